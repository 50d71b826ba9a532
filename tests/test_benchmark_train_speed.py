"""python -m benchmarks.train_speed in its CI size: it runs the trainer's path on a CPU and prints JSON with the
measured and projected numbers (no timing is checked: only that every number is there and positive)."""
import json
import subprocess
import sys

import pytest

from benchmarks import train_speed
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

ARCHS = ("deeplabv3", "segmenter")


@pytest.fixture(scope="module")
def report():
    """The CI-size command, as a user runs it (each configuration in a process of its own)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.train_speed", "--small", "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def small_spec(arch: str) -> dict:
    """What the command line gives a worker with --small (the diagnostics run here, in this process)."""
    return {"arch": arch, "device": "cpu", "small": True, "size": 64, "batch": 2, "val_batch": 2, "iters": 2,
            "warmup": 1, "amp": None, "repetitions": 1}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def check_speed(measurement: dict, batch: int) -> None:
    assert measurement["batch"] == batch and measurement["iterations_timed"] == 2
    seconds = measurement["s_per_iteration"]
    assert len(seconds["all"]) == 2 and all(positive(s) for s in seconds["all"])
    assert seconds["min"] <= seconds["median"] <= seconds["max"]
    assert positive(measurement["images_per_s"]["median"]) and positive(measurement["images_per_s"]["min"])


@pytest.mark.parametrize("arch", ARCHS)
def test_training_steps_are_measured_through_the_trainer(report, arch):
    measured = report["measured"][arch]
    step0, incremental = measured["step0"], measured["incremental_mbs"]["train"]
    assert step0["classes_per_step"] == [16] and step0["old_model"] is None
    assert incremental["classes_per_step"] == [16, 1] and incremental["old_model"] == [16]
    assert incremental["method"].startswith("mbs (") and "ortho" in incremental["method"]
    for measurement in (step0, incremental):
        check_speed(measurement, batch=2)
        assert measurement["size"] == 64 and measurement["precision"] == "fp32"
        assert positive(measurement["peak_memory"]["host_peak_rss_gib"])
        assert positive(measurement["flops_per_iteration"]) and positive(measurement["achieved_tflops"])
        assert "fraction_of_dense_bf16_peak" not in measurement  # a CPU has no bf16 peak in the table
    # the MBS step also runs the old model and the distillation terms
    assert incremental["flops_per_iteration"] > step0["flops_per_iteration"]
    check_speed(measured["incremental_mbs"]["evaluation"], batch=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_mbs_against_finetuning_and_profile(arch):
    compare = train_speed.measure_mbs_over_finetune(small_spec(arch))
    assert set(compare["seconds"]) == {"finetune", "mbs", "old_forward"}
    assert all(len(times) == 1 and positive(times[0]) for times in compare["seconds"].values())
    assert positive(compare["mbs_over_finetune"]["median"])
    assert compare["lower_bound_finetune_plus_old_forward_over_finetune"]["min"] > 1
    profile = train_speed.profile_incremental_step(small_spec(arch))
    assert profile["classes_per_step"] == [16, 1] and positive(profile["profiled_iteration_s"])
    top = profile["top_ops_by_self_cpu_time"]
    assert top and all(op["op"].startswith("aten::") and positive(op["self_cpu_s"]) for op in top)
    assert [op["self_cpu_s"] for op in top] == sorted((op["self_cpu_s"] for op in top), reverse=True)
    shares = profile["host_time_shares"]
    assert all(0 <= share <= 1 for share in shares.values()) and positive(shares["dense_ops (conv, matmul, attention)"])


def test_projections_cover_both_tasks_with_every_step(report):
    runs = {run["config"]: run for run in report["projected"]["runs"]}
    assert set(runs) == {"configs/voc.yaml", "configs/ade20k.yaml", "configs/voc_vit.yaml", "configs/ade20k_vit.yaml"}
    assert report["projected"]["caveats"]  # --small and CPU numbers say so
    for config, run in runs.items():
        expected_steps = 6 if "voc" in config else 2
        assert [step["step"] for step in run["steps"]] == list(range(expected_steps))
        for step in run["steps"]:
            assert positive(step["iterations"]) and positive(step["train_s"]) and positive(step["test_s"])
        assert positive(run["total_hours"])
        assert run["total_hours"] == pytest.approx(run["train_hours"] + run["evaluation_hours"])
    # the reference's "best" policy validates during every step; the DeepLab recipes never do
    assert all(step["validations_during_step"] > 0 for step in runs["configs/voc_vit.yaml"]["steps"])
    assert all(step["validations_during_step"] == 0 for step in runs["configs/voc.yaml"]["steps"])


def test_projection_uses_the_standard_image_counts(report, shared_data):
    """Spec section 1: images per step of VOC 15-1 and ADE 100-50 (overlapped), from the class lists; the
    iterations follow from the recipe (VOC R101: batch 24, 30 epochs; ADE ViT: batch 8, 64 epochs)."""
    runs = {run["config"]: run for run in report["projected"]["runs"]}
    voc, ade_vit = runs["configs/voc.yaml"], runs["configs/ade20k_vit.yaml"]
    assert [s["train_images"] for s in voc["steps"]] == [9568, 487, 299, 491, 500, 548]
    assert [s["train_images"] for s in ade_vit["steps"]] == [20192, 9390]
    assert voc["steps"][0]["iterations"] == 30 * (9568 // 24)
    assert ade_vit["steps"][1]["iterations"] == 64 * (9390 // 8)
    assert voc["steps"][0]["test_images"] == 1449 and ade_vit["steps"][0]["test_images"] == 2000
    assert runs["configs/voc_vit.yaml"]["steps"][0]["selection_images"] == 1240  # spec: 1240 of 1449


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["mib", "plop"])
def test_mib_and_plop_steps_are_measured_plop_after_its_pass(arch, method):
    measured = train_speed.measure_training({**small_spec(arch), "kind": "train", "step": 1, "method": method})
    assert measured["method"].startswith(f"{method} (") and measured["old_model"] == [16]
    check_speed(measured, batch=2)
    assert positive(measured["flops_per_iteration"])
