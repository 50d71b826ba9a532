"""StepRun, the object that trains during a step: opt-in compilation and the deferred non-finite check."""
import pytest
import torch

from models.deeplab import DeepLabV3
from trainer.methods import build_method
from trainer.step import StepPlan, StepRun
from utils.config import load_config
from utils.distributed import DistContext


def step_run(monkeypatch=None, **train):
    cfg = load_config(None, [f"train.{key}={value}" for key, value in train.items()])
    torch.manual_seed(0)
    old = DeepLabV3([3], "resnet18", "none", 16, head_channels=8)
    model = DeepLabV3([3, 2], "resnet18", "none", 16, head_channels=8)
    method = build_method(cfg.method, num_old=3, num_classes=5)
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
