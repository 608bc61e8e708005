"""The frozen prefix computed once: the activations entering the first trainable block, every row.

When the strategy freezes the first blocks, their output never changes during the fine-tune, so it
is cached (on the device) for every split and phase 2 trains only the suffix (retrain.trunk.Suffix)
on it; the head phase runs the rest of the trunk over it instead of the whole network. Apart from
the phases because both read it and because whether it fits (``hyper.cache_mb``) is its own decision,
recorded in the recipe's report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from retrain.batches import Split, TrainingSet, all_splits
from retrain.phase import RunContext, to_device
from retrain.trunk import Trunk, activation_bytes, find_trunk, prefix_activations


@dataclass(frozen=True)
class PrefixCache:
    """Phase 2's inputs: cached activations at ``trunk.units[start]`` (or None: images)."""

    trunk: Trunk | None
    start: int
    data: TrainingSet | None
    record: dict[str, Any]


def cache_prefix(model: nn.Module, data: TrainingSet, ctx: RunContext) -> PrefixCache:
    """Cache the inputs of the first trainable block for every row, when that is possible."""
    sample = to_device(data.train.x[:4], ctx.device)
    trunk = find_trunk(model, sample)
    if trunk is None:
        return PrefixCache(None, 0, None, {"cached": False, "reason": "forward_features is not a chain of blocks"})
    start = trunk.first_trainable()
    if start == 0:
        return PrefixCache(trunk, 0, None, {"cached": False,
                                            "reason": "the first layer trains: nothing frozen to cache"})
    rows = sum(len(s) for s in all_splits(data))
    needed = activation_bytes(trunk, start, sample, rows)
    if needed > ctx.hyper.cache_mb * 2**20:
        return PrefixCache(trunk, start, None, {
            "cached": False, "reason": f"activations at {trunk.names[start]} need {needed / 2**20:.0f} MiB "
                                       f"> hyper.cache_mb {ctx.hyper.cache_mb}"})
    t = time.perf_counter()
    model.eval()
    cached = TrainingSet(*(Split(prefix_activations(trunk, start, s.x, device=ctx.device), s.y.to(ctx.device))
                           for s in all_splits(data)))
    seconds = time.perf_counter() - t
    return PrefixCache(trunk, start, cached, {
        "cached": True, "at": trunk.names[start], "frozen_units": start, "units": len(trunk.units),
        "rows": rows, "mib": needed / 2**20, "seconds": seconds, "images_per_second": rows / max(seconds, 1e-9)})
