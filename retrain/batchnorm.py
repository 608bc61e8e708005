"""BatchNorm statistics: what a job finds in the model, and the one-time re-estimation it may try.

Real pretrained networks carry collapsed channels (ImageNet MobileNetV2: 32% of its 17,056
channels have running_var < 1e-3, some 5.6e-45). A channel whose variance is ~0 divides by
sqrt(eps): anything that moves its input is amplified ~300x. :func:`inspect_batchnorm` reports
them at job start.

How phase 2 treats the statistics is chosen by measurement (bench/README.md, "BatchNorm"):
- ``frozen``: every BatchNorm in eval mode, statistics as served (what the source model was
  trained with);
- ``adapt``: re-estimate the trainable layers' statistics once on replay + new rows in the
  batches' proportions (AdaBN-style, keeping the source's share), then let them follow the
  mixed batches;
- ``auto``: try the re-estimation and keep it only if validation loss does not rise (a model
  fine-tuned with frozen ImageNet statistics loses everything when they are replaced: on the
  bench 0.91 clean accuracy fell to 0.08; a model trained on its own data gains).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

NEAR_ZERO_VAR = 1e-3  # the threshold the issue measured 32% of MobileNetV2's channels under


@dataclass(frozen=True)
class BatchNormReport:
    layers: int
    channels: int
    near_zero: int                  # channels with running_var < threshold
    threshold: float
    smallest_var: float
    worst_layers: tuple[tuple[str, int, int], ...]  # (name, near-zero channels, channels), most first

    @property
    def share(self) -> float:
        return self.near_zero / self.channels if self.channels else 0.0

    def message(self) -> str:
        if not self.layers:
            return "no BatchNorm layers"
        worst = ", ".join(f"{n} {d}/{c}" for n, d, c in self.worst_layers[:3] if d)
        return (f"BatchNorm: {self.near_zero}/{self.channels} channels ({self.share:.0%}) in {self.layers} layers "
                f"have running_var < {self.threshold:g} (smallest {self.smallest_var:.2g})"
                + (f"; most in {worst}" if worst else ""))

    def to_json(self) -> dict:
        return {"layers": self.layers, "channels": self.channels, "near_zero": self.near_zero,
                "share": self.share, "threshold": self.threshold, "smallest_var": self.smallest_var,
                "worst_layers": [list(w) for w in self.worst_layers[:5]]}


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None]


def inspect_batchnorm(model: nn.Module, threshold: float = NEAR_ZERO_VAR) -> BatchNormReport:
    """Count BatchNorm channels whose running variance is below ``threshold``."""
    per_layer = []
    smallest = float("inf")
    for name, bn in batchnorm_layers(model):
        var = bn.running_var.detach().float()
        per_layer.append((name, int((var < threshold).sum()), var.numel()))
        smallest = min(smallest, float(var.min()))
    per_layer.sort(key=lambda t: (-t[1], t[0]))
    return BatchNormReport(layers=len(per_layer), channels=sum(c for _, _, c in per_layer),
                           near_zero=sum(d for _, d, _ in per_layer), threshold=threshold,
                           smallest_var=smallest if per_layer else 0.0, worst_layers=tuple(per_layer))


def stats_of(layers: Iterable[nn.modules.batchnorm._BatchNorm]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in bn.state_dict().items() if "running" in k or "num_batches" in k}
            for bn in layers]


def load_stats(layers: Iterable[nn.modules.batchnorm._BatchNorm], stats: list[dict[str, torch.Tensor]]) -> None:
    for bn, state in zip(layers, stats):
        for key, value in state.items():
            getattr(bn, key).copy_(value)


@torch.no_grad()
def reestimate(layers: list[nn.modules.batchnorm._BatchNorm], forward: Callable[[torch.Tensor], object],
               batches: Iterable[torch.Tensor]) -> int:
    """Replace the statistics of ``layers`` by the plain average of their batch statistics over
    ``batches`` (AdaBN; equal-sized batches weigh equally).

    Only those layers run in train mode (cumulative averaging, momentum None); everything
    else keeps the caller's modes. Returns the number of rows seen.
    """
    saved = [(bn.momentum, bn.training) for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    rows = 0
    try:
        for x in batches:
            forward(x)
            rows += len(x)
    finally:
        for bn, (momentum, training) in zip(layers, saved):
            bn.momentum = momentum
            bn.train(training)
    return rows


@dataclass
class CollapsedRescale:
    """A function-preserving reparametrisation of the channels whose running variance is collapsed.

    ``y = gamma * (W x - mean) / sqrt(var + eps) + beta`` is unchanged when ``W``, ``mean`` (and a
    conv bias) are multiplied by ``s`` and ``var`` becomes ``s^2 (var + eps) - eps``. With
    ``var`` floored at ``floor``, ``s = sqrt((floor + eps) / (var + eps))`` (up to ~10x at 1e-3,
    eps 1e-5): the served model computes the same function, but an Adam step of the same size on
    ``s W`` moves the channel's output ``s`` x less. Without it a step on a collapsed channel's
    filter is amplified by ``gamma / sqrt(eps)`` in the forward pass, which is where a phase-2
    rate that suits the healthy channels would send validation loss up. Measured on the
    MobileNetV2 grid and left off by default (bench/README.md, "Small and dissimilar: full, not
    all_but_stem; collapsed BatchNorm channels preconditioned"). ``undo`` divides the scale back
    out after training.
    """

    pairs: list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm, torch.Tensor]]  # (conv, bn, s per channel)
    floor: float

    @property
    def channels(self) -> int:
        return sum(int((s > 1).sum()) for _, _, s in self.pairs)

    def to_json(self) -> dict:
        return {"floor": self.floor, "layers": len(self.pairs), "channels": self.channels}

    @torch.no_grad()
    def _apply(self, inverse: bool) -> None:
        for conv, bn, s in self.pairs:
            k = 1 / s if inverse else s
            shape = (-1,) + (1,) * (conv.weight.ndim - 1)
            conv.weight.mul_(k.view(shape).to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.mul_(k.to(conv.bias.dtype))
            bn.running_mean.mul_(k.to(bn.running_mean.dtype))
            var = (bn.running_var.double() + bn.eps) * k.double() ** 2 - bn.eps
            bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))

    def apply(self) -> None:
        self._apply(inverse=False)

    def undo(self) -> None:
        self._apply(inverse=True)


def conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm]]:
    """(conv, BN) pairs where the BN reads exactly the conv's output, found by one eval forward of
    ``example`` (tensor identity, not module order: a residual add or activation in between
    would break the rescale's algebra, and then the pair is not listed)."""
    outputs: dict[int, tuple[torch.Tensor, nn.Conv2d]] = {}  # the tensors stay referenced: ids stay unique
    pairs: list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm]] = []

    def after_conv(module, _inputs, output):
        outputs[id(output)] = (output, module)

    def before_bn(module, inputs):
        hit = outputs.get(id(inputs[0]))
        if hit is not None and hit[0] is inputs[0] and hit[1].out_channels == module.num_features:
            pairs.append((hit[1], module))

    handles = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [bn.register_forward_pre_hook(before_bn) for _, bn in batchnorm_layers(model)]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return pairs


def collapsed_rescale(pairs: Iterable[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm]],
                      floor: float) -> CollapsedRescale:
    """The rescale that floors the running variance of ``pairs``' BN channels at ``floor`` (not yet
    applied). Only pairs whose conv trains are listed: a frozen filter gains nothing from it."""
    out = []
    for conv, bn in pairs:
        if not conv.weight.requires_grad:
            continue
        var = bn.running_var.detach().double()
        s = torch.sqrt((torch.clamp(var, min=floor) + bn.eps) / (var + bn.eps)).float()
        if bool((s > 1).any()):
            out.append((conv, bn, s.to(bn.running_var.device)))
    return CollapsedRescale(out, floor)
