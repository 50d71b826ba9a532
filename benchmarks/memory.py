"""Estimated peak GPU memory of a training iteration per recipe, measured on the CPU with fake tensors, printed as
one JSON object.

What is estimated: two iterations of the trainer's own ``trainer.step.StepRun`` / ``trainer.engine.train_iteration``
(forward, the frozen old model's forward, the method's losses, backward, SGD step) of each recipe
(configs/{voc,ade20k}{,_vit}.yaml, random init) at a step with the old model (VOC 15-1 step 1; ADE 100-50 step 1,
151 channels) and at step 0, with every tensor a FakeTensor: shapes and dtypes only, no compute, no memory.
``torch.distributed._tools.MemTracker`` gives the peak of the live tensors (parameters, gradients, momentum,
activations, temporaries, the old model). The recipe's mixed precision runs as CPU autocast (``StepRun``'s
``precision``); the loss scaler is off (fake tensors cannot take its overflow read; it holds a few bytes).

Not included, and why these are estimates, not GPU measurements: the CUDA context (~0.5 GiB), cuDNN / cuBLAS
workspaces, NCCL and DDP buckets (+1x the gradients with several GPUs), the caching allocator's fragmentation,
and CUDA autocast's own op policy (it may keep an op in fp32 where CPU autocast runs it in bf16, e.g. upsampling).
``utils.gpu_memory`` turns the per-image and fixed parts into the estimate main.py checks a GPU against.

    python -m benchmarks.memory                      # every recipe, ~10 min on 2 CPU cores
    python -m benchmarks.memory --recipes voc_r101 --batches 24 12
    python -m benchmarks.memory --small              # tiny models: plumbing check in seconds

(from the project root).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from datasets.tasks import get_task
from datasets.transforms import normalisation_constants
from trainer.engine import device_batch, train_iteration
from trainer.methods import build_method
from trainer.step import StepPlan, StepRun, step_models
from utils.config import load_config
from utils.distributed import DistContext
from utils.gpu_memory import memory_key

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# name -> (config, the recipe's per-GPU batch on one GPU, the precision its train.amp runs on a current GPU)
RECIPES = {
    "voc_r101": ("configs/voc.yaml", 24, "bf16"),
    "ade_r101": ("configs/ade20k.yaml", 24, "bf16"),
    "voc_vit": ("configs/voc_vit.yaml", 16, "fp16"),
    "ade_vit": ("configs/ade20k_vit.yaml", 8, "fp16"),
}
SMALL_OVERRIDES = {
    "deeplabv3": ["model.backbone=resnet18", "model.head_channels=16"],
    "segmenter": ['model.backbone_overrides={"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}',
                  "model.decoder_dim=32", "model.decoder_heads=2", "model.decoder_layers=1"],
}


@contextlib.contextmanager
def fake_tensors(mode: FakeTensorMode) -> Iterator[FakeTensorMode]:
    """FakeTensorMode in which modules can be moved and cast. ``Module.to`` swaps a fake parameter with its
    converted copy, and ``torch.utils.swap_tensors`` refuses tensors with weak references, which the mode's cache of
    real-to-fake conversions holds on every tensor it made (torch 2.14). Nothing here converts a real tensor, so
    that cache is emptied before each swap."""
    swap = torch.utils.swap_tensors
    normalisation_constants.cache_clear()  # device constants made in another mode cannot mix with this one's

    def swap_without_cache(first, second):
        mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
        return swap(first, second)

    torch.utils.swap_tensors = swap_without_cache
    try:
        with mode:
            yield mode
    finally:
        torch.utils.swap_tensors = swap
        normalisation_constants.cache_clear()


def as_fake(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """``module`` with every parameter and buffer replaced by a fake tensor of ``mode`` with the same shape, dtype and
    strides (called outside the mode)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(mode.from_tensor(param.detach()), param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = mode.from_tensor(buffer)
    return module


class LiveTensorTracker(MemTracker):
    """MemTracker's accounting of every live tensor storage, without its per-module bookkeeping, which registers
    gradient hooks on every parameter of a module it sees run (the frozen old model's refuse them) and takes a
    module's second forward for an error."""

    def _pre_fw_hook(self, module, inputs) -> None:
        pass

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass


def estimate(config: str, step: int, batch: int, precision: str, size: int = 512, small: bool = False,
             iterations: int = 2) -> dict:
    """Peak live-tensor bytes of ``iterations`` training iterations at ``step``, by category, under fake tensors."""
    overrides = ["model.pretrained=none", "device=cpu", f"data.crop_size={size}", f"data.base_size={size}"]
    cfg = load_config(ROOT / config, overrides)
    if small:
        cfg = load_config(ROOT / config, overrides + SMALL_OVERRIDES[cfg.model.architecture])
    task = get_task(cfg.data.dataset, cfg.data.task)
    started = time.time()
    torch.manual_seed(0)
    method = build_method(cfg.method, cfg.data.dataset, task.num_old_channels(step), task.num_channels(step))
    # built with real weights (timm reads numbers it draws), then every weight replaced by a fake one
    mode = FakeTensorMode()
    model, old_model = (None if m is None else as_fake(m, mode)
                        for m in step_models(cfg.model, task, step, method, size))
    with fake_tensors(mode):
        run = StepRun(step, model, old_model, method, StepPlan(1, iterations, iterations, 0.01), cfg.train,
                      DistContext(), precision=precision)
        # fake tensors cannot take the scaler's found_inf read (.item()); its own memory is a few bytes
        run.scaler = torch.amp.GradScaler("cpu", enabled=False)
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        labels = torch.randint(0, task.num_channels(step), (batch, size, size), dtype=torch.uint8)
        tracker = LiveTensorTracker()
        tracker.track_external(*[m for m in (run.model, run.old_model) if m is not None], run.optimizer)
        with tracker:
            for _ in range(iterations):
                x, y = device_batch(images, labels, run.ctx.device, run.memory_format)
                train_iteration(run, x, y)
                del x, y
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {"config": config, "architecture": f"{cfg.model.architecture} {cfg.model.backbone}",
            "dataset": cfg.data.dataset, "step": step, "channels": task.num_channels(step), "batch": batch,
            "size": size, "precision": precision, "peak_gib": round(peak["Total"] / GIB, 3),
            "by_category_gib": {k: round(v / GIB, 3) for k, v in peak.items() if k != "Total" and v},
            "seconds": round(time.time() - started, 1)}


def fit(low: dict, high: dict) -> dict:
    """Fixed and per-image parts of the peak from two batch sizes (the peak grows linearly with the batch)."""
    per_image = (high["peak_gib"] - low["peak_gib"]) / (high["batch"] - low["batch"])
    return {"fixed_gib": round(high["peak_gib"] - per_image * high["batch"], 3), "per_image_gib": round(per_image, 4)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--batches", nargs=2, type=int, metavar=("FULL", "HALF"),
                        help="per-GPU batches to fit the per-image part on (default: the recipe's and half of it)")
    parser.add_argument("--fp32", action="store_true", help="also estimate train.amp=none (fp32)")
    parser.add_argument("--small", action="store_true", help="tiny models at 64 px (a plumbing check)")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = 64 if args.small else 512
    report: dict = {"what": "peak live tensors of two training iterations, fake tensors on the CPU (an estimate: "
                            "no CUDA context, workspaces, DDP buckets or fragmentation)",
                    "torch": torch.__version__, "size": size, "recipes": {}}
    for name in args.recipes:
        config, recipe_batch, amp = RECIPES[name]
        full, half = args.batches or ((4, 2) if args.small else (recipe_batch, max(2, recipe_batch // 2)))
        rows = {}
        for precision in [amp] + (["fp32"] if args.fp32 else []):
            step1 = [estimate(config, 1, batch, precision, size, args.small) for batch in (half, full)]
            step0 = estimate(config, 0, full, precision, size, args.small)
            first = step1[0]
            rows[precision] = {"key": "/".join(memory_key(first["architecture"].split()[0],
                                                          first["architecture"].split()[1], first["dataset"],
                                                          precision)),
                               "step1": step1, "step0": step0, "step1_fit": fit(*step1)}
            print(json.dumps({name: {precision: rows[precision]["step1_fit"]}}), file=sys.stderr, flush=True)
        report["recipes"][name] = rows
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
