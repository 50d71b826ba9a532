"""DataLoaders whose batches are a pure function of (seed, epoch, iteration), so a run can
resume in the middle of a step and see the remaining batches exactly as an
uninterrupted run would: the same samples in the same order, and the same random
augmentation of each (every sample's augmentation is drawn from its own seed,
so it depends neither on where a run was resumed nor on the number of workers).

One training loader serves a whole step (its workers start once per step, not once
per epoch); it yields the batches of iterations ``start_iteration .. total - 1``.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.config import batch_per_process
from utils.distributed import DistContext
from utils.errors import STOP_SIGNALS


class StepSampler(Sampler[tuple[int, int]]):
    """This rank's samples for iterations ``start_iteration .. total_iterations - 1`` of a step.

    Epoch ``e`` has ``iterations_per_epoch`` global batches drawn from shuffled passes over the
    dataset (a dataset smaller than one global batch is cycled, never dropped); its global order is
    fixed by ``seed`` and ``e``. Batch ``i`` of every rank comes from the same slice of it, so ranks
    never see the same sample in a batch.
    """

    def __init__(self, size: int, batch_per_rank: int, iterations_per_epoch: int, total_iterations: int,
                 ctx: DistContext, seed: int, start_iteration: int = 0):
        self.size, self.batch_per_rank = size, batch_per_rank
        self.iterations_per_epoch, self.total_iterations = iterations_per_epoch, total_iterations
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.seed, self.start_iteration = seed, start_iteration

    def epoch_samples(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(iterations_per_epoch, batch_per_rank) dataset indices and augmentation seeds of this rank."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        needed = self.iterations_per_epoch * self.batch_per_rank * self.world_size
        passes = -(-needed // self.size)
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(passes)])[:needed]
        # a sample's seed is fixed by its place in the epoch's global order
        seeds = (self.seed * 1_000_003 + epoch) * 10_000_019 + torch.arange(needed)
        shape = (self.iterations_per_epoch, self.world_size, self.batch_per_rank)
        return order.view(shape)[:, self.rank], seeds.view(shape)[:, self.rank] % 2**62

    def __iter__(self):
        """Yields ``(dataset index, augmentation seed)`` pairs (read by :class:`SeededSamples`)."""
        epoch = None
        for iteration in range(self.start_iteration, self.total_iterations):
            if iteration // self.iterations_per_epoch != epoch:
                epoch = iteration // self.iterations_per_epoch
                indices, seeds = self.epoch_samples(epoch)
            batch = iteration % self.iterations_per_epoch
            yield from zip(indices[batch].tolist(), seeds[batch].tolist())

    def __len__(self) -> int:
        return (self.total_iterations - self.start_iteration) * self.batch_per_rank


class SeededSamples(Dataset):
    """``dataset[(index, seed)]``: sample ``index``, its random transforms drawn from ``seed``.

    torchvision's v2 transforms draw from torch's global CPU generator; it is forked, so
    the caller's random state (dropout in the main process with num_workers=0) is left
    as it was. Only that generator is seeded: ``torch.manual_seed`` would also seed every
    accelerator's generator (about 0.3 ms a sample), which the transforms never use.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Rank r evaluates samples r, r + world, ...: every sample exactly once over all ranks
    (torch's DistributedSampler pads with repeats, which would count images twice)."""

    def __init__(self, size: int, ctx: DistContext):
        self.indices = list(range(ctx.rank, size, ctx.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _leave_stop_signals_to_the_main_process() -> None:
    """A scheduler sends SIGTERM (a terminal SIGINT) to the whole process group. torch's worker dies of SIGTERM at
    once, and a batch the main process was receiving from it is lost with a traceback before the main process
    could finish the iteration and save. So a worker takes the stop signals in a thread of its own and exits only
    when its parent sends one (multiprocessing's terminate at the parent's exit, as torch's handler does); the
    main process stops its workers itself. Where the signal's sender cannot be read (no ``sigwaitinfo``, e.g.
    macOS), torch's behaviour stays."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    # blocked before the waiting thread starts: a forked worker has one thread, and threads it starts later
    # (the queue's feeder) inherit the mask, so no thread runs torch's handler
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def wait_for_the_parent() -> None:
        while signal.sigwaitinfo(STOP_SIGNALS).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_the_parent, name="stop-signals", daemon=True).start()


def _prepare_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy/random from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    _leave_stop_signals_to_the_main_process()


def iterations_per_epoch(dataset_size: int, global_batch: int) -> int:
    return max(1, dataset_size // global_batch)


def _prefetch(num_workers: int, prefetch_factor: int) -> Optional[int]:
    # DataLoader refuses a prefetch factor without worker processes
    return prefetch_factor if num_workers > 0 else None


def train_loader(dataset: Dataset, global_batch: int, ctx: DistContext, seed: int, iterations_per_epoch: int,
                 total_iterations: int, num_workers: int, start_iteration: int = 0,
                 prefetch_factor: int = 2) -> DataLoader:
    """The batches of iterations ``start_iteration .. total_iterations - 1`` of a step, for this rank;
    each worker prepares ``prefetch_factor`` batches ahead."""
    per_rank = batch_per_process(global_batch, ctx.world_size)
    sampler = StepSampler(len(dataset), per_rank, iterations_per_epoch, total_iterations, ctx, seed,
                          start_iteration)
    generator = torch.Generator().manual_seed(seed * 7919 + ctx.rank)
    return DataLoader(SeededSamples(dataset), batch_size=per_rank, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=ctx.device.type == "cuda", worker_init_fn=_prepare_worker,
                      generator=generator, prefetch_factor=_prefetch(num_workers, prefetch_factor))


def eval_loader(dataset: Dataset, batch_size: int, ctx: DistContext, num_workers: int,
                prefetch_factor: int = 2, reused: bool = False) -> DataLoader:
    """Every sample once over all ranks. ``reused``: iterated many times (validation during a step), so its
    workers stay alive between passes instead of starting again each time."""
    # a generator of its own: without one, every pass would draw its workers' seed from the global generator
    # and move the dropout draws of the training that follows a validation
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), ctx),
                      num_workers=num_workers, pin_memory=ctx.device.type == "cuda", worker_init_fn=_prepare_worker,
                      generator=torch.Generator(), prefetch_factor=_prefetch(num_workers, prefetch_factor),
                      persistent_workers=reused and num_workers > 0)
