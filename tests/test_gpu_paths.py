"""The CUDA-only branches, checked on the CPU: what a run records about where it ran, the refusal of an unasked CPU
fallback, no host-device synchronisation per training iteration, fp16 loss-scaling accounting, compilation across
the steps of a task, the old model's dtype, the bf16 fallback, DDP's layout and settings, the multi-node check and
the GPU memory estimate.

How the CUDA branches run here: ``StepRun(precision=...)`` takes the precision a GPU would run (CPU autocast in
bf16 or fp16, ``GradScaler("cpu")`` for fp16); the decisions that depend on the GPU itself (compute capability,
fused SGD) are functions of ``trainer.step`` called with ``torch.device("cuda")``, whose ``torch.cuda`` queries
are monkeypatched.
"""
from __future__ import annotations

import logging
import socket
import types
import warnings

import pytest
import torch

import trainer.step as step_module
from datasets.tasks import Task
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device
from models.deeplab import DeepLabV3
from trainer.engine import device_batch, train_iteration
from trainer.methods import build_method
from trainer.step import (LossNotFiniteError, StepPlan, StepRun, describe_runtime, effective_precision, fused_sgd,
                          precision_fallback, runtime_record, step_models, synchronised_batch_norm)
from utils.config import ConfigError, full_size_model, load_config
from utils.distributed import DistContext, gpu_runs_build, init_distributed, unsupported_gpu
from utils.metrics import ConfusionMatrix

from tests.helpers import ROOT, free_port

CUDA = torch.device("cuda", 0)
TINY_SEGMENTER = ['model.architecture=segmenter', 'model.backbone=vit_tiny_patch16_224',
                  'model.backbone_overrides={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}',
                  "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_layers=1", "model.pretrained=none"]


def fake_gpu(monkeypatch, capability=(9, 0), name="NVIDIA H100 80GB HBM3", memory_gib=80.0):
    """torch.cuda's answers about a GPU that is not there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(name=name, total_memory=int(memory_gib * 2**30)))


def tiny_step_run(step=1, precision=None, architecture="deeplabv3", overrides=(), seed=0):
    """The StepRun the trainer builds at ``step`` of a 3 + 2 + 2 class task, tiny model, on the CPU."""
    model_options = (["model.backbone=resnet18", "model.head_channels=8", "model.pretrained=none"]
                     if architecture == "deeplabv3" else TINY_SEGMENTER)
    cfg = load_config(None, model_options + list(overrides))
    task = Task("voc", "tiny", ((0, 1, 2), (3, 4), (5, 6)))
    torch.manual_seed(seed)
    method = build_method(cfg.method, cfg.data.dataset, task.num_old_channels(step), task.num_channels(step))
    model, old = step_models(cfg.model, task, step, method, 32)
    run = StepRun(step, model, old, method, StepPlan(1, 100, 100, 0.01), cfg.train, DistContext(),
                  precision=precision)
    if run.scaler.is_enabled():
        # this tiny network's gradients overflow fp16 at the default start scale 2^16: every run's first step
        # would be a skip; a smaller start makes the skips each test provokes the only ones
        run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    return run


def batch(seed=1, size=32, new_class=3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = (torch.randint(0, 2, (2, size, size), generator=generator) * new_class).to(torch.uint8)
    return images, labels


def iterate(run, images, labels):
    x, y = device_batch(images, labels, run.ctx.device, run.memory_format)
    return train_iteration(run, x, y)


# ------------------------------------------------------------------ 1. what ran
def test_runtime_record_of_a_cpu_run():
    cfg = load_config(None, [])
    record = runtime_record(cfg.train, "deeplabv3", DistContext())
    assert record["device"] == "cpu" and record["device_name"] == "CPU" and record["capability"] is None
    assert record["precision"] == "fp32" and record["amp"] == "bf16" and not record["loss_scaling"]
    assert record["world_size"] == 1 and record["backend"] is None
    assert record["sync_bn"] is False and record["compile"] is False
    assert record["torch"] == torch.__version__ and record["cuda"] == torch.version.cuda
    line = describe_runtime(record)
    assert line.startswith("runtime: cpu;") and "precision fp32" in line and "1 process;" in line
    assert "synchronised batch norm off" in line and "compile off" in line


def test_runtime_record_of_several_gpus(monkeypatch):
    fake_gpu(monkeypatch)
    ctx = DistContext(rank=0, world_size=4, device=CUDA)
    record = runtime_record(load_config(None, ["train.compile=true"]).train, "deeplabv3", ctx)
    assert record["device_name"] == "NVIDIA H100 80GB HBM3" and record["capability"] == "9.0"
    assert record["memory_gib"] == 80.0 and record["precision"] == "bf16" and record["world_size"] == 4
    assert record["sync_bn"] is True and record["compile"] is True  # sync_bn null: on for several GPUs
    line = describe_runtime(record)
    assert "compute capability 9.0" in line and "precision bf16;" in line and "4 processes" in line
    assert runtime_record(load_config(None, ["train.sync_bn=false"]).train, "deeplabv3", ctx)["sync_bn"] is False
    assert runtime_record(load_config(None, []).train, "segmenter", ctx)["sync_bn"] is False  # no batch norm


def test_report_shows_where_each_run_ran():
    from analysis.report import comparison_table, ran_on
    step = {"step": 0, "miou_old": 0.5, "miou_new": None, "miou_all": 0.5, "miou_old_no_bg": 0.4}
    recorded = {"meta": {"name": "gpu", "runtime": {"device_name": "NVIDIA H100", "precision": "bf16",
                                                     "world_size": 4}}, "steps": [step]}
    old = {"meta": {"name": "old"}, "steps": [step]}  # written before meta.runtime existed
    table = comparison_table([recorded, old])
    assert "| ran on |" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| NVIDIA H100, bf16, 4 processes |")
    assert table.splitlines()[3].endswith("| - |")
    assert ran_on({"runtime": {"device_name": "CPU", "precision": "fp32", "world_size": 1}}) == "CPU, fp32"


# ------------------------------------------------------------------ 2. no silent CPU fallback
def test_full_size_models_are_the_recipes_models():
    assert full_size_model(load_config(ROOT / "configs/voc.yaml", [])) == "DeepLab-V3 ResNet-101 at 512 px"
    assert full_size_model(load_config(ROOT / "configs/ade20k_vit.yaml", [])) == \
        "Segmenter vit_base_patch16_384 at 512 px"
    assert full_size_model(load_config(ROOT / "configs/voc.yaml", ["data.crop_size=320"])) is None
    assert full_size_model(load_config(ROOT / "configs/voc.yaml", ["model.backbone=resnet50"])) is None
    assert full_size_model(load_config(ROOT / "configs/demo.yaml", [])) is None
    assert full_size_model(load_config(ROOT / "configs/voc_vit.yaml", TINY_SEGMENTER[2:3])) is None


@pytest.mark.parametrize("world_size, model, meant", [
    ("2", None, "2 processes were launched"),
    ("1", "DeepLab-V3 ResNet-101 at 512 px", "the model is DeepLab-V3 ResNet-101 at 512 px"),
])
def test_auto_device_refuses_an_unasked_cpu_run(monkeypatch, world_size, model, meant):
    import torch.distributed as dist
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as caught:
        init_distributed("auto", full_size_model=model)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("config key 'device': auto found no usable CUDA device (")
    assert meant in message and message.endswith("to train on the CPU anyway pass device=cpu")
    assert f"CUDA {torch.version.cuda}" in message and " ".join(torch.cuda.get_arch_list()) in message
    assert not dist.is_initialized()  # refused before any process group


def test_cpu_runs_that_ask_for_it_or_are_small_still_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("auto").device.type == "cpu"  # the demo, the tests: small models
    assert init_distributed("cpu", full_size_model="DeepLab-V3 ResNet-101 at 512 px").device.type == "cpu"


def test_gpu_without_kernels_in_the_build_is_named(monkeypatch):
    default = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1's default wheel
    assert not gpu_runs_build((7, 0), default)  # V100
    assert gpu_runs_build((7, 5), default) and gpu_runs_build((8, 9), default) and gpu_runs_build((9, 0), default)
    assert gpu_runs_build((7, 0), ["sm_70", "sm_80"]) and gpu_runs_build((7, 2), ["compute_70"])
    assert not gpu_runs_build((9, 1), ["sm_90a"]) and gpu_runs_build((9, 0), ["sm_90a"])
    fake_gpu(monkeypatch, capability=(7, 0), name="Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: default)
    problem = unsupported_gpu(CUDA)
    assert "cuda:0 (Tesla V100-SXM2-32GB, compute capability 7.0) has no kernels" in problem
    assert "built for CUDA 13.0 with kernels for sm_75 sm_80" in problem or torch.version.cuda != "13.0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"^config key 'device': the GPU cuda:0 \(Tesla V100-SXM2-32GB, compute "
                                          r"capability 7.0\) has no kernels .* or pass device=cpu$"):
        init_distributed("auto")
    fake_gpu(monkeypatch, capability=(8, 0))
    assert unsupported_gpu(CUDA) is None
    assert init_distributed("auto").device == CUDA


@pytest.mark.slow
def test_torchrun_of_a_recipe_without_cuda_stops_in_one_line(tmp_path):
    from tests.helpers import run
    import sys
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
                  "--config", "configs/voc.yaml", "--opt", f"output_dir={tmp_path}", "device=auto"])
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "auto found no usable CUDA device" in lines[0] and "2 processes were launched" in lines[0]
    assert "pass device=cpu" in lines[0]
    assert "main.py\", line" not in result.stderr  # no traceback of ours (torchrun reports the failed ranks)


# ------------------------------------------------------------------ 3. no host-device sync per iteration
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the calls that make the host wait for the device on CUDA: reading a tensor's value
    (``Tensor.item``/``tolist``/``cpu``/``bool(...)``...) and tensors built from host data (``torch.tensor``,
    ``torch.as_tensor``: a blocking host-to-device copy on CUDA). Only while ``counting`` is on."""
    calls: list[str] = []
    state = {"counting": False}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            if state["counting"]:
                calls.append(name)
            return original(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, counted(f"torch.{name}", getattr(torch, name)))
    return calls, state


@pytest.mark.parametrize("precision, cuda_choices, expected", [
    ("fp32", False, []),                         # the CPU path
    ("bf16", True, []),                          # a GPU in bf16: fused SGD, no loss scaling
    ("fp16", True, ["Tensor.item"]),             # fp16: GradScaler reads its overflow flag (foreach SGD, see below)
])
def test_no_host_sync_in_a_training_iteration(monkeypatch, host_reads, precision, cuda_choices, expected):
    if cuda_choices:  # the optimiser a GPU would get
        monkeypatch.setattr(step_module, "fused_sgd", lambda device, loss_scaling: fused_sgd(CUDA, loss_scaling))
    run = tiny_step_run(precision=precision)
    images, labels = batch()
    iterate(run, images, labels)  # first iteration: lazy state (momentum, the scaler's scale, constants)
    calls, state = host_reads
    state["counting"] = True
    for _ in range(2):
        iterate(run, images, labels)
    state["counting"] = False
    assert calls == expected * 2
    run.check_losses()  # the one deliberate read, at logging and checkpoint points
    assert run.state.skipped_steps == 0 and run.state.nonfinite_losses == 0


def test_normalisation_is_torchvision_bit_for_bit_without_host_copies(host_reads):
    from torchvision.transforms.v2 import functional as F
    generator = torch.Generator().manual_seed(0)
    calls, state = host_reads
    for shape in [(1, 3, 5, 7), (4, 3, 32, 48), (2, 3, 97, 64)]:
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        expected = F.normalize(F.to_dtype(images, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
        normalize_on_device(images)  # builds the device constants once
        state["counting"] = True
        out = normalize_on_device(images)
        state["counting"] = False
        assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert calls == []


def test_confusion_matrix_update_is_sync_free_and_counts_as_before():
    generator = torch.Generator().manual_seed(0)
    n = 5
    target = torch.randint(0, n + 2, (3, 17, 19), generator=generator)
    target[target == n + 1] = 255
    prediction = torch.randint(0, n, (3, 17, 19), generator=generator)
    matrix = ConfusionMatrix(n)
    matrix.update(prediction, target)
    valid = target < n  # the former formulation, a boolean-mask selection
    expected = torch.bincount(target[valid] * n + prediction[valid], minlength=n * n).view(n, n)
    assert torch.equal(matrix.matrix, expected)
    # a data-dependent shape (mask selection, bincount) cannot run on the meta device; this update can
    on_meta = ConfusionMatrix(n, device="meta")
    on_meta.update(prediction.to("meta"), target.to("meta"))
    assert on_meta.matrix.shape == (n, n)


def test_fused_sgd_on_cuda_without_loss_scaling_only():
    assert fused_sgd(CUDA, loss_scaling=False)
    assert not fused_sgd(CUDA, loss_scaling=True)
    assert not fused_sgd(torch.device("cpu"), loss_scaling=False)
    run = tiny_step_run()
    assert not run.optimizer.defaults.get("fused")  # the CPU path keeps its SGD


def test_a_skipped_first_step_leaves_the_weights_as_if_it_never_happened(monkeypatch):
    """Why fp16 keeps the foreach SGD: the scaler skips a first step that overflowed, and the next step must start
    from clean momentum. (PyTorch's fused SGD allocates its momentum buffers uninitialised and leaves them so when
    the scaler skips the first step; with it this test fails.)"""
    monkeypatch.setattr(step_module, "fused_sgd", lambda device, loss_scaling: fused_sgd(CUDA, loss_scaling))
    images, labels = batch()
    constant_lr = ["train.lr_schedule=constant"]  # the schedule counts the skipped iteration
    skipped_first = tiny_step_run(precision="fp16", overrides=constant_lr)
    hook = skipped_first.model.backbone.stem[0].weight.register_hook(lambda grad: grad * float("inf"))
    iterate(skipped_first, images, labels)
    hook.remove()
    torch.manual_seed(5)  # the same dropout masks (ASPP) in both updates
    iterate(skipped_first, images, labels)
    one_step = tiny_step_run(precision="fp16", overrides=constant_lr)
    torch.manual_seed(5)
    iterate(one_step, images, labels)
    skipped_first.check_losses()
    assert skipped_first.state.skipped_steps == 1
    # the same update (up to fp16 rounding at another loss scale); uninitialised momentum is off by orders
    for (name, a), b in zip(skipped_first.model.named_parameters(), one_step.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), name


def test_sync_bn_switch():
    cpu_pair, gpu_pair = DistContext(world_size=2), DistContext(world_size=2, device=CUDA)
    default, off, on = (load_config(None, [f"train.sync_bn={value}"]).train for value in ("null", "false", "true"))
    assert synchronised_batch_norm(default, True, gpu_pair) and synchronised_batch_norm(on, True, gpu_pair)
    assert not synchronised_batch_norm(off, True, gpu_pair)
    assert not synchronised_batch_norm(default, False, gpu_pair)  # a model without batch norm
    assert not synchronised_batch_norm(on, True, DistContext(device=CUDA))  # one process: nothing to synchronise
    assert not synchronised_batch_norm(default, True, cpu_pair)
    with pytest.raises(ConfigError, match="train.sync_bn=true: synchronised batch norm runs on CUDA only"):
        synchronised_batch_norm(on, True, cpu_pair)


def test_one_image_per_gpu_needs_synchronised_batch_norm():
    from trainer.incremental import check_batch_for_batch_norm
    gpu_pair = DistContext(world_size=2, device=CUDA)
    check_batch_for_batch_norm(load_config(None, ["train.batch_size=2"]), gpu_pair)
    with pytest.raises(ConfigError, match="leaves one image per process"):
        check_batch_for_batch_norm(load_config(None, ["train.batch_size=2", "train.sync_bn=false"]), gpu_pair)


# ------------------------------------------------------------------ 4. fp16 accounting
def test_an_overflowing_gradient_with_a_finite_loss_is_a_skipped_step(caplog):
    run = tiny_step_run(precision="fp16")
    images, labels = batch()
    iterate(run, images, labels)
    hook = run.model.classifiers[0].weight.register_hook(lambda grad: grad * float("inf"))
    before = [p.detach().clone() for p in run.model.parameters()]
    loss, _, _ = iterate(run, images, labels)
    hook.remove()
    assert torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))  # the update was skipped
    run.state.iteration = 2
    with caplog.at_level(logging.WARNING, logger="mbs"):
        run.check_losses()
    assert run.state.skipped_steps == 1 and run.state.nonfinite_losses == 0
    assert "the fp16 gradient scaler skipped 1 of the iterations 1..2" in caplog.text
    assert "not finite" not in caplog.text


def test_a_nan_loss_with_finite_gradients_is_a_nonfinite_loss_not_a_skip(monkeypatch, caplog):
    run = tiny_step_run(precision="fp16")
    losses = run.method.losses
    monkeypatch.setattr(run.method, "losses", lambda *args: {**losses(*args), "broken": torch.tensor(float("nan"))})
    images, labels = batch()
    before = [p.detach().clone() for p in run.model.parameters()]
    loss, _, _ = iterate(run, images, labels)
    assert torch.isnan(loss)
    assert not all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))  # gradients were finite
    run.state.iteration = 1
    with caplog.at_level(logging.WARNING, logger="mbs"):
        run.check_losses()
    assert run.state.nonfinite_losses == 1 and run.state.skipped_steps == 0
    assert "the loss was not finite in 1 of the iterations 1..1" in caplog.text and "skipped" not in caplog.text


@pytest.mark.slow
def test_a_persistently_nan_fp16_run_stops(monkeypatch):
    run = tiny_step_run(precision="fp16")
    images, labels = batch()
    real_forward = run.model.forward
    monkeypatch.setattr(run.model, "forward", lambda x, **options: real_forward(x * float("nan"), **options))
    for iteration in range(1, 13):
        iterate(run, images, labels)
        run.state.iteration = iteration
        if iteration % 4 == 0 and iteration < 12:
            run.check_losses()  # 4 and 8 in a row: loss scaling may still recover
    with pytest.raises(LossNotFiniteError, match=r"step 1: the loss was not finite in 12 iterations in a row"):
        run.check_losses()


@pytest.mark.slow
def test_an_fp16_run_whose_scale_collapses_stops():
    run = tiny_step_run(precision="fp16")
    images, labels = batch()
    hook = run.model.classifiers[0].weight.register_hook(lambda grad: grad * float("inf"))
    for iteration in range(1, 10):  # 256 halved 9 times: 0.5
        iterate(run, images, labels)
    hook.remove()
    run.state.iteration = 9
    with pytest.raises(LossNotFiniteError, match=r"the fp16 loss scale fell to 0.5 by iteration 9"):
        run.check_losses()


def test_a_skipped_first_step_does_not_warn_about_the_schedule():
    run = tiny_step_run(precision="fp16")
    images, labels = batch()
    hook = run.model.classifiers[0].weight.register_hook(lambda grad: grad * float("inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iterate(run, images, labels)
    hook.remove()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert run.scheduler.last_epoch == 1  # the schedule counts the iteration all the same


# ------------------------------------------------------------------ 5. compile across the steps of a task
@pytest.mark.slow
def test_compiled_trunk_serves_every_step_of_an_eleven_step_task(monkeypatch):
    import torch._dynamo
    from trainer.engine import evaluate
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: real_compile(function, backend="eager"))
    messages = []

    class Catch(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    catcher = Catch()
    dynamo_logger = logging.getLogger("torch._dynamo")
    dynamo_logger.addHandler(catcher)
    torch._dynamo.reset()
    try:
        cfg = load_config(None, ["model.backbone=resnet18", "model.head_channels=8", "model.pretrained=none",
                                 "train.compile=true"])
        task = Task("voc", "10-1", tuple([tuple(range(11))] + [(c,) for c in range(11, 21)]))
        images, labels = batch(size=32, new_class=0)
        previous = None
        for step in range(task.num_steps):
            method = build_method(cfg.method, cfg.data.dataset, task.num_old_channels(step), task.num_channels(step))
            model, old = step_models(cfg.model, task, step, method, 32, previous)
            run = StepRun(step, model, old, method, StepPlan(1, 1, 1, 0.01), cfg.train, DistContext())
            iterate(run, images, labels)
            evaluate(run.model, [(images, labels)], task.num_channels(step), run.ctx, "bf16")
            previous = run.model.state_dict()
        entries = {part: len(torch._dynamo.eval_frame._debug_get_cache_entry_list(part.__code__))
                   for part in (type(run.model.backbone).forward, type(run.model.aspp).forward)}
    finally:
        dynamo_logger.removeHandler(catcher)
        torch._dynamo.reset()
    assert not [m for m in messages if "recompile_limit" in m or "cache_size_limit" in m], messages
    # train (grad) and eval (no grad) variants: the same few graphs at step 10 as at step 1
    assert all(0 < count < torch._dynamo.config.recompile_limit for count in entries.values()), entries


def test_segmenter_compiles_its_encoder_blocks(monkeypatch):
    import torch._dynamo
    real_compile = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile",
                        lambda function, **options: compiled.append(function) or real_compile(function, backend="eager"))
    torch._dynamo.reset()
    try:
        run = tiny_step_run(architecture="segmenter", overrides=["train.compile=true"])
        loss, _, _ = iterate(run, *batch())
    finally:
        torch._dynamo.reset()
    assert [function.__self__ for function in compiled] == [run.model.encoder.blocks, run.old_model.encoder.blocks]
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ 6. the old ViT teacher keeps fp32 weights
def test_old_vit_keeps_fp32_weights_under_bf16_while_old_deeplab_is_cast():
    vit = tiny_step_run(precision="bf16", architecture="segmenter")
    assert {p.dtype for p in vit.old_model.parameters()} == {torch.float32}
    images, _ = batch()
    x, _ = device_batch(images, images[:, 0], vit.ctx.device, vit.memory_format)
    reference = tiny_step_run(precision="fp32", architecture="segmenter").old_model  # same seed: same weights
    with vit.autocast, torch.no_grad():
        teacher, fp32_teacher = vit.old_forward(x), reference(x)
    assert torch.equal(teacher.logits, fp32_teacher.logits) and torch.equal(teacher.features, fp32_teacher.features)
    deeplab = tiny_step_run(precision="bf16")
    assert {p.dtype for p in deeplab.old_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in deeplab.model.parameters()} == {torch.float32}


# ------------------------------------------------------------------ 7. bf16 only where the GPU has it
@pytest.mark.parametrize("capability, amp, expected", [
    ((7, 5), "bf16", "fp16"), ((8, 0), "bf16", "bf16"), ((9, 0), "fp16", "fp16"), ((7, 5), "none", "fp32")])
def test_bf16_falls_back_to_fp16_below_ampere(monkeypatch, capability, amp, expected):
    fake_gpu(monkeypatch, capability=capability, name="Tesla T4")
    assert effective_precision(CUDA, amp) == expected
    assert effective_precision(torch.device("cpu"), amp) == "fp32"
    warning = precision_fallback(CUDA, amp)
    assert (warning is not None) == (expected != amp and amp != "none")
    if warning:
        assert "Tesla T4 (compute capability 7.5) has no bf16 tensor cores" in warning and "fp16" in warning
        record = runtime_record(load_config(None, [f"train.amp={amp}"]).train, "deeplabv3", DistContext(device=CUDA))
        assert record["precision"] == "fp16" and record["loss_scaling"] and record["amp"] == "bf16"
        assert "precision fp16 with loss scaling (train.amp=bf16)" in describe_runtime(record)


# ------------------------------------------------------------------ 8. quiet, lean DDP
def test_channels_last_gradients_match_their_weights_with_mbs(monkeypatch):
    monkeypatch.setattr(step_module, "memory_format_for", lambda model, device: torch.channels_last)
    for step in (0, 1):
        run = tiny_step_run(step=step, precision="bf16")
        assert run.memory_format == torch.channels_last
        iterate(run, *batch(new_class=3 if step else 1))
        for name, parameter in run.model.named_parameters():
            assert parameter.grad.stride() == parameter.stride(), name  # DDP warns at every step otherwise


def test_ddp_keeps_buffers_and_gradients_lean(monkeypatch):
    from trainer.step import for_processes
    wrapped = []
    monkeypatch.setattr(step_module, "DistributedDataParallel",
                        lambda module, **options: wrapped.append((module, options)) or module)
    pair = DistContext(rank=0, world_size=2)
    for_processes(DeepLabV3([3], "resnet18", "none", 16, head_channels=8), pair)
    synchronised = for_processes(DeepLabV3([3], "resnet18", "none", 16, head_channels=8), pair, sync_bn=True)
    (plain_module, plain), (_, synced) = wrapped
    assert plain == {"device_ids": None, "broadcast_buffers": True, "gradient_as_bucket_view": True}
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain_module.modules())
    # SyncBatchNorm keeps the running statistics equal on every rank: no broadcast of rank 0's buffers
    assert synced["broadcast_buffers"] is False and synced["gradient_as_bucket_view"] is True
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synchronised.modules())


# ------------------------------------------------------------------ 9. every rank sees the run folder
def _check_folder(rank: int, port: int, folders, results) -> None:
    import torch.distributed as dist

    import utils.run_folder
    from utils.run_folder import RunFolder, RunFolderError
    utils.run_folder.TOKEN_WAIT_S = 0.5
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        RunFolder(folders[rank]).check_shared_by_ranks(rank, 2)
        results[rank] = "ok"
    except RunFolderError as err:
        results[rank] = str(err)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_ranks_that_do_not_see_the_run_folder_are_refused(tmp_path, shared):
    import torch.multiprocessing as mp
    folders = [tmp_path / "run", tmp_path / ("run" if shared else "elsewhere")]
    for folder in folders:
        folder.mkdir(exist_ok=True)
    results = mp.Manager().dict()
    mp.spawn(_check_folder, args=(free_port(), [str(f) for f in folders], results), nprocs=2, join=True)
    assert not list(tmp_path.rglob(".ranks_*"))  # the token is gone either way
    if shared:
        assert dict(results) == {0: "ok", 1: "ok"}
    else:
        for message in results.values():  # every rank stops, naming the rank that cannot see the folder
            assert message.startswith(f"rank 1 on {socket.gethostname()} cannot read the token rank 0 wrote")
            assert "shared file system" in message


# ------------------------------------------------------------------ 10. GPU memory
def test_a_batch_too_large_for_the_gpu_is_refused():
    from utils.gpu_memory import check_batch_fits, estimated_peak_gib
    ade = load_config(ROOT / "configs/ade20k.yaml", [])
    assert 25 < estimated_peak_gib(ade, 24, "bf16") < 35
    check_batch_fits(ade, 24, "bf16", "NVIDIA H100 80GB HBM3", 79.1)
    check_batch_fits(ade, 12, "bf16", "NVIDIA A10", 22.0)  # 2 GPUs
    with pytest.raises(ConfigError) as caught:
        check_batch_fits(ade, 24, "bf16", "NVIDIA A10", 22.0)
    message = str(caught.value)
    assert "train.batch_size=24 puts 24 images on each GPU, and NVIDIA A10 has 22.0 GiB" in message
    assert "about 18 images fit per GPU" in message and "more GPUs" in message
    demo = load_config(ROOT / "configs/demo.yaml", [])
    assert estimated_peak_gib(demo, 1000, "fp32") is None  # models outside the table are not judged
    check_batch_fits(demo, 1000, "fp32", "tiny", 1.0)
    small_crop = load_config(ROOT / "configs/ade20k.yaml", ["data.crop_size=256"])
    assert estimated_peak_gib(small_crop, 24, "bf16") < estimated_peak_gib(ade, 24, "bf16") / 3


def test_main_checks_the_batch_against_the_visible_gpu_only_on_cuda(monkeypatch):
    from main import refuse_batch_too_large_for_gpu
    ade = load_config(ROOT / "configs/ade20k.yaml", [])
    refuse_batch_too_large_for_gpu(ade, DistContext())  # the CPU: nothing to check
    fake_gpu(monkeypatch, capability=(8, 6), name="NVIDIA A10", memory_gib=22.0)
    with pytest.raises(ConfigError, match="NVIDIA A10 has 22.0 GiB"):
        refuse_batch_too_large_for_gpu(ade, DistContext(device=CUDA))
    refuse_batch_too_large_for_gpu(ade, DistContext(world_size=2, device=CUDA))  # 12 images per GPU fit
