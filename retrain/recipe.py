"""The guarded two-phase fine-tuning recipe.

Phase 1 trains the head alone on pooled features of the frozen backbone (BatchNorm in eval mode,
so its statistics cannot drift) until validation loss plateaus. Phase 2 unfreezes the layer
groups the strategy names with layer-wise learning rates (timm optimizer + timm/one-cycle
scheduler, which apply each group's ``lr_scale``), gradient clipping, an L2-SP/EWC anchor to the
starting weights and early stopping. With ``hyper.distill_weight`` > 0 both phases also pull the
replay rows' predictions toward the served model's (retrain.distill).

What keeps phase 2 from diverging silently on a real pretrained backbone:
- its learning rate comes from a short range test on the head-trained model (lr_finder) unless
  ``lr_backbone`` is set;
- guards judge it against the head-trained model it started from (guards.BaselineGuard: gradient
  norm x the norm measured there, validation loss x the head phase's) as well as step to step
  (SpikeDetector); a trip restores the head-phase weights and retries at ``backoff_factor`` x the
  rate, at most ``max_backoffs`` times, each trip a progress event and a line in the report;
- BatchNorm statistics stay as served unless re-estimating them is measured not to hurt
  (retrain.batchnorm);
- when the phase never beats the head phase's validation loss, the head-only model is kept and
  the report says so (RecipeReport.head_only_reason), for the job's result.

Frozen layers are computed once: the activations entering the first trainable block are cached
for every row (retrain.trunk), so an epoch runs only the trainable part.

The parts live apart: retrain.phase (the epoch loop and its guards), retrain.prefix_cache (the
frozen activations), retrain.layer_lrs (parameter groups, layer-wise LRs, the range test) and
retrain.finetune (phase 2: baseline, BatchNorm choice, backoff, the head-only fallback). This module
runs them in order and reports.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from retrain.batches import Split, TrainingSet, all_splits, with_replay_teacher
from retrain.batchnorm import BatchNormReport, inspect_batchnorm
from retrain.config import HyperConfig
from retrain.distill import TEMPERATURE
from retrain.finetune import finetune_phase
from retrain.guards import Anchor, AnchorWeights, GuardTripped
from retrain.layer_lrs import set_trainable
from retrain.model import pooled_features, unwrap
from retrain.phase import PhaseReport, Progress, RunContext, Trainer, autocast, run_phase, to_device
from retrain.prefix_cache import PrefixCache, cache_prefix
from retrain.strategy import StrategyPlan
from retrain.trunk import Suffix


@dataclass(frozen=True)
class RecipeReport:
    phases: tuple[PhaseReport, ...]
    guard_message: str | None = None   # the last guard trip, if any
    weight_drift: float = 0.0          # final L2 distance of the backbone from its start
    seconds: float = 0.0
    history: tuple[dict, ...] = field(default=())  # the epoch events, for the job's record
    trips: tuple[str, ...] = ()        # every guard trip, in order ("finetune attempt 1 at lr 1e-3: ...")
    finetune_kept: bool = False        # phase 2 ran and its weights were kept
    head_only_reason: str | None = None  # why phase 2's weights were thrown away (None: kept or not run)
    batchnorm: dict[str, Any] = field(default_factory=dict)   # inspection + what phase 2 did with the statistics
    lr_search: dict[str, Any] | None = None  # the range test, when the LR was chosen by it
    prefix_cache: dict[str, Any] = field(default_factory=dict)  # where frozen activations were cached, or why not
    epochs_capped: dict[str, Any] | None = None  # phase 2's epochs cut by max_finetune_steps, when they were

    def outcome_reason(self, outcome: str, gate_reason: str) -> str:
        """The job's result line: says "head-only" when phase 2 was thrown away."""
        if self.head_only_reason is None:
            return gate_reason
        return f"{outcome} head-only: {self.head_only_reason}; {gate_reason}"

    def to_json(self) -> dict[str, Any]:
        return {"phases": [p.__dict__ for p in self.phases], "trips": list(self.trips),
                "finetune_kept": self.finetune_kept, "head_only_reason": self.head_only_reason,
                "batchnorm": self.batchnorm, "lr_search": self.lr_search, "prefix_cache": self.prefix_cache,
                "epochs_capped": self.epochs_capped, "weight_drift": self.weight_drift, "seconds": self.seconds}


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available; "cuda" without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("retrain.device is 'cuda' but no CUDA device is available")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


@torch.no_grad()
def _map(fn: Callable[[torch.Tensor], torch.Tensor], split: Split, device: torch.device, width: int,
         batch_size: int = 256) -> Split:
    out = []
    for start in range(0, len(split), batch_size):
        with autocast(device):
            out.append(fn(to_device(split.x[start : start + batch_size], device)).float())
    x = torch.cat(out) if out else split.x.new_zeros((0, width), device=device)
    return Split(x, split.y.to(device))


def _head_phase(model: nn.Module, data: TrainingSet, ctx: RunContext, cache: PrefixCache
                ) -> tuple[PhaseReport, GuardTripped | None, float, torch.Tensor | None]:
    """Phase 1 on pooled features: exactly a frozen backbone with BN in eval mode, computed once.
    Returns the report, a trip, the images/s of the one feature pass, and the served model's
    logits on the replay rows (the distillation targets; None when distillation is off)."""
    model.eval()
    t = time.perf_counter()
    if data.features_only:
        features = data
    elif cache.data is not None:  # the rest of the trunk over the cached prefix
        assert cache.trunk is not None
        suffix = Suffix(model, cache.trunk, cache.start).eval()
        features = TrainingSet(*(_map(suffix.features, s, ctx.device, unwrap(model).num_features)
                                 for s in all_splits(cache.data)), features_only=True)
    else:
        features = TrainingSet(*(_map(lambda x: pooled_features(model, x), s, ctx.device, unwrap(model).num_features)
                                 for s in all_splits(data)), features_only=True)
    rows = sum(len(s) for s in all_splits(data))
    feature_rate = rows / max(time.perf_counter() - t, 1e-9)
    head = model.get_classifier()
    teacher = None
    if ctx.hyper.distill_weight > 0 and len(features.replay):
        # the served head (the model is in eval mode and the head has not trained yet)
        teacher = _map(head, features.replay, ctx.device, unwrap(model).num_classes).x
        features = with_replay_teacher(features, teacher)
        ctx.emit({"event": "phase", "phase": "distill", "message": (
            f"distilling {len(features.replay)} replay rows toward the served model's predictions "
            f"(distill_weight {ctx.hyper.distill_weight:g}, temperature {TEMPERATURE:g})")})
    optimizer = torch.optim.AdamW(head.parameters(), lr=ctx.hyper.lr_head, weight_decay=1e-4)
    anchor = None
    if ctx.hyper.l2sp_head > 0:  # pulled toward the served head: what it knew of the source stays
        anchor = Anchor(head, [n for n, _ in head.named_parameters()], AnchorWeights(ctx.hyper.l2sp_head, 0.0))
    trainer = Trainer(head, head, features, list(head.parameters()), list(head.parameters()), anchor=anchor,
                      reports_drift=False)
    # Every DDP rank runs this small phase in full, identically (same data, same seed): no sharding.
    report, tripped = run_phase("head", trainer, optimizer, ctx.hyper.epochs_head, replace(ctx, world_size=1))
    return report, tripped, feature_rate, teacher


def fine_tune(
    model: nn.Module, data: TrainingSet, hyper: HyperConfig, plan: StrategyPlan, *,
    device: torch.device, progress: Progress | None = None, anchor_data: Split | None = None,
) -> RecipeReport:
    """Fine-tune ``model`` in place (it ends on ``device`` in eval mode) and report what happened.

    ``anchor_data``: reference rows for the EWC Fisher estimate (used when ``hyper.ewc_weight`` > 0).
    Under torch.distributed every rank calls this with the same data; rank 0 reports progress.
    """
    started = time.monotonic()
    torch.manual_seed(hyper.seed)
    distributed = dist.is_available() and dist.is_initialized()
    ctx = RunContext(hyper=hyper, device=device, progress=progress or (lambda event: None),
                     generator=torch.Generator().manual_seed(hyper.seed),
                     rank=dist.get_rank() if distributed else 0,
                     world_size=dist.get_world_size() if distributed else 1, history=[])
    model.to(device)
    model.to(memory_format=torch.channels_last)  # matches to_device's batches, on CPU as on CUDA
    bn: BatchNormReport = inspect_batchnorm(model)
    ctx.emit({"event": "phase", "phase": "batchnorm", "message": bn.message(), **bn.to_json()})
    second = not data.features_only and plan.name != "head" and hyper.epochs_finetune > 0
    cache = PrefixCache(None, 0, None, {"cached": False, "reason": "no fine-tune phase"})
    backbone: list[str] = []
    if second:
        _, backbone = set_trainable(model, plan)
        cache = cache_prefix(model, data, ctx)
        ctx.emit({"event": "phase", "phase": "prefix_cache", "message": (
            f"cached the activations entering {cache.record['at']} for {cache.record['rows']} rows "
            f"({cache.record['mib']:.0f} MiB, {cache.record['images_per_second']:.0f} images/s): "
            f"epochs run only the trainable part" if cache.record["cached"]
            else f"no activation cache: {cache.record['reason']}")})
    phases = []
    report, tripped, feature_rate, teacher = _head_phase(model, data, ctx, cache)
    phases.append(report)
    record: dict[str, Any] = {}
    trips = [f"head phase: {tripped}"] if tripped is not None else []
    if tripped is None and second:
        data = with_replay_teacher(data, teacher)
        if cache.data is not None:
            cache = replace(cache, data=with_replay_teacher(cache.data, teacher))
        record = finetune_phase(model, data, plan, ctx, anchor_data, cache, report, backbone)
        phases.append(record["report"])
        trips += record["trips"]
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return RecipeReport(
        phases=tuple(phases), guard_message=trips[-1] if trips else None, weight_drift=record.get("drift", 0.0),
        seconds=time.monotonic() - started, history=tuple(ctx.history), trips=tuple(trips),
        finetune_kept=record.get("kept", False), head_only_reason=record.get("head_only_reason"),
        batchnorm={"inspection": bn.to_json(), "finetune": record.get("batchnorm")},
        lr_search=record.get("lr_search"), epochs_capped=record.get("epochs_capped"),
        prefix_cache={**cache.record, "feature_pass_images_per_second": feature_rate})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (the start point for WiSE-FT and comparisons)."""
    return copy.deepcopy({k: v.detach() for k, v in unwrap(model).state_dict().items()})
