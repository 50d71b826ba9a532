"""DataLoaders whose order is a pure function of (seed, step, epoch), so a run can
resume in the middle of an epoch and see the remaining batches in the same order.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.distributed import DistContext


class EpochSampler(Sampler[int]):
    """Exactly ``iterations`` batches per epoch for this rank, drawn from shuffled passes
    over the dataset (a dataset smaller than one global batch is cycled, never dropped).

    The global order for epoch ``e`` is fixed by ``seed`` and ``e``; batch ``i`` of every
    rank comes from the same slice of it, so ranks never see the same sample in a batch.
    """

    def __init__(self, size: int, batch_per_rank: int, iterations: int, ctx: DistContext,
                 seed: int, epoch: int, skip_batches: int = 0):
        self.size, self.batch_per_rank, self.iterations = size, batch_per_rank, iterations
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.seed, self.epoch, self.skip_batches = seed, epoch, skip_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        needed = self.iterations * self.batch_per_rank * self.world_size
        passes = -(-needed // self.size)
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(passes)])[:needed]
        mine = order.view(self.iterations, self.world_size, self.batch_per_rank)[:, self.rank]
        return iter(mine[self.skip_batches:].reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.iterations - self.skip_batches) * self.batch_per_rank


class ShardSampler(Sampler[int]):
    """Rank r evaluates samples r, r + world, ...: every sample exactly once over all ranks
    (torch's DistributedSampler pads with repeats, which would count images twice)."""

    def __init__(self, size: int, ctx: DistContext):
        self.indices = list(range(ctx.rank, size, ctx.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy/random from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def iterations_per_epoch(dataset_size: int, global_batch: int) -> int:
    return max(1, dataset_size // global_batch)


def train_loader(dataset: Dataset, global_batch: int, ctx: DistContext, seed: int, epoch: int,
                 num_workers: int, skip_batches: int = 0) -> DataLoader:
    if global_batch % ctx.world_size:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {ctx.world_size} processes")
    per_rank = global_batch // ctx.world_size
    iterations = iterations_per_epoch(len(dataset), global_batch)
    sampler = EpochSampler(len(dataset), per_rank, iterations, ctx, seed, epoch, skip_batches)
    generator = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + ctx.rank)
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=ctx.device.type == "cuda", worker_init_fn=_seed_worker, generator=generator,
                      persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, ctx: DistContext, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), ctx),
                      num_workers=num_workers, pin_memory=ctx.device.type == "cuda")
