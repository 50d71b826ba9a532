"""MiB and PLOP as presets, through the trainer (issue 18, trainer part): the 3-step runs and their outputs, PLOP's
per-step pass (once per step >= 1, in the in-step checkpoint, never repeated by a resumed step), the step 0 the two
share and the MBS family does not, and the background transfer each preset asks for.

The runs use the tiny synthetic setup of tests/helpers.py (``run_options``) at output stride 8, beside the session's
MBS run (``finished_run``).
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.helpers import (ROOT, STEPS_3, assert_clean_user_error, assert_same_finished_step, describe,
                           event_files, file_set, kill_when, main_argv, main_command, run, run_in_process, run_options,
                           scalars)

PASS_LOGGED = "PLOP's entropy thresholds from one pass of the old model"
# POD slices every map into 4 x 4 regions (spec 2.2): at 32 px the tiny runs need output stride 8 (4 x 4 maps)
POD_SIZED = ["model.output_stride=8"]


def pass_lines(text: str, step: int) -> list[str]:
    return [line for line in text.splitlines() if f"step {step}: {PASS_LOGGED}" in line]


# ------------------------------------------------------------------ fast: what each preset asks of the trainer
def test_step0_recipe_holds_ce_all_pixels_only_when_it_is_on(monkeypatch):
    from datasets.tasks import get_task
    from trainer import step0_reuse
    from utils.config import load_config
    monkeypatch.setattr(step0_reuse, "training_data_identity", lambda cfg: "the same training data")
    task = get_task("voc", "15-1")

    def recipe(*overrides):
        return step0_reuse.step0_recipe(load_config(ROOT / "configs" / "voc.yaml", list(overrides)), task)

    mbs = recipe()
    # the MBS family's recipe is the one every step0.pt written before the switch holds: no method section
    assert "method" not in mbs and mbs == recipe("method.name=baseline") == recipe("method.name=finetune")
    assert recipe("method.name=mib", "method.ce_all_pixels=false") == mbs
    mib = recipe("method.name=mib")
    assert mib["method"] == {"ce_all_pixels": True}
    assert mib == recipe("method.name=plop") == recipe("method.ce_all_pixels=true")
    assert step0_reuse.recipe_differences(mbs, mib) == ["method.ce_all_pixels: None here vs True there"]


@pytest.mark.parametrize("name", ["mib", "plop"])
def test_mib_and_plop_transfer_background_balanced(name):
    """prepare_model calls the transfer with balanced=switches.balanced_init (MiB's init_balanced, spec 1.4)."""
    from models.deeplab import DeepLabV3
    from trainer.methods import build_method
    from utils.config import load_config
    torch.manual_seed(0)
    model = DeepLabV3([15, 3], "resnet18", "none", 16, head_channels=16)
    background_weight = model.classifiers[0].weight[0].clone()
    background_bias = model.classifiers[0].bias[0].clone()
    build_method(load_config(None, [f"method.name={name}"]).method, "voc", num_old=15, num_classes=18
                 ).prepare_model(model)
    lowered = background_bias - math.log(3 + 1)
    assert torch.equal(model.classifiers[1].weight, background_weight.expand_as(model.classifiers[1].weight))
    torch.testing.assert_close(model.classifiers[1].bias, lowered.expand(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.classifiers[0].bias[0], lowered, rtol=0, atol=1e-6)  # background's too


# ------------------------------------------------------------------ slow: 3-step runs through main.py
@pytest.fixture(scope="module")
def baseline_runs(finished_run, data_root, runs_dir):
    """MiB then PLOP on the MBS run's task (15 + 3 + 3 classes, 3 iterations per step, output stride 8), both
    with train.step0_checkpoint=auto: MiB trains step 0, PLOP takes MiB's."""
    runs = {}
    for name in ("mib", "plop"):
        options = run_options(data_root, runs_dir, f"{name}_e2e") + POD_SIZED + [f"method.name={name}",
                                                                                 "train.step0_checkpoint=auto"]
        result = run(main_command(options))
        assert result.returncode == 0, describe(result)
        runs[name] = runs_dir / f"{name}_e2e", options, result
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name,distilled", [("mib", "output_distill"), ("plop", "feature_distill")])
def test_mib_and_plop_run_three_steps_and_write_every_output(baseline_runs, finished_run, name, distilled):
    run_dir, _, result = baseline_runs[name]
    assert "Traceback" not in result.stderr
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step0.pt", "step1.pt", "step2.pt"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["meta"]["method"].startswith(f"{name} (") and "balanced_init" in results["meta"]["method"]
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    assert all(s["iterations"] == 3 and 0.0 <= s["miou_all"] <= 1.0 for s in results["steps"])
    table = (run_dir / "results.md").read_text()
    assert all(f"\n| {step} | " in table for step in range(3))
    assert file_set(run_dir) == file_set(finished_run[0])  # every output the MBS run writes, and nothing else

    tags = scalars(next(iter(event_files(run_dir))))
    for step in (1, 2):
        assert tags[f"step{step}/loss/ce"] == [1, 2, 3] and tags[f"step{step}/loss/{distilled}"] == [1, 2, 3]
    other = {"mib": "feature_distill", "plop": "output_distill"}[name]  # PLOP has no output distillation
    assert not any(tag.endswith((f"loss/{other}", "loss/ortho")) for tag in tags)

    # PLOP's pass: once per step >= 1, never at step 0; MiB has none
    log = (run_dir / "log.txt").read_text()
    expected_passes = 1 if name == "plop" else 0
    assert [len(pass_lines(log, step)) for step in range(3)] == [0, expected_passes, expected_passes]
    if name == "plop":
        assert "of the 15 old classes" in pass_lines(log, 1)[0] and "of the 18 old classes" in pass_lines(log, 2)[0]


@pytest.mark.slow
def test_mib_and_plop_share_step0_and_mbs_keeps_its_own(baseline_runs, finished_run, data_root, runs_dir, tmp_path,
                                                        capsys):
    from datasets.tasks import get_task
    from trainer.step0_reuse import find_reusable_step0
    from utils.config import load_config
    from utils.run_folder import RunFolder
    mbs_step0 = finished_run[0] / "checkpoints" / "step0.pt"
    mib_dir, _, mib_result = baseline_runs["mib"]
    mib_step0 = mib_dir / "checkpoints" / "step0.pt"
    # auto: MiB skipped the MBS run's step 0 (labelled-pixel mean) and trained its own; PLOP reused MiB's
    assert "step 0: trained" in mib_result.stdout and "step 0: reusing" not in mib_result.stdout
    plop_dir, _, plop_result = baseline_runs["plop"]
    assert f"step 0: reusing {mib_step0}" in plop_result.stdout and "step 0: trained" not in plop_result.stdout
    mbs_saved = torch.load(mbs_step0, map_location="cpu", weights_only=True)
    mib_saved = torch.load(mib_step0, map_location="cpu", weights_only=True)
    assert "method" not in mbs_saved["step0_recipe"] and mib_saved["step0_recipe"]["method"] == {"ce_all_pixels": True}
    assert json.loads((plop_dir / "results.json").read_text())["steps"][0]["reused_from"] == str(mib_step0)

    # auto beside one step0.pt, the runs' model otherwise: the MBS family takes the step0.pt without the new
    # key (as every step0.pt written before it), never MiB's; MiB and PLOP take MiB's, never the MBS family's
    task = get_task("voc", "probe", STEPS_3)
    for source, model, takes in ((mib_step0, POD_SIZED, {"mib": True, "plop": True, "mbs": False, "finetune": False}),
                                 (mbs_step0, [], {"mib": False, "plop": False, "mbs": True, "baseline": True})):
        output_dir = tmp_path / source.parent.parent.name
        (output_dir / "trained" / "checkpoints").mkdir(parents=True)
        shutil.copy(source, output_dir / "trained" / "checkpoints" / "step0.pt")
        for method, reused in takes.items():
            cfg = load_config(ROOT / "configs" / "demo.yaml",
                              run_options(data_root, output_dir, "probe") + model + [f"method.name={method}",
                                                                                     "train.step0_checkpoint=auto"])
            found = find_reusable_step0(cfg, task, RunFolder(output_dir / "probe"))
            assert (found == output_dir / "trained" / "checkpoints" / "step0.pt") is reused, (source, method)

    # naming the other family's step0.pt is refused, naming the key
    options = run_options(data_root, runs_dir, "mbs_from_mib") + POD_SIZED + [f"train.step0_checkpoint={mib_step0}"]
    line = assert_clean_user_error(run_in_process(main_argv(options), capsys))
    assert "method.ce_all_pixels: None here vs True there" in line and str(mib_step0) in line


@pytest.mark.slow
def test_a_run_folder_saved_with_lambda_written_out_resumes_through_main(finished_run, data_root, runs_dir, capsys):
    """A finished run of the previous version (``output_distill_weight: 25.0`` in config.yaml and in every
    checkpoint's record, none of the new keys) continues with --resume; a real change of lambda is refused."""
    import yaml

    from tests.test_bad_input import as_saved_before_the_baselines
    from utils.checkpoint import save_atomic
    run_dir = runs_dir / "old_format"
    shutil.copytree(finished_run[0], run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["name"] = "old_format"
    config["method"] = as_saved_before_the_baselines(config["method"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for checkpoint in sorted((run_dir / "checkpoints").glob("step*.pt")):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        saved["config"]["method"] = as_saved_before_the_baselines(saved["config"]["method"])
        save_atomic(saved, checkpoint)

    options = run_options(data_root, runs_dir, "old_format")
    result = run_in_process(main_argv(options, "--resume"), capsys)
    assert result.returncode == 0, describe(result)
    assert all(f"step {step} is finished" in result.stdout for step in range(3)), describe(result)
    changed = run_in_process(main_argv(options + ["method.output_distill_weight=10"], "--resume"), capsys)
    assert "method.output_distill_weight: 25.0 (saved) vs 10.0 (now)" in assert_clean_user_error(changed)


# ------------------------------------------------------------------ slow: kill PLOP mid-step, resume
def partial_iteration(path) -> int:
    """The iteration an in-step checkpoint was written at (-1 while there is none)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["train_state"]["iteration"]
    except (FileNotFoundError, EOFError, RuntimeError):  # not there yet (written atomically: never half)
        return -1


@pytest.mark.slow
def test_plop_killed_mid_step_resumes_without_a_second_pass_and_bit_identical(data_root, runs_dir):
    # Steps 0 and 1 train on the few images showing class 1 / class 2; step 2 runs its pass, then trains on
    # almost every image (capped at 10 iterations, an in-step checkpoint every 2).
    steps = [[0, 1], [2], list(range(3, 21))]
    total = 10
    train = dict(steps=steps, epochs=1, epochs_incremental=1, max_iters_per_step=total, checkpoint_interval=2)
    options = run_options(data_root, runs_dir, "plop_resume", **train) + POD_SIZED + ["method.name=plop"]
    run_dir = runs_dir / "plop_resume"
    checkpoints = run_dir / "checkpoints"
    partial = checkpoints / "step2_partial.pt"

    first_log = run_dir.parent / "plop_resume_first_session.txt"
    # the pass writes the in-step checkpoint at iteration 0; wait for one written by training
    kill_when(main_command(options), first_log, lambda: partial_iteration(partial) > 0,
              "step 2 trained past its first in-step checkpoint")
    if (checkpoints / "step2.pt").exists():
        pytest.fail("precondition: the run was to be killed inside step 2, but step2.pt exists already")
    saved = torch.load(partial, map_location="cpu", weights_only=True)
    killed_at = saved["train_state"]["iteration"]
    assert 0 < killed_at < total
    # the in-step checkpoint holds the thresholds, one per class of step 2
    thresholds = saved["method"]["thresholds"]
    assert thresholds.dtype == torch.float32 and thresholds.shape == (21,)
    first_session = first_log.read_text()
    assert [len(pass_lines(first_session, step)) for step in range(3)] == [0, 1, 1]

    events_before = event_files(run_dir)
    result = run(main_command(options, "--resume"))
    assert result.returncode == 0, describe(result)
    assert f"step 2: resuming from {partial} (epoch 1, iteration {killed_at})" in result.stdout, describe(result)
    assert PASS_LOGGED not in result.stdout  # the pass is not repeated
    assert "step 2: PLOP's entropy thresholds restored from the in-step checkpoint" in result.stdout
    tags = scalars(next(iter(event_files(run_dir) - events_before)))
    assert tags["step2/loss/total"] == list(range(killed_at + 1, total + 1))

    reference = run(main_command(run_options(data_root, runs_dir, "plop_resume_reference", **train) + POD_SIZED
                                 + ["method.name=plop"]))
    assert reference.returncode == 0, describe(reference)
    assert [len(pass_lines(reference.stdout, step)) for step in range(3)] == [0, 1, 1]
    assert_same_finished_step(checkpoints / "step2.pt",
                              runs_dir / "plop_resume_reference" / "checkpoints" / "step2.pt")
