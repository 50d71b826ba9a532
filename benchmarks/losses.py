"""Time label-guided distillation (LGKD) and plain KD, forward + backward on one CPU thread, and their peak memory.

Three implementations of each loss, on the same random inputs (new logits with grad, old logits, step labels
mixing background, new classes and ignore pixels):

* ``ours``: ``losses.label_guided_distillation`` / ``losses.knowledge_distillation`` (from logits);
* ``previous``: the one-hot formulation this project used before (private copy below; the tests use it as the
  oracle the current implementation must match);
* ``reference``: the authors' ``LabelGuidedOutputDistillation`` / ``KnowledgeDistillationLoss``, imported at run
  time from their ``utils/loss.py`` in the clone given by ``--reference-repo`` (nothing of theirs is copied
  here); without that option the column is skipped with a message on stderr.

Each repetition runs every implementation once, in turn (interleaved), and the script reports min and median
seconds and the ours/previous and ours/reference ratios of both. Peak memory: each implementation runs one
forward + backward in a fresh subprocess, which reports its peak RSS (VmHWM on Linux, else ``ru_maxrss``) and
the growth of that peak over its value after building the inputs (what the loss itself needs). Prints one JSON
object on stdout.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.losses --reference-repo ../ECCV2024_MBS
    .venv/bin/python -m benchmarks.losses --small     # tiny sizes: seconds, for CI

(from the project root: run as a module, ``import losses`` finds the project's package, not this file).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import losses
from utils.ignore import IGNORE_INDEX

FULL_SIZE = dict(batch=8, classes=21, old_classes=16, size=512, repeats=5)
SMALL_SIZE = dict(batch=2, classes=6, old_classes=4, size=32, repeats=2)
LOSSES = ("lgkd", "kd")


# --------------------------------------------------------------- the previous implementation (test oracle)
def previous_label_guided_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor,
                                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """LGKD as this project computed it before the gather form: an explicit (B,C,H,W) target built from a
    one-hot of the guided new class, a zero-padded old softmax and a channel concatenation."""
    num_classes, num_old = new_logits.shape[1], old_logits.shape[1]
    with torch.autocast(device_type=new_logits.device.type, enabled=False):
        old_probs = torch.softmax(old_logits.detach().float(), dim=1)
        log_probs = torch.log_softmax(new_logits.float(), dim=1)
        is_new = (labels >= num_old) & (labels < num_classes) & (labels != ignore_index)
        guided_class = torch.where(is_new, labels, torch.zeros_like(labels))
        new_one_hot = F.one_hot(guided_class, num_classes).permute(0, 3, 1, 2).float()
        new_one_hot = new_one_hot * is_new.unsqueeze(1)
        background = old_probs[:, :1]
        target = F.pad(old_probs, (0, 0, 0, 0, 0, num_classes - num_old))
        target = target + new_one_hot * background
        keep_background = (~is_new).unsqueeze(1).float()
        target = torch.cat([target[:, :1] * keep_background, target[:, 1:]], dim=1)
        return -(target * log_probs).mean()


def previous_knowledge_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """Plain KD over the old channels as this project computed it before (its own softmax of the old logits)."""
    num_old = old_logits.shape[1]
    with torch.autocast(device_type=new_logits.device.type, enabled=False):
        old_probs = torch.softmax(old_logits.detach().float(), dim=1)
        log_probs = torch.log_softmax(new_logits[:, :num_old].float(), dim=1)
        return -(old_probs * log_probs).mean()


# --------------------------------------------------------------- implementations under test
def load_reference(repo: Path):
    """The authors' loss module, loaded from ``repo/utils/loss.py`` by path under a private name: their
    ``utils`` package is not imported (its ``__init__`` pulls in the rest of their code, and by name it would
    be ours), and ``sys.path`` / ``sys.modules`` stay as they are. The file imports only torch."""
    path = repo / "utils" / "loss.py"
    spec = importlib.util.spec_from_file_location("mbs_reference_utils_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def implementations(reference_repo: Path | None) -> dict[str, dict]:
    """{loss: {implementation: fn(new_logits, old_logits, labels) -> scalar}}."""
    table = {
        "lgkd": {"ours": losses.label_guided_distillation, "previous": previous_label_guided_distillation},
        "kd": {"ours": lambda new, old, labels: losses.knowledge_distillation(new, old),
               "previous": lambda new, old, labels: previous_knowledge_distillation(new, old)},
    }
    if reference_repo is not None:
        reference = load_reference(reference_repo)
        lgkd = reference.LabelGuidedOutputDistillation(reduction="mean", alpha=1.0)
        kd = reference.KnowledgeDistillationLoss(reduction="mean", alpha=1.0)
        table["lgkd"]["reference"] = lambda new, old, labels: lgkd(new, old, labels)
        table["kd"]["reference"] = lambda new, old, labels: kd(new, old)
    return table


def make_inputs(batch: int, classes: int, old_classes: int, size: int, seed: int = 0):
    """New logits (with grad), old logits and step labels: ~60 % background, ~30 % new classes, ~10 % ignore."""
    generator = torch.Generator().manual_seed(seed)
    # Scaled in place: no temporary copy that would raise the peak-memory baseline.
    new_logits = torch.randn(batch, classes, size, size, generator=generator).mul_(2).requires_grad_()
    old_logits = torch.randn(batch, old_classes, size, size, generator=generator).mul_(2)
    draw = torch.rand(batch, size, size, generator=generator)
    new_class = torch.randint(old_classes, classes, (batch, size, size), generator=generator)
    labels = torch.where(draw < 0.6, 0, torch.where(draw < 0.9, new_class, IGNORE_INDEX))
    return new_logits, old_logits, labels


def forward_backward_seconds(fn, new_logits, old_logits, labels) -> float:
    new_logits.grad = None
    start = time.perf_counter()
    fn(new_logits, old_logits, labels).backward()
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    return {"min": min(seconds), "median": statistics.median(seconds), "all": seconds}


def time_all(table: dict, sizes: dict) -> dict:
    inputs = make_inputs(sizes["batch"], sizes["classes"], sizes["old_classes"], sizes["size"])
    results = {}
    for loss_name, impls in table.items():
        for fn in impls.values():  # warm-up round, not timed
            forward_backward_seconds(fn, *inputs)
        seconds = {name: [] for name in impls}
        for _ in range(sizes["repeats"]):
            for name, fn in impls.items():
                seconds[name].append(forward_backward_seconds(fn, *inputs))
        stats = {name: summary(values) for name, values in seconds.items()}
        ratios = {f"ours/{other}": {key: stats["ours"][key] / stats[other][key] for key in ("min", "median")}
                  for other in impls if other != "ours"}
        results[loss_name] = {"seconds": stats, "ratios": ratios, "agreement": agreement(impls, inputs)}
    return results


def agreement(impls: dict, inputs) -> dict:
    """Loss value of each implementation and the largest gradient difference from ``ours`` (sanity check)."""
    new_logits, old_logits, labels = inputs
    values, grads = {}, {}
    for name, fn in impls.items():
        new_logits.grad = None
        loss = fn(new_logits, old_logits, labels)
        loss.backward()
        values[name] = loss.item()
        grads[name] = new_logits.grad
    new_logits.grad = None
    return {"value": values,
            "max_abs_grad_difference_from_ours": {name: (grads[name] - grads["ours"]).abs().max().item()
                                                  for name in impls if name != "ours"},
            "max_abs_grad_ours": grads["ours"].abs().max().item()}


# --------------------------------------------------------------- peak memory, one subprocess per implementation
def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM of /proc/self/status, because ru_maxrss keeps the
    parent's peak across fork + exec; elsewhere ru_maxrss (bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure_memory_here(loss_name: str, impl_name: str, sizes: dict, reference_repo: Path | None) -> dict:
    """Run once in this (fresh) process: peak RSS after building the inputs and after one forward + backward."""
    fn = implementations(reference_repo)[loss_name][impl_name]
    inputs = make_inputs(sizes["batch"], sizes["classes"], sizes["old_classes"], sizes["size"])
    before = peak_rss_bytes()
    forward_backward_seconds(fn, *inputs)
    after = peak_rss_bytes()
    return {"peak_rss_bytes": after, "peak_growth_bytes": after - before}


def measure_memory(table: dict, sizes: dict, reference_repo: Path | None) -> dict:
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for loss_name, impls in table.items():
        results[loss_name] = {}
        for impl_name in impls:
            # same working directory and environment as this process: the module is found as it was here
            command = [sys.executable, "-m", "benchmarks.losses", "--memory-of", f"{loss_name}:{impl_name}",
                       *size_arguments(sizes)]
            if reference_repo is not None:
                command += ["--reference-repo", str(reference_repo)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            results[loss_name][impl_name] = json.loads(out)
    return results


def size_arguments(sizes: dict) -> list[str]:
    return [arg for key in ("batch", "classes", "old_classes", "size")
            for arg in (f"--{key.replace('_', '-')}", str(sizes[key]))]


# --------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.losses", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help=f"tiny sizes {SMALL_SIZE} (seconds; for CI)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--classes", type=int, help="C, channels of the current model")
    parser.add_argument("--old-classes", type=int, help="C_old, channels of the old model (background included)")
    parser.add_argument("--size", type=int, help="H = W of logits and labels")
    parser.add_argument("--repeats", type=int, help="timed repetitions per implementation (after one warm-up)")
    parser.add_argument("--reference-repo", type=Path, default=None,
                        help="clone of RoadoneP/ECCV2024_MBS; its utils/loss.py is imported (column skipped if absent)")
    parser.add_argument("--memory-of", metavar="LOSS:IMPL", help=argparse.SUPPRESS)  # internal: one subprocess
    return parser.parse_args(argv)


def resolve_sizes(args: argparse.Namespace) -> dict:
    defaults = SMALL_SIZE if args.small else FULL_SIZE
    return {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sizes = resolve_sizes(args)
    if args.reference_repo is not None and not (args.reference_repo / "utils" / "loss.py").is_file():
        sys.exit(f"--reference-repo {args.reference_repo}: no utils/loss.py there (expected a clone of "
                 f"RoadoneP/ECCV2024_MBS)")
    if args.memory_of:
        loss_name, impl_name = args.memory_of.split(":")
        print(json.dumps(measure_memory_here(loss_name, impl_name, sizes, args.reference_repo)))
        return
    if args.reference_repo is None:
        print("reference column skipped: no --reference-repo given", file=sys.stderr)
    table = implementations(args.reference_repo)
    load_start = os.getloadavg()
    memory = measure_memory(table, sizes, args.reference_repo)
    timings = time_all(table, sizes)
    report = {
        "config": {**sizes, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "reference_repo": None if args.reference_repo is None else str(args.reference_repo)},
        "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
        **{name: {**timings[name], "memory": memory[name]} for name in LOSSES},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
