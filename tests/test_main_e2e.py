"""End-to-end tests of the incremental trainer, run through ``main.py`` as a user would.

Every run uses a tiny synthetic dataset (60 train / 20 val images of 32 px, generated
once per session), a ResNet-18 DeepLab with a 16-channel head and a few iterations per
step, so the whole file stays around a minute on two CPU cores. Subprocesses run with
one intra-op thread: on a shared two-core machine, two spinning OpenMP threads per
process make a training iteration many times slower, not faster.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.helpers import (ROOT, STEPS_3, RUN_TIMEOUT, assert_clean_user_error, assert_same_finished_step, describe,
                           event_files, file_set, kill_when, main_argv, main_command, on_two_gloo_ranks, run,
                           run_in_process, run_options, scalars, sha256, subprocess_env)


# ------------------------------------------------------------------ 1. end to end
@pytest.mark.slow
def test_three_step_run_writes_every_output(finished_run, data_root):
    from datasets.synthetic import CLASS_NAMES
    run_dir, _, result = finished_run
    assert "Traceback" not in result.stderr

    # exactly the finished steps' checkpoints: no in-step, best-of-step or temporary file left behind
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step0.pt", "step1.pt", "step2.pt"]
    previous_backbone = None
    for step in range(3):
        saved = torch.load(checkpoints / f"step{step}.pt", map_location="cpu", weights_only=True)
        assert {"model", "config", "metrics", "task"} <= saved.keys()
        # the optimiser's state is the in-step checkpoint's business: nothing reads it once a step is finished
        assert "optimizer" not in saved and "scaler" not in saved
        assert saved["step"] == step and saved["metrics"]["step"] == step
        assert saved["config"]["data"]["root"] == str(data_root)
        assert saved["config"]["data"]["custom_steps"] == STEPS_3 == saved["task"]
        # the model grows by one classifier per step, sized like the step's classes
        model = saved["model"]
        for j in range(step + 1):
            assert model[f"classifiers.{j}.weight"].shape[:2] == (len(STEPS_3[j]), 16)
        assert f"classifiers.{step + 1}.weight" not in model
        # every step trained: the backbone moved away from the previous step's
        backbone = model["backbone.stem.0.weight"]
        if previous_backbone is not None:
            assert not torch.equal(backbone, previous_backbone)
        previous_backbone = backbone

    # results: three steps with the three means, a protocol section, and the markdown table
    results = json.loads((run_dir / "results.json").read_text())
    assert {"task", "method", "checkpoint_policy", "eval_mode", "processes"} <= results["meta"].keys()
    assert results["meta"]["checkpoint_policy"] == "last" and results["meta"]["processes"] == 1
    assert results["meta"]["runtime"]["precision"] == "fp32" and results["meta"]["runtime"]["world_size"] == 1
    assert results["meta"]["method"].startswith("mbs")
    steps = results["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert {"miou_old", "miou_new", "miou_all"} <= s.keys()
        assert s["iterations"] == 3 and s["skipped_steps"] == 0 and s["nonfinite_losses"] == 0
        assert 0.0 <= s["miou_all"] <= 1.0 and 0.0 <= s["miou_old"] <= 1.0
        assert len(s["iou"]) == sum(len(c) for c in STEPS_3[: s["step"] + 1])
        assert s["step_classes"] == [CLASS_NAMES[c] for c in STEPS_3[s["step"]]]
    assert steps[0]["miou_new"] is None  # nothing is new at step 0
    assert all(0.0 <= s["miou_new"] <= 1.0 for s in steps[1:])
    for step in range(3):  # results.json and the checkpoints agree
        saved = torch.load(checkpoints / f"step{step}.pt", map_location="cpu", weights_only=True)
        assert saved["metrics"]["miou_all"] == steps[step]["miou_all"]
    table = (run_dir / "results.md").read_text()
    assert "| step |" in table
    for step in range(3):
        assert f"\n| {step} | " in table

    # the resolved config, the log and tensorboard
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["name"] == "e2e" and config["data"]["custom_steps"] == STEPS_3
    assert config["train"]["max_iters_per_step"] == 3
    log = (run_dir / "log.txt").read_text()
    for step in range(3):
        assert f"step {step}: trained 3 iterations" in log and f"step {step} test: mIoU" in log
    events = event_files(run_dir)
    assert len(events) == 1
    tags = scalars(next(iter(events)))
    for step in range(3):
        assert tags[f"step{step}/loss/total"] == [1, 2, 3]
    assert tags["test/miou_all"] == [0, 1, 2]
    # MBS distils from the old model from step 1 on, never at step 0
    assert "step0/loss/output_distill" not in tags
    assert "step1/loss/output_distill" in tags and "step2/loss/feature_distill" in tags

    assert file_set(run_dir) == {"config.yaml", "log.txt", "results.json", "results.md", "run.lock",
                                 "checkpoints/step0.pt", "checkpoints/step1.pt", "checkpoints/step2.pt",
                                 "tensorboard/events.out.tfevents.*"}


# ------------------------------------------------------------------ 2. resume after a kill
@pytest.mark.slow
def test_killed_run_resumes_without_retraining(data_root, runs_dir, finished_run):
    # Steps 0 and 1 train on the few images showing class 1 / class 2 (1-2 iterations),
    # step 2 on almost all of them (capped at 8 iterations, an in-step checkpoint every 2).
    steps = [[0, 1], [2], list(range(3, 21))]
    total = 8
    options = run_options(data_root, runs_dir, "resume", steps=steps, epochs=1, epochs_incremental=1,
                          max_iters_per_step=total, checkpoint_interval=2)
    run_dir = runs_dir / "resume"
    checkpoints = run_dir / "checkpoints"
    partial = checkpoints / "step2_partial.pt"

    kill_when(main_command(options), run_dir.parent / "resume_first_session.txt", partial.exists,
              f"step 2 wrote {partial}")
    if (checkpoints / "step2.pt").exists():
        pytest.fail("precondition: the run was to be killed inside step 2, but step2.pt exists already "
                    "(step 2 finished before the kill; give it more iterations)")
    killed_at = torch.load(partial, map_location="cpu", weights_only=True)["train_state"]["iteration"]
    if not 0 < killed_at < total:
        pytest.fail(f"precondition: the in-step checkpoint should be from inside step 2, it is at {killed_at}")
    hashes = {name: sha256(checkpoints / name) for name in ("step0.pt", "step1.pt")}
    events_before = event_files(run_dir)
    # what a kill can leave besides: a temporary file of a write cut short, and an in-step
    # checkpoint of a step that was finished (killed between writing step0.pt and removing it)
    (checkpoints / ".step2_partial.pt.999999.tmp").write_bytes(b"half a checkpoint")
    (checkpoints / "step0_partial.pt").write_bytes(b"stale")

    result = run(main_command(options, "--resume"))
    assert result.returncode == 0, describe(result)
    out = result.stdout
    for step in (0, 1):
        assert f"step {step} is finished" in out and "not retraining" in out, describe(result)
        assert f"step {step}: trained" not in out
        assert sha256(checkpoints / f"step{step}.pt") == hashes[f"step{step}.pt"], f"step{step}.pt was rewritten"
    assert f"step 2: resuming from {partial} (epoch 1, iteration {killed_at})" in out, describe(result)
    assert f"step 2: trained {total} iterations" in out

    # the resumed session trained exactly the iterations left, starting after the saved one
    new_events = event_files(run_dir) - events_before
    assert len(new_events) == 1
    tags = scalars(next(iter(new_events)))
    assert tags["step2/loss/total"] == list(range(killed_at + 1, total + 1))
    assert not any(tag.startswith(("step0/", "step1/")) for tag in tags)

    results = json.loads((run_dir / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    assert results["steps"][2]["iterations"] == total
    assert (run_dir / "results.md").is_file()
    # the same files as an uninterrupted run: no in-step, stale or temporary file left behind
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step0.pt", "step1.pt", "step2.pt"]
    assert file_set(run_dir) == file_set(finished_run[0])

    # and the same numbers: the resumed step saw the same augmented batches and dropout masks
    reference = run(main_command(run_options(data_root, runs_dir, "resume_reference", steps=steps, epochs=1,
                                             epochs_incremental=1, max_iters_per_step=total,
                                             checkpoint_interval=2)))
    assert reference.returncode == 0, describe(reference)
    assert_same_finished_step(checkpoints / "step2.pt", runs_dir / "resume_reference" / "checkpoints" / "step2.pt")


# ------------------------------------------------------------------ 3. distributed (gloo, 2 processes)
def torchrun_command(options: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
            "--config", "configs/demo.yaml", "--opt", *options]


@pytest.mark.slow
def test_two_process_run(data_root, runs_dir):
    steps = [list(range(15)), list(range(15, 21))]
    options = run_options(data_root, runs_dir, "dist", steps=steps, max_iters_per_step=2)
    result = run(torchrun_command(options))
    assert result.returncode == 0, describe(result)
    assert "terminate called" not in result.stderr, describe(result)
    run_dir = runs_dir / "dist"
    results = json.loads((run_dir / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [0, 1]
    assert results["meta"]["processes"] == 2
    runtime = results["meta"]["runtime"]  # what ran
    assert runtime["world_size"] == 2 and runtime["backend"] == "gloo" and runtime["sync_bn"] is False
    assert runtime["device"] == "cpu" and runtime["precision"] == "fp32" and runtime["compile"] is False
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step0.pt", "step1.pt"]
    log = (run_dir / "log.txt").read_text()
    assert log.count("batch 4 (2 per process x 2 processes)") == 2
    assert log.count("runtime: cpu; torch ") == 1 and "; 2 processes (gloo); synchronised batch norm off" in log
    assert not list(run_dir.glob(".ranks_*"))  # the shared-folder token is gone
    assert len(event_files(run_dir)) == 1  # only rank 0 writes tensorboard


def test_train_batch_is_split_over_ranks():
    from torch.utils.data import TensorDataset

    from trainer.loaders import train_loader
    from utils.distributed import DistContext

    dataset = TensorDataset(torch.arange(10))

    def batches(rank: int, world_size: int, global_batch: int = 4) -> list[list[int]]:
        ctx = DistContext(rank=rank, world_size=world_size)
        per_epoch = 10 // global_batch
        loader = train_loader(dataset, global_batch, ctx, seed=3, iterations_per_epoch=per_epoch,
                              total_iterations=2 * per_epoch, num_workers=0, start_iteration=per_epoch)
        return [b[0].tolist() for b in loader]  # the second epoch

    single, rank0, rank1 = batches(0, 1), batches(0, 2), batches(1, 2)
    assert len(single) == len(rank0) == len(rank1) == 10 // 4
    for whole, first, second in zip(single, rank0, rank1):
        assert len(first) == len(second) == 2
        assert not set(first) & set(second)
        assert sorted(first + second) == sorted(whole)  # the two halves of the same global batch
    with pytest.raises(ValueError, match="batch_size=5 is not divisible"):
        train_loader(dataset, 5, DistContext(rank=0, world_size=2), seed=3, iterations_per_epoch=2,
                     total_iterations=2, num_workers=0)


def test_trainer_refuses_indivisible_batch_before_any_work(tmp_path):
    """Checked when the trainer is built, identically on every rank (so all stop with the same
    one-line error and leave through cleanup together), before any file is written."""
    from trainer.incremental import IncrementalTrainer
    from utils.config import ConfigError, load_config
    from utils.distributed import DistContext
    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", "train.batch_size=5"])
    with pytest.raises(ConfigError, match=r"train.batch_size=5 .*divisible by their number \(2\)"):
        IncrementalTrainer(cfg, DistContext(rank=1, world_size=2))
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ 4. eval-only and user errors
# The error paths run main.main() in-process (see run_in_process); bad keys go through a real
# subprocess (cheap: main.py reports them before importing torch) to show the exit code and output.
@pytest.mark.slow
def test_eval_only_prints_the_step_table(finished_run, capsys):
    run_dir, options, _ = finished_run
    hashes = {p.name: sha256(p) for p in (run_dir / "checkpoints").iterdir()}
    events = event_files(run_dir)
    result = run_in_process(main_argv(options, "--eval-only", "--step", "1"), capsys)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert any(line.startswith("| step |") for line in lines), describe(result)
    rows = [line for line in lines if line.startswith("| 1 | ")]
    assert len(rows) == 1, describe(result)
    # the same checkpoint on the same images: the numbers the run reported for step 1
    step1 = json.loads((run_dir / "results.json").read_text())["steps"][1]
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[2:5] == [f"{100 * step1[k]:.2f}" for k in ("miou_old", "miou_new", "miou_all")]
    # evaluation leaves the run folder alone
    assert {p.name: sha256(p) for p in (run_dir / "checkpoints").iterdir()} == hashes
    assert event_files(run_dir) == events


def test_eval_only_without_checkpoints_names_the_missing_file(data_root, runs_dir, capsys):
    options = run_options(data_root, runs_dir, "never_trained")
    result = run_in_process(main_argv(options, "--eval-only"), capsys)
    line = assert_clean_user_error(result)
    assert str(runs_dir / "never_trained" / "checkpoints" / "step2.pt") in line  # default: the last step
    assert not (runs_dir / "never_trained").exists()  # eval-only creates nothing


@pytest.mark.slow
def test_second_start_without_resume_is_refused(finished_run, capsys):
    run_dir, options, _ = finished_run
    hashes = {p.name: sha256(p) for p in (run_dir / "checkpoints").iterdir()}
    events = event_files(run_dir)
    results = (run_dir / "results.json").read_text()
    result = run_in_process(main_argv(options), capsys)
    line = assert_clean_user_error(result)
    assert "already holds checkpoints" in line and "--resume" in line
    assert {p.name: sha256(p) for p in (run_dir / "checkpoints").iterdir()} == hashes
    assert event_files(run_dir) == events and (run_dir / "results.json").read_text() == results


@pytest.mark.slow
def test_bad_override_key_is_named(data_root, runs_dir):
    result = run(main_command(run_options(data_root, runs_dir, "bad_key") + ["train.learning_rate=0.1"]))
    line = assert_clean_user_error(result)
    assert "train.learning_rate" in line
    assert not (runs_dir / "bad_key").exists()


def test_wrong_data_layout_names_the_expected_folder(runs_dir, tmp_path, capsys):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    options = run_options(empty, runs_dir, "bad_layout") + ["data.synthetic.enabled=false"]
    result = run_in_process(main_argv(options), capsys)
    line = assert_clean_user_error(result)
    assert str(empty / "VOCdevkit" / "VOC2012" / "JPEGImages") in line
    assert not any(empty.iterdir())  # nothing generated or cached in a root that is not synthetic


# ------------------------------------------------------------------ 5. weight transfer is the method's choice
def _method(name: str, *overrides: str):
    from trainer.methods import build_method
    from utils.config import load_config
    cfg = load_config(None, [f"method.name={name}", *overrides])
    return build_method(cfg.method, cfg.data.dataset, num_old=15, num_classes=18)


@pytest.mark.parametrize("name,overrides,transfers", [
    ("mbs", (), True),
    ("baseline", (), True),
    ("finetune", (), False),
    ("mbs", ("method.weight_transfer=false",), False),
])
def test_only_methods_with_weight_transfer_copy_background(name, overrides, transfers):
    from models.deeplab import DeepLabV3
    torch.manual_seed(0)
    model = DeepLabV3([15, 3], "resnet18", "none", 16, head_channels=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    background_weight, background_bias = model.classifiers[0].weight[0].clone(), model.classifiers[0].bias[0].clone()
    assert not torch.equal(model.classifiers[1].weight[0], background_weight)  # not equal by chance

    _method(name, *overrides).prepare_model(model)

    new_weight, new_bias = model.classifiers[1].weight, model.classifiers[1].bias
    if transfers:
        for k in range(3):
            assert torch.equal(new_weight[k], background_weight) and new_bias[k] == background_bias
    else:
        assert torch.equal(new_weight, before["classifiers.1.weight"])
        assert torch.equal(new_bias, before["classifiers.1.bias"])
    # nothing else changes, either way
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("classifiers.1."))


def test_step_zero_never_transfers():
    from models.deeplab import DeepLabV3
    from trainer.methods import build_method
    from utils.config import load_config
    model = DeepLabV3([15], "resnet18", "none", 16, head_channels=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method(load_config(None, ["method.name=mbs"]).method, "voc", num_old=0, num_classes=15)
    method.prepare_model(model)  # a one-classifier model would raise if it tried
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("root_is_the_dataset_folder", [False, True])
def test_ade_class_names_read_from_object_info_and_made_unique(tmp_path, root_is_the_dataset_folder):
    from datasets.classes import class_names
    from datasets.tasks import get_task

    base = tmp_path / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (base / sub).mkdir(parents=True)
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    rows += [f"{k}\t0.01\t10\t1\t{'plant;flora' if k in (17, 66) else f'name{k};alias'}" for k in range(1, 151)]
    (base / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    # data.root may be the folder holding ADEChallengeData2016/ or that folder itself (datasets/layout.py)
    names = class_names(get_task("ade", "100-50"), base if root_is_the_dataset_folder else tmp_path)
    assert len(names) == 151 and len(set(names)) == 151
    assert names[0] == "other" and names[1] == "name1" and names[150] == "name150"
    assert names[17] == "plant_17" and names[66] == "plant_66"  # a repeated short name gets its class id


def test_a_bug_keeps_its_traceback(data_root, runs_dir, monkeypatch, capsys):
    """Only bad input (a UserError) becomes a one-line error; a ValueError from the code itself, say a shape
    bug in a loss, must surface with its traceback instead of passing for bad input."""
    from trainer.incremental import IncrementalTrainer

    def shape_bug(self):
        raise ValueError("labels (2, 8, 8) do not match logits (2, 5, 4, 4)")

    monkeypatch.setattr(IncrementalTrainer, "run", shape_bug)
    with pytest.raises(ValueError, match="do not match logits"):
        run_in_process(main_argv(run_options(data_root, runs_dir, "bug")), capsys)


# ------------------------------------------------------------------ 6. SIGTERM / SIGINT: stop, save, resume
@pytest.mark.slow
def test_sigterm_mid_step_saves_and_resume_redoes_nothing(data_root, runs_dir):
    """Pre-emption sends SIGTERM to every process of the job (loader workers too): the run finishes the
    iteration, writes the in-step checkpoint, exits 143 with one line saying how to resume; the resumed run
    trains only the iterations left and ends bit-identical to an uninterrupted run."""
    steps = [[0, 1], [2], list(range(3, 21))]
    total = 30  # step 2: 15 iterations per epoch, 2 epochs
    options = run_options(data_root, runs_dir, "sigterm", steps=steps, epochs=1, epochs_incremental=2,
                          max_iters_per_step=total, checkpoint_interval=100) + ["data.num_workers=1"]
    run_dir = runs_dir / "sigterm"
    first_log = run_dir.parent / "sigterm_first_session.txt"
    with open(first_log, "w") as output:
        process = subprocess.Popen(main_command(options), cwd=ROOT, env=subprocess_env(), stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            # 3 of 30 done: tqdm's bar may skip a count (it updates n in batches), so read the count, not a text
            while max(map(int, re.findall(r"step2 epoch 1: .*?\| (\d+)/30", first_log.read_text(errors="replace"))),
                      default=0) < 3:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the run never reached step 2 iteration 3:\n{first_log.read_text()[-3000:]}")
                time.sleep(0.02)
            os.killpg(process.pid, signal.SIGTERM)  # the whole process group, as a scheduler does
            code = process.wait(timeout=RUN_TIMEOUT)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    text = first_log.read_text(errors="replace")
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and "SIGTERM received: stopped after iteration" in lines[0] and "--resume" in lines[0]
    stopped_at = int(lines[0].split("stopped after iteration ")[1].split()[0])
    partial = run_dir / "checkpoints" / "step2_partial.pt"
    saved = torch.load(partial, map_location="cpu", weights_only=True)
    assert saved["train_state"]["iteration"] == stopped_at and 3 <= stopped_at < total
    assert not (run_dir / "checkpoints" / "step2.pt").exists()

    events_before = event_files(run_dir)
    result = run(main_command(options, "--resume"))
    assert result.returncode == 0, describe(result)
    assert f"step 2: resuming from {partial} (epoch 1, iteration {stopped_at})" in result.stdout, describe(result)
    new_events = event_files(run_dir) - events_before
    tags = scalars(next(iter(new_events)))
    assert tags["step2/loss/total"] == list(range(stopped_at + 1, total + 1))  # no iteration done twice

    reference = run(main_command(run_options(data_root, runs_dir, "sigterm_reference", steps=steps, epochs=1,
                                             epochs_incremental=2, max_iters_per_step=total,
                                             checkpoint_interval=100) + ["data.num_workers=1"]))
    assert reference.returncode == 0, describe(reference)
    assert_same_finished_step(run_dir / "checkpoints" / "step2.pt",
                              runs_dir / "sigterm_reference" / "checkpoints" / "step2.pt")


def _agree_on_stop(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist

    from utils.distributed import StopRequest
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        with StopRequest() as stop:
            first = stop.agreed()           # nobody was signalled yet
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)   # only rank 1 is signalled
                time.sleep(0.1)             # let Python run the handler
            second = stop.agreed()
        results[rank] = (first, second, stop.signum)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_a_stop_signal_any_rank_received():
    results = on_two_gloo_ranks(_agree_on_stop)
    assert results == {0: (False, True, signal.SIGTERM), 1: (False, True, signal.SIGTERM)}


# ------------------------------------------------------------------ 7. step 0 trained once per family
@pytest.mark.slow
def test_second_task_reuses_the_first_tasks_step0(finished_run, data_root, runs_dir, capsys):
    """e2e (15 + 3 + 3 classes, MBS) finished step 0; a 15 + 6 task of another method has the same step 0
    (same classes, images, model, recipe and seed; step 0 is cross-entropy alone for every method)."""
    source = finished_run[0] / "checkpoints" / "step0.pt"
    steps = [list(range(15)), list(range(15, 21))]
    options = run_options(data_root, runs_dir, "reuse", steps=steps) + ["method.name=finetune",
                                                                         "train.step0_checkpoint=auto"]
    result = run_in_process(main_argv(options), capsys)
    assert result.returncode == 0, describe(result)
    assert f"step 0: reusing {source}" in result.stdout and "step 0: trained" not in result.stdout
    assert "step 1: trained" in result.stdout
    reused = torch.load(runs_dir / "reuse" / "checkpoints" / "step0.pt", map_location="cpu", weights_only=True)
    original = torch.load(source, map_location="cpu", weights_only=True)
    assert reused["model"].keys() == original["model"].keys()
    assert all(torch.equal(reused["model"][k], v) for k, v in original["model"].items())
    assert reused["step0_recipe_hash"] == original["step0_recipe_hash"]
    step0 = json.loads((runs_dir / "reuse" / "results.json").read_text())["steps"][0]
    assert step0["reused_from"] == str(source) and f"reused from {source}" in step0["checkpoint"]
    assert step0["miou_all"] == original["metrics"]["miou_all"]  # the same weights on the same val images

    # a reuse of that reuse names the run that trained step 0, once
    again = run_options(data_root, runs_dir, "reuse_again", steps=steps) + [
        "method.name=finetune", f"train.step0_checkpoint={runs_dir / 'reuse' / 'checkpoints' / 'step0.pt'}"]
    assert run_in_process(main_argv(again), capsys).returncode == 0
    step0 = json.loads((runs_dir / "reuse_again" / "results.json").read_text())["steps"][0]
    assert step0["reused_from"] == str(source) and step0["checkpoint"].count("reused from") == 1

    # another step-0 recipe (a learning rate) is refused by name when the checkpoint is named explicitly
    changed = run_options(data_root, runs_dir, "reuse_changed", steps=steps) + [
        "train.lr=0.123", f"train.step0_checkpoint={source}"]
    line = assert_clean_user_error(run_in_process(main_argv(changed), capsys))
    assert "train.lr: 0.123 here vs" in line and str(source) in line
    assert not (runs_dir / "reuse_changed" / "checkpoints").exists()


@pytest.mark.slow
def test_auto_reuse_skips_other_recipes(finished_run, data_root, runs_dir):
    from datasets.tasks import get_task
    from trainer.step0_reuse import find_reusable_step0
    from utils.config import load_config
    from utils.run_folder import RunFolder
    base = run_options(data_root, runs_dir, "probe") + ["train.step0_checkpoint=auto"]
    task = get_task("voc", "probe", [list(range(15)), list(range(15, 21))])
    same = load_config(ROOT / "configs/demo.yaml", base)
    assert find_reusable_step0(same, task, RunFolder(runs_dir / "probe")) == finished_run[0] / "checkpoints" / "step0.pt"
    for change in ("seed=1", "data.setting=disjoint", "model.head_channels=8", "train.epochs=2"):
        other = load_config(ROOT / "configs/demo.yaml", base + [change])
        assert find_reusable_step0(other, task, RunFolder(runs_dir / "probe")) is None, change
    other_classes = get_task("voc", "probe", [list(range(14)), list(range(14, 21))])
    assert find_reusable_step0(same, other_classes, RunFolder(runs_dir / "probe")) is None


def test_deeplab_refuses_one_image_per_process(tmp_path):
    """The ASPP image-pooling branch normalises a (B, C, 1, 1) tensor: one image would fail in the first
    iteration with a torch traceback; it is refused up front, naming the key."""
    from trainer.incremental import IncrementalTrainer
    from utils.config import ConfigError, load_config
    from utils.distributed import DistContext
    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", "train.batch_size=2"])
    with pytest.raises(ConfigError, match=r"train.batch_size=2 leaves one image per process"):
        IncrementalTrainer(cfg, DistContext(rank=0, world_size=2))
    IncrementalTrainer(cfg, DistContext(rank=0, world_size=1))  # two images in one process train
