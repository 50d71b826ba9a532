"""Results files of a run, and tables / plots that compare runs.

A run folder gets, after every finished step::

    results.json   {"meta": {...protocol...}, "steps": [per-step summary, ...]}
    results.md     the per-step table and the per-class IoU of every step

Compare runs (their last finished step)::

    python -m analysis.report runs/* --out runs/summary.md --plot runs/summary.png --published

``--out x.md`` writes the Markdown tables to x.md and one line per run to x.csv;
``--plot`` draws mIoU after every step; ``--published`` sets the published numbers of
``benchmarks/published.yaml`` beside every run whose protocol they share;
``--qualitative N`` draws N validation images with the prediction after every step
(:mod:`analysis.figures`).

Tables follow the papers: one table per protocol, one row per method / model /
checkpoint policy, one column group per setting. A protocol is everything the numbers
depend on besides the method: dataset, task (with its class order), evaluation (mode and
sizes) and the step the numbers come from; runs whose protocols differ never share a
column. The standard metric (a zero IoU counts as 0) is the headline; the reference's
overall number (``all (ref. metric)``, see :func:`utils.metrics.summarize`) is an extra
column for setting our runs beside published ones.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import yaml

from utils.config import DATASET_CLASSES, figure_formats
from utils.errors import UserError, one_line
from utils.files import atomic_write_text
from utils.presets import PRESET_KEYS, PRESETS, preset_value
from utils.run_folder import RunFolder, RunFolderError
from utils.results import MEAN_COLUMNS, METRIC_NOTE, REFERENCE_COLUMN, markdown_table, mean_columns, percent

# The result keys (results.json, per step) a published source may name as the counterpart of its numbers.
RESULT_KEYS = frozenset(key for key, _ in MEAN_COLUMNS) | {REFERENCE_COLUMN[0]}
PUBLISHED_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "published.yaml"


class ReportError(UserError, ValueError):
    """The published-numbers file is malformed, or an output path cannot be written."""


# ------------------------------------------------------------------ run folders
@dataclass
class Run:
    """A run folder's results and the protocol its numbers belong to."""

    path: Path
    meta: dict
    steps: list[dict]
    config: dict          # the run's config.yaml ({} when the folder has none)
    label: str = ""       # how tables name the run: its name, or its folder where names repeat

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def last(self) -> dict:
        return self.steps[-1]

    def data(self, key: str, default=None):
        return self.config.get("data", {}).get(key, default)

    @property
    def class_order(self) -> Optional[list]:
        """The explicit steps of a custom task (None: the named task's standard order)."""
        return self.data("custom_steps")

    @property
    def num_steps(self) -> Optional[int]:
        if self.class_order is not None:
            return len(self.class_order)
        from datasets.tasks import TASKS
        steps = TASKS.get(self.data("dataset", self.meta.get("dataset")), {}).get(self.meta.get("task"))
        return None if steps is None else len(steps)

    @property
    def finished(self) -> bool:
        return self.num_steps is not None and self.last["step"] == self.num_steps - 1

    @property
    def evaluation(self) -> str:
        """How the validation images were fed to the model: the mode and the sizes it uses."""
        mode = self.meta.get("eval_mode", self.data("eval_mode", "?"))
        if mode == "center_crop":
            return f"center_crop (short side {self.data('base_size', '?')}, crop {self.meta.get('crop_size', '?')})"
        return str(mode)

    def task_protocol(self) -> tuple:
        """What must match for two runs to share a column, but the setting (one column group each)."""
        order = json.dumps(self.class_order) if self.class_order is not None else None
        return (self.meta.get("dataset", "?"), self.meta.get("task", "?"), order, self.evaluation, self.last["step"])

    def describe_task_protocol(self) -> str:
        dataset, task, order, evaluation, step = self.task_protocol()
        steps = self.num_steps
        when = (f"after step {step} (the last)" if self.finished else
                f"after step {step} of 0..{steps - 1 if steps else '?'} (unfinished)")
        custom = f", custom class order {order}" if order else ""
        return f"{dataset} {task}{custom} · eval {evaluation} · {when}"

    @property
    def ran_on(self) -> str:
        return ran_on(self.meta)

    def row_key(self) -> tuple:
        return (self.meta.get("method", "?"), self.meta.get("architecture", "?"),
                self.meta.get("checkpoint_policy", "?"))


@dataclass
class Collected:
    runs: list[Run]
    not_reported: list[str]   # run folders without results: listed under the tables
    skipped: list[str]        # paths that are not run folders: a note on stderr only


def collect_runs(paths: list[Path]) -> Collected:
    """Read every run folder among ``paths``.

    A path that does not exist is reported (main.sh passes the folders of the runs it launched,
    so it is a run that never started); a file, or a folder that no run wrote (e.g. the summary
    written beside the runs), is skipped; a run folder without a finished step or with an
    unreadable results.json is reported.
    """
    collected = Collected([], [], [])
    for path in map(Path, paths):
        folder = RunFolder(path)
        if not path.exists():
            collected.not_reported.append(f"{path}: no such folder ({folder.results_json} does not exist; "
                                          "has the run started?)")
        elif not folder.looks_like_a_run():
            kind = (f"a folder without {folder.results_json.name}, {folder.checkpoint_dir.name}/ or "
                    f"{folder.config_file.name}" if path.is_dir() else "a file")
            collected.skipped.append(f"{path} is not a run folder ({kind}): skipped")
        elif not folder.results_json.exists():
            collected.not_reported.append(f"{path}: started, no finished step yet (no {folder.results_json.name})")
        else:
            try:
                content, config = folder.read_results(), folder.read_config_dict()
            except RunFolderError as err:
                collected.not_reported.append(str(err))
                continue
            collected.runs.append(Run(path, content.get("meta", {}), content["steps"], config))
    names = [run.name for run in collected.runs]
    for run in collected.runs:
        run.label = run.name if names.count(run.name) == 1 else str(run.path)
    return collected


# ------------------------------------------------------------------ tables
def ran_on(meta: dict) -> str:
    """The device and the precision autocast used (results.json's ``meta.runtime``), e.g. "NVIDIA H100, bf16, 4
    processes"; "-" for results written before it was recorded."""
    runtime = meta.get("runtime")
    if not isinstance(runtime, dict):
        return "-"
    text = f"{runtime.get('device_name', '?')}, {runtime.get('precision', '?')}"
    processes = runtime.get("world_size", 1)
    return text + (f", {processes} processes" if isinstance(processes, int) and processes > 1 else "")


def comparison_table(runs: list[dict]) -> str:
    """Markdown: one row per run (results.json content), its last finished step's means and where it ran."""
    columns = mean_columns([run["steps"][-1] for run in runs])
    header = ["run", "task", "setting", "method", "model", "checkpoint", "eval", "steps done",
              *(label for _, label in columns), "ran on"]
    rows = []
    for run in runs:
        meta, last = run["meta"], run["steps"][-1]
        rows.append([str(meta.get("name", "?")), f"{meta.get('dataset', '?')} {meta.get('task', '?')}",
                     *(str(meta.get(key, "?")) for key in ("setting", "method", "architecture", "checkpoint_policy",
                                                           "eval_mode")),
                     str(last["step"] + 1), *(percent(last.get(key)) for key, _ in columns), ran_on(meta)])
    return markdown_table(header, rows)


def _group(runs: list[Run], key) -> dict:
    groups: dict = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def task_table(runs: list[Run]) -> str:
    """Markdown in the papers' format for runs of one task protocol: a row per method / model / checkpoint
    policy, a column group (old / new / all, then the reference convention) per setting."""
    settings = sorted({run.meta.get("setting", "?") for run in runs})
    columns = mean_columns([run.last for run in runs])
    rows: list[tuple[tuple, dict[str, Run]]] = []  # (row key, setting -> run); a second run of a cell opens a row
    for run in runs:
        setting = run.meta.get("setting", "?")
        row = next((cells for key, cells in rows if key == run.row_key() and setting not in cells), None)
        if row is None:
            row = {}
            rows.append((run.row_key(), row))
        row[setting] = run
    header = ["method", "model", "checkpoint", *(f"{s} {label}" for s in settings for _, label in columns), "runs"]
    lines = []
    for key, cells in rows:
        numbers = [percent(cells[s].last.get(k)) if s in cells else "" for s in settings for k, _ in columns]
        lines.append([*key, *numbers, ", ".join(cells[s].label for s in settings if s in cells)])
    return markdown_table(header, lines)


def papers_tables(runs: list[Run]) -> str:
    """One table per task protocol, those of one task next to each other."""
    groups = _group(runs, Run.task_protocol)
    order = sorted(groups, key=lambda key: tuple(str(part) for part in key))
    return "\n\n".join(f"## {groups[key][0].describe_task_protocol()}\n\n{task_table(groups[key])}"
                       for key in order)


CSV_FIELDS = ("run", "folder", "dataset", "task", "class_order", "setting", "evaluation", "step", "finished",
              "method", "architecture", "checkpoint_policy", "ran_on", *(key for key, _ in MEAN_COLUMNS),
              REFERENCE_COLUMN[0])


def runs_csv(runs: list[Run]) -> str:
    """One line per run: its protocol and its last finished step's means (mIoU in %, empty where undefined)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for run in runs:
        dataset, task, order, evaluation, step = run.task_protocol()
        numbers = [("" if run.last.get(key) is None else f"{100 * run.last[key]:.4f}")
                   for key in CSV_FIELDS[CSV_FIELDS.index("miou_old"):]]
        writer.writerow([run.name, str(run.path), dataset, task, order or "", run.meta.get("setting", "?"),
                         evaluation, step, run.finished, *run.row_key(), run.ran_on, *numbers])
    return out.getvalue()


# ------------------------------------------------------------------ published numbers
@dataclass(frozen=True)
class PublishedSource:
    """Where a set of published numbers comes from (one table of a paper), the protocol that produced them,
    and how its old / new / all are computed: in words (``*_metric``) and as the result keys of ours computed
    the same way (``*_key``), so a run is compared in the source's convention."""

    key: str
    paper: str
    table: Optional[str]
    what: str              # who ran what, and the protocol differences a run folder cannot show
    architecture: str      # our model.architecture
    backbone: str          # a prefix of our model.backbone (timm name)
    checkpoint_policy: str
    eval_mode: str
    base_size: int
    crop_size: int
    old_metric: str
    new_metric: str
    all_metric: str
    old_key: str           # e.g. miou_old_no_bg (MBS's tables) or miou_old (MiB's, PLOP's)
    new_key: str
    all_key: str

    @property
    def keys(self) -> tuple[str, str, str]:
        return self.old_key, self.new_key, self.all_key

    @property
    def title(self) -> str:
        return f"{self.paper}, {self.table}" if self.table else self.paper


@dataclass(frozen=True)
class PublishedResult:
    source: PublishedSource
    method: str            # our method.name the row reports (one table may hold several methods)
    dataset: str
    task: str
    setting: str
    old: float
    new: float
    all: float


def load_published(path: Path = PUBLISHED_FILE) -> list[PublishedResult]:
    """Read the published-numbers file; an error names the file and the entry at fault."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ReportError(f"published numbers {path} could not be read: {err}") from None
    wanted = [f.name for f in fields(PublishedSource) if f.name != "key"]
    sources = {}
    for key, entry in (content or {}).get("sources", {}).items():
        missing = [name for name in wanted if name not in (entry or {})]
        if missing:
            raise ReportError(f"{path}: source {key!r} lacks {', '.join(missing)}")
        unknown = [f"{name}: {entry[name]!r}" for name in ("old_key", "new_key", "all_key")
                   if entry[name] not in RESULT_KEYS]
        if unknown:
            raise ReportError(f"{path}: source {key!r} names no result key in {', '.join(unknown)} "
                              f"(one of {', '.join(sorted(RESULT_KEYS))})")
        sources[key] = PublishedSource(key, **{name: entry[name] for name in wanted})
    results = []
    for number, entry in enumerate((content or {}).get("results", []), 1):
        try:
            results.append(PublishedResult(sources[entry["source"]], str(entry["method"]), str(entry["dataset"]),
                                           str(entry["task"]), str(entry["setting"]), float(entry["old"]),
                                           float(entry["new"]), float(entry["all"])))
        except (KeyError, TypeError, ValueError) as err:
            raise ReportError(f"{path}: result {number} ({entry}) is malformed or names an unknown source: "
                              f"{err!r}") from None
    return results


def _method_name(meta: dict) -> str:
    return str(meta.get("method", "?")).split(" (")[0]


def published_for(run: Run, published: list[PublishedResult]) -> list[PublishedResult]:
    """Published numbers of the run's protocol: dataset, standard task and setting, method (the row's: mbs,
    mib, plop ...) and model family. Only finished runs match (published numbers are after the last step)."""
    architecture, _, backbone = str(run.meta.get("architecture", "")).partition(" ")
    return [p for p in published
            if run.finished and run.class_order is None and p.dataset == run.meta.get("dataset")
            and p.task == run.meta.get("task") and p.setting == run.meta.get("setting")
            and p.method == _method_name(run.meta) and p.source.architecture == architecture
            and backbone.startswith(p.source.backbone)]


def protocol_differences(run: Run, source: PublishedSource) -> list[str]:
    """What differs between how the run and the published numbers were produced, beyond what must match."""
    differences = []
    if run.meta.get("checkpoint_policy") != source.checkpoint_policy:
        differences.append(f"checkpoint policy {run.meta.get('checkpoint_policy')} here, "
                           f"{source.checkpoint_policy} there")
    ours = (run.meta.get("eval_mode"), run.data("base_size"), run.meta.get("crop_size"))
    theirs = (source.eval_mode, source.base_size, source.crop_size)
    if ours[0] != theirs[0] or (ours[0] == "center_crop" and ours != theirs):
        differences.append(f"evaluation {run.evaluation} here, {source.eval_mode} "
                           f"(short side {source.base_size}, crop {source.crop_size}) there")
    changed = method_keys_set_apart_from_the_preset(run)
    if changed:
        differences.append("method keys set explicitly to other values than the preset's: "
                           + ", ".join(f"{key}={value}" for key, value in changed.items()))
    return differences


def method_keys_set_apart_from_the_preset(run: Run) -> dict:
    """The method keys a preset resolves (switches and dataset-dependent weights) that the run's config sets to
    another value than its preset gives on its dataset. A value written out equal to the preset's is none: a
    run saved before the weights were resolved holds ``output_distill_weight: 25.0`` explicitly."""
    method = run.config.get("method", {})
    name, dataset = method.get("name"), run.data("dataset", run.meta.get("dataset"))
    if name not in PRESETS or dataset not in DATASET_CLASSES:
        return {}
    return {key: value for key, value in method.items()
            if key in PRESET_KEYS and value is not None and value != preset_value(name, key, dataset)}


def _signed(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _as_published(value: float) -> str:
    """A published number with its paper's precision: one decimal (MiB, MBS's tables) or two (PLOP)."""
    return f"{value:.1f}" if round(value, 1) == value else f"{value:.2f}"


def published_table(runs: list[Run], published: list[PublishedResult]) -> str:
    """Markdown: every run that shares a protocol with published numbers, each published row under it with
    the difference (ours - published), compared like with like: our numbers are given in each source's
    convention (its result keys), one row of ours per convention among the run's matches."""
    header = ["protocol", "numbers from", *(f"{name} (the source's convention)" for name in ("old", "new", "all")),
              "Δ old", "Δ new", "Δ all", "differs from the published protocol"]
    rows, shown = [], {}
    for run in runs:
        matches = published_for(run, published)
        protocol = f"{run.meta.get('dataset')} {run.meta.get('task')} {run.meta.get('setting')}"
        conventions: dict[tuple[str, str, str], list[PublishedResult]] = {}
        for p in matches:
            conventions.setdefault(p.source.keys, []).append(p)
        for keys, same_convention in conventions.items():
            ours = [None if run.last.get(key) is None else 100 * run.last[key] for key in keys]
            rows.append([protocol, f"ours: {run.label} ({run.meta.get('architecture')}, "
                         f"{run.meta.get('checkpoint_policy')} checkpoints; {' / '.join(keys)})",
                         *("-" if v is None else f"{v:.2f}" for v in ours), "", "", "", ""])
            for p in same_convention:
                shown[p.source.key] = p.source
                deltas = [None if mine is None else mine - theirs
                          for mine, theirs in zip(ours, (p.old, p.new, p.all))]
                rows.append(["", f"{p.source.title}: {p.method}", *map(_as_published, (p.old, p.new, p.all)),
                             *map(_signed, deltas), "; ".join(protocol_differences(run, p.source)) or "-"])
    if not rows:
        return "No run shares its protocol (dataset, standard task, setting, method, model family) with an entry of " \
               "the published numbers, or none has finished its last step."
    how = "\n".join(f"- {s.title}: {s.what}. old = {s.old_metric}; new = {s.new_metric}; all = {s.all_metric}. "
                    f"Ours: `{s.old_key}` / `{s.new_key}` / `{s.all_key}`." for s in shown.values())
    return (f"{markdown_table(header, rows)}\n\nHow each number is computed (mIoU %, after the last step). Each "
            "source has its own convention, and the row of ours above its numbers names the keys of our "
            "results.json computed the same way: `miou_old` = the step-0 classes (background included on VOC), "
            "`miou_old_no_bg` = the same without background, `miou_new` = the later classes, `miou_all` = every "
            "class seen, each with zero IoUs counted; `miou_all_reference` = the classes whose IoU is non-zero, "
            "background included. Our headline numbers (the tables above) are `miou_old` / `miou_new` / "
            "`miou_all`. Δ = ours - published.\n"
            f"{how}")


# ------------------------------------------------------------------ plot
def plot_panels(runs: list[Run]) -> dict[str, list[Run]]:
    """Panel title -> its runs: one panel per dataset, task (and class order), setting and evaluation, whatever
    the method, model, checkpoint policy or number of steps done."""
    def key(run: Run) -> str:
        dataset, task, order, evaluation, _ = run.task_protocol()
        custom = " (custom order)" if order else ""
        return f"{dataset} {task}{custom} {run.meta.get('setting', '?')}\neval {evaluation}"
    return _group(runs, key)


def plot_runs(runs: list[Run], path: Path) -> None:
    """One panel per task protocol (dataset, task, setting, evaluation): old / new / all mIoU after every step,
    one colour per run, one line style per mean, so finetune / baseline / MBS of a task share a panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    styles = {"miou_old": "-", "miou_new": "--", "miou_all": ":"}
    panels = plot_panels(runs)
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.9 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, members) in zip(axes.flat, panels.items()):
        for index, run in enumerate(members):
            colour = colours[index % len(colours)]
            for key, style in styles.items():
                points = [(r["step"], 100 * r[key]) for r in run.steps if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), linestyle=style, marker="o", markersize=3, color=colour)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("mIoU (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=colours[i % len(colours)], label=f"{run.label} ({_method_name(run.meta)})")
                   for i, run in enumerate(members)]
        handles += [Line2D([], [], color="grey", linestyle=style, label=label)
                    for (key, style), label in zip(styles.items(), ("old", "new", "all"))]
        ax.legend(handles=handles, fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ command line
def summary_markdown(collected: Collected, published: Optional[list[PublishedResult]]) -> str:
    runs = collected.runs
    parts = ["# Results", METRIC_NOTE + " One table per protocol (dataset, task and class order, evaluation, the "
             "step the numbers come from); one column group per setting.", papers_tables(runs),
             "## Every run\n\n" + comparison_table([{"meta": r.meta, "steps": r.steps} for r in runs])]
    if published is not None:
        parts.append("## Published numbers beside ours\n\n" + published_table(runs, published))
    if collected.not_reported:
        parts.append("Not reported:\n" + "\n".join(f"- {message}" for message in collected.not_reported))
    return "\n\n".join(parts) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path,
                        help="run folders holding results.json (other paths, e.g. an earlier summary, are skipped)")
    parser.add_argument("--out", type=Path,
                        help="write the Markdown tables here and one line per run to the same name with .csv "
                             "(default: print the Markdown)")
    parser.add_argument("--plot", type=Path, help="also plot mIoU after every step to this image (PNG/SVG)")
    parser.add_argument("--published", nargs="?", type=Path, const=PUBLISHED_FILE, metavar="YAML",
                        help="set published numbers beside every run of the same protocol "
                             f"(default file: {PUBLISHED_FILE.relative_to(PUBLISHED_FILE.parents[1])})")
    parser.add_argument("--qualitative", type=int, metavar="N",
                        help="draw N validation images with the prediction after every step, per run "
                             "(analysis.figures; written to RUN/qualitative.png unless --qualitative-out)")
    parser.add_argument("--qualitative-out", type=Path, help="where the qualitative figure goes (one run only)")
    parser.add_argument("--device", default="auto", help="device for --qualitative: auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--data-root", help="the dataset root for --qualitative, if not the run's data.root")
    args = parser.parse_args(argv)
    try:
        return report(args)
    except UserError as err:  # an output that cannot be written, a malformed published file: one line
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


def check_output_path(path: Optional[Path], option: str, image: bool = False) -> None:
    """Refuse, before any work, an output path that is a folder, lies under a file, or (``image``) has a suffix
    matplotlib cannot write."""
    if path is None:
        return
    if path.is_dir():
        raise ReportError(f"{option} {path}: is a folder; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ReportError(f"{option} {path}: {parent} is a file, not a folder")
            break
    if image:
        formats = figure_formats()
        if path.suffix.lstrip(".").lower() not in formats:
            raise ReportError(f"{option} {path}: matplotlib cannot write {path.suffix or 'a file without suffix'!r} "
                              f"images; use one of {', '.join('.' + f for f in sorted(formats))}")


def report(args: argparse.Namespace) -> int:
    check_output_path(args.out, "--out")
    check_output_path(args.plot, "--plot", image=True)
    check_output_path(args.qualitative_out, "--qualitative-out", image=True)
    collected = collect_runs(args.run_dirs)
    for message in collected.skipped:
        print(f"note: {message}", file=sys.stderr)
    for message in collected.not_reported:
        print(f"warning: {message}", file=sys.stderr)
    if not collected.runs:
        print("error: none of the given run folders has results", file=sys.stderr)
        return 2
    published = load_published(args.published) if args.published else None
    table = summary_markdown(collected, published)
    for path in (args.out, args.plot):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.out:
        atomic_write_text(args.out, table)
        atomic_write_text(args.out.with_suffix(".csv"), runs_csv(collected.runs))
    else:
        print(table, end="")
    if args.plot:
        plot_runs(collected.runs, args.plot)
    if args.qualitative:
        return qualitative(collected.runs, args)
    return 0


def qualitative(runs: list[Run], args: argparse.Namespace) -> int:
    from analysis.figures import write_qualitative_figure
    if args.qualitative_out and len(runs) > 1:
        print("error: --qualitative-out names one figure; give one run folder, or leave it out", file=sys.stderr)
        return 2
    for run in runs:
        out = args.qualitative_out or RunFolder(run.path).qualitative_figure
        try:
            write_qualitative_figure(run.path, out, args.qualitative, args.device, data_root=args.data_root)
        except UserError as err:
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
            return 2
        print(f"qualitative figure: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
