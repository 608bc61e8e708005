"""The promotion gate: the candidate must gain on new data without forgetting the old.

Candidate and current model answer the same held-out rows: the production slice (the newest
labelled rows, one per distinct input, none of whose inputs was trained on: retrain.split) and
the reference slice (held-out source rows). Promote only if

- production: the gain is at least ``min_gain`` AND the candidate is credibly better (exact
  one-sided McNemar p <= ``alpha``; for ``min_gain`` < 0, Tango's test that it loses less than
  ``-min_gain``), and
- reference: the candidate credibly loses less than ``max_forgetting`` (Tango's non-inferiority
  score test, p <= ``alpha``: the one-sided upper bound on forgetting is below the margin).

The burden of proof is on the candidate on both slices: a slice too small to show a forgetting
below ``max_forgetting`` even for a candidate identical to the current model is a rejection that
says how many rows it needs (268 distinct rows at the defaults), as is a slice below ``min_rows``.
A slice whose rows come in groups (``Split.groups``, from retrain.group_pattern) is weighed by
them (retrain.paired.grouped_counts): 300 rows that fail four at a time count as about 75.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from retrain.batches import Split
from retrain.config import GateConfig
from retrain.paired import (MCNEMAR, TANGO, PairedCounts, floor_rows, grouped_counts, lower_bound, p_value,
                            paired_counts, rows_needed)
from retrain.result import GateResult, SliceTest  # the verdict's types, torch-free for the daemon

__all__ = ["GateResult", "SliceTest", "accuracy", "choose_wise_alpha", "correct", "decide", "evaluate_gate",
           "interpolate", "slice_floors", "too_small"]


@torch.no_grad()
def correct(model: nn.Module, split: Split, device: torch.device, *, features_only: bool = False) -> np.ndarray:
    """Per-row top-1 correctness (bool[N]) of ``model`` on ``split``; x are pooled features when
    ``features_only``."""
    was_training = model.training
    model.eval()
    forward = model.get_classifier() if features_only else model
    hits = []
    try:
        for start in range(0, len(split), 256):
            x = split.x[start : start + 256].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.no_grad():
                logits = forward(x)
            hits.append((logits.argmax(1).cpu() == split.y[start : start + 256]).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(hits) if hits else np.zeros(0, dtype=bool)


def accuracy(model: nn.Module, split: Split, device: torch.device, *, features_only: bool = False) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``split``. Raises ValueError on an empty split (a gate
    without data decides nothing)."""
    if len(split) == 0:
        raise ValueError("cannot score a model on an empty slice")
    return float(correct(model, split, device, features_only=features_only).mean())


def slice_floors(gate: GateConfig) -> tuple[int, int]:
    """(production, reference) slice sizes below which the gate cannot judge: ``min_rows``, and for
    the reference slice also the rows a forgetting test at ``max_forgetting`` needs at all."""
    return gate.min_rows, max(gate.min_rows, floor_rows(gate.max_forgetting, gate.alpha) or 0)


def too_small(gate: GateConfig, *, production_rows: int, reference_rows: int) -> list[str]:
    """Why slices of these sizes cannot be judged (empty when they can), with the rows needed."""
    prod_floor, ref_floor = slice_floors(gate)
    out = []
    if production_rows < prod_floor:
        out.append(f"production gate slice has {production_rows} distinct held-out rows, the gate needs at least "
                   f"{prod_floor} (retrain.gate.min_rows): wait for more labelled rows or raise gate_fraction")
    if reference_rows < ref_floor:
        why = ("retrain.gate.min_rows" if ref_floor == gate.min_rows else
               f"to show a forgetting below max_forgetting {gate.max_forgetting} at alpha {gate.alpha}, even for a "
               "candidate identical to the current model")
        out.append(f"reference gate slice has {reference_rows} distinct held-out rows, {ref_floor} are needed ({why}): "
                   "add replay rows (retrain.replay_logs, retrain.max_rows) or raise gate_fraction")
    return out


def _judge(counts: PairedCounts, margin: float, alpha: float, floor: int) -> SliceTest:
    p = p_value(counts, margin)
    passed = counts.rows >= floor and p <= alpha
    return SliceTest(
        rows=counts.rows, candidate_accuracy=counts.candidate_accuracy, current_accuracy=counts.current_accuracy,
        better=counts.better, worse=counts.worse, test=MCNEMAR if margin == 0 else TANGO, margin=margin,
        p_value=p, lower_bound=lower_bound(counts, alpha), min_rows=floor,
        rows_needed=None if passed else rows_needed(counts, margin, alpha), passed=passed,
        groups=counts.groups, design_effect=None if counts.groups is None else counts.design_effect,
    )


def _rows(counts: PairedCounts, noun: str = "rows") -> str:
    """"300 rows", or for grouped rows "300 rows in 75 groups, weighing as 140 independent (...)"."""
    if counts.groups is None:
        return f"{counts.rows} {noun}"
    return (f"{counts.rows} {noun} in {counts.groups} groups, weighing as {counts.effective_rows:.0f} independent "
            f"(design effect {counts.design_effect:.2f})")


def _needed(t: SliceTest) -> str:
    return (f"; about {t.rows_needed} rows would show it at these rates" if t.rows_needed is not None
            and t.rows_needed > t.rows else "")


def decide(gate: GateConfig, *, production: PairedCounts, reference: PairedCounts,
           wise_alpha: float | None = None) -> GateResult:
    """Apply the rule to the paired outcomes of candidate and current on both slices."""
    prod_floor, ref_floor = slice_floors(gate)
    prod = _judge(production, max(0.0, -gate.min_gain), gate.alpha, prod_floor)
    ref = _judge(reference, gate.max_forgetting, gate.alpha, ref_floor)
    gain, forgetting = production.difference, -reference.difference
    failures = too_small(gate, production_rows=production.rows, reference_rows=reference.rows)
    if production.rows >= prod_floor:
        if gain < gate.min_gain:
            failures.append(f"production accuracy gain {gain:+.3f} < min_gain {gate.min_gain}")
        elif not prod.passed:
            failures.append(
                f"production gain {gain:+.3f} is not significant ({prod.test}: p {prod.p_value:.3g} > alpha "
                f"{gate.alpha}, {prod.better} rows better / {prod.worse} worse of {_rows(production)}{_needed(prod)})")
    if reference.rows >= ref_floor:
        if forgetting > gate.max_forgetting:
            failures.append(f"reference accuracy dropped {forgetting:.3f} > max_forgetting {gate.max_forgetting}")
        elif not ref.passed:
            failures.append(
                f"reference accuracy drop {forgetting:.3f} not shown below max_forgetting {gate.max_forgetting} "
                f"({ref.test}: p {ref.p_value:.3g} > alpha {gate.alpha}, upper bound {-ref.lower_bound:.3f} on "
                f"{_rows(reference)}{_needed(ref)})")
    summary = (f"production {production.current_accuracy:.3f} -> {production.candidate_accuracy:.3f} "
               f"({_rows(production, 'held-out rows')}, p {prod.p_value:.2g}), reference "
               f"{reference.current_accuracy:.3f} -> {reference.candidate_accuracy:.3f} ({_rows(reference)}, drop <= "
               f"{-ref.lower_bound:.3f} at {1 - gate.alpha:.0%})")
    reason = ("; ".join(failures) + f": keeping current model ({summary})") if failures else f"promote: {summary}"
    return GateResult(
        promote=not failures, reason=reason,
        candidate_production=production.candidate_accuracy, current_production=production.current_accuracy,
        candidate_reference=reference.candidate_accuracy, current_reference=reference.current_accuracy,
        production_rows=production.rows, reference_rows=reference.rows, wise_alpha=wise_alpha,
        production=prod, reference=ref, alpha=gate.alpha,
    )


def evaluate_gate(
    candidate: nn.Module, current: nn.Module, production: Split, reference: Split, gate: GateConfig,
    device: torch.device, *, features_only: bool = False, wise_alpha: float | None = None,
    current_correct: tuple[np.ndarray, np.ndarray] | None = None,
) -> GateResult:
    """Score both models on both slices and decide. ``current_correct``: the current model's
    per-row correctness on (production, reference), when already computed. A slice with
    ``groups`` is judged as grouped rows (retrain.paired.grouped_counts)."""
    if current_correct is None:
        current_correct = (correct(current, production, device, features_only=features_only),
                           correct(current, reference, device, features_only=features_only))

    def counts(split: Split, current_hits: np.ndarray) -> PairedCounts:
        hits = correct(candidate, split, device, features_only=features_only)
        return paired_counts(hits, current_hits) if split.groups is None else grouped_counts(hits, current_hits, split.groups)

    return decide(gate, production=counts(production, current_correct[0]),
                  reference=counts(reference, current_correct[1]), wise_alpha=wise_alpha)


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
    accuracy (or, if none passes, the one with the best gain minus excess forgetting); returns its gate result.

    Every mix is judged on the same gate slices, so each is tested at ``gate.alpha`` / the number
    of mixes (Bonferroni): at ``gate.alpha`` each, four tries would promote a model that does not
    gain (or does forget) up to four times as often as the gate promises."""
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gate = replace(gate, alpha=gate.alpha / len(alphas))
    fixed = (correct(current, production, device, features_only=features_only),
             correct(current, reference, device, features_only=features_only))
    results = []
    for alpha in alphas:
        model.load_state_dict(interpolate(start, tuned, alpha))
        results.append(evaluate_gate(model, current, production, reference, gate, device,
                                     features_only=features_only, wise_alpha=alpha, current_correct=fixed))

    def rank(r: GateResult) -> tuple[bool, float]:
        return (r.promote, r.candidate_production if r.promote else r.gain - max(0.0, r.forgetting - gate.max_forgetting))

    best = max(results, key=rank)
    model.load_state_dict(interpolate(start, tuned, best.wise_alpha or 1.0))
    return best
