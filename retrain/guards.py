"""Forgetting guards used by the recipe at every step.

- :class:`SpikeDetector`: a gradient-norm spike (factor over the running median) or a non-finite
  loss means the step diverged; the recipe stops the phase and restores its best weights.
- :class:`BaselineGuard`: the fine-tune phase judged against the head-trained model it started
  from: a gradient norm ``factor`` x the norm measured there (a running median follows a slow
  climb; a fixed baseline does not), or a validation loss ``val_rise`` x the head phase's best.
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
    """Flags a gradient norm above ``factor`` x the median of the last ``window`` steps that is
    also above the phase's starting scale (the median of its first ``warmup`` norms).

    The first ``warmup`` steps only fill the window (early norms are legitimately large). The
    starting scale keeps convergence from reading as divergence: a head that fits its batches
    drives the median toward zero, and an ordinary harder batch is then 10x it (MobileNetV2,
    2000 rows, blur:1: 0.97 against a median of 0.084, while the phase began near 4; that trip
    skipped the whole fine-tune). An explosion exceeds where the phase began.
    Stateless apart from the norms; ``state_dict``/``load_state_dict`` for checkpointing.
    """

    def __init__(self, factor: float, *, window: int = 25, warmup: int = 5):
        self.factor = factor
        self.warmup = warmup
        self._norms: deque[float] = deque(maxlen=window)
        self._start: list[float] = []

    def median(self) -> float | None:
        if len(self._norms) < self.warmup:
            return None
        return float(torch.tensor(list(self._norms)).median())

    def start_scale(self) -> float | None:
        """The median of the phase's first ``warmup`` norms (None until there are that many)."""
        if len(self._start) < self.warmup:
            return None
        return float(torch.tensor(self._start).median())

    def check(self, norm: float, loss: float) -> None:
        """Record one step; raises GuardTripped on a non-finite loss/norm or a spike."""
        if not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(norm))):
            raise GuardTripped("non_finite", f"non-finite training step (loss={loss}, grad_norm={norm})")
        median, start = self.median(), self.start_scale()
        if median is not None and start is not None and median > 0 and norm > self.factor * median and norm > start:
            raise GuardTripped(
                "grad_spike",
                f"gradient norm {norm:.3g} is {norm / median:.1f}x the running median {median:.3g} "
                f"(limit {self.factor}x) and above the phase's starting {start:.3g}",
            )
        self._norms.append(norm)
        if len(self._start) < self.warmup:
            self._start.append(norm)

    def state_dict(self) -> dict[str, list[float]]:
        return {"norms": list(self._norms), "start": list(self._start)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self._norms.clear()
        self._norms.extend(state["norms"])
        self._start = list(state["start"])


class BaselineGuard:
    """Fixed baselines from the head phase; ``check_step`` and ``check_val`` raise GuardTripped.

    ``grad_baseline``: median gradient norm of the trainable parameters at the head-trained
    weights (measured before any fine-tune step); ``val_baseline``: the head phase's best
    validation loss. A gradient norm over ``factor`` x baseline on ``consecutive`` steps in a
    row trips "grad_ratio" (one step can be an outlier; two in a row is a trend).
    """

    def __init__(self, grad_baseline: float, val_baseline: float, *, factor: float, val_rise: float,
                 consecutive: int = 2):
        self.grad_baseline = grad_baseline
        self.val_baseline = val_baseline
        self.factor = factor
        self.val_rise = val_rise
        self.consecutive = consecutive
        self._over = 0
        self.max_ratio = 0.0

    def ratio(self, norm: float) -> float:
        return norm / self.grad_baseline if self.grad_baseline > 0 else 0.0

    def check_step(self, norm: float) -> None:
        ratio = self.ratio(norm)
        self.max_ratio = max(self.max_ratio, ratio)
        self._over = self._over + 1 if ratio > self.factor else 0
        if self._over >= self.consecutive:
            raise GuardTripped(
                "grad_ratio",
                f"gradient norm {norm:.3g} is {ratio:.0f}x the head-trained model's {self.grad_baseline:.3g} "
                f"for {self._over} steps (limit {self.factor:g}x)")

    def check_val(self, val_loss: float) -> None:
        if not torch.isfinite(torch.tensor(val_loss)):
            raise GuardTripped("non_finite", f"validation loss is {val_loss}")
        if val_loss > self.val_rise * self.val_baseline:
            raise GuardTripped(
                "val_rise",
                f"validation loss {val_loss:.3g} rose above {self.val_rise:g}x the head phase's "
                f"{self.val_baseline:.3g}")


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
