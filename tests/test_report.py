"""analysis.report: tables in the papers' format, the CSV, published numbers beside ours, curves, and which
paths count as run folders. Run folders are written here by hand (results.json + config.yaml), with
numbers chosen so every expected cell can be worked out by reading the test."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.report import (PUBLISHED_FILE, ReportError, collect_runs, load_published, main as report_main,
                          plot_panels, published_for)

VOC_15_1 = {"dataset": "voc", "task": "15-1"}
REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, name: str, *, setting="overlapped", method="mbs", architecture="deeplabv3 resnet101",
             policy="last", eval_mode="center_crop", base_size=512, crop_size=512, last_step=5, means=None,
             dataset="voc", task="15-1", custom_steps=None, method_config=None) -> Path:
    """A run folder as the trainer leaves it: results.json (one entry per step 0..last_step) and config.yaml.
    ``means``: the last step's miou_* values (fractions); earlier steps get 0.5 everywhere."""
    run = root / name
    run.mkdir(parents=True)
    meta = {"name": name, "dataset": dataset, "task": task, "setting": setting,
            "method": f"{method} (some, switches)", "architecture": architecture, "checkpoint_policy": policy,
            "eval_mode": eval_mode, "crop_size": crop_size, "processes": 1}
    steps = [{"step": t, "iou": {}, "miou_old": 0.5, "miou_new": None if t == 0 else 0.5, "miou_all": 0.5,
              "miou_old_no_bg": 0.5, "miou_all_reference": 0.5} for t in range(last_step + 1)]
    steps[-1].update(means or {})
    (run / "results.json").write_text(json.dumps({"meta": meta, "steps": steps}))
    config = {"name": name, "data": {"dataset": dataset, "task": task, "custom_steps": custom_steps,
                                     "setting": setting, "eval_mode": eval_mode, "base_size": base_size,
                                     "crop_size": crop_size},
              "method": {"name": method, "afd": None, "ortho": None, **(method_config or {})}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


MEANS = {"miou_old": 0.7, "miou_new": 0.4, "miou_all": 0.6, "miou_old_no_bg": 0.65, "miou_all_reference": 0.62}
MBS_KEYS = ("miou_old_no_bg", "miou_new", "miou_all_reference")


def test_papers_table_rows_methods_columns_settings(tmp_path, capsys):
    make_run(tmp_path, "mbs_ov", means=MEANS)
    make_run(tmp_path, "mbs_dis", setting="disjoint", means={**MEANS, "miou_new": 0.3})
    make_run(tmp_path, "ft_ov", method="finetune", means={**MEANS, "miou_old": 0.1})
    out = tmp_path / "summary" / "table.md"
    assert report_main([str(p) for p in sorted(tmp_path.iterdir())] + ["--out", str(out)]) == 0
    text = out.read_text()
    # one table for the task, disjoint before overlapped, each setting its own column group
    assert text.count("## voc 15-1 · eval center_crop (short side 512, crop 512) · after step 5 (the last)") == 1
    assert ("| method | model | checkpoint | disjoint old | disjoint new | disjoint all | disjoint old w/o bg | "
            "disjoint all (ref. metric) | overlapped old | overlapped new | overlapped all | overlapped old w/o bg | "
            "overlapped all (ref. metric) | runs |") in text
    # the two MBS runs share a row (one per setting), finetune has its own with empty disjoint cells
    assert ("| mbs (some, switches) | deeplabv3 resnet101 | last | 70.00 | 30.00 | 60.00 | 65.00 | 62.00 | "
            "70.00 | 40.00 | 60.00 | 65.00 | 62.00 | mbs_dis, mbs_ov |") in text
    assert "| finetune (some, switches) | deeplabv3 resnet101 | last |  |  |  |  |  | 10.00 | 40.00 |" in text

    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["run"] for r in rows] == ["ft_ov", "mbs_dis", "mbs_ov"]
    assert rows[1]["setting"] == "disjoint" and rows[1]["miou_new"] == "30.0000"
    assert rows[2]["miou_all_reference"] == "62.0000" and rows[2]["finished"] == "True"


def test_different_protocols_never_share_a_column(tmp_path):
    make_run(tmp_path, "crop", means=MEANS)
    make_run(tmp_path, "full", eval_mode="full", means=MEANS)
    make_run(tmp_path, "small", base_size=256, crop_size=256, means=MEANS)
    make_run(tmp_path, "half", last_step=2, means=MEANS)
    make_run(tmp_path, "order", custom_steps=[[0, 1], [2]], task="15-1", last_step=1, means=MEANS)
    out = tmp_path / "t.md"
    assert report_main([str(tmp_path / n) for n in ("crop", "full", "small", "half", "order")] + ["--out", str(out)]) == 0
    headings = [line for line in out.read_text().splitlines() if line.startswith("## voc")]
    assert len(headings) == 5, headings
    assert "## voc 15-1 · eval full · after step 5 (the last)" in headings
    assert "## voc 15-1 · eval center_crop (short side 256, crop 256) · after step 5 (the last)" in headings
    assert "## voc 15-1 · eval center_crop (short side 512, crop 512) · after step 2 of 0..5 (unfinished)" in headings
    assert ("## voc 15-1, custom class order [[0, 1], [2]] · eval center_crop (short side 512, crop 512) · "
            "after step 1 (the last)") in headings


def test_reference_column_only_when_results_have_it(tmp_path):
    run = make_run(tmp_path, "old_results", means=MEANS)
    content = json.loads((run / "results.json").read_text())
    for step in content["steps"]:
        del step["miou_all_reference"]
    (run / "results.json").write_text(json.dumps(content))
    out = tmp_path / "t.md"
    assert report_main([str(run), "--out", str(out)]) == 0
    header = next(line for line in out.read_text().splitlines() if line.startswith("| method |"))
    assert header == ("| method | model | checkpoint | overlapped old | overlapped new | overlapped all | "
                      "overlapped old w/o bg | runs |")


def test_published_numbers_beside_a_matching_run(tmp_path):
    make_run(tmp_path, "vit", architecture="segmenter vit_base_patch16_384", policy="best",
             means={"miou_old": 0.80, "miou_old_no_bg": 0.81, "miou_new": 0.70, "miou_all": 0.77,
                    "miou_all_reference": 0.785})
    make_run(tmp_path, "r101", means=MEANS)  # DeepLab: no published ViT numbers apply
    make_run(tmp_path, "vit_half", architecture="segmenter vit_base_patch16_384", last_step=3, means=MEANS)
    out = tmp_path / "t.md"
    assert report_main([str(tmp_path / n) for n in ("vit", "r101", "vit_half")]
                       + ["--out", str(out), "--published"]) == 0
    section = out.read_text().split("## Published numbers beside ours")[1]
    assert "| voc 15-1 overlapped | ours: vit (segmenter vit_base_patch16_384, best checkpoints; miou_old_no_bg / " \
           "miou_new / miou_all_reference) | 81.00 | 70.00 | 78.50 |" in section
    # SELECT: 82.3 / 69.0 / 79.0; Parameter Release: 81.9 / 65.6 / 78.0 (VOC 15-1 overlapped); delta = ours - theirs
    assert "| 82.3 | 69.0 | 79.0 | -1.30 | +1.00 | -0.50 | - |" in section
    assert "| 81.9 | 65.6 | 78.0 | -0.90 | +4.40 | +0.50 | - |" in section
    assert "r101" not in section and "vit_half" not in section
    assert "miou_old_no_bg" in section and "miou_all_reference" in section  # says how ours are computed


def test_published_differences_are_named(tmp_path):
    make_run(tmp_path, "vit", architecture="segmenter vit_base_patch16_384", policy="last", eval_mode="full",
             method_config={"ortho": False}, means=MEANS)
    out = tmp_path / "t.md"
    assert report_main([str(tmp_path / "vit"), "--out", str(out), "--published"]) == 0
    section = out.read_text().split("## Published numbers beside ours")[1]
    assert "checkpoint policy last here, best there" in section
    assert "evaluation full here, center_crop (short side 512, crop 512) there" in section
    assert "method keys set explicitly to other values than the preset's: ortho=False" in section


def test_published_file_holds_the_seeded_numbers():
    published = load_published(PUBLISHED_FILE)
    assert len(published) == 34
    by_key = {(p.source.key, p.method, p.dataset, p.task, p.setting): (p.old, p.new, p.all) for p in published}
    assert by_key[("select_bmvc2026", "mbs", "ade", "100-5", "overlapped")] == (44.4, 22.1, 38.8)
    assert by_key[("parameter_release_iclr2026", "mbs", "voc", "15-5", "disjoint")] == (82.7, 68.6, 79.3)
    mbs = [p for p in published if p.method == "mbs"]
    assert len(mbs) == 21
    assert all(p.source.backbone == "vit_base_patch16" and p.source.keys == MBS_KEYS for p in mbs)


def test_published_file_holds_mib_and_plop_numbers():
    """The rows of BASELINES_SPEC section 4 (issue 18, 1.9), one source per table, in MiB's / PLOP's convention;
    PLOP's ADE20K table (only in the paper) is not there."""
    published = load_published(PUBLISHED_FILE)
    by_key = {(p.source.key, p.method, p.dataset, p.task, p.setting): (p.old, p.new, p.all) for p in published}
    expected = {
        ("mib_cvpr2020_table1", "mib", "voc", "19-1", "disjoint"): (69.6, 25.6, 67.4),
        ("mib_cvpr2020_table1", "mib", "voc", "19-1", "overlapped"): (70.2, 22.1, 67.8),
        ("mib_cvpr2020_table1", "mib", "voc", "15-5", "disjoint"): (71.8, 43.3, 64.7),
        ("mib_cvpr2020_table1", "mib", "voc", "15-5", "overlapped"): (75.5, 49.4, 69.0),
        ("mib_cvpr2020_table1", "mib", "voc", "15-1", "disjoint"): (46.2, 12.9, 37.9),
        ("mib_cvpr2020_table1", "mib", "voc", "15-1", "overlapped"): (35.1, 13.5, 29.7),
        ("mib_cvpr2020_table2", "mib", "ade", "100-50", "overlapped"): (37.9, 27.9, 34.6),
        ("plop_cvpr2021_table1", "plop", "voc", "19-1", "overlapped"): (75.35, 37.35, 73.54),
        ("plop_cvpr2021_table1", "plop", "voc", "15-5", "overlapped"): (75.73, 51.71, 70.09),
        ("plop_cvpr2021_table1", "plop", "voc", "15-1", "overlapped"): (65.12, 21.11, 54.64),
        ("plop_cvpr2021_table1", "mib", "voc", "19-1", "overlapped"): (71.43, 23.59, 69.15),
        ("plop_cvpr2021_table1", "mib", "voc", "15-5", "overlapped"): (76.37, 49.97, 70.08),
        ("plop_cvpr2021_table1", "mib", "voc", "15-1", "overlapped"): (34.22, 13.50, 29.29),
    }
    assert {key: value for key, value in by_key.items() if key[1] != "mbs"} == expected
    for p in published:
        if p.method != "mbs":
            source = p.source
            assert (source.architecture, source.backbone, source.checkpoint_policy, source.eval_mode,
                    source.base_size, source.crop_size) == ("deeplabv3", "resnet101", "last", "center_crop", 512, 512)
            assert source.keys == ("miou_old", "miou_new", "miou_all")
    # PLOP's Table 1: all is the class-weighted mean of old (with background) and new, as the spec notes (to 0.01,
    # PLOP's 15-5 to 0.08): a number copied wrong breaks it.
    for (key, method, _, task, _), (old, new, all_) in expected.items():
        if key.startswith("plop"):
            num_old = int(task.split("-")[0]) + 1
            assert abs((num_old * old + (21 - num_old) * new) / 21 - all_) <= (0.08 if task == "15-5" else 0.01)


@pytest.mark.slow
def test_mib_and_plop_runs_beside_their_rows_in_the_sources_convention(tmp_path):
    """A finished MiB DeepLab R101 run is set beside MiB's own Table 1 and PLOP's re-run with miou_old / miou_new /
    miou_all; an MBS run beside the MBS rows with miou_old_no_bg / miou_new / miou_all_reference. The reference
    means differ from the standard ones, so the wrong convention gives other differences."""
    means = {"miou_old": 0.40, "miou_old_no_bg": 0.30, "miou_new": 0.20, "miou_all": 0.35, "miou_all_reference": 0.45}
    mib = make_run(tmp_path, "mib_r101", method="mib", means=means)
    make_run(tmp_path, "plop_r101", method="plop", task="19-1", last_step=1, means=means)
    make_run(tmp_path, "mib_dis", method="mib", setting="disjoint", means=means)
    make_run(tmp_path, "mbs_vit", architecture="segmenter vit_base_patch16_384", policy="best", means=MEANS)
    runs = {run.name: run for run in collect_runs(sorted(tmp_path.iterdir())).runs}
    published = load_published()
    assert [(p.source.key, p.method) for p in published_for(runs["mib_r101"], published)] == [
        ("mib_cvpr2020_table1", "mib"), ("plop_cvpr2021_table1", "mib")]
    assert [(p.source.key, p.method) for p in published_for(runs["plop_r101"], published)] == [
        ("plop_cvpr2021_table1", "plop")]
    assert [p.source.key for p in published_for(runs["mib_dis"], published)] == ["mib_cvpr2020_table1"]

    out = tmp_path / "summary.md"
    assert report_main([str(tmp_path / name) for name in runs] + ["--out", str(out), "--published"]) == 0
    section = out.read_text().split("## Published numbers beside ours")[1]
    assert "| old (the source's convention) | new (the source's convention) | all (the source's convention) |" \
           in section
    assert ("| voc 15-1 overlapped | ours: mib_r101 (deeplabv3 resnet101, last checkpoints; miou_old / miou_new / "
            "miou_all) | 40.00 | 20.00 | 35.00 |") in section
    # MiB, Table 1 (15-1 overlapped): 35.1 / 13.5 / 29.7; PLOP's re-run: 34.22 / 13.50 / 29.29
    assert "Table 1 (voc-tab.png in fcdl94/MiB): mib | 35.1 | 13.5 | 29.7 | +4.90 | +6.50 | +5.30 | - |" in section
    assert "CVPR2021_PLOP): mib | 34.22 | 13.5 | 29.29 | +5.78 | +6.50 | +5.71 | - |" in section
    # PLOP, Table 1 (19-1 overlapped): 75.35 / 37.35 / 73.54
    assert "CVPR2021_PLOP): plop | 75.35 | 37.35 | 73.54 | -35.35 | -17.35 | -38.54 | - |" in section
    # MiB disjoint 15-1: 46.2 / 12.9 / 37.9
    assert "| voc 15-1 disjoint | ours: mib_dis" in section and "| 46.2 | 12.9 | 37.9 | -6.20 | +7.10 | -2.90 |" in section
    # the MBS run keeps MBS's convention: old w/o bg 65.00, all (ref. metric) 62.00 against SELECT's 82.3 / 79.0
    assert ("| voc 15-1 overlapped | ours: mbs_vit (segmenter vit_base_patch16_384, best checkpoints; miou_old_no_bg "
            "/ miou_new / miou_all_reference) | 65.00 | 40.00 | 62.00 |") in section
    assert "SELECT (BMVC 2026): mbs | 82.3 | 69.0 | 79.0 | -17.30 | -29.00 | -17.00 |" in section
    # the note prints each shown source's definitions and what a run folder cannot show
    assert "- MiB (Cermelli et al., CVPR 2020), Table 1 (voc-tab.png in fcdl94/MiB): " in section
    assert "labels the column 1-15 / 1-19" in section and "in-place ABN" in section
    assert "apex O1 mixed precision" in section and "its own half of the step's images" in section

    # the command line on the one run
    done = subprocess.run([sys.executable, "-m", "analysis.report", str(mib), "--published"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ours: mib_r101 (deeplabv3 resnet101, last checkpoints; miou_old / miou_new / miou_all)" in done.stdout


def test_published_source_must_name_result_keys(tmp_path):
    content = yaml.safe_load(PUBLISHED_FILE.read_text())
    content["sources"]["mib_cvpr2020_table1"]["old_key"] = "old"
    bad = tmp_path / "published.yaml"
    bad.write_text(yaml.safe_dump(content))
    with pytest.raises(ReportError, match="source 'mib_cvpr2020_table1' names no result key in old_key: 'old'"):
        load_published(bad)


def test_published_matching_needs_the_standard_order(tmp_path):
    make_run(tmp_path, "custom", architecture="segmenter vit_base_patch16_384", custom_steps=[[0, 1], [2]],
             last_step=1, means=MEANS)
    run = collect_runs([tmp_path / "custom"]).runs[0]
    assert published_for(run, load_published()) == []


def test_malformed_published_file_names_the_file(tmp_path):
    bad = tmp_path / "published.yaml"
    bad.write_text("sources: {}\nresults:\n  - {source: nowhere, dataset: voc, task: 15-1}\n")
    with pytest.raises(ReportError, match="published.yaml: result 1"):
        load_published(bad)


def test_curves_one_panel_per_task_with_every_method(tmp_path):
    for method in ("finetune", "baseline", "mbs"):
        make_run(tmp_path, f"{method}_ov", method=method, means=MEANS)
    make_run(tmp_path, "mbs_half", last_step=2, means=MEANS)  # unfinished: same curve panel
    make_run(tmp_path, "mbs_dis", setting="disjoint", means=MEANS)
    runs = collect_runs(sorted(tmp_path.iterdir())).runs
    panels = plot_panels(runs)
    assert len(panels) == 2
    overlapped = next(members for title, members in panels.items() if "overlapped" in title)
    assert sorted(run.name for run in overlapped) == ["baseline_ov", "finetune_ov", "mbs_half", "mbs_ov"]
    plot = tmp_path / "plots" / "curves.png"
    assert report_main([str(p) for p in sorted(tmp_path.iterdir()) if p.is_dir()] + ["--plot", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_report_twice_into_the_runs_folder(tmp_path, capsys):
    """The README's command run twice: the first summary's files are not taken for runs."""
    runs = tmp_path / "runs"
    make_run(runs, "a", means=MEANS)
    make_run(runs, "b", method="finetune", means=MEANS)
    (runs / "tensorboard_export").mkdir()                       # a folder no run wrote
    started = runs / "started"                                  # a run with no finished step yet
    (started / "checkpoints").mkdir(parents=True)
    broken = runs / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    command = lambda: report_main([str(p) for p in sorted(runs.iterdir())]  # noqa: E731 - the shell glob runs/*
                                  + ["--out", str(runs / "summary.md"), "--plot", str(runs / "summary.png")])
    assert command() == 0
    first = (runs / "summary.md").read_text()
    capsys.readouterr()
    assert command() == 0
    second = (runs / "summary.md").read_text()
    err = capsys.readouterr().err
    assert second == first
    for name in ("summary.md", "summary.csv", "summary.png", "tensorboard_export"):
        assert f"note: {runs / name} is not a run folder" in err
        assert name not in second
    assert f"- {started}: started, no finished step yet (no results.json)" in second
    assert f"- {broken / 'results.json'} is not valid JSON" in second
    assert len(list(csv.DictReader((runs / "summary.csv").open()))) == 2


def test_nothing_to_report(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert report_main([str(tmp_path / "notes.txt")]) == 2
    assert "none of the given run folders has results" in capsys.readouterr().err


@pytest.mark.parametrize("dataset,method,method_config,reported", [
    ("voc", "mbs", {"output_distill_weight": 10.0}, "output_distill_weight=10.0"),
    ("ade", "mbs", {"output_distill_weight": 25.0}, "output_distill_weight=25.0"),  # ADE's preset is 50
    ("voc", "plop", {"pod_factor": 0.02, "entropy_pl": True}, "pod_factor=0.02"),
    ("voc", "mib", {"unkd": False, "output_distill_weight": 10.0}, "unkd=False"),
    # written out as the preset resolves it (a run saved before the weights were resolved): no difference
    ("voc", "mbs", {"output_distill_weight": 25.0, "ortho": True}, None),
    ("ade", "mbs", {"output_distill_weight": 50.0}, None),
])
def test_protocol_differences_name_every_key_set_apart_from_the_preset(tmp_path, dataset, method, method_config,
                                                                        reported):
    from analysis.report import protocol_differences
    make_run(tmp_path, "run", dataset=dataset, method=method, method_config=method_config, means=MEANS)
    run = collect_runs([tmp_path / "run"]).runs[0]
    differences = [line for line in protocol_differences(run, load_published()[0].source) if "method" in line]
    if reported is None:
        assert differences == []
    else:
        assert differences == [f"method keys set explicitly to other values than the preset's: {reported}"]
