"""Process-group setup for single-process, torchrun and torch.distributed.launch runs.

torchrun (and ``python -m torch.distributed.launch``) set RANK, WORLD_SIZE and
LOCAL_RANK in the environment; the old launcher also passes ``--local_rank``,
which main.py accepts and forwards here. GPUs use NCCL, CPUs gloo.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from utils.config import ConfigError, check_device
from utils.errors import STOP_SIGNALS


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", local_rank: Optional[int] = None,
                     full_size_model: Optional[str] = None) -> DistContext:
    """This process's rank, world size and device, and the process group when several processes run.
    ``device: auto`` takes CUDA when it is usable; when it is not, a run of several processes or of a
    ``full_size_model`` (its description; ``utils.config.full_size_model``) stops with a ConfigError instead of
    training on the CPU unasked. A GPU this torch build has no kernels for is refused too."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    check_device(device)  # load_config checked it already; this is for callers that build no Config
    if device == "auto" and not use_cuda:
        refuse_silent_cpu_fallback(world_size, full_size_model)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        problem = unsupported_gpu(torch_device)
        if problem:
            raise ConfigError(f"config key 'device': {problem}; install a torch build that has kernels for it "
                              "(docs/running.md#requirements), or pass device=cpu")
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                **({"device_id": torch_device} if use_cuda else {}))
    return DistContext(rank, world_size, local_rank, torch_device)


def build_description() -> str:
    """The CUDA version this torch was built for and the GPU architectures it has kernels for."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA (a CPU-only wheel)"
    return f"this torch {torch.__version__} is built for CUDA {torch.version.cuda} with kernels for " \
           f"{' '.join(torch.cuda.get_arch_list()) or 'no architecture'}"


def cuda_unavailable_reason() -> str:
    """Why torch sees no usable CUDA device, in CUDA's own words (no GPU visible, no driver, a driver too old
    for the build's CUDA version, ...)."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    try:
        torch.cuda.init()
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError (or AssertionError) with the reason
        return " ".join(str(err).split()) or type(err).__name__
    return "torch.cuda.is_available() is False"


def refuse_silent_cpu_fallback(world_size: int, full_size_model: Optional[str]) -> None:
    """``device: auto`` found no usable GPU: refuse (ConfigError) when the run was plainly meant for GPUs."""
    if world_size > 1:
        meant = f"{world_size} processes were launched"
    elif full_size_model:
        meant = f"the model is {full_size_model}"
    else:
        return
    raise ConfigError(f"config key 'device': auto found no usable CUDA device ({cuda_unavailable_reason()}; "
                      f"{build_description()}: a driver older than that CUDA version needs another torch build, "
                      f"docs/running.md#requirements), and {meant}; to train on the CPU anyway pass device=cpu")


def gpu_runs_build(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a GPU of compute ``capability`` runs kernels of a build compiled for ``arch_list``
    (``torch.cuda.get_arch_list()``): a cubin ``sm_XY`` runs on the same major version with minor >= Y
    (``sm_90a``-style ones on exactly X.Y), PTX ``compute_XY`` on every capability >= X.Y."""
    wanted = capability[0] * 10 + capability[1]
    for arch in arch_list:
        kind, _, code = arch.partition("_")
        digits = "".join(c for c in code if c.isdigit())
        if not digits:
            continue
        number = int(digits)
        major = number // 10
        if kind == "sm" and (number == wanted if code != digits else major == capability[0] and number <= wanted):
            return True
        if kind == "compute" and number <= wanted:
            return True
    return False


def unsupported_gpu(device: torch.device) -> Optional[str]:
    """Why this torch build cannot run kernels on ``device`` (e.g. a V100 with a build without sm_70), or None.
    Without the check the first kernel fails with "no kernel image is available for execution on the device"."""
    arch_list = torch.cuda.get_arch_list()
    capability = torch.cuda.get_device_capability(device)
    if not arch_list or gpu_runs_build(capability, arch_list):
        return None
    return (f"the GPU {device} ({torch.cuda.get_device_name(device)}, compute capability "
            f"{capability[0]}.{capability[1]}) has no kernels in this build: {build_description()}")


def describe_device(device: torch.device) -> dict:
    """What ran: the device (name and compute capability, or the CPU) and the versions of torch, CUDA and cuDNN
    of this build; the process group's backend."""
    record = {"device": str(device), "device_name": "CPU", "capability": None, "memory_gib": None,
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        record.update(device_name=torch.cuda.get_device_name(device), capability=f"{major}.{minor}",
                      memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return record


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup(failed: bool = False, timeout_s: float = 30.0) -> None:
    """Tear the group down; every exit of main.py, error or not, comes through here.

    The barrier first keeps gloo from aborting at exit ("terminate called without an
    active exception") when the last collective is still in flight. On an error path
    the other ranks may not reach a barrier (an error raised on one rank only), so it
    is a gloo ``monitored_barrier`` that gives up after ``timeout_s`` instead of
    hanging; with NCCL (no monitored barrier) an error path skips the barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if not failed:
            dist.barrier()
        elif dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
    except Exception:  # a peer is gone or stuck: nothing left to synchronise with
        pass
    finally:
        dist.destroy_process_group()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` replaced, in place, by its element-wise maximum over all ranks (itself without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of every rank's ``tensor`` (same shape and device kind on every rank), on every
    rank; ``tensor`` itself without a process group."""
    if dist.is_available() and dist.is_initialized():
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total
    return tensor


def random_state(device: torch.device) -> dict:
    """This process's torch generator states (CPU, and the CUDA device's when training there)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_random_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if dist.is_available() and dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj


T = TypeVar("T")


def run_on_main(ctx: DistContext, fn: Callable[[], T]) -> Optional[T]:
    """Run ``fn`` on rank 0 only (file-system work other ranks must not race on) and
    make every rank share its outcome: the others wait for it, and an exception raised
    on rank 0 is raised on every rank (same type and message), so all ranks leave
    through the same error path instead of some waiting forever in the next collective.
    Returns ``fn``'s result on rank 0, None elsewhere.
    """
    if not ctx.distributed:
        return fn()
    result, error, shared = None, None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
            try:
                shared = pickle.loads(pickle.dumps(err))
            except Exception:  # an exception that does not pickle: keep its text
                shared = RuntimeError(f"{type(err).__name__}: {err}")
    shared = broadcast_object(shared)
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


class StopRequest:
    """SIGTERM (cluster pre-emption) and SIGINT (Ctrl-C) ask the run to stop after the current iteration.

    Inside ``with StopRequest() as stop:`` the two signals only set a flag (the previous handlers come back
    afterwards). :meth:`agreed` tells every rank whether any rank was asked, so that all stop after the same
    iteration; the ranks agree through a one-number all-reduce on a gloo group, which leaves the GPU stream
    alone (no host sync).
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.signum = 0
        self.group = None
        self.previous: dict = {}
        self.child_handler = None  # SIGCHLD's handler, while a stop signal has set it aside

    def __enter__(self) -> "StopRequest":
        if dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo")  # collective: every rank enters at the same point
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if self.child_handler is not None:
            signal.signal(signal.SIGCHLD, self.child_handler)
            self.child_handler = None

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        # Our data-loader workers outlive stop signals (trainer/loaders.py), but a worker of other code, or one
        # killed outright, may die now; torch's SIGCHLD handler would then raise here, in the middle of the
        # iteration (or of the checkpoint write). This process fetches no batch after the current iteration, so
        # no exit matters.
        if self.child_handler is None:
            self.child_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def agreed(self) -> bool:
        """True on every rank when any rank received a stop signal (then ``signum`` is the largest one)."""
        if self.group is None:
            return bool(self.signum)
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flag.item())
        return bool(self.signum)
