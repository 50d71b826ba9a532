"""StepRun, the object that trains during a step: opt-in compilation, the deferred non-finite check, and the
method's per-step pass (PLOP's thresholds) with its state in the in-step checkpoint."""
import contextlib

import pytest
import torch

from models.deeplab import DeepLabV3
from trainer.methods import build_method
from trainer.step import StepPlan, StepRun
from utils.config import load_config
from tests.helpers import on_two_gloo_ranks
from utils.distributed import DistContext


def step_run(monkeypatch=None, method_name="mbs", **train):
    cfg = load_config(None, [f"train.{key}={value}" for key, value in train.items()] + [f"method.name={method_name}"])
    torch.manual_seed(0)
    old = DeepLabV3([3], "resnet18", "none", 16, head_channels=8)
    model = DeepLabV3([3, 2], "resnet18", "none", 16, head_channels=8)
    method = build_method(cfg.method, cfg.data.dataset, num_old=3, num_classes=5)
    return StepRun(1, model, old, method, StepPlan(1, 4, 4, 0.01), cfg.train, DistContext())


def test_compile_is_opt_in_and_compiles_the_step_invariant_trunk_in_place(monkeypatch):
    compiled = []

    def fake_compile(function):
        compiled.append(function)
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = step_run(compile=False)
    assert compiled == [] and plain.train_model is plain.model and plain.old_forward is plain.old_model
    run = step_run(compile=True)
    # the forwards of the backbone and the ASPP of the trained model and of the frozen old model, nothing else
    assert compiled == [run.model.backbone.forward, run.model.aspp.forward, run.old_model.backbone.forward,
                        run.old_model.aspp.forward]
    assert run.train_model is run.model and run.old_forward is run.old_model
    assert all(not key.startswith("_orig_mod") for key in run.state_dict()["model"])  # checkpoints unchanged


def test_non_finite_loss_is_found_at_the_next_check_without_loss_scaling():
    run = step_run()
    for value in (1.0, float("nan"), 2.0):
        run.watch_loss(torch.tensor(value))
        run.state.iteration += 1
    with pytest.raises(FloatingPointError, match=r"step 1: the loss was not finite in 1 of the iterations 1..3"):
        run.check_losses()
    run.watch_loss(torch.tensor(0.5))
    run.state.iteration += 1
    run.check_losses()  # counted afresh after a check: nothing to report


def test_stop_request_catches_sigint_and_sigterm_and_restores_the_handlers():
    import os
    import signal

    from utils.distributed import StopRequest
    before = signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with StopRequest() as stop:
            assert not stop.agreed()
            os.kill(os.getpid(), sig)  # Ctrl-C / pre-emption: no KeyboardInterrupt, no exit, only the flag
            assert stop.agreed() and stop.name == sig.name
    assert signal.getsignal(signal.SIGINT) is before


# ---- PLOP's per-step pass and the method's state in the in-step checkpoint (issue 18 section 1.4)
class _StepSamples(torch.utils.data.Dataset):
    """uint8 images and step labels (background, the new classes 3 and 4, some 255), as the datasets give them."""

    def __init__(self, count: int, size: int = 32):
        generator = torch.Generator().manual_seed(11)
        self.images = torch.randint(256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
        self.labels = torch.tensor([0, 0, 3, 4, 255])[torch.randint(5, (count, size, size), generator=generator)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def test_the_statistics_pass_gives_plops_thresholds_and_draws_no_random_number():
    from datasets.transforms import normalize_on_device
    from losses.plop import median_entropy_thresholds
    from trainer.engine import collect_step_statistics
    from trainer.loaders import train_loader

    run = step_run(method_name="plop")
    assert run.method.needs_step_statistics and not run.method.has_step_statistics
    # the trainer's loader over epoch 0 (3 batches of 2); the pass must leave the global generators alone
    batches = train_loader(_StepSamples(6), 2, run.ctx, seed=5, iterations_per_epoch=3, total_iterations=3,
                           num_workers=0)
    state_before = torch.get_rng_state()
    collect_step_statistics(run, batches)
    assert torch.equal(torch.get_rng_state(), state_before)
    run.method.finish_step_statistics(lambda histogram: histogram)
    with torch.no_grad():
        expected = median_entropy_thresholds(
            [(run.old_model(normalize_on_device(images)).logits, labels.long()) for images, labels in batches],
            num_classes=5, threshold=0.001)
    assert torch.equal(run.method.thresholds, expected)


def _through_a_file(state: dict) -> dict:
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_method_state_travels_in_the_in_step_checkpoint():
    run = step_run(method_name="plop")
    run.method.thresholds = torch.tensor([0.002, float("inf"), 0.001, 0.001, 0.001])
    saved = _through_a_file(run.state_dict())  # plain tensors: weights_only=True reads them
    assert set(saved["method"]) == {"thresholds"}
    resumed = step_run(method_name="plop")
    resumed.load_state_dict(saved)
    assert resumed.method.has_step_statistics and torch.equal(resumed.method.thresholds, run.method.thresholds)
    assert step_run().state_dict()["method"] == {}  # MBS has no state


def test_an_in_step_checkpoint_without_method_state_is_refused_only_when_the_method_has_state():
    from utils.checkpoint import CheckpointError
    saved = step_run().state_dict()
    del saved["method"]  # as in every in-step checkpoint written before methods had a state
    step_run().load_state_dict(saved, "old.pt")  # MBS: nothing is missing
    with pytest.raises(CheckpointError, match=r"^old\.pt lacks method \(written by another version\?\)"):
        step_run(method_name="plop").load_state_dict(saved, "old.pt")
    wrong = step_run(method_name="plop").state_dict()
    wrong["method"] = {"thresholds": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"thresholds of shape \(3,\), this step has 5 classes"):
        step_run(method_name="plop").load_state_dict(wrong, "other.pt")


def _plop_pass(ctx: DistContext, samples, results=None):
    """PLOP's pass as the trainer runs it (trainer.incremental.IncrementalTrainer.step_statistics): this
    process's share of epoch 0's batches through the old model, then the histogram summed over processes."""
    from types import SimpleNamespace

    from trainer.engine import collect_step_statistics
    from trainer.loaders import train_loader
    from utils.distributed import sum_over_processes
    torch.manual_seed(0)
    old = DeepLabV3([3], "resnet18", "none", 16, head_channels=8).eval()
    method = build_method(load_config(None, ["method.name=plop"]).method, "voc", num_old=3, num_classes=5)
    run = SimpleNamespace(ctx=ctx, step=1, old_forward=old, method=method, memory_format=torch.contiguous_format,
                          autocast=contextlib.nullcontext())
    batches = train_loader(samples, 4, ctx, seed=5, iterations_per_epoch=3, total_iterations=3, num_workers=0)
    collect_step_statistics(run, batches)
    method.finish_step_statistics(sum_over_processes)
    return method.thresholds


def _plop_pass_on_rank(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results[rank] = _plop_pass(DistContext(rank=rank, world_size=world_size), _StepSamples(12)).tolist()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_hold_the_thresholds_of_one_pass_over_all_their_batches():
    results = on_two_gloo_ranks(_plop_pass_on_rank)
    one_process = _plop_pass(DistContext(), _StepSamples(12))  # the same 3 global batches of 4, in one process
    assert results[0] == results[1] == one_process.tolist()
    # without the sum (no process group: each process alone, as PLOP's own code) rank 0's share gives others
    rank0_alone = _plop_pass(DistContext(rank=0, world_size=2), _StepSamples(12))
    assert rank0_alone.tolist() != one_process.tolist()
