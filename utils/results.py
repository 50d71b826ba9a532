"""A run's results as text: the per-step table, the per-class table and the protocol line.

The trainer writes them into the run folder after every finished step (``results.md`` beside
``results.json``, through :class:`utils.run_folder.RunFolder`); ``analysis.report`` sets several runs
side by side with the same columns.
"""
from __future__ import annotations

from typing import Optional

MEAN_COLUMNS = (("miou_old", "old"), ("miou_new", "new"), ("miou_all", "all"), ("miou_old_no_bg", "old w/o bg"))
REFERENCE_COLUMN = ("miou_all_reference", "all (ref. metric)")
METRIC_NOTE = ("mIoU (%) on the whole validation set. Standard metric (the headline): old = classes of step 0 "
               "(background included for VOC), new = classes of steps 1..t, all = every evaluated class; a class "
               "with IoU 0 counts as 0. Reference convention, to set beside published MBS tables: old w/o bg = old "
               "without background; all (ref. metric) = mean IoU over the classes whose IoU is non-zero (the MBS "
               "authors' evaluation code drops zero-IoU classes).")


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _classes(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]} ({len(names)})"


def mean_columns(steps: list[dict]) -> tuple[tuple[str, str], ...]:
    """The standard means, plus the reference metric's column when a step has it (older results do not)."""
    has_reference = any(REFERENCE_COLUMN[0] in step for step in steps)
    return MEAN_COLUMNS + ((REFERENCE_COLUMN,) if has_reference else ())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_step_table(results: list[dict]) -> str:
    """Markdown: one row per step with the old / new / all means (mIoU in %)."""
    columns = mean_columns(results)
    rows = [[str(r["step"]), _classes(r.get("step_classes", [])), *(percent(r.get(key)) for key, _ in columns),
             str(r.get("checkpoint", "-"))] for r in results]
    return markdown_table(["step", "classes learned", *(label for _, label in columns), "checkpoint"], rows)


def format_class_table(results: list[dict]) -> str:
    """Markdown: IoU (%) of every class (rows) after every step (columns)."""
    names: list[str] = []
    for r in results:
        names += [n for n in r["iou"] if n not in names]
    rows = [[name, *(percent(r["iou"].get(name)) for r in results)] for name in names]
    return markdown_table(["class", *(f"step {r['step']}" for r in results)], rows)


def describe_protocol(meta: dict) -> str:
    keys = ("dataset", "task", "setting", "method", "architecture", "checkpoint_policy", "eval_mode", "crop_size",
            "processes")
    return "; ".join(f"{key}: {meta[key]}" for key in keys if key in meta)


def results_markdown(name: str, results: list[dict], meta: dict) -> str:
    """``results.md``: the protocol, the per-step table and the IoU of every class after every step."""
    return (f"# {name}\n\n{describe_protocol(meta)}\n\n"
            f"{METRIC_NOTE} Numbers after each step:\n\n{format_step_table(results)}\n\n"
            f"## IoU per class (%)\n\n{format_class_table(results)}\n")
