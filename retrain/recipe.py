"""The guarded two-phase fine-tuning recipe.

Phase 1 trains the head alone on pooled features of the frozen backbone (BatchNorm in eval mode,
so its statistics cannot drift) until validation loss plateaus. Phase 2 unfreezes the layer
groups the strategy names with layer-wise learning rates (timm optimizer + timm/one-cycle
scheduler, which apply each group's ``lr_scale``), gradient clipping, an L2-SP/EWC anchor to the
starting weights and early stopping.

What keeps phase 2 from diverging silently on a real pretrained backbone:
- its learning rate comes from a short range test on the head-trained model (lr_finder) unless
  ``lr_backbone`` is set;
- guards judge it against the head-trained model it started from (guards.BaselineGuard: gradient
  norm x the norm measured there, validation loss x the head phase's) as well as step to step
  (SpikeDetector); a trip restores the head-phase weights and retries at 1/10 the rate, at most
  ``max_backoffs`` times, each trip a progress event and a line in the report;
- BatchNorm statistics stay as served unless re-estimating them is measured not to hurt
  (retrain.batchnorm);
- when the phase never beats the head phase's validation loss, the head-only model is kept and
  the report says so (RecipeReport.head_only_reason), for the job's result.

Frozen layers are computed once: the activations entering the first trainable block are cached
for every row (retrain.trunk), so an epoch runs only the trainable part.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import timm.optim
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch import nn

from retrain.batches import Split, TrainingSet, mixed_batches, steps_per_epoch
from retrain.batchnorm import BatchNormReport, batchnorm_layers, inspect_batchnorm, load_stats, reestimate, stats_of
from retrain.config import HyperConfig
from retrain.guards import Anchor, AnchorWeights, BaselineGuard, GuardTripped, SpikeDetector, grad_norm
from retrain.lr_finder import RangeTest, range_test
from retrain.model import pooled_features, unwrap
from retrain.strategy import StrategyPlan, layer_groups
from retrain.trunk import Suffix, Trunk, activation_bytes, find_trunk, prefix_activations

Progress = Callable[[dict], None]
log = logging.getLogger(__name__)

PROGRESS_EVERY = 25      # steps between "step" events: the daemon's guard gauges read the last line
CHECK_EVERY = 50         # steps between validation checks of the val_rise guard inside an epoch
BASELINE_BATCHES = 3     # batches whose gradient norm at the head-trained weights is the baseline
RANGE_TEST_STEPS = 30    # steps of the LR range test (1e-7 .. 1, stops early on divergence)


@dataclass(frozen=True)
class PhaseReport:
    name: str                       # "head" | "finetune"
    epochs: int                     # epochs run (of the last attempt)
    best_epoch: int                 # 0 = the phase's starting weights were best
    best_val_loss: float
    stopped: str                    # "plateau" | "max_epochs" | "guard:<kind>"
    lr: float | None = None         # phase 2: the base LR of the last attempt
    images_per_second: float = 0.0  # training throughput (batches incl. replay rows)
    grad_norm_median: float = 0.0   # median gradient norm over the phase's steps


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

    def outcome_reason(self, outcome: str, gate_reason: str) -> str:
        """The job's result line: says "head-only" when phase 2 was thrown away."""
        if self.head_only_reason is None:
            return gate_reason
        return f"{outcome} head-only: {self.head_only_reason}; {gate_reason}"

    def to_json(self) -> dict[str, Any]:
        return {"phases": [p.__dict__ for p in self.phases], "trips": list(self.trips),
                "finetune_kept": self.finetune_kept, "head_only_reason": self.head_only_reason,
                "batchnorm": self.batchnorm, "lr_search": self.lr_search, "prefix_cache": self.prefix_cache,
                "weight_drift": self.weight_drift, "seconds": self.seconds}


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
            if event["event"] == "guard":  # every trip is a line in the job's log too
                log.warning("retrain guard (%s, %s): %s", event.get("phase"), event.get("guard"), event["message"])
            elif event["event"] == "phase" and event.get("phase") != "head" and event.get("phase") != "finetune":
                log.info("retrain %s: %s", event.get("phase"), event.get("message"))


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


def _splits(data: TrainingSet) -> tuple[Split, Split, Split, Split]:
    return data.train, data.val, data.replay, data.replay_val


@torch.no_grad()
def _map(fn: Callable[[torch.Tensor], torch.Tensor], split: Split, device: torch.device, width: int,
         batch_size: int = 256) -> Split:
    out = []
    for start in range(0, len(split), batch_size):
        with _autocast(device):
            out.append(fn(_to(split.x[start : start + batch_size], device)).float())
    x = torch.cat(out) if out else split.x.new_zeros((0, width), device=device)
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


def _global_mean(value: float, ctx: _Ctx) -> float:
    """The loss averaged over DDP ranks, so every rank's guard takes the same decision."""
    if ctx.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t) / ctx.world_size


@dataclass
class _Trainer:
    """What one phase steps: ``forward`` over ``data`` (images or cached activations)."""

    module: nn.Module                          # whose state is saved/restored (the weights that train)
    forward: Callable[[torch.Tensor], torch.Tensor]
    data: TrainingSet
    trainable: list[nn.Parameter]
    watched: list[nn.Parameter]                # gradient norm reported and guarded (the backbone in phase 2)
    set_modes: Callable[[], None] = lambda: None
    before_eval: Callable[[], None] = lambda: None
    anchor: Anchor | None = None

    def loss(self, batch: Split, ctx: _Ctx) -> torch.Tensor:
        with _autocast(ctx.device):
            loss = nn.functional.cross_entropy(self.forward(_to(batch.x, ctx.device)).float(), batch.y.to(ctx.device))
        return loss + self.anchor.penalty() if self.anchor is not None else loss

    def val(self, ctx: _Ctx) -> float:
        self.module.eval()
        self.before_eval()
        return _val_loss(self.forward, self.data, ctx)


def _run_phase(name: str, tr: _Trainer, optimizer: torch.optim.Optimizer, epochs: int, ctx: _Ctx, *,
               schedule: Callable[[int], None] = lambda step: None, guard: BaselineGuard | None = None,
               start_loss: float | None = None, lr: float | None = None) -> tuple[PhaseReport, GuardTripped | None]:
    """Epoch loop shared by both phases: mixed batches, guards, early stopping, best-weights restore."""
    hyper = ctx.hyper
    best_loss = tr.val(ctx) if start_loss is None else start_loss
    best_state, best_epoch = _state(tr.module), 0
    spike = SpikeDetector(hyper.spike_factor)
    ctx.emit({"event": "phase", "phase": name, "val_loss": best_loss,
              "message": f"starting {name} phase" + (f" at lr {lr:.2g}" if lr is not None else "")})
    step, epoch, stopped, tripped = 0, 0, "max_epochs", None
    images, train_seconds, all_norms = 0, 0.0, []
    for epoch in range(1, epochs + 1):
        tr.set_modes()
        norms: list[float] = []
        train_loss = 0.0
        batches = mixed_batches(tr.data, hyper.batch_size, hyper.replay_fraction, ctx.generator,
                                rank=ctx.rank, world_size=ctx.world_size)
        started = time.perf_counter()
        try:
            for batch in batches:
                schedule(step)
                loss = tr.loss(batch, ctx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                total_norm = grad_norm(tr.trainable)
                norms.append(grad_norm(tr.watched))
                spike.check(total_norm, _global_mean(float(loss.detach()), ctx))
                if guard is not None:
                    guard.check_step(norms[-1])
                if hyper.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(tr.trainable, hyper.grad_clip)
                optimizer.step()
                train_loss += float(loss.detach())
                images += len(batch) * ctx.world_size
                step += 1
                if guard is not None and step % PROGRESS_EVERY == 0:
                    ctx.emit({"event": "step", "phase": name, "epoch": epoch, "step": step,
                              "grad_norm": norms[-1], "grad_ratio": guard.ratio(norms[-1]),
                              "weight_drift": tr.anchor.drift() if tr.anchor is not None else 0.0,
                              "lr": max(g["lr"] for g in optimizer.param_groups), "train_loss": float(loss.detach())})
                if guard is not None and step % CHECK_EVERY == 0 and len(norms) < steps_per_epoch(
                        tr.data, hyper.batch_size, hyper.replay_fraction):
                    train_seconds += time.perf_counter() - started
                    guard.check_val(tr.val(ctx))  # mid-epoch: a divergence must not run a whole epoch
                    tr.set_modes()
                    started = time.perf_counter()
        except GuardTripped as exc:
            train_seconds += time.perf_counter() - started
            all_norms += norms
            tr.module.load_state_dict(best_state)
            ctx.emit({"event": "guard", "phase": name, "epoch": epoch, "guard": exc.kind,
                      "grad_norm": norms[-1] if norms else 0.0,
                      "weight_drift": tr.anchor.drift() if tr.anchor is not None else 0.0,
                      "message": f"{exc}; restored the weights of epoch {best_epoch}"})
            stopped, tripped = f"guard:{exc.kind}", exc
            break
        train_seconds += time.perf_counter() - started
        all_norms += norms
        val = tr.val(ctx)
        ctx.emit({"event": "epoch", "phase": name, "epoch": epoch, "train_loss": train_loss / max(1, len(norms)),
                  "val_loss": val, "grad_norm": max(norms, default=0.0),
                  "grad_norm_mean": sum(norms) / max(1, len(norms)),
                  "weight_drift": tr.anchor.drift() if tr.anchor is not None else 0.0,
                  "images_per_second": images / max(train_seconds, 1e-9)})
        if guard is not None:
            try:
                guard.check_val(val)
            except GuardTripped as exc:
                tr.module.load_state_dict(best_state)
                ctx.emit({"event": "guard", "phase": name, "epoch": epoch, "guard": exc.kind,
                          "grad_norm": norms[-1] if norms else 0.0,
                          "weight_drift": tr.anchor.drift() if tr.anchor is not None else 0.0,
                          "message": f"{exc}; restored the weights of epoch {best_epoch}"})
                stopped, tripped = f"guard:{exc.kind}", exc
                break
        if val < best_loss - 1e-4:
            best_loss, best_state, best_epoch = val, _state(tr.module), epoch
        elif epoch - best_epoch >= hyper.patience:
            stopped = "plateau"
            break
    if tripped is None:
        tr.module.load_state_dict(best_state)
    median = float(torch.tensor(all_norms).median()) if all_norms else 0.0
    return PhaseReport(name, epoch if epochs else 0, best_epoch, best_loss, stopped, lr,
                       images / max(train_seconds, 1e-9), median), tripped


@dataclass(frozen=True)
class _Cache:
    """Phase 2's inputs: cached activations at ``trunk.units[start]`` (or None: images)."""

    trunk: Trunk | None
    start: int
    data: TrainingSet | None
    record: dict[str, Any]


def _prefix_cache(model: nn.Module, data: TrainingSet, ctx: _Ctx) -> _Cache:
    """Cache the inputs of the first trainable block for every row, when that is possible."""
    sample = _to(data.train.x[:4], ctx.device)
    trunk = find_trunk(model, sample)
    if trunk is None:
        return _Cache(None, 0, None, {"cached": False, "reason": "forward_features is not a chain of blocks"})
    start = trunk.first_trainable()
    if start == 0:
        return _Cache(trunk, 0, None, {"cached": False, "reason": "the first layer trains: nothing frozen to cache"})
    rows = sum(len(s) for s in _splits(data))
    needed = activation_bytes(trunk, start, sample, rows)
    if needed > ctx.hyper.cache_mb * 2**20:
        return _Cache(trunk, start, None, {
            "cached": False, "reason": f"activations at {trunk.names[start]} need {needed / 2**20:.0f} MiB "
                                       f"> hyper.cache_mb {ctx.hyper.cache_mb}"})
    t = time.perf_counter()
    model.eval()
    cached = TrainingSet(*(Split(prefix_activations(trunk, start, s.x, device=ctx.device), s.y.to(ctx.device))
                           for s in _splits(data)))
    seconds = time.perf_counter() - t
    return _Cache(trunk, start, cached, {
        "cached": True, "at": trunk.names[start], "frozen_units": start, "units": len(trunk.units),
        "rows": rows, "mib": needed / 2**20, "seconds": seconds, "images_per_second": rows / max(seconds, 1e-9)})


def _head_phase(model: nn.Module, data: TrainingSet, ctx: _Ctx, cache: _Cache
                ) -> tuple[PhaseReport, GuardTripped | None, float]:
    """Phase 1 on pooled features: exactly a frozen backbone with BN in eval mode, computed once.
    Returns the report, a trip, and the images/s of the one feature pass."""
    model.eval()
    t = time.perf_counter()
    if data.features_only:
        features = data
    elif cache.data is not None:  # the rest of the trunk over the cached prefix
        assert cache.trunk is not None
        suffix = Suffix(model, cache.trunk, cache.start).eval()
        features = TrainingSet(*(_map(suffix.features, s, ctx.device, unwrap(model).num_features)
                                 for s in _splits(cache.data)), features_only=True)
    else:
        features = TrainingSet(*(_map(lambda x: pooled_features(model, x), s, ctx.device, unwrap(model).num_features)
                                 for s in _splits(data)), features_only=True)
    rows = sum(len(s) for s in _splits(data))
    feature_rate = rows / max(time.perf_counter() - t, 1e-9)
    head = model.get_classifier()
    optimizer = torch.optim.AdamW(head.parameters(), lr=ctx.hyper.lr_head, weight_decay=1e-4)
    trainer = _Trainer(head, head, features, list(head.parameters()), list(head.parameters()))
    # Every DDP rank runs this small phase in full, identically (same data, same seed): no sharding.
    report, tripped = _run_phase("head", trainer, optimizer, ctx.hyper.epochs_head, replace(ctx, world_size=1))
    return report, tripped, feature_rate


def _set_trainable(model: nn.Module, plan: StrategyPlan) -> tuple[list[str], list[str]]:
    """requires_grad on the plan's layer groups; returns (trainable names, backbone names)."""
    groups = layer_groups(model)
    trainable_ids = set(plan.trainable_groups(max(groups) + 1))
    head_names = set(groups[max(groups)])
    train_names = {n for gid, names in groups.items() if gid in trainable_ids for n in names}
    for n, p in model.named_parameters():
        p.requires_grad_(n in train_names)
    return sorted(train_names), sorted(train_names - head_names)


def _optimizer(model: nn.Module, plan: StrategyPlan, hyper: HyperConfig, lr: float) -> torch.optim.Optimizer:
    # timm's layer decay names groups by the whole model; frozen parameters are skipped by it
    return timm.optim.create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.0, layer_decay=plan.layer_decay)


def _schedule(optimizer: torch.optim.Optimizer, hyper: HyperConfig, lr: float, total: int) -> Callable[[int], None]:
    warmup = min(total - 1, round(hyper.warmup_epochs * total / max(1, hyper.epochs_finetune)))
    if hyper.schedule == "cosine":
        sched = CosineLRScheduler(optimizer, t_initial=total, warmup_t=warmup, warmup_lr_init=lr * 0.01,
                                  lr_min=lr * 0.01, t_in_epochs=False)
        return sched.step_update  # timm applies each group's lr_scale here
    one = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups],
        total_steps=total + 1, pct_start=max(0.01, warmup / total))
    return lambda step: one.step() if step > 0 else None  # first step uses the initial LR


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _finetune_phase(model: nn.Module, data: TrainingSet, plan: StrategyPlan, ctx: _Ctx, anchor_data: Split | None,
                    cache: _Cache, head: PhaseReport, backbone: list[str]) -> dict[str, Any]:
    hyper = replace(ctx.hyper, replay_fraction=plan.replay_fraction(ctx.hyper.replay_fraction))
    ctx = replace(ctx, hyper=hyper)
    anchor = Anchor(model, backbone, AnchorWeights(hyper.l2sp_weight * plan.l2sp_scale, hyper.ewc_weight))
    if hyper.ewc_weight > 0 and anchor_data is not None and len(anchor_data):
        model.eval()
        anchor.estimate_fisher(
            model, ((_to(anchor_data.x[i : i + 64], ctx.device), anchor_data.y[i : i + 64].to(ctx.device))
                    for i in range(0, len(anchor_data), 64)), lambda m, x: m(x))
    if cache.data is not None:
        assert cache.trunk is not None
        net: nn.Module = Suffix(model, cache.trunk, cache.start)
        train_data = cache.data
    else:
        net, train_data = model, data
    wrapped = net
    if ctx.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    watched = [p for n, p in model.named_parameters() if n in set(backbone)]
    trainable_bn = [bn for _, bn in batchnorm_layers(net) if any(p.requires_grad for p in bn.parameters())]
    adapt = {"value": False}

    def set_modes() -> None:
        # Frozen layers (the stem, the cached prefix) keep their statistics, or they are not frozen;
        # trainable layers' statistics follow the mixed batches only when that was measured safe.
        net.train()
        for _, bn in batchnorm_layers(net):
            if not (adapt["value"] and bn in trainable_bn):
                bn.eval()

    def sync_buffers() -> None:
        # Each rank updates BatchNorm statistics on its own shard: adopt rank 0's before every
        # validation so all ranks score, keep and stop identically (and end identical).
        if ctx.world_size > 1:
            for buffer in net.buffers():
                dist.broadcast(buffer, src=0)

    tr = _Trainer(model, wrapped, train_data, trainable, watched, set_modes, sync_buffers, anchor)
    record: dict[str, Any] = {}
    head_val = head.best_val_loss
    head_state = _state(model)  # the head-phase model, with the statistics its head was trained on
    record["batchnorm"] = _choose_batchnorm(net, tr, trainable_bn, plan, ctx, head_val, adapt)
    start_state = _state(model)

    # the baseline: gradient norm of the head-trained model, before any fine-tune step
    set_modes()
    norms = []
    for i, batch in enumerate(mixed_batches(train_data, hyper.batch_size, hyper.replay_fraction, ctx.generator,
                                            rank=ctx.rank, world_size=ctx.world_size)):
        if i == BASELINE_BATCHES:
            break
        model.zero_grad(set_to_none=True)
        tr.loss(batch, ctx).backward()
        norms.append(grad_norm(watched))
    model.zero_grad(set_to_none=True)
    baseline = float(torch.tensor(norms).median()) if norms else 0.0
    record["grad_baseline"] = baseline
    record["head_grad_norm"] = head.grad_norm_median

    if hyper.lr_backbone is None:
        test = _lr_range_test(model, tr, plan, ctx)
        model.load_state_dict(start_state)
        lr = test.suggestion
        record["lr_search"] = test.to_json()
        ctx.emit({"event": "phase", "phase": "lr_range_test", "lr": lr,
                  "message": f"lr_backbone {lr:.2g}: {test.reason}"})
    else:
        lr = hyper.lr_backbone
    total = max(1, hyper.epochs_finetune * steps_per_epoch(train_data, hyper.batch_size, hyper.replay_fraction))
    trips: list[str] = []
    for attempt in range(hyper.max_backoffs + 1):
        if attempt:
            model.load_state_dict(start_state)
            lr /= 10
        optimizer = _optimizer(model, plan, hyper, lr)
        guard = BaselineGuard(baseline, head_val, factor=hyper.grad_ratio, val_rise=hyper.val_rise)
        report, tripped = _run_phase("finetune", tr, optimizer, hyper.epochs_finetune, ctx,
                                     schedule=_schedule(optimizer, hyper, lr, total), guard=guard, start_loss=head_val,
                                     lr=lr)
        if tripped is None:
            break
        trips.append(f"finetune attempt {attempt + 1} at lr {lr:.2g}: {tripped}")
        if report.best_epoch > 0:  # it improved before it tripped: keep that, as any early stop would
            break
        if attempt < hyper.max_backoffs:
            ctx.emit({"event": "guard", "phase": "finetune", "guard": "backoff", "epoch": report.epochs,
                      "message": f"{tripped}; retrying the phase from the head-trained weights at lr {lr / 10:.2g}"})
    improved = report.best_epoch > 0 and report.best_val_loss < head_val - 1e-4
    if not improved:
        model.load_state_dict(head_state)
        detail = (f"{len(trips)} guard trip(s), the last: {trips[-1]}" if report.stopped.startswith("guard")
                  else f"best fine-tune {report.best_val_loss:.3f} at lr {lr:.2g}"
                  + (f" after {len(trips)} backoff(s)" if trips else ""))
        why = f"fine-tuning did not improve validation loss (head phase {head_val:.3f}; {detail})"
        record["head_only_reason"] = why
        log.warning("retrain: kept the head-phase weights: %s", why)
        ctx.emit({"event": "phase", "phase": "finetune", "val_loss": head_val,
                  "message": f"kept the head-phase weights: {why}"})
    record.update(report=report, trips=trips, drift=anchor.drift(), kept=improved, lr=lr)
    return record


def _choose_batchnorm(net: nn.Module, tr: _Trainer, layers: list, plan: StrategyPlan, ctx: _Ctx, head_val: float,
                      adapt: dict[str, bool]) -> dict[str, Any]:
    """Decide whether the trainable layers' BN statistics follow the batches in phase 2."""
    mode = ctx.hyper.batchnorm
    if not layers:
        return {"mode": mode, "adapted": False, "reason": "no BatchNorm in the trainable layers"}
    if mode == "frozen" or (mode == "auto" and not plan.adapt_batchnorm):
        why = "hyper.batchnorm is 'frozen'" if mode == "frozen" else f"strategy {plan.name} keeps statistics"
        return {"mode": mode, "adapted": False, "reason": why}
    served = stats_of(layers)
    hyper = ctx.hyper
    net.eval()
    rows = reestimate(layers, tr.forward, (
        _to(b.x, ctx.device) for b in mixed_batches(tr.data, hyper.batch_size, hyper.replay_fraction, ctx.generator,
                                                    rank=ctx.rank, world_size=ctx.world_size)))
    tr.before_eval()
    val = _val_loss(tr.forward, tr.data, ctx)
    keep = mode == "adapt" or val <= head_val
    verdict = (f"re-estimated statistics of {len(layers)} layers on {rows} rows (replay share "
               f"{hyper.replay_fraction:g}): validation loss {head_val:.3f} -> {val:.3f}")
    if not keep:
        load_stats(layers, served)
    adapt["value"] = keep
    msg = verdict + ("; statistics adapt in phase 2" if keep else "; kept the served statistics, frozen")
    ctx.emit({"event": "phase", "phase": "batchnorm", "val_loss": val, "message": msg})
    return {"mode": mode, "adapted": keep, "reason": msg, "val_loss_reestimated": val}


def _lr_range_test(model: nn.Module, tr: _Trainer, plan: StrategyPlan, ctx: _Ctx) -> RangeTest:
    hyper = ctx.hyper
    optimizer = _optimizer(model, plan, hyper, 1e-7)
    tr.set_modes()
    batches = iter(())

    def step(lr: float) -> float:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = mixed_batches(tr.data, hyper.batch_size, hyper.replay_fraction, ctx.generator,
                                    rank=ctx.rank, world_size=ctx.world_size)
            batch = next(batches)
        _set_lr(optimizer, lr)
        loss = tr.loss(batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hyper.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(tr.trainable, hyper.grad_clip)
        optimizer.step()
        return _global_mean(float(loss.detach()), ctx)

    return range_test(step, steps=RANGE_TEST_STEPS)


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
    bn: BatchNormReport = inspect_batchnorm(model)
    ctx.emit({"event": "phase", "phase": "batchnorm", "message": bn.message(), **bn.to_json()})
    second = not data.features_only and plan.name != "head" and hyper.epochs_finetune > 0
    cache = _Cache(None, 0, None, {"cached": False, "reason": "no fine-tune phase"})
    backbone: list[str] = []
    if second:
        _, backbone = _set_trainable(model, plan)
        cache = _prefix_cache(model, data, ctx)
        ctx.emit({"event": "phase", "phase": "prefix_cache", "message": (
            f"cached the activations entering {cache.record['at']} for {cache.record['rows']} rows "
            f"({cache.record['mib']:.0f} MiB, {cache.record['images_per_second']:.0f} images/s): "
            f"epochs run only the trainable part" if cache.record["cached"]
            else f"no activation cache: {cache.record['reason']}")})
    phases = []
    report, tripped, feature_rate = _head_phase(model, data, ctx, cache)
    phases.append(report)
    record: dict[str, Any] = {}
    trips = [f"head phase: {tripped}"] if tripped is not None else []
    if tripped is None and second:
        record = _finetune_phase(model, data, plan, ctx, anchor_data, cache, report, backbone)
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
        lr_search=record.get("lr_search"),
        prefix_cache={**cache.record, "feature_pass_images_per_second": feature_rate})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (the start point for WiSE-FT and comparisons)."""
    return copy.deepcopy({k: v.detach() for k, v in unwrap(model).state_dict().items()})
