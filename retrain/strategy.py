"""Which layers to fine-tune, and why: from labelled-sample count and measured domain gap.

    small + similar     -> head          (features still fit; only the decision boundary moved)
    large + similar     -> top_blocks    (enough data to adapt high-level features safely)
    dissimilar          -> full          (inputs changed: the stem and early layers must move)

Layer decay belongs to the strategy: input-level shifts need early layers to move, so the
dissimilar strategy decays the learning rate less with depth. Defaults chosen with
``bench/retrain_bench.py`` (see bench/README.md). On the pretrained MobileNetV2 grid (8
corruptions x 3 seeds at 600 rows, "Small and dissimilar: full, not all_but_stem") full instead
of all_but_stem for the 13 small dissimilar cells raised mean target accuracy 0.702 -> 0.717
over all 24 cells, at or above naive fine-tuning in 22 cells instead of 19, mean source 0.921
-> 0.919: noise needs the stem (noise:1 seed 0: 0.398 -> 0.554). all_but_stem (the stem
frozen, anchored 4x harder) stays available by request. The cost: nothing before the stem to
cache, so phase 2 runs the whole network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from timm.models import group_parameters
from torch import nn

from retrain.config import STRATEGIES

LARGE_ROWS = 1000            # labelled rows at which "large" begins
DISSIMILAR_GAP = 0.25        # domain gap (share of shifted feature dims) at which "dissimilar" begins
ADAPT_BN_REPLAY = 0.7        # replay share when BN statistics adapt (0.5 forgot 1.9 points on one bench seed)

# (layer_decay, l2sp multiplier, adapt BatchNorm statistics) per strategy: how fast the LR shrinks
# toward the stem, how hard to anchor, and whether BN statistics follow the (mixed) batches
_DEFAULTS: dict[str, tuple[float, float, bool]] = {
    "head": (1.0, 1.0, False),
    "top_blocks": (0.7, 1.0, False),
    "all_but_stem": (0.8, 4.0, True),
    "full": (0.9, 1.0, True),
}


@dataclass(frozen=True)
class StrategyPlan:
    name: str                   # one of head, top_blocks, all_but_stem, full
    reason: str                 # recorded in meta.json and the job result
    layer_decay: float          # LR multiplier per layer group below the head
    l2sp_scale: float           # multiplies hyper.l2sp_weight
    adapt_batchnorm: bool = False  # BN in train mode during phase 2 (input-level shifts)
    min_replay_fraction: float = 0.0  # floor on hyper.replay_fraction (unless that is 0: replay off)

    def replay_fraction(self, configured: float) -> float:
        """The replay share of every batch while BN statistics adapt: they must stay mostly source.
        (retrain.finetune goes back to ``configured`` when the statistics stay frozen.)"""
        return configured if configured == 0 else max(configured, self.min_replay_fraction)

    def trainable_groups(self, num_groups: int) -> range:
        """Layer-group ids (timm's group_matcher: 0 = stem ... num_groups-1 = head) trained in phase 2."""
        first = {"head": num_groups - 1, "top_blocks": num_groups // 2, "all_but_stem": 1, "full": 0}[self.name]
        return range(first, num_groups)


def choose_strategy(
    labelled_rows: int, domain_gap: float, *, requested: str = "auto", layer_decay: float | None = None
) -> StrategyPlan:
    """The plan for ``labelled_rows`` training rows and a domain gap in [0, 1].

    ``requested`` other than "auto" overrides the choice (the reason says so); ``layer_decay``
    overrides the strategy's default. Raises ValueError on an unknown strategy name.
    """
    if requested not in STRATEGIES:
        raise ValueError(f"unknown strategy {requested!r}; choose one of {', '.join(STRATEGIES)}")
    large = labelled_rows >= LARGE_ROWS
    dissimilar = domain_gap >= DISSIMILAR_GAP
    size = f"{labelled_rows} labelled rows ({'>=' if large else '<'} {LARGE_ROWS})"
    gap = f"domain gap {domain_gap:.2f} ({'>=' if dissimilar else '<'} {DISSIMILAR_GAP})"
    if requested != "auto":
        name, reason = requested, f"set in config (retrain.strategy); {size}, {gap}"
    else:
        name = "full" if dissimilar else "top_blocks" if large else "head"
        reason = f"{size}, {gap}"
    default_decay, l2sp_scale, adapt_bn = _DEFAULTS[name]
    return StrategyPlan(name=name, reason=reason, layer_decay=layer_decay or default_decay, l2sp_scale=l2sp_scale,
                        adapt_batchnorm=adapt_bn, min_replay_fraction=ADAPT_BN_REPLAY if adapt_bn else 0.0)


def layer_groups(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by timm layer group (0 = stem, last = head), as layer decay sees them."""
    return group_parameters(model, model.group_matcher(coarse=False))


def domain_gap(reference_features: np.ndarray, production_features: np.ndarray, *, threshold: float = 0.5) -> float:
    """Share of feature dimensions whose standardised mean difference exceeds ``threshold``.

    A cheap, bounded stand-in for the monitor's activation signal when none is passed in:
    0 = the backbone sees the same inputs, 1 = every pooled feature moved.
    """
    if reference_features.ndim != 2 or production_features.ndim != 2:
        raise ValueError("features must be 2-D [rows, dims]")
    if reference_features.shape[1] != production_features.shape[1]:
        raise ValueError(
            f"feature dims differ: reference {reference_features.shape[1]}, production {production_features.shape[1]}"
        )
    pooled_sd = np.sqrt(0.5 * (reference_features.var(0) + production_features.var(0))) + 1e-6
    d = np.abs(reference_features.mean(0) - production_features.mean(0)) / pooled_sd
    return float((d > threshold).mean())
