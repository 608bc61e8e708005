"""The promotion gate: the candidate must gain on new data without forgetting the old.

Candidate and current model are scored on the same held-out production slice and held-out
reference (source) slice. Promote only if production accuracy gains >= ``min_gain`` AND
reference accuracy drops by <= ``max_forgetting``; otherwise keep the current model and say why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from retrain.batches import Split
from retrain.config import GateConfig


@dataclass(frozen=True)
class GateResult:
    promote: bool
    reason: str
    candidate_production: float     # accuracy 0..1 on the held-out production slice
    current_production: float
    candidate_reference: float      # accuracy 0..1 on the held-out reference slice
    current_reference: float
    production_rows: int
    reference_rows: int
    wise_alpha: float | None = None  # WiSE-FT mixing weight of the fine-tuned model, when used

    @property
    def gain(self) -> float:
        return self.candidate_production - self.current_production

    @property
    def forgetting(self) -> float:
        return self.current_reference - self.candidate_reference

    def to_json(self) -> dict:
        return {**asdict(self), "gain": self.gain, "forgetting": self.forgetting}


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, device: torch.device, *, features_only: bool = False) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``split``; x are pooled features when ``features_only``.
    Raises ValueError on an empty split (a gate without data decides nothing)."""
    if len(split) == 0:
        raise ValueError("cannot score a model on an empty slice")
    was_training = model.training
    model.eval()
    forward = model.get_classifier() if features_only else model
    correct = 0
    try:
        for start in range(0, len(split), 256):
            x = split.x[start : start + 256].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.no_grad():
                logits = forward(x)
            correct += int((logits.argmax(1).cpu() == split.y[start : start + 256]).sum())
    finally:
        model.train(was_training)
    return correct / len(split)


def decide(
    gate: GateConfig, *, candidate: tuple[float, float], current: tuple[float, float],
    production_rows: int, reference_rows: int, wise_alpha: float | None = None,
) -> GateResult:
    """Apply the rule to (production, reference) accuracies of candidate and current."""
    gain = candidate[0] - current[0]
    forgetting = current[1] - candidate[1]
    failures = []
    if gain < gate.min_gain:
        failures.append(f"production accuracy gain {gain:+.3f} < min_gain {gate.min_gain}")
    if forgetting > gate.max_forgetting:
        failures.append(f"reference accuracy dropped {forgetting:.3f} > max_forgetting {gate.max_forgetting}")
    summary = (f"production {current[0]:.3f} -> {candidate[0]:.3f}, reference {current[1]:.3f} -> {candidate[1]:.3f}"
               f" ({production_rows} / {reference_rows} held-out rows)")
    reason = ("; ".join(failures) + f": keeping current model ({summary})") if failures else f"promote: {summary}"
    return GateResult(not failures, reason, candidate[0], current[0], candidate[1], current[1],
                      production_rows, reference_rows, wise_alpha)


def evaluate_gate(
    candidate: nn.Module, current: nn.Module, production: Split, reference: Split, gate: GateConfig,
    device: torch.device, *, features_only: bool = False, wise_alpha: float | None = None,
) -> GateResult:
    def scores(model: nn.Module) -> tuple[float, float]:
        return (accuracy(model, production, device, features_only=features_only),
                accuracy(model, reference, device, features_only=features_only))

    return decide(gate, candidate=scores(candidate), current=scores(current), production_rows=len(production),
                  reference_rows=len(reference), wise_alpha=wise_alpha)


def interpolate(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT weights ``(1 - alpha) * start + alpha * tuned`` (integer buffers taken from tuned)."""
    return {k: (torch.lerp(start[k].to(v.device, v.dtype), v, alpha) if v.is_floating_point() else v)
            for k, v in tuned.items()}


def choose_wise_alpha(
    model: nn.Module, start: dict[str, torch.Tensor], current: nn.Module, production: Split, reference: Split,
    gate: GateConfig, device: torch.device, *, features_only: bool = False,
    alphas: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
) -> GateResult:
    """Load into ``model`` the WiSE-FT mix that passes the gate with the highest production
    accuracy (or, if none passes, the one with the best gain minus excess forgetting); returns its gate result."""
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = []
    for alpha in alphas:
        model.load_state_dict(interpolate(start, tuned, alpha))
        results.append(evaluate_gate(model, current, production, reference, gate, device,
                                     features_only=features_only, wise_alpha=alpha))

    def rank(r: GateResult) -> tuple[bool, float]:
        return (r.promote, r.candidate_production if r.promote else r.gain - max(0.0, r.forgetting - gate.max_forgetting))

    best = max(results, key=rank)
    model.load_state_dict(interpolate(start, tuned, best.wise_alpha or 1.0))
    return best
