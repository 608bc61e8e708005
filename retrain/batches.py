"""In-memory training splits and the mixed batches the recipe draws from them.

Every batch mixes production rows with replay rows from the source data in a fixed proportion,
which is what keeps the source classes from being forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    """Inputs and labels: x float32[N, C, H, W] (images) or float32[N, D] (pooled features); y int64[N].
    ``groups``: one key per row when rows come in groups (retrain.group_pattern), for the gate's
    tests; None when every row stands alone."""

    x: torch.Tensor
    y: torch.Tensor
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"split has {self.x.shape[0]} inputs but {self.y.shape[0]} labels")
        if self.groups is not None and len(self.groups) != self.y.shape[0]:
            raise ValueError(f"split has {self.y.shape[0]} rows but {len(self.groups)} group keys")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, index: torch.Tensor) -> "Split":
        groups = None if self.groups is None else self.groups[index.numpy()]
        return Split(self.x[index], self.y[index], groups)


@dataclass(frozen=True)
class TrainingSet:
    """What the recipe trains on. ``features_only``: x are pooled features, only the head trains."""

    train: Split            # production rows for gradient steps
    val: Split              # production rows for early stopping
    replay: Split           # source rows mixed into every batch
    replay_val: Split       # source rows for early stopping (forgetting shows here first)
    features_only: bool = False


def mixed_batches(
    data: TrainingSet, batch_size: int, replay_fraction: float, generator: torch.Generator,
    *, rank: int = 0, world_size: int = 1,
) -> Iterator[Split]:
    """One epoch (one pass over ``data.train``) of batches, each ``replay_fraction`` replay rows.

    Every rank draws the same global batch from ``generator`` and keeps its own stride, so DDP
    ranks see disjoint shards without any communication.
    """
    train_rows = len(data.train)
    replay_rows = len(data.replay)
    n_replay = round(batch_size * replay_fraction) if replay_rows else 0
    n_new = max(1, batch_size - n_replay)
    order = torch.randperm(train_rows, generator=generator)
    for step in range(math.ceil(train_rows / n_new)):
        new = data.train.take(order[step * n_new : (step + 1) * n_new])
        if n_replay:
            old = data.replay.take(torch.randint(replay_rows, (n_replay,), generator=generator))
            batch = Split(torch.cat([new.x, old.x]), torch.cat([new.y, old.y]))
        else:
            batch = new
        if world_size > 1:
            if len(batch) < world_size:  # a rank with no rows would put NaN into the shared loss
                continue
            batch = batch.take(torch.arange(rank, len(batch), world_size))
        yield batch


def steps_per_epoch(data: TrainingSet, batch_size: int, replay_fraction: float) -> int:
    n_replay = round(batch_size * replay_fraction) if len(data.replay) else 0
    return math.ceil(len(data.train) / max(1, batch_size - n_replay))


def all_splits(data: TrainingSet) -> tuple[Split, Split, Split, Split]:
    """The four splits in a fixed order (a TrainingSet rebuilt from them keeps their roles)."""
    return data.train, data.val, data.replay, data.replay_val
