"""python -m benchmarks.losses runs in its --small form and prints the JSON report (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]

# Stand-in for the authors' utils/loss.py (same class names and call signatures; delegates to this project's
# losses), so the reference column's loading path is exercised without their code.
FAKE_REFERENCE_LOSS = '''
import torch
import losses


class LabelGuidedOutputDistillation(torch.nn.Module):
    def __init__(self, reduction="mean", alpha=1.0):
        super().__init__()

    def forward(self, inputs, targets, masks=None):
        return losses.label_guided_distillation(inputs, targets, masks)


class KnowledgeDistillationLoss(torch.nn.Module):
    def __init__(self, reduction="mean", alpha=1.0):
        super().__init__()

    def forward(self, inputs, targets, masks=None):
        return losses.knowledge_distillation(inputs, targets)
'''


def run_benchmark(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.losses", "--small", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_losses_benchmark_small_prints_report(tmp_path):
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "loss.py").write_text(FAKE_REFERENCE_LOSS)
    done = run_benchmark("--reference-repo", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["config"]["threads"] == 1 and report["config"]["reference_repo"] == str(tmp_path)
    assert len(report["load_average_1_5_15"]["start"]) == 3
    implementations = {"ours", "previous", "reference"}
    for loss in ("lgkd", "kd"):
        section = report[loss]
        assert set(section["seconds"]) == implementations
        for stats in section["seconds"].values():
            assert 0 < stats["min"] <= stats["median"] and len(stats["all"]) == report["config"]["repeats"]
        assert set(section["ratios"]) == {"ours/previous", "ours/reference"}
        assert set(section["memory"]) == implementations
        assert all(entry["peak_rss_bytes"] > 0 and entry["peak_growth_bytes"] >= 0
                   for entry in section["memory"].values())
        values = section["agreement"]["value"]
        assert values["ours"] == pytest.approx(values["previous"], rel=1e-5)
        assert values["ours"] == values["reference"]  # the stand-in computes the same thing


def test_losses_benchmark_rejects_a_folder_without_their_loss_file(tmp_path):
    done = run_benchmark("--reference-repo", str(tmp_path))
    assert done.returncode != 0
    assert str(tmp_path) in done.stderr and "utils/loss.py" in done.stderr


def test_memory_benchmark_prints_fake_tensor_estimates():
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--small", "--recipes", "voc_r101", "voc_vit"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for name, precision in (("voc_r101", "bf16"), ("voc_vit", "fp16")):
        row = report["recipes"][name][precision]
        assert [r["batch"] for r in row["step1"]] == [2, 4] and row["step0"]["step"] == 0
        assert row["step1"][1]["peak_gib"] > row["step1"][0]["peak_gib"] > 0  # more images, more memory
        assert row["step1_fit"]["per_image_gib"] > 0
