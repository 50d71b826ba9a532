"""Results files of a run, and tables / plots that compare runs.

A run folder gets, after every finished step::

    results.json   {"meta": {...protocol...}, "steps": [per-step summary, ...]}
    results.md     the per-step table and the per-class IoU of every step

Compare finished runs (one row each, at their last step)::

    python -m utils.report runs/voc_15-1_* --out runs/summary.md [--plot runs/summary.png]

Every table says which protocol produced its numbers: task, setting, method,
checkpoint policy (``last`` or the reference's ``best``) and evaluation mode.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from utils.errors import UserError
from utils.files import atomic_write_text

MEAN_COLUMNS = (("miou_old", "old"), ("miou_new", "new"), ("miou_all", "all"), ("miou_old_no_bg", "old w/o bg"))


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _classes(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]} ({len(names)})"


def format_step_table(results: list[dict]) -> str:
    """Markdown: one row per step with the old / new / all means (mIoU in %)."""
    header = "| step | classes learned | " + " | ".join(label for _, label in MEAN_COLUMNS) + " | checkpoint |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        means = " | ".join(percent(r.get(key)) for key, _ in MEAN_COLUMNS)
        lines.append(f"| {r['step']} | {_classes(r.get('step_classes', []))} | {means} | {r.get('checkpoint', '-')} |")
    return "\n".join(lines)


def format_class_table(results: list[dict]) -> str:
    """Markdown: IoU (%) of every class (rows) after every step (columns)."""
    names: list[str] = []
    for r in results:
        names += [n for n in r["iou"] if n not in names]
    header = "| class | " + " | ".join(f"step {r['step']}" for r in results) + " |"
    lines = [header, "|" + "---|" * (len(results) + 1)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(percent(r["iou"].get(name)) for r in results) + " |")
    return "\n".join(lines)


def describe_protocol(meta: dict) -> str:
    keys = ("dataset", "task", "setting", "method", "architecture", "checkpoint_policy", "eval_mode", "crop_size",
            "processes")
    return "; ".join(f"{key}: {meta[key]}" for key in keys if key in meta)


def write_results(run_dir: Path, results: list[dict], meta: dict) -> None:
    """Write results.json and results.md (atomically: a reader never sees half a file)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "results.json", json.dumps({"meta": meta, "steps": results}, indent=1) + "\n")
    text = (f"# {meta.get('name', run_dir.name)}\n\n{describe_protocol(meta)}\n\n"
            f"mIoU (%) on the whole validation set after each step; old = classes of step 0 "
            f"(background included for VOC), new = classes of steps 1..t.\n\n{format_step_table(results)}\n\n"
            f"## IoU per class (%)\n\n{format_class_table(results)}\n")
    atomic_write_text(run_dir / "results.md", text)


class ReportError(UserError, ValueError):
    """A run folder holds no readable results."""


def read_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ReportError(f"{path} does not exist (has the run finished a step?)")
    try:
        content = json.loads(path.read_text())
    except ValueError as err:
        raise ReportError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(content, dict) or not content.get("steps"):
        raise ReportError(f"{path} holds no step results")
    return content


def comparison_table(runs: list[dict]) -> str:
    """Markdown: one row per run, its last finished step's means."""
    header = ("| run | task | setting | method | model | checkpoint | eval | steps done | "
              + " | ".join(label for _, label in MEAN_COLUMNS) + " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs:
        meta, last = run["meta"], run["steps"][-1]
        means = " | ".join(percent(last.get(key)) for key, _ in MEAN_COLUMNS)
        lines.append(f"| {meta.get('name', '?')} | {meta.get('dataset', '?')} {meta.get('task', '?')} | "
                     f"{meta.get('setting', '?')} | {meta.get('method', '?')} | {meta.get('architecture', '?')} | "
                     f"{meta.get('checkpoint_policy', '?')} | {meta.get('eval_mode', '?')} | "
                     f"{last['step'] + 1} | {means} |")
    return "\n".join(lines)


def plot_runs(runs: list[dict], path: Path) -> None:
    """One panel per mean (old / new / all): mIoU after every step, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, (key, label) in zip(axes, MEAN_COLUMNS[:3]):
        for run in runs:
            points = [(r["step"], 100 * r[key]) for r in run["steps"] if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=run["meta"].get("name", "?"))
        ax.set_title(f"mIoU {label}")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    axes[-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders holding results.json")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (default: print it)")
    parser.add_argument("--plot", type=Path, help="also plot mIoU after every step to this image (PNG/SVG)")
    args = parser.parse_args(argv)
    runs, missing = [], []
    for run_dir in args.run_dirs:
        try:
            runs.append(read_results(run_dir))
        except ReportError as err:
            missing.append(str(err))
    for message in missing:
        print(f"warning: {message}", file=sys.stderr)
    if not runs:
        print("error: none of the given run folders has results", file=sys.stderr)
        return 2
    table = comparison_table(runs) + "\n"
    if missing:
        table += "\nMissing: " + "; ".join(missing) + "\n"
    for path in (args.out, args.plot):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.out:
        args.out.write_text(table)
    else:
        print(table, end="")
    if args.plot:
        plot_runs(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
