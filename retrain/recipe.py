"""The guarded two-phase fine-tuning recipe.

Phase 1 trains the head alone on pooled features of the frozen backbone (BatchNorm in eval mode,
so its statistics cannot drift) until validation loss plateaus. Phase 2 unfreezes the layer
groups the strategy names with layer-wise learning rates (timm optimizer + timm/one-cycle
scheduler, which apply each group's ``lr_scale``), gradient clipping, an L2-SP/EWC anchor to the
starting weights and early stopping. Every step is checked by the guards; a spike or a
non-finite loss stops training and restores the best weights seen.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import timm.optim
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch import nn

from retrain.batches import Split, TrainingSet, mixed_batches, steps_per_epoch
from retrain.config import HyperConfig
from retrain.guards import Anchor, AnchorWeights, GuardTripped, SpikeDetector, grad_norm
from retrain.model import pooled_features, unwrap
from retrain.strategy import StrategyPlan, layer_groups

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class PhaseReport:
    name: str                       # "head" | "finetune"
    epochs: int                     # epochs run
    best_epoch: int                 # 0 = the phase's starting weights were best
    best_val_loss: float
    stopped: str                    # "plateau" | "max_epochs" | "guard:<kind>"


@dataclass(frozen=True)
class RecipeReport:
    phases: tuple[PhaseReport, ...]
    guard_message: str | None = None   # set when a guard stopped training
    weight_drift: float = 0.0          # final L2 distance of the backbone from its start
    seconds: float = 0.0
    history: tuple[dict, ...] = field(default=())  # the epoch events, for the job's record


@dataclass
class _Ctx:
    hyper: HyperConfig
    device: torch.device
    progress: Progress
    generator: torch.Generator
    rank: int
    world_size: int
    history: list[dict]

    def emit(self, event: dict) -> None:
        if event["event"] == "epoch":
            self.history.append(event)
        if self.rank == 0:
            self.progress(event)


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available; "cuda" without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("retrain.device is 'cuda' but no CUDA device is available")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    # bf16 keeps fp32's range, so no loss scaler; CPU trains in fp32 (bf16 there is slow)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 and device.type == "cuda" else x


@torch.no_grad()
def _features(model: nn.Module, split: Split, device: torch.device, batch_size: int) -> Split:
    out = []
    for start in range(0, len(split), batch_size):
        with _autocast(device):
            out.append(pooled_features(model, _to(split.x[start : start + batch_size], device)).float())
    x = torch.cat(out) if out else split.x.new_zeros((0, unwrap(model).num_features), device=device)
    return Split(x, split.y.to(device))


@torch.no_grad()
def _val_loss(forward: Callable[[torch.Tensor], torch.Tensor], data: TrainingSet, ctx: _Ctx) -> float:
    """Mean of production and replay validation losses (each weighs half: forgetting counts)."""
    losses = []
    for split in (data.val, data.replay_val):
        if len(split) == 0:
            continue
        total = 0.0
        for start in range(0, len(split), 256):
            with _autocast(ctx.device):
                logits = forward(_to(split.x[start : start + 256], ctx.device)).float()
            total += float(nn.functional.cross_entropy(logits, split.y[start : start + 256].to(ctx.device), reduction="sum"))
        losses.append(total / len(split))
    return sum(losses) / len(losses)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _run_phase(
    name: str, module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], data: TrainingSet,
    optimizer: torch.optim.Optimizer, epochs: int, ctx: _Ctx, *,
    schedule: Callable[[int], None] = lambda step: None, anchor: Anchor | None = None,
    watched: list[nn.Parameter] | None = None, set_modes: Callable[[], None] = lambda: None,
    before_eval: Callable[[], None] = lambda: None,
) -> tuple[PhaseReport, GuardTripped | None]:
    """Epoch loop shared by both phases: mixed batches, guards, early stopping, best-weights restore."""
    hyper = ctx.hyper
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    watched = watched if watched is not None else trainable
    before_eval()
    best_loss, best_state, best_epoch = _val_loss(forward, data, ctx), _state(module), 0
    spike = SpikeDetector(hyper.spike_factor)
    ctx.emit({"event": "phase", "phase": name, "val_loss": best_loss, "message": f"starting {name} phase"})
    step, epoch, stopped, tripped = 0, 0, "max_epochs", None
    for epoch in range(1, epochs + 1):
        set_modes()
        norms: list[float] = []
        train_loss = 0.0
        batches = mixed_batches(data, hyper.batch_size, hyper.replay_fraction, ctx.generator,
                                rank=ctx.rank, world_size=ctx.world_size)
        try:
            for batch in batches:
                schedule(step)
                with _autocast(ctx.device):
                    loss = nn.functional.cross_entropy(forward(_to(batch.x, ctx.device)).float(), batch.y.to(ctx.device))
                if anchor is not None:
                    loss = loss + anchor.penalty()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                total_norm = grad_norm(trainable)
                norms.append(grad_norm(watched))
                spike.check(total_norm, _global_mean(float(loss.detach()), ctx))
                if hyper.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, hyper.grad_clip)
                optimizer.step()
                train_loss += float(loss.detach())
                step += 1
        except GuardTripped as exc:
            module.load_state_dict(best_state)
            ctx.emit({"event": "guard", "phase": name, "epoch": epoch, "guard": exc.kind,
                      "message": f"{exc}; restored the weights of epoch {best_epoch}"})
            stopped, tripped = f"guard:{exc.kind}", exc
            break
        module.eval()
        before_eval()
        val = _val_loss(forward, data, ctx)
        ctx.emit({"event": "epoch", "phase": name, "epoch": epoch, "train_loss": train_loss / max(1, len(norms)),
                  "val_loss": val, "grad_norm": max(norms, default=0.0),
                  "grad_norm_mean": sum(norms) / max(1, len(norms)),
                  "weight_drift": anchor.drift() if anchor is not None else 0.0})
        if val < best_loss - 1e-4:
            best_loss, best_state, best_epoch = val, _state(module), epoch
        elif epoch - best_epoch >= hyper.patience:
            stopped = "plateau"
            break
    if tripped is None:
        module.load_state_dict(best_state)
    return PhaseReport(name, epoch if epochs else 0, best_epoch, best_loss, stopped), tripped


def _global_mean(value: float, ctx: _Ctx) -> float:
    """The loss averaged over DDP ranks, so every rank's guard takes the same decision."""
    if ctx.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t) / ctx.world_size


def _head_phase(model: nn.Module, data: TrainingSet, ctx: _Ctx) -> tuple[PhaseReport, GuardTripped | None]:
    """Phase 1 on pooled features: exactly a frozen backbone with BN in eval mode, computed once."""
    model.eval()
    if not data.features_only:
        data = TrainingSet(*(_features(model, s, ctx.device, 256) for s in
                             (data.train, data.val, data.replay, data.replay_val)), features_only=True)
    head = model.get_classifier()
    optimizer = torch.optim.AdamW(head.parameters(), lr=ctx.hyper.lr_head, weight_decay=1e-4)
    # Every DDP rank runs this small phase in full, identically (same data, same seed): no sharding.
    return _run_phase("head", head, head, data, optimizer, ctx.hyper.epochs_head, replace(ctx, world_size=1))


def _finetune_phase(
    model: nn.Module, data: TrainingSet, plan: StrategyPlan, ctx: _Ctx, anchor_data: Split | None,
) -> tuple[PhaseReport, GuardTripped | None, Anchor]:
    hyper = ctx.hyper
    groups = layer_groups(model)
    trainable_ids = set(plan.trainable_groups(max(groups) + 1))
    head_names = set(groups[max(groups)])
    train_names = {n for gid, names in groups.items() if gid in trainable_ids for n in names}
    for n, p in model.named_parameters():
        p.requires_grad_(n in train_names)
    backbone = sorted(train_names - head_names)
    anchor = Anchor(model, backbone, AnchorWeights(hyper.l2sp_weight * plan.l2sp_scale, hyper.ewc_weight))
    if hyper.ewc_weight > 0 and anchor_data is not None and len(anchor_data):
        model.eval()
        anchor.estimate_fisher(
            model, ((_to(anchor_data.x[i : i + 64], ctx.device), anchor_data.y[i : i + 64].to(ctx.device))
                    for i in range(0, len(anchor_data), 64)), lambda m, x: m(x))
    hyper = replace(hyper, replay_fraction=plan.replay_fraction(hyper.replay_fraction))
    ctx = replace(ctx, hyper=hyper)
    optimizer = timm.optim.create_optimizer_v2(
        model, opt="adamw", lr=hyper.lr_backbone, weight_decay=0.0, layer_decay=plan.layer_decay)
    total = max(1, hyper.epochs_finetune * steps_per_epoch(data, hyper.batch_size, hyper.replay_fraction))
    warmup = min(total - 1, round(hyper.warmup_epochs * total / max(1, hyper.epochs_finetune)))
    if hyper.schedule == "cosine":
        sched = CosineLRScheduler(optimizer, t_initial=total, warmup_t=warmup, warmup_lr_init=hyper.lr_backbone * 0.01,
                                  lr_min=hyper.lr_backbone * 0.01, t_in_epochs=False)
        schedule = sched.step_update  # timm applies each group's lr_scale here
    else:
        one = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[hyper.lr_backbone * g.get("lr_scale", 1.0) for g in optimizer.param_groups],
            total_steps=total + 1, pct_start=max(0.01, warmup / total))
        schedule = lambda step: one.step() if step > 0 else None  # noqa: E731 (first step uses the initial LR)

    wrapped: nn.Module = model
    if ctx.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def set_modes() -> None:
        # Similar domains keep BatchNorm statistics frozen. For an input-level shift the
        # statistics themselves are what moved; with replay in every batch they adapt to the
        # mixture of old and new inputs instead of being overwritten by the new ones.
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                # A frozen layer (e.g. the stem) keeps its statistics too, or it is not frozen.
                frozen = not any(p.requires_grad for p in m.parameters())
                if frozen or not plan.adapt_batchnorm:
                    m.eval()

    def sync_buffers() -> None:
        # Each rank updates BatchNorm statistics on its own shard: adopt rank 0's before every
        # validation so all ranks score, keep and stop identically (and end identical).
        if ctx.world_size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    watched = [p for n, p in model.named_parameters() if n in set(backbone)]
    report, tripped = _run_phase("finetune", model, wrapped, data, optimizer, hyper.epochs_finetune, ctx,
                                 schedule=schedule, anchor=anchor, watched=watched, set_modes=set_modes,
                                 before_eval=sync_buffers)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return report, tripped, anchor


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
    ctx = _Ctx(hyper=hyper, device=device, progress=progress or (lambda event: None),
               generator=torch.Generator().manual_seed(hyper.seed),
               rank=dist.get_rank() if distributed else 0,
               world_size=dist.get_world_size() if distributed else 1, history=[])
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    phases = []
    report, tripped = _head_phase(model, data, ctx)
    phases.append(report)
    drift = 0.0
    if tripped is None and not data.features_only and plan.name != "head" and hyper.epochs_finetune > 0:
        report, tripped, anchor = _finetune_phase(model, data, plan, ctx, anchor_data)
        phases.append(report)
        drift = anchor.drift()
    model.eval()
    return RecipeReport(phases=tuple(phases), guard_message=None if tripped is None else str(tripped),
                        weight_drift=drift, seconds=time.monotonic() - started, history=tuple(ctx.history))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (the start point for WiSE-FT and comparisons)."""
    return copy.deepcopy({k: v.detach() for k, v in unwrap(model).state_dict().items()})
