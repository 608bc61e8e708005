"""Phase 2, the fine-tune: from the head-trained model, guarded, backed off, or thrown away.

It measures the baseline the guards judge against (the gradient norm of the head-trained model),
decides by measurement whether BatchNorm statistics follow the batches, takes its learning rate from
the range test unless ``hyper.lr_backbone`` is set, and on a guard trip restores the head-phase
weights and retries at ``hyper.backoff_factor`` x the rate (at most ``hyper.max_backoffs`` times).
When it never beats the head phase's validation loss the head-phase weights are kept and the
reason recorded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from retrain.batches import Split, TrainingSet, mixed_batches, steps_per_epoch
from retrain.batchnorm import (CollapsedRescale, batchnorm_layers, collapsed_rescale, conv_batchnorm_pairs,
                               load_stats, reestimate, stats_of)
from retrain.guards import Anchor, AnchorWeights, BaselineGuard, grad_norm
from retrain.layer_lrs import layerwise_optimizer, lr_range_test, lr_schedule
from retrain.phase import PhaseReport, RunContext, Trainer, run_phase, state_copy, to_device, val_loss
from retrain.prefix_cache import PrefixCache
from retrain.strategy import StrategyPlan
from retrain.trunk import Suffix

log = logging.getLogger("retrain.recipe")  # the logger name from before the move: log filters keep working

BASELINE_BATCHES = 3     # batches whose gradient norm at the head-trained weights is the baseline
# batches the BN re-estimate averages: 1024 rows at batch 64 settle the statistics; a whole epoch
# (4080 rows for 1200 training rows at replay 0.7) took 13 s of a 2-minute CPU retrain
REESTIMATE_BATCHES = 16


def finetune_phase(model: nn.Module, data: TrainingSet, plan: StrategyPlan, ctx: RunContext,
                   anchor_data: Split | None, cache: PrefixCache, head: PhaseReport,
                   backbone: list[str]) -> dict[str, Any]:
    """Phase 2 on ``model`` in place, after the head phase ``head``. Returns what fine_tune reports:
    report, trips, drift, kept, lr, batchnorm, grad_baseline, head_grad_norm, and (when they apply)
    lr_search and head_only_reason."""
    configured = ctx.hyper.replay_fraction
    hyper = replace(ctx.hyper, replay_fraction=plan.replay_fraction(configured))
    ctx = replace(ctx, hyper=hyper)
    head_state = state_copy(model)  # the head-phase model as served: what a discarded phase 2 leaves
    rescale = precondition_collapsed(model, data, ctx)
    anchor = Anchor(model, backbone, AnchorWeights(hyper.l2sp_weight * plan.l2sp_scale, hyper.ewc_weight))
    if hyper.ewc_weight > 0 and anchor_data is not None and len(anchor_data):
        model.eval()
        anchor.estimate_fisher(
            model, ((to_device(anchor_data.x[i : i + 64], ctx.device), anchor_data.y[i : i + 64].to(ctx.device))
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

    tr = Trainer(model, wrapped, train_data, trainable, watched, set_modes, sync_buffers, anchor)
    record: dict[str, Any] = {}
    head_val = head.best_val_loss
    record["batchnorm"] = choose_batchnorm(net, tr, trainable_bn, plan, ctx, head_val, adapt)
    if rescale is not None:
        record["batchnorm"]["collapsed_rescale"] = rescale.to_json()
    if not adapt["value"] and hyper.replay_fraction != configured:
        # The strategy's replay floor keeps adapted statistics mostly source; with the served
        # statistics frozen it buys nothing and costs steps (0.7 -> 0.5: 1.7x fewer per epoch).
        hyper = replace(hyper, replay_fraction=configured)
        ctx = replace(ctx, hyper=hyper)
    record["batchnorm"]["replay_fraction"] = hyper.replay_fraction  # what phase 2's batches then mixed
    start_state = state_copy(model)

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
        # The test reads the label loss alone (no distillation term): its onset rule and noise
        # margin were measured on that loss (retrain.lr_finder).
        test = lr_range_test(model, tr, plan, replace(ctx, hyper=replace(hyper, distill_weight=0.0)))
        model.load_state_dict(start_state)
        lr = test.suggestion
        record["lr_search"] = test.to_json()
        ctx.emit({"event": "phase", "phase": "lr_range_test", "lr": lr,
                  "message": f"lr_backbone {lr:.2g}: {test.reason}"})
    else:
        lr = hyper.lr_backbone
    per_epoch = steps_per_epoch(train_data, hyper.batch_size, hyper.replay_fraction)
    if hyper.max_finetune_steps is not None:
        epochs = min(hyper.epochs_finetune, max(1, math.ceil(hyper.max_finetune_steps / per_epoch)))
        if epochs < hyper.epochs_finetune:
            record["epochs_capped"] = {"epochs": epochs, "of": hyper.epochs_finetune, "steps_per_epoch": per_epoch,
                                       "max_finetune_steps": hyper.max_finetune_steps}
            ctx.emit({"event": "phase", "phase": "finetune_budget", "epochs": epochs, "message": (
                f"phase 2 runs at most {epochs} of epochs_finetune {hyper.epochs_finetune} epochs: "
                f"{per_epoch} steps each, max_finetune_steps {hyper.max_finetune_steps}")})
            hyper = replace(hyper, epochs_finetune=epochs)
            ctx = replace(ctx, hyper=hyper)
    total = max(1, hyper.epochs_finetune * per_epoch)
    trips: list[str] = []
    for attempt in range(hyper.max_backoffs + 1):
        if attempt:
            model.load_state_dict(start_state)
            lr *= hyper.backoff_factor
        optimizer = layerwise_optimizer(model, plan, hyper, lr)
        guard = BaselineGuard(baseline, head_val, factor=hyper.grad_ratio, val_rise=hyper.val_rise)
        report, tripped = run_phase("finetune", tr, optimizer, hyper.epochs_finetune, ctx,
                                    schedule=lr_schedule(optimizer, hyper, lr, total), guard=guard,
                                    start_loss=head_val, lr=lr)
        better = report.best_epoch > 0 and report.best_val_loss < head_val - 1e-4
        if tripped is None and (better or report.epochs == 0):
            break
        if tripped is None:
            # Early-stopped without ever beating the head phase: validation loss rose and stayed
            # above it, only below the val_rise trip. On the tiny test model the range test's rate
            # did this in about half the runs; a tenth of it then improved. Same bounded backoff.
            tripped = (f"validation loss stayed above the head phase's {head_val:.3f} for {report.epochs} "
                       f"epoch(s) (best {report.best_val_loss:.3f})")
        trips.append(f"finetune attempt {attempt + 1} at lr {lr:.2g}: {tripped}")
        if report.best_epoch > 0:  # it improved before it tripped: keep that, as any early stop would
            break
        if attempt < hyper.max_backoffs:
            ctx.emit({"event": "guard", "phase": "finetune", "guard": "backoff", "epoch": report.epochs,
                      "message": f"{tripped}; retrying the phase from the head-trained weights at lr "
                                 f"{lr * hyper.backoff_factor:.2g}"})
    improved = better  # the last attempt's
    if improved and rescale is not None and not adapt["value"]:
        # back to the served parametrisation, so WiSE-FT mixes like with like (statistics that
        # followed the batches are no longer the floored ones: the rescaled form stays, exact)
        rescale.undo()
    if not improved:
        model.load_state_dict(head_state)
        detail = (f"{len(trips)} guard trip(s), the last: {trips[-1]}" if report.stopped.startswith("guard")
                  else f"best fine-tune {report.best_val_loss:.3f} at lr {lr:.2g}"
                  + (f" after {attempt} backoff(s)" if attempt else ""))
        why = f"fine-tuning did not improve validation loss (head phase {head_val:.3f}; {detail})"
        record["head_only_reason"] = why
        log.warning("retrain: kept the head-phase weights: %s", why)
        ctx.emit({"event": "phase", "phase": "finetune", "val_loss": head_val,
                  "message": f"kept the head-phase weights: {why}"})
    record.update(report=report, trips=trips, drift=anchor.drift(), kept=improved, lr=lr)
    return record


def precondition_collapsed(model: nn.Module, data: TrainingSet, ctx: RunContext) -> CollapsedRescale | None:
    """Apply the function-preserving rescale of collapsed BatchNorm channels (retrain.batchnorm)
    to the trainable layers when ``hyper.bn_var_floor`` > 0, and report it."""
    floor = ctx.hyper.bn_var_floor
    if floor <= 0 or len(data.train) == 0:
        return None
    pairs = conv_batchnorm_pairs(model, to_device(data.train.x[:1], ctx.device))
    rescale = collapsed_rescale(pairs, floor)
    rescale.apply()
    ctx.emit({"event": "phase", "phase": "batchnorm", "message": (
        f"preconditioned {rescale.channels} collapsed BatchNorm channels in {len(rescale.pairs)} trainable layers: "
        f"their filters train as if running_var were >= {floor:g} (the served function is unchanged)")})
    return rescale


def choose_batchnorm(net: nn.Module, tr: Trainer, layers: list, plan: StrategyPlan, ctx: RunContext,
                     head_val: float, adapt: dict[str, bool]) -> dict[str, Any]:
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
    batches = mixed_batches(tr.data, hyper.batch_size, hyper.replay_fraction, ctx.generator,
                            rank=ctx.rank, world_size=ctx.world_size)
    rows = reestimate(layers, tr.forward, (to_device(b.x, ctx.device) for b in islice(batches, REESTIMATE_BATCHES)))
    tr.before_eval()
    val = val_loss(tr.forward, tr.data, ctx)
    keep = mode == "adapt" or val <= head_val
    verdict = (f"re-estimated statistics of {len(layers)} layers on {rows} rows (replay share "
               f"{hyper.replay_fraction:g}): validation loss {head_val:.3f} -> {val:.3f}")
    if not keep:
        load_stats(layers, served)
    adapt["value"] = keep
    msg = verdict + ("; statistics adapt in phase 2" if keep else "; kept the served statistics, frozen")
    ctx.emit({"event": "phase", "phase": "batchnorm", "val_loss": val, "message": msg})
    return {"mode": mode, "adapted": keep, "reason": msg, "val_loss_reestimated": val}
