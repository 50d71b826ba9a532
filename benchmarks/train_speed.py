"""Training and evaluation speed of the project's own training path, printed as one JSON object.

What is measured (``"measured"`` in the JSON), for DeepLab-V3 R101 (configs/voc.yaml) and Segmenter ViT-B/16
(configs/voc_vit.yaml), random init, on synthetic batches already on the device (no data loading; see
benchmarks/pipeline.py for the loader):

- ``step0``: ``trainer.engine.train_iteration`` of VOC 15-1 step 0 (one classifier, cross-entropy only);
- ``incremental_mbs``: the same at VOC 15-1 step 1 (model [16, 1], the frozen old model [16], the MBS method
  with every component on), built as the trainer builds it (``trainer.step.StepRun``);
- ``evaluation``: ``trainer.engine.evaluate`` on batches of ``train.val_batch_size`` images;
- ``incremental_<name>`` (``--methods mib plop``): step 1 with another preset; a method with a per-step pass
  (PLOP's thresholds) runs it over the synthetic batch before the timing, as the trainer does before training.

Each configuration runs in a fresh process (peak memory of one configuration only). Warm-up iterations are
left out; on CUDA the clock is read after ``torch.cuda.synchronize``. Images/s: median and min over the timed
iterations. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one more iteration (forward, old model,
losses, backward, optimiser); on CUDA the achieved rate is also given as a fraction of the device's dense
bf16 peak when the device is in ``DENSE_BF16_PEAK_TFLOPS``.

What is projected (``"projected"``): the wall time of VOC 15-1 and ADE 100-50 on one device with each
architecture's recipe (configs/{voc,ade20k}{,_vit}.yaml), from the iterations per step (``trainer.step.
plan_step`` over the per-step image counts), the measured seconds per image, and the evaluations the recipe
runs (the test after each step; the reference's validations for the "best" policy).

    python -m benchmarks.train_speed --device cuda --output speed.json   # the recipes' batches, 512 px
    python -m benchmarks.train_speed --small --device cpu                # CI size: tiny models, seconds
    python -m benchmarks.train_speed --device cpu --arch segmenter --batch 1 --val-batch 1 --iters 3 --warmup 1
    python -m benchmarks.train_speed --arch deeplabv3 --size 256 --batch 2 --compare-finetune 5 --profile

(from the project root).

(DeepLab-V3 cannot train at batch 1: the batch norm of its ASPP image-pooling branch needs two images.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils import flop_counter

from datasets.class_lists import read_class_lists
from utils.ignore import IGNORE_INDEX
from datasets.splits import selection_image_ids, step_image_ids
from datasets.tasks import NUM_CLASSES, Task, get_task
from trainer.engine import collect_step_statistics, device_batch, evaluate, train_iteration
from trainer.methods import build_method
from trainer.step import StepRun, TrainState, effective_precision, plan_step, step_models, validation_due
from utils.config import Config, load_config
from utils.distributed import DistContext, init_distributed, sum_over_processes
from utils.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]

# The measured configurations are VOC 15-1 models; the projections use each dataset's recipe.
RECIPES = {"deeplabv3": {"voc": "configs/voc.yaml", "ade": "configs/ade20k.yaml"},
           "segmenter": {"voc": "configs/voc_vit.yaml", "ade": "configs/ade20k_vit.yaml"}}
ARCH_NAMES = {"deeplabv3": "DeepLab-V3 ResNet-101", "segmenter": "Segmenter ViT-B/16"}
# --small: the tiny models of the tests, so that the whole benchmark runs in seconds on a CPU
SMALL_OVERRIDES = {
    "deeplabv3": ["model.backbone=resnet18", "model.head_channels=16"],
    "segmenter": ['model.backbone_overrides={"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}',
                  "model.decoder_dim=32", "model.decoder_heads=2", "model.decoder_layers=1"],
}
SMALL_DEFAULTS = {"size": 64, "batch": 2, "iters": 2, "warmup": 1, "val_batch": 2}

# Fallback image counts (spec section 1, standard class lists, overlapped) for a checkout without the class
# lists in ../shared/data (or $MBS_SHARED_DATA).
SPEC_TRAIN_IMAGES = {("voc", "15-1"): [9568, 487, 299, 491, 500, 548], ("ade", "100-50"): [20192, 9390]}
SPEC_VAL_IMAGES = {"voc": 1449, "ade": 2000}
PROJECTED_TASKS = {"voc": "15-1", "ade": "100-50"}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (which print the sparse
# figure, twice these): H100 SXM 1979 / PCIe 1513 / NVL 1671, H200 1979, A100 624, L40S 733, A10 250.
# fp16 has the same peak on these devices. First matching pattern of torch.cuda.get_device_name() wins.
DENSE_BF16_PEAK_TFLOPS = [(r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100", 989.0), (r"H200", 989.0),
                          (r"A100", 312.0), (r"L40S", 362.0), (r"\bA10\b", 125.0)]

LABEL_IGNORED_SHARE = 0.1  # share of synthetic label pixels set to 255
DENSE_OP_PATTERN = re.compile(r"aten::(.*conv.*|mm|bmm|addmm|baddbmm|addbmm|matmul|linear|.*attention.*)$")

aten = torch.ops.aten


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode counts the CUDA attention kernels but not the CPU one (torch 2.14): the same formula for it.
CPU_ATTENTION_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                       aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


# ------------------------------------------------------------------ configuration
def shared_data_dir() -> Path:
    return Path(os.environ.get("MBS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shown(path: Path) -> str:
    """A path as the JSON shows it: relative to the checkout."""
    return os.path.relpath(path, ROOT)


def benchmark_config(config_path: str, arch: str, spec: dict) -> Config:
    """The recipe's config with random init, the benchmark's device, batch, size and precision."""
    overrides = ["model.pretrained=none", f"device={spec['device']}", f"data.crop_size={spec['size']}",
                 f"data.base_size={spec['size']}"]
    if spec.get("batch") is not None:
        overrides.append(f"train.batch_size={spec['batch']}")
    if spec.get("val_batch") is not None:
        overrides.append(f"train.val_batch_size={spec['val_batch']}")
    if spec.get("amp") is not None:
        overrides.append(f"train.amp={spec['amp']}")
    if spec.get("method") is not None:
        overrides.append(f"method.name={spec['method']}")
    if spec.get("small"):
        overrides += SMALL_OVERRIDES[arch]
    return load_config(ROOT / config_path, overrides)


def precision(cfg: Config, device: torch.device) -> str:
    """What the trainer computes in (trainer.step.effective_precision): autocast on CUDA only, bf16 as fp16 on GPUs
    without bf16 tensor cores."""
    effective = effective_precision(device, cfg.train.amp)
    return "fp32" if effective == "fp32" else f"{effective} autocast"


def train_image_counts(cfg: Config, task: Task) -> tuple[list[int], str]:
    """Training images of every step (datasets.splits over the standard class lists), or the spec's counts."""
    path = shared_data_dir() / cfg.data.dataset / "train_cls.txt"
    if path.is_file():
        lists = read_class_lists(path, NUM_CLASSES[cfg.data.dataset])
        disjoint = cfg.data.setting == "disjoint"
        return [len(step_image_ids(lists, task, t, disjoint)) for t in range(task.num_steps)], shown(path)
    return list(SPEC_TRAIN_IMAGES[(cfg.data.dataset, task.name)]), "spec section 1 (class lists not found)"


def validation_image_counts(cfg: Config, task: Task) -> tuple[int, list[int], str]:
    """The val set's size and, per step, the val images the reference selects its best weights on."""
    path = shared_data_dir() / cfg.data.dataset / "val_cls.txt"
    if path.is_file():
        lists = read_class_lists(path, NUM_CLASSES[cfg.data.dataset])
        return len(lists), [len(selection_image_ids(lists, task, t, lists)) for t in range(task.num_steps)], shown(path)
    total = SPEC_VAL_IMAGES[cfg.data.dataset]
    return total, [total] * task.num_steps, "spec section 1; selection images = whole val set (upper bound)"


# ------------------------------------------------------------------ one configuration (worker process)
def synthetic_batch(batch: int, size: int, channels: list[int], device: torch.device,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images (as the loaders hand them over) and labels drawn from ``channels``, with some
    pixels 255."""
    images = torch.randint(256, (batch, 3, size, size), generator=generator, dtype=torch.uint8)
    choices = torch.tensor(channels)
    labels = choices[torch.randint(len(channels), (batch, size, size), generator=generator)]
    labels[torch.rand(batch, size, size, generator=generator) < LABEL_IGNORED_SHARE] = IGNORE_INDEX
    return images.to(device), labels.to(device)


def step_label_channels(task: Task, step: int) -> list[int]:
    """The channels a step's labels hold: all seen ones at step 0; background and the new ones later (old
    classes are rewritten to background)."""
    return task.channels_seen(0) if step == 0 else [0] + task.channels_of_step(step)


def build_run(cfg: Config, task: Task, step: int, ctx: DistContext) -> StepRun:
    """The StepRun the trainer would build for ``step``, from random weights instead of a checkpoint (the
    trainer's own trainer.step.step_models)."""
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, cfg.data.dataset, task.num_old_channels(step), task.num_channels(step))
    model, old_model = step_models(cfg.model, task, step, method, cfg.data.crop_size)
    counts, _ = train_image_counts(cfg, task)
    plan = plan_step(cfg.train, step, counts[step])
    return StepRun(step, model, old_model, method, plan, cfg.train, ctx)


def prepared_step(spec: dict, step: int, ctx: DistContext, method: Optional[str] = None
                  ) -> tuple[Config, Task, StepRun, tuple[torch.Tensor, torch.Tensor]]:
    """Step ``step`` of the VOC 15-1 recipe (``method``: ``spec["method"]``, else the config's) as the trainer
    builds it, in training mode, and a synthetic batch of its labels on the device. A method with a per-step
    pass (PLOP's thresholds) has run it over that batch, as the trainer runs it before the first iteration."""
    cfg = benchmark_config(RECIPES[spec["arch"]]["voc"], spec["arch"],
                           {**spec, "method": method or spec.get("method")})
    task = get_task(cfg.data.dataset, cfg.data.task, cfg.data.custom_steps)
    run = build_run(cfg, task, step, ctx)
    images, labels = synthetic_batch(cfg.train.batch_size, cfg.data.crop_size, step_label_channels(task, step),
                                     ctx.device, torch.Generator().manual_seed(1))
    if run.method.needs_step_statistics:
        collect_step_statistics(run, [(images, labels)])
        run.method.finish_step_statistics(sum_over_processes)
    images, labels = device_batch(images, labels, ctx.device, run.memory_format)  # as trainer.engine.train does
    run.train_model.train()
    return cfg, task, run, (images, labels)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], object], warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds of each of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def speed_summary(times: list[float], batch: int) -> dict:
    return {"batch": batch, "iterations_timed": len(times),
            "s_per_iteration": {"median": statistics.median(times), "min": min(times), "max": max(times),
                                "all": times},
            "images_per_s": {"median": batch / statistics.median(times), "min": batch / max(times)}}


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process so far: host RSS always, allocated/reserved on CUDA."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    peak = {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30}
    if device.type == "cuda":
        peak["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return peak


def dense_bf16_peak(device: torch.device) -> tuple[Optional[float], str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for pattern, tflops in DENSE_BF16_PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops, name
    return None, name


def count_flops(call: Callable[[], object]) -> int:
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        call()
    return counter.get_total_flops()


def flop_rate(flops: int, median_s: float, cfg: Config, device: torch.device) -> dict:
    achieved = flops / median_s / 1e12
    rate = {"flops_per_iteration": flops, "achieved_tflops": achieved}
    peak, name = dense_bf16_peak(device)
    if peak is not None and precision(cfg, device) != "fp32":
        rate.update(dense_bf16_peak_tflops=peak, fraction_of_dense_bf16_peak=achieved / peak)
    elif device.type == "cuda":
        rate["fraction_of_dense_bf16_peak"] = None
        rate["why_no_fraction"] = (f"{name!r} is not in DENSE_BF16_PEAK_TFLOPS" if peak is None
                                   else "the step ran without autocast")
    return rate


def measure_training(spec: dict) -> dict:
    """Time train_iteration of one step of the VOC 15-1 recipe; then, for the incremental step, evaluation."""
    ctx = init_distributed(spec["device"])
    cfg, task, run, (images, labels) = prepared_step(spec, spec["step"], ctx)
    times = time_calls(lambda: train_iteration(run, images, labels), spec["warmup"], spec["iters"], ctx.device)
    run.check_losses()  # a benchmark of a diverging step would be meaningless
    result = {"classes_per_step": run.model.classes_per_step,
              "old_model": None if run.old_model is None else run.old_model.classes_per_step,
              "method": run.method.switches.describe() if run.method.incremental else "cross-entropy (step 0)",
              "precision": precision(cfg, ctx.device), "size": cfg.data.crop_size,
              "parameters_million": sum(p.numel() for p in run.model.parameters()) / 1e6,
              **speed_summary(times, cfg.train.batch_size), "peak_memory": peak_memory(ctx.device)}
    flops = count_flops(lambda: train_iteration(run, images, labels))
    result.update(flop_rate(flops, result["s_per_iteration"]["median"], cfg, ctx.device))
    if spec.get("evaluation"):
        result = {"train": result, "evaluation": measure_evaluation(run, cfg, task, spec)}
    return result


def measure_evaluation(run: StepRun, cfg: Config, task: Task, spec: dict) -> dict:
    """trainer.engine.evaluate (eval mode, no_grad, the trainer's autocast, confusion matrix) on one batch
    of ``train.val_batch_size`` images per call."""
    num_channels = task.num_channels(run.step)
    batch = synthetic_batch(cfg.train.val_batch_size, cfg.data.crop_size, list(range(num_channels)),
                            run.ctx.device, torch.Generator().manual_seed(2))
    times = time_calls(lambda: evaluate(run.model, [batch], num_channels, run.ctx, cfg.train.amp),
                       spec["warmup"], spec["iters"], run.ctx.device)
    return {"mode": "center crop (fixed size)", "precision": precision(cfg, run.ctx.device),
            **speed_summary(times, cfg.train.val_batch_size)}


def measure_mbs_over_finetune(spec: dict) -> dict:
    """The incremental MBS step against a fine-tuning step (cross-entropy, no old model) of the same model,
    and the old model's no-grad forward alone; the three are interleaved (order rotated) over repetitions."""
    ctx = init_distributed(spec["device"])
    mbs_cfg, _, mbs, (images, labels) = prepared_step(spec, 1, ctx, "mbs")
    _, _, finetune, _ = prepared_step(spec, 1, ctx, "finetune")

    def old_forward():
        with mbs.autocast, torch.no_grad():
            mbs.old_forward(images)

    calls = {"finetune": lambda: train_iteration(finetune, images, labels),
             "mbs": lambda: train_iteration(mbs, images, labels), "old_forward": old_forward}
    names = list(calls)
    times = {name: [] for name in names}
    for repetition in range(spec["warmup"] + spec["repetitions"]):
        order = names[repetition % 3:] + names[:repetition % 3]
        for name in order:
            seconds = time_calls(calls[name], 0, 1, ctx.device)[0]
            if repetition >= spec["warmup"]:
                times[name].append(seconds)
    ratio = [m / f for m, f in zip(times["mbs"], times["finetune"])]
    bound = [(f + o) / f for f, o in zip(times["finetune"], times["old_forward"])]
    return {"classes_per_step": mbs.model.classes_per_step, "batch": mbs_cfg.train.batch_size,
            "size": mbs_cfg.data.crop_size, "precision": precision(mbs_cfg, ctx.device),
            "repetitions": spec["repetitions"], "seconds": times,
            "mbs_over_finetune": {"min": min(ratio), "median": statistics.median(ratio), "all": ratio},
            "lower_bound_finetune_plus_old_forward_over_finetune": {
                "min": min(bound), "median": statistics.median(bound), "all": bound}}


def profile_incremental_step(spec: dict) -> dict:
    """torch.profiler over one incremental MBS iteration: the ops that dominate, and how much of the wall
    time is spent outside aten ops (Python, autograd engine, optimiser loop: the framework's overhead)."""
    ctx = init_distributed(spec["device"])
    cfg, _, run, (images, labels) = prepared_step(spec, 1, ctx)
    time_calls(lambda: train_iteration(run, images, labels), spec["warmup"], 0, ctx.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ctx.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        wall_s = time_calls(lambda: train_iteration(run, images, labels), 0, 1, ctx.device)[0]
    return summarize_profile(profiler.key_averages(), wall_s, run, cfg)


def summarize_profile(events, wall_s: float, run: StepRun, cfg: Config, top: int = 15) -> dict:
    device, wall_us = run.ctx.device, wall_s * 1e6
    ops = [e for e in events if e.key.startswith("aten::")]
    op_us = sum(e.self_cpu_time_total for e in ops)
    dense_us = sum(e.self_cpu_time_total for e in ops if DENSE_OP_PATTERN.search(e.key))
    summary = {
        "classes_per_step": run.model.classes_per_step, "batch": cfg.train.batch_size, "size": cfg.data.crop_size,
        "precision": precision(cfg, device), "profiled_iteration_s": wall_s,
        "host_time_shares": {
            "dense_ops (conv, matmul, attention)": dense_us / wall_us,
            "other_aten_ops": (op_us - dense_us) / wall_us,
            "outside_aten_ops (framework overhead)": max(0.0, 1 - op_us / wall_us)},
        "top_ops_by_self_cpu_time": [
            {"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
             "share_of_wall": e.self_cpu_time_total / wall_us}
            for e in sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]],
        "note": "times under the profiler (which adds overhead); self CPU time of the calling thread",
    }
    if device.type == "cuda":
        device_ops = sorted(ops, key=lambda e: e.self_device_time_total, reverse=True)
        busy_us = sum(e.self_device_time_total for e in ops)
        summary["device_busy_share"] = busy_us / wall_us
        summary["top_ops_by_self_device_time"] = [
            {"op": e.key, "calls": e.count, "self_device_s": e.self_device_time_total / 1e6,
             "share_of_wall": e.self_device_time_total / wall_us} for e in device_ops[:top]]
    return summary


WORKERS = {"train": measure_training, "compare": measure_mbs_over_finetune, "profile": profile_incremental_step}


# ------------------------------------------------------------------ orchestration (parent process)
def run_worker(spec: dict) -> dict:
    """One configuration in a fresh Python process (its peak memory is its own); its JSON result."""
    command = [sys.executable, "-m", "benchmarks.train_speed", "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"the benchmark worker for {spec} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def projected_run(arch: str, dataset: str, measured: dict, spec: dict) -> dict:
    """Wall time of one task with one recipe on one device, from the measured seconds per image."""
    cfg = benchmark_config(RECIPES[arch][dataset], arch, {**spec, "batch": None, "val_batch": None})
    task = get_task(cfg.data.dataset, PROJECTED_TASKS[dataset])
    train_counts, train_source = train_image_counts(cfg, task)
    val_images, selection_counts, val_source = validation_image_counts(cfg, task)
    incremental = measured["incremental_mbs"]["train"]
    step_rates = [measured["step0"], incremental]
    eval_s_per_image = 1 / measured["incremental_mbs"]["evaluation"]["images_per_s"]["median"]
    steps = []
    for step, images in enumerate(train_counts):
        plan = plan_step(cfg.train, step, images)
        rate = step_rates[min(step, 1)]
        train_s = plan.total_iterations * cfg.train.batch_size * rate["s_per_iteration"]["median"] / rate["batch"]
        validations = count_validations(cfg, plan)
        steps.append({"step": step, "train_images": images, "epochs": plan.epochs,
                      "iterations": plan.total_iterations, "train_s": train_s,
                      "validations_during_step": validations, "selection_images": selection_counts[step],
                      "validation_s": validations * selection_counts[step] * eval_s_per_image,
                      "test_images": val_images, "test_s": val_images * eval_s_per_image})
    train_h = sum(s["train_s"] for s in steps) / 3600
    eval_h = sum(s["validation_s"] + s["test_s"] for s in steps) / 3600
    return {"run": f"{cfg.data.dataset.upper()} {task.name} {cfg.data.setting}, {ARCH_NAMES[arch]}",
            "config": RECIPES[arch][dataset], "batch": cfg.train.batch_size,
            "checkpoint_policy": cfg.train.checkpoint_policy, "validation": cfg.train.validation,
            "train_images_from": train_source, "val_images_from": val_source, "steps": steps,
            "train_hours": train_h, "evaluation_hours": eval_h, "total_hours": train_h + eval_h}


def count_validations(cfg: Config, plan) -> int:
    """How often the recipe validates during a step (trainer.step.validation_due, iteration by iteration)."""
    if cfg.train.validation == "none":
        return 0
    state, count = TrainState(), 0
    while state.iteration < plan.total_iterations:
        completed_epoch = state.advance(plan.iterations_per_epoch)
        count += validation_due(cfg.train.validation, cfg.train.val_interval, state, plan, completed_epoch)
    return count


PROJECTION_BASIS = (
    "Projected, not measured. Training: the recipe's iterations per step (trainer.step.plan_step over the "
    "step's training images) x the measured median seconds per image (s/iteration / measured batch) x the "
    "recipe's batch: time is assumed linear in the batch, so a measurement at a smaller batch than the "
    "recipe's overestimates a GPU run. Step 0 uses the step-0 measurement, every later step the VOC 15-1 step-1 "
    "MBS measurement (ADE 100-50 step 1 has 151 channels instead of 17: more decoder tokens for the Segmenter, "
    "a wider 1x1 classifier for DeepLab). Evaluation: images x the measured median seconds per image, for the "
    "test on the whole val set after each step and the reference's validations during a step on the images "
    "showing the step's classes (ViT recipes: checkpoint_policy best). Data loading is assumed to keep up "
    "(benchmarks/pipeline.py measures it); checkpoint writing and start-up are left out.")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def projection_caveats(args: argparse.Namespace) -> list[str]:
    caveats = []
    if args.small:
        caveats.append("--small: measured on tiny models, not the recipes' ones: the projections only exercise "
                       "the code")
    if args.size != 512:
        caveats.append(f"measured at {args.size} px; the recipes train and evaluate at 512 px")
    if args.device == "cpu":
        caveats.append("measured on a CPU in fp32: a GPU run (bf16/fp16 autocast) is far faster")
    return caveats


def machine_info(device: torch.device) -> dict:
    return {"device": str(device), "device_name": dense_bf16_peak(device)[1] if device.type == "cuda" else cpu_name(),
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def resolve_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available")
    for key, small_value in SMALL_DEFAULTS.items():
        if getattr(args, key) is None and args.small:
            setattr(args, key, small_value)
    if args.batch == 1 and args.arch in ("deeplabv3", "both"):
        parser.error("--batch 1 cannot train DeepLab-V3: batch norm in the ASPP's image-pooling branch "
                         "needs more than one value per channel (use --batch 2 or more, or --arch segmenter)")
    args.size = args.size or 512
    args.iters = args.iters or 10
    args.warmup = 3 if args.warmup is None else args.warmup
    return args


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--arch", choices=["deeplabv3", "segmenter", "both"], default="both")
    parser.add_argument("--batch", type=int, help="training batch (default: the config's train.batch_size)")
    parser.add_argument("--val-batch", type=int, help="evaluation batch (default: the config's train.val_batch_size)")
    parser.add_argument("--size", type=int, help="crop size in pixels (default 512)")
    parser.add_argument("--iters", type=int, help="timed iterations per configuration (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default 3)")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"],
                        help="CUDA autocast (default: the config's train.amp; the trainer runs fp32 on CPU)")
    parser.add_argument("--small", action="store_true",
                        help="tiny models (resnet18 with a 16-channel head, a 2-block ViT), 64 px, batch 2, 2 "
                             "iterations: seconds on a CPU; the numbers say nothing about the real models")
    parser.add_argument("--compare-finetune", type=int, default=0, metavar="REPS",
                        help="also time the MBS step against a fine-tuning step over REPS interleaved repetitions")
    parser.add_argument("--profile", action="store_true", help="also profile one incremental MBS iteration")
    parser.add_argument("--methods", nargs="+", choices=sorted(PRESETS), metavar="NAME",
                        help="also time the incremental step with these presets (e.g. mib plop), as "
                             "incremental_NAME; PLOP's per-step pass runs first, untimed")
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one configuration, JSON spec
    return parser


def measure_architecture(arch: str, spec: dict, args: argparse.Namespace) -> dict:
    def say(what: str) -> None:
        print(f"[train_speed] {arch}: {what}", file=sys.stderr, flush=True)

    spec = {**spec, "arch": arch}
    say("step 0")
    measured = {"config": RECIPES[arch]["voc"], "model": ARCH_NAMES[arch] + (" (--small: tiny)" if args.small else ""),
                "step0": run_worker({**spec, "kind": "train", "step": 0})}
    say("incremental MBS step and evaluation")
    measured["incremental_mbs"] = run_worker({**spec, "kind": "train", "step": 1, "evaluation": True})
    for method in args.methods or ():
        say(f"incremental {method} step")
        measured[f"incremental_{method}"] = run_worker({**spec, "kind": "train", "step": 1, "method": method})
    if args.compare_finetune:
        say(f"MBS vs fine-tuning, {args.compare_finetune} repetitions")
        measured["mbs_vs_finetune"] = run_worker({**spec, "kind": "compare", "repetitions": args.compare_finetune})
    if args.profile:
        say("profile of the incremental MBS step")
        measured["profile_incremental_mbs"] = run_worker({**spec, "kind": "profile"})
    return measured


def main(argv: Optional[list[str]] = None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0
    args = resolve_arguments(args, parser)
    spec = {"device": args.device, "size": args.size, "batch": args.batch, "val_batch": args.val_batch,
            "iters": args.iters, "warmup": args.warmup, "amp": args.amp, "small": args.small}
    archs = ["deeplabv3", "segmenter"] if args.arch == "both" else [args.arch]
    load_before = os.getloadavg()
    measured = {arch: measure_architecture(arch, spec, args) for arch in archs}
    load_after = os.getloadavg()
    report = {
        "benchmark": "benchmarks.train_speed", "command": " ".join(["python -m benchmarks.train_speed", *sys.argv[1:]]),
        "machine": {**machine_info(torch.device(args.device)), "load_average_1_5_15_before": load_before,
                    "load_average_1_5_15_after": load_after},
        "settings": dict(spec),
        "measured": {"what": "trainer.engine.train_iteration / evaluate on synthetic batches already on the "
                             "device, VOC 15-1 models, random init; medians and minima over the timed iterations",
                     **measured},
        "projected": {"basis": PROJECTION_BASIS, "caveats": projection_caveats(args),
                      "runs": [projected_run(arch, dataset, measured[arch], spec)
                               for arch in archs for dataset in ("voc", "ade")]},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
