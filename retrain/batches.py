"""In-memory training splits and the mixed batches the recipe draws from them.

Every batch mixes production rows with replay rows from the source data in a fixed proportion,
which is what keeps the source classes from being forgotten. Replay rows may carry the served
model's logits (``Split.teacher``): the recipe then also pulls the candidate's predictions on them
toward the served model's (retrain.distill).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

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
    # float32[N, classes]: the served model's logits, the distillation targets (None: not distilled);
    # ``distilled`` bool[N] says which rows have one (a mixed batch: its replay rows)
    teacher: torch.Tensor | None = None
    distilled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"split has {self.x.shape[0]} inputs but {self.y.shape[0]} labels")
        if self.groups is not None and len(self.groups) != self.y.shape[0]:
            raise ValueError(f"split has {self.y.shape[0]} rows but {len(self.groups)} group keys")
        if (self.teacher is None) != (self.distilled is None):
            raise ValueError("split has teacher logits without the rows they belong to, or the reverse")
        if self.teacher is not None and self.distilled is not None and not (
                self.teacher.shape[0] == self.distilled.shape[0] == self.y.shape[0]):
            raise ValueError(f"split has {self.y.shape[0]} rows but {self.teacher.shape[0]} teacher rows")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, index: torch.Tensor) -> "Split":
        groups = None if self.groups is None else self.groups[index.numpy()]
        if self.teacher is None or self.distilled is None:
            return Split(self.x[index], self.y[index], groups)
        return Split(self.x[index], self.y[index], groups, self.teacher[index], self.distilled[index])

    def with_teacher(self, logits: torch.Tensor) -> "Split":
        """This split with ``logits`` as every row's distillation target."""
        return Split(self.x, self.y, self.groups, logits, torch.ones(len(self), dtype=torch.bool, device=logits.device))


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
            batch = _concat(new, old)
        else:
            batch = new
        if world_size > 1:
            if len(batch) < world_size:  # a rank with no rows would put NaN into the shared loss
                continue
            batch = batch.take(torch.arange(rank, len(batch), world_size))
        yield batch


def _concat(new: Split, old: Split) -> Split:
    """Production rows then replay rows; the replay rows' teacher logits travel with them."""
    x, y = torch.cat([new.x, old.x]), torch.cat([new.y, old.y])
    if old.teacher is None or old.distilled is None:
        return Split(x, y)
    teacher = torch.cat([old.teacher.new_zeros((len(new), old.teacher.shape[1])), old.teacher])
    distilled = torch.cat([old.distilled.new_zeros(len(new)), old.distilled])
    return Split(x, y, None, teacher, distilled)


def steps_per_epoch(data: TrainingSet, batch_size: int, replay_fraction: float) -> int:
    n_replay = round(batch_size * replay_fraction) if len(data.replay) else 0
    return math.ceil(len(data.train) / max(1, batch_size - n_replay))


def all_splits(data: TrainingSet) -> tuple[Split, Split, Split, Split]:
    """The four splits in a fixed order (a TrainingSet rebuilt from them keeps their roles)."""
    return data.train, data.val, data.replay, data.replay_val


def with_replay_teacher(data: TrainingSet, logits: torch.Tensor | None) -> TrainingSet:
    """``data`` whose replay rows carry ``logits`` (the served model's, row for row) as distillation targets."""
    if logits is None:
        return data
    return replace(data, replay=data.replay.with_teacher(logits))
