"""The backbone as a chain of units, so frozen layers run once and only the trainable rest trains.

``forward_features`` of timm's CNNs (ResNet, EfficientNet/MobileNet, ConvNeXt, ...) is its
top-level children called in order, stages being ``nn.Sequential`` of blocks. :func:`find_trunk`
records which children ``forward_features`` calls, flattens the Sequentials into blocks, and
checks on a real batch that running the chain reproduces ``forward_features``; a model whose
forward does more than chain its children (a ViT adds position embeddings in a method) gets
None, and the recipe runs the whole network instead.

With the first trainable unit known, :class:`Suffix` is "the rest of the network" as a module:
the fine-tune phase computes the frozen prefix once per row (:func:`prefix_activations`) and
every epoch runs only the suffix on those cached activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Trunk:
    """``forward_features(x) == units[-1](...units[0](x))``; ``names``: each unit's module path."""

    names: tuple[str, ...]
    units: tuple[nn.Module, ...]

    def first_trainable(self) -> int:
        """Index of the first unit with a parameter that requires grad (len(units) if none)."""
        for i, unit in enumerate(self.units):
            if any(p.requires_grad for p in unit.parameters()):
                return i
        return len(self.units)


def _flatten(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    # Only plain Sequentials are chains by construction; a subclass may override forward.
    if type(module) is nn.Sequential:
        return [u for child_name, child in module.named_children() for u in _flatten(f"{name}.{child_name}", child)]
    return [(name, module)]


@torch.no_grad()
def find_trunk(model: nn.Module, sample: torch.Tensor, *, rtol: float = 1e-4) -> Trunk | None:
    """The chain of units behind ``model.forward_features``, or None when it is not a chain.

    ``sample``: a few real input rows (the check runs in eval mode; the model's mode is restored).
    """
    if not hasattr(model, "forward_features") or len(sample) == 0:
        return None
    calls: list[str] = []
    children = dict(model.named_children())
    hooks = [child.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
             for name, child in children.items()]
    was_training = model.training
    model.eval()
    try:
        expected = model.forward_features(sample)
    finally:
        for h in hooks:
            h.remove()
    try:
        if not calls or len(set(calls)) != len(calls):
            return None
        units = [u for name in calls for u in _flatten(name, children[name])]
        x = sample
        try:
            for _, unit in units:
                x = unit(x)
        except (RuntimeError, ValueError, TypeError, IndexError):  # the children are not a chain
            return None
        if not isinstance(x, torch.Tensor) or x.shape != expected.shape:
            return None
        scale = float(expected.abs().max()) or 1.0
        if float((x - expected).abs().max()) > rtol * scale:
            return None
        return Trunk(tuple(n for n, _ in units), tuple(u for _, u in units))
    finally:
        model.train(was_training)


class Suffix(nn.Module):
    """Units ``trunk.units[start:]`` followed by the model's own ``forward_head``.

    Registers only the modules it runs (those units and the head's top-level modules), so a
    DistributedDataParallel wrapper around it syncs exactly the trainable part.
    """

    def __init__(self, model: nn.Module, trunk: Trunk, start: int):
        super().__init__()
        self.units = nn.ModuleList(trunk.units[start:])
        trunk_roots = {name.split(".")[0] for name in trunk.names}
        self.head = nn.ModuleList(m for n, m in model.named_children() if n not in trunk_roots)
        self._model = [model]  # a list: not registered as a submodule (that would pull in the prefix)
        self.start = start

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            h = unit(h)
        return self._model[0].forward_head(h)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The pooled pre-logits (what ``retrain.model.pooled_features`` gives for the full input)."""
        for unit in self.units:
            h = unit(h)
        return self._model[0].forward_head(h, pre_logits=True)


@torch.no_grad()
def prefix_activations(trunk: Trunk, start: int, x: torch.Tensor, *, device: torch.device,
                       batch_size: int = 256) -> torch.Tensor:
    """Inputs of unit ``start`` for every row of ``x`` (prefix in eval mode), kept on ``device``."""
    prefix: Sequence[nn.Module] = trunk.units[:start]
    for unit in prefix:
        unit.eval()
    out = []
    for i in range(0, len(x), batch_size):
        h = x[i : i + batch_size].to(device)
        for unit in prefix:
            h = unit(h)
        out.append(h.float())
    return torch.cat(out) if out else x[:0].to(device)


def activation_bytes(trunk: Trunk, start: int, sample: torch.Tensor, rows: int) -> int:
    """Memory that caching unit ``start``'s inputs for ``rows`` rows takes (float32)."""
    one = prefix_activations(trunk, start, sample[:1], device=sample.device)
    return int(one[0].numel()) * 4 * rows
