"""One phase of the recipe: the epoch loop the head and fine-tune phases share, and what it steps.

``run_phase`` steps a ``Trainer`` (a forward over images or cached activations, the parameters that
train and those whose gradient norm is watched, an optional L2-SP/EWC anchor, replay distillation)
through mixed batches under the step-to-step guard (SpikeDetector) and, in phase 2, the baseline
guard; it stops on a plateau and ends on the best weights. ``RunContext`` carries what every phase
reads (hyper-parameters, device, DDP rank and size, the progress callback and the epoch history).
Apart from retrain.recipe, which decides what each phase trains, so the loop and its guards read
on their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from retrain.batches import Split, TrainingSet, mixed_batches, steps_per_epoch
from retrain.config import HyperConfig
from retrain.distill import distill_loss
from retrain.guards import Anchor, BaselineGuard, GuardTripped, SpikeDetector, grad_norm

Progress = Callable[[dict], None]
log = logging.getLogger("retrain.recipe")  # the logger name from before the move: log filters keep working

PROGRESS_EVERY = 25      # steps between "step" events: the daemon's guard gauges read the last line
CHECK_EVERY = 50         # steps between validation checks of the val_rise guard inside an epoch


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


@dataclass
class RunContext:
    """What every phase reads; ``emit`` records and reports a progress event (rank 0 only)."""

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


def autocast(device: torch.device):
    """The precision context a forward runs under on ``device``."""
    # bf16 keeps fp32's range, so no loss scaler; CPU trains in fp32 (bf16 there is slow)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; image (and cached activation) batches channels-last, as the model is.

    On CPU too: oneDNN's convolutions run channels-last ~1.1-1.5x faster per training step
    (MobileNetV2 at 64 px, test_resnet at 32 px, 2 threads; bench/README.md, "Speed").
    """
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@torch.no_grad()
def val_loss(forward: Callable[[torch.Tensor], torch.Tensor], data: TrainingSet, ctx: RunContext) -> float:
    """Mean of production and replay validation losses (each weighs half: forgetting counts)."""
    losses = []
    for split in (data.val, data.replay_val):
        if len(split) == 0:
            continue
        total = 0.0
        for start in range(0, len(split), 256):
            with autocast(ctx.device):
                logits = forward(to_device(split.x[start : start + 256], ctx.device)).float()
            total += float(nn.functional.cross_entropy(logits, split.y[start : start + 256].to(ctx.device), reduction="sum"))
        losses.append(total / len(split))
    return sum(losses) / len(losses)


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict, to restore it later."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def global_mean(value: float, ctx: RunContext) -> float:
    """The loss averaged over DDP ranks, so every rank's guard takes the same decision."""
    if ctx.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t) / ctx.world_size


@dataclass
class Trainer:
    """What one phase steps: ``forward`` over ``data`` (images or cached activations)."""

    module: nn.Module                          # whose state is saved/restored (the weights that train)
    forward: Callable[[torch.Tensor], torch.Tensor]
    data: TrainingSet
    trainable: list[nn.Parameter]
    watched: list[nn.Parameter]                # gradient norm reported and guarded (the backbone in phase 2)
    set_modes: Callable[[], None] = lambda: None
    before_eval: Callable[[], None] = lambda: None
    anchor: Anchor | None = None
    # whether weight_drift reports the anchor's drift: the driftd_retrain_weight_drift gauge reads
    # the backbone's, so the head phase's pull toward the served head is not reported as drift
    reports_drift: bool = True

    def loss(self, batch: Split, ctx: RunContext) -> torch.Tensor:
        with autocast(ctx.device):
            logits = self.forward(to_device(batch.x, ctx.device)).float()
        loss = nn.functional.cross_entropy(logits, batch.y.to(ctx.device))
        distilled = distill_loss(logits, batch, ctx.hyper.distill_weight)
        if distilled is not None:
            loss = loss + distilled
        return loss + self.anchor.penalty() if self.anchor is not None else loss

    def weight_drift(self) -> float:
        """How far the backbone moved from the start (0 with no anchor, or in the head phase)."""
        return self.anchor.drift() if self.anchor is not None and self.reports_drift else 0.0

    def val(self, ctx: RunContext) -> float:
        self.module.eval()
        self.before_eval()
        return val_loss(self.forward, self.data, ctx)


def run_phase(name: str, tr: Trainer, optimizer: torch.optim.Optimizer, epochs: int, ctx: RunContext, *,
              schedule: Callable[[int], None] = lambda step: None, guard: BaselineGuard | None = None,
              start_loss: float | None = None, lr: float | None = None) -> tuple[PhaseReport, GuardTripped | None]:
    """Epoch loop shared by both phases: mixed batches, guards, early stopping, best-weights restore."""
    hyper = ctx.hyper
    best_loss = tr.val(ctx) if start_loss is None else start_loss
    best_state, best_epoch = state_copy(tr.module), 0
    spike = SpikeDetector(hyper.spike_factor)
    ctx.emit({"event": "phase", "phase": name, "val_loss": best_loss,
              "message": f"starting {name} phase" + (f" at lr {lr:.2g}" if lr is not None else "")})
    step, epoch, stopped, tripped = 0, 0, "max_epochs", None
    images, train_seconds, all_norms = 0, 0.0, []

    def restore_after(exc: GuardTripped, norms: list[float]) -> str:
        """A guard tripped (mid-epoch or at its end): back to the best weights, say so; the stop reason."""
        tr.module.load_state_dict(best_state)
        ctx.emit({"event": "guard", "phase": name, "epoch": epoch, "guard": exc.kind,
                  "grad_norm": norms[-1] if norms else 0.0, "weight_drift": tr.weight_drift(),
                  "message": f"{exc}; restored the weights of epoch {best_epoch}"})
        return f"guard:{exc.kind}"

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
                spike.check(total_norm, global_mean(float(loss.detach()), ctx))
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
                              "weight_drift": tr.weight_drift(),
                              "lr": max(g["lr"] for g in optimizer.param_groups), "train_loss": float(loss.detach())})
                # counted within the epoch: an epoch shorter than CHECK_EVERY steps is checked at its
                # end only (on the global count, a 38-step epoch paid a validation pass every 50 steps,
                # 4% of a 2000-image CPU retrain, to guard against less than one epoch of divergence)
                if guard is not None and len(norms) % CHECK_EVERY == 0 and len(norms) < steps_per_epoch(
                        tr.data, hyper.batch_size, hyper.replay_fraction):
                    train_seconds += time.perf_counter() - started
                    guard.check_val(tr.val(ctx))  # mid-epoch: a divergence must not run a whole epoch
                    tr.set_modes()
                    started = time.perf_counter()
        except GuardTripped as exc:
            train_seconds += time.perf_counter() - started
            all_norms += norms
            stopped, tripped = restore_after(exc, norms), exc
            break
        train_seconds += time.perf_counter() - started
        all_norms += norms
        val = tr.val(ctx)
        ctx.emit({"event": "epoch", "phase": name, "epoch": epoch, "train_loss": train_loss / max(1, len(norms)),
                  "val_loss": val, "grad_norm": max(norms, default=0.0),
                  "grad_norm_mean": sum(norms) / max(1, len(norms)),
                  "weight_drift": tr.weight_drift(),
                  "images_per_second": images / max(train_seconds, 1e-9)})
        if guard is not None:
            try:
                guard.check_val(val)
            except GuardTripped as exc:
                stopped, tripped = restore_after(exc, norms), exc
                break
        if val < best_loss - 1e-4:
            best_loss, best_state, best_epoch = val, state_copy(tr.module), epoch
        elif epoch - best_epoch >= hyper.patience:
            stopped = "plateau"
            break
    if tripped is None:
        tr.module.load_state_dict(best_state)
    median = float(torch.tensor(all_norms).median()) if all_norms else 0.0
    return PhaseReport(name, epoch if epochs else 0, best_epoch, best_loss, stopped, lr,
                       images / max(train_seconds, 1e-9), median), tripped
