"""Phase 2's parameter groups and layer-wise learning rates.

Which parameters train (the strategy's layer groups), the AdamW optimizer whose groups carry timm's
layer-decay ``lr_scale``, the cosine or one-cycle schedule that applies those scales at every step,
and the short LR range test that picks the base rate when ``hyper.lr_backbone`` is not set. Apart
from the fine-tune phase itself, which only asks for an optimizer and a schedule at a given rate.
"""

from __future__ import annotations

from collections.abc import Callable

import timm.optim
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from retrain.batches import mixed_batches
from retrain.config import HyperConfig
from retrain.lr_finder import RangeTest, range_test
from retrain.phase import RunContext, Trainer, global_mean
from retrain.strategy import StrategyPlan, layer_groups

RANGE_TEST_STEPS = 30    # steps of the LR range test (1e-7 .. 1, stops early on divergence)


def set_trainable(model: nn.Module, plan: StrategyPlan) -> tuple[list[str], list[str]]:
    """requires_grad on the plan's layer groups; returns (trainable names, backbone names)."""
    groups = layer_groups(model)
    trainable_ids = set(plan.trainable_groups(max(groups) + 1))
    head_names = set(groups[max(groups)])
    train_names = {n for gid, names in groups.items() if gid in trainable_ids for n in names}
    for n, p in model.named_parameters():
        p.requires_grad_(n in train_names)
    return sorted(train_names), sorted(train_names - head_names)


def layerwise_optimizer(model: nn.Module, plan: StrategyPlan, hyper: HyperConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, one group per layer with its ``lr_scale``."""
    # timm's layer decay names groups by the whole model; frozen parameters are skipped by it
    return timm.optim.create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.0, layer_decay=plan.layer_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, hyper: HyperConfig, lr: float, total: int) -> Callable[[int], None]:
    """The per-step schedule (``hyper.schedule``) over ``total`` steps from base rate ``lr``."""
    warmup = min(total - 1, round(hyper.warmup_epochs * total / max(1, hyper.epochs_finetune)))
    if hyper.schedule == "cosine":
        sched = CosineLRScheduler(optimizer, t_initial=total, warmup_t=warmup, warmup_lr_init=lr * 0.01,
                                  lr_min=lr * 0.01, t_in_epochs=False)
        return sched.step_update  # timm applies each group's lr_scale here
    one = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups],
        total_steps=total + 1, pct_start=max(0.01, warmup / total))
    return lambda step: one.step() if step > 0 else None  # first step uses the initial LR


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Base rate ``lr`` times each group's ``lr_scale``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def lr_range_test(model: nn.Module, tr: Trainer, plan: StrategyPlan, ctx: RunContext) -> RangeTest:
    """The range test on the head-trained model (it moves the weights: the caller restores them)."""
    hyper = ctx.hyper
    optimizer = layerwise_optimizer(model, plan, hyper, 1e-7)
    tr.set_modes()
    batches = iter(())

    def step(lr: float) -> float:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = mixed_batches(tr.data, hyper.batch_size, hyper.replay_fraction, ctx.generator,
                                    rank=ctx.rank, world_size=ctx.world_size)
            batch = next(batches)
        set_lr(optimizer, lr)
        loss = tr.loss(batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hyper.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(tr.trainable, hyper.grad_clip)
        optimizer.step()
        return global_mean(float(loss.detach()), ctx)

    return range_test(step, steps=RANGE_TEST_STEPS)
