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
