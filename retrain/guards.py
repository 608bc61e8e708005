"""Forgetting guards used by the recipe at every step.

- :class:`SpikeDetector`: a gradient-norm spike (factor over the running median) or a non-finite
  loss means the step diverged; the recipe stops the phase and restores its best weights.
- :class:`Anchor`: L2-SP (pull toward the starting weights) and optional EWC (the same pull
  weighted by a Fisher diagonal estimated on reference data), plus the weight drift that is
  reported to the progress callback.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


class GuardTripped(Exception):
    """Raised inside a phase when a step must not be kept (``kind``: "grad_spike" | "non_finite")."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    """Global L2 norm of the gradients present on ``params`` (0.0 when none have one)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class SpikeDetector:
    """Flags a gradient norm above ``factor`` x the median of the last ``window`` steps.

    The first ``warmup`` steps only fill the window (early norms are legitimately large).
    Stateless apart from the window; ``state_dict``/``load_state_dict`` for checkpointing.
    """

    def __init__(self, factor: float, *, window: int = 25, warmup: int = 5):
        self.factor = factor
        self.warmup = warmup
        self._norms: deque[float] = deque(maxlen=window)

    def median(self) -> float | None:
        if len(self._norms) < self.warmup:
            return None
        return float(torch.tensor(list(self._norms)).median())

    def check(self, norm: float, loss: float) -> None:
        """Record one step; raises GuardTripped on a non-finite loss/norm or a spike."""
        if not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(norm))):
            raise GuardTripped("non_finite", f"non-finite training step (loss={loss}, grad_norm={norm})")
        median = self.median()
        if median is not None and median > 0 and norm > self.factor * median:
            raise GuardTripped(
                "grad_spike",
                f"gradient norm {norm:.3g} is {norm / median:.1f}x the running median {median:.3g} "
                f"(limit {self.factor}x)",
            )
        self._norms.append(norm)

    def state_dict(self) -> dict[str, list[float]]:
        return {"norms": list(self._norms)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self._norms.clear()
        self._norms.extend(state["norms"])


@dataclass(frozen=True)
class AnchorWeights:
    l2sp: float
    ewc: float


class Anchor:
    """Penalties tying backbone parameters to their starting values.

    ``penalty() = l2sp/2 * sum ||w - w0||^2 + ewc/2 * sum F * (w - w0)^2`` over the named
    backbone parameters (the head is free to move: it must learn the new data).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], weights: AnchorWeights):
        params = dict(model.named_parameters())
        self.names = tuple(names)
        self.weights = weights
        self._params = [params[n] for n in self.names]
        self._start = [params[n].detach().clone() for n in self.names]
        self._fisher: list[torch.Tensor] | None = None

    def estimate_fisher(
        self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    ) -> None:
        """Empirical Fisher diagonal (mean squared gradient of the log-likelihood) on reference
        batches, normalised to mean 1 so ``ewc_weight`` is on the L2-SP scale."""
        fisher = [torch.zeros_like(p) for p in self._params]
        count = 0
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(forward(model, x), y)
            grads = torch.autograd.grad(loss, self._params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.detach() ** 2
            count += 1
        scale = torch.cat([f.flatten() for f in fisher]).mean().clamp_min(1e-12) * max(count, 1)
        self._fisher = [f / scale for f in fisher]

    def penalty(self) -> torch.Tensor:
        total = self._params[0].new_zeros(()) if self._params else torch.zeros(())
        if self.weights.l2sp > 0:
            total = total + 0.5 * self.weights.l2sp * sum(
                ((p - s) ** 2).sum() for p, s in zip(self._params, self._start) if p.requires_grad
            )
        if self.weights.ewc > 0 and self._fisher is not None:
            total = total + 0.5 * self.weights.ewc * sum(
                (f * (p - s) ** 2).sum()
                for p, s, f in zip(self._params, self._start, self._fisher) if p.requires_grad
            )
        return total

    @torch.no_grad()
    def drift(self) -> float:
        """L2 distance of the backbone from its starting weights."""
        if not self._params:
            return 0.0
        return float(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(self._params, self._start))))
