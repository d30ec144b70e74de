"""Which samples each process trains on at each step: global batches, deterministic and resumable.

Contract: an epoch is a seeded permutation of the dataset (`seed`, `epoch`; identity order without shuffle) cut
into global batches of `micro_batch * world * accum` samples; the last incomplete one is dropped. Global batch s
is split into `world * accum` micro-batches; process r takes micro-batches a * world + r for a = 0..accum-1, so the
sample at global position p of the batch is the same whatever the world size and accumulation (1 process x
batch 4 == 2 processes x batch 2 == 1 process x batch 2 x 2 micro-steps). Items are (dataset index, position p);
p keys the sample's masking noise. `set_position(epoch, step)` makes the next iteration start at that step of
that epoch (resume). `EvalSampler` walks a dataset once in order, padded with repeats to whole global batches;
positions >= the dataset size mark those repeats (weight 0).
"""

from __future__ import annotations

from typing import Iterator

import torch

from diffusionvl.core.errors import check


class GlobalBatchSampler:
    def __init__(self, size: int, micro_batch: int, world: int = 1, rank: int = 0, accum: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.size, self.micro_batch, self.world, self.rank, self.accum = size, micro_batch, world, rank, accum
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch * world * accum
        check(size >= self.global_batch, f"the training data has {size} usable samples, fewer than one global batch "
              f"of {self.global_batch} (batch_size {micro_batch} x {world} processes x grad_accum {accum})")
        self.steps_per_epoch = size // self.global_batch
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step: int) -> None:
        self.epoch, self.start_step = epoch, step

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            for a in range(self.accum):
                first = (a * self.world + self.rank) * self.micro_batch
                yield [(batch[p], p) for p in range(first, first + self.micro_batch)]


class EvalSampler:
    def __init__(self, size: int, micro_batch: int, world: int = 1, rank: int = 0):
        self.size, self.micro_batch, self.world, self.rank = size, micro_batch, world, rank
        group = micro_batch * world
        self.padded = -(-size // group) * group

    def __len__(self) -> int:
        return self.padded // (self.micro_batch * self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        group = self.micro_batch * self.world
        for start in range(0, self.padded, group):
            first = start + self.rank * self.micro_batch
            yield [(p % self.size, p) for p in range(first, first + self.micro_batch)]
