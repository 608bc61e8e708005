"""COTT: thresholded confidence optimal transport (Lu et al., NeurIPS 2023), label-shift aware.

COT transports the window's softmax outputs onto the label distribution the window should
have; mass that has to travel far (a row moved onto a class it gave little probability) is
error. Unlike averaged confidence, this sees a model that has collapsed onto a few classes
with high confidence (the bench's noise corruption: confidence 0.98, accuracy 0.10), because
the predicted classes no longer match the label distribution. COTT counts the transported mass
whose cost exceeds a threshold learned on the labelled reference, so that the count there equals
the reference accuracy (as ATC does for confidence).

The label distribution of the window is not known. Plain COT takes the reference's, and so
reads any label-prior shift as error (the bench: 0.47 estimated for a true 0.97). Here it is
estimated: the rows that still look like reference rows of their predicted class (class-
conditional kNN typicality, monitor/signals/typicality.py) are taken to be under label shift
and their class prior is estimated BBSD-style (monitor/signals/label_shift.py); the atypical
rest is given the reference's prior, as COT assumes. Under pure label shift nearly every row is
typical and the estimated prior follows the shift; under a covariate shift few rows are typical
and the estimate is plain COTT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monitor.signals.label_shift import estimate_class_prior
from monitor.signals.transport import EPSILON, Plan, transport_plan
from monitor.signals.typicality import TypicalityBank


@dataclass(frozen=True, eq=False)
class CottFit:
    threshold: float            # cost at or below which transported mass counts as correct
    replicates: np.ndarray      # float64[R]: the threshold refitted on bootstrap resamples of the reference
    label_share: np.ndarray     # float64[C]: the labelled reference's class prior
    confusion: np.ndarray       # int64[C, C]: counts of (predicted i, label j) on the labelled reference
    typicality: TypicalityBank
    epsilon: float = EPSILON

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"threshold": np.float64(self.threshold), "replicates": self.replicates,
                  "label_share": self.label_share, "epsilon": np.float64(self.epsilon)}
        arrays.update({f"typicality.{k}": v for k, v in self.typicality.to_arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], confusion: np.ndarray) -> "CottFit":
        bank = TypicalityBank.from_arrays({k[len("typicality."):]: v for k, v in arrays.items()
                                           if k.startswith("typicality.")})
        return cls(threshold=float(arrays["threshold"]), replicates=arrays["replicates"],
                   label_share=arrays["label_share"], confusion=confusion, typicality=bank,
                   epsilon=float(arrays["epsilon"]))


def correct_mass(plan: Plan, threshold: float) -> np.ndarray:
    """Per row, the transported mass at cost <= threshold (its share of being right)."""
    # Costs are sorted ascending along each row and the (j+1)-th largest probability is at
    # most 1/(j+1), so entry j can be at or below the threshold only if j/(j+1) <= threshold:
    # for the usual threshold < 0.5, only each row's top class matters.
    cols = int(threshold / (1.0 - threshold)) + 1 if threshold < 1.0 else plan.cost.shape[1]
    return (plan.mass[:, :cols] * (plan.cost[:, :cols] <= threshold)).sum(axis=1)


def _threshold(plan: Plan, weights: np.ndarray, accuracy: float, order: np.ndarray) -> float:
    """The cost at which the weighted mass at or below it first reaches ``accuracy``."""
    w = (plan.mass * weights[:, None]).ravel()[order]
    cum = np.cumsum(w) / weights.sum()
    at = min(int(np.searchsorted(cum, accuracy - 1e-12)), cum.size - 1)
    return float(plan.cost.ravel()[order][at])


def fit_cott(
    *, top_prob: np.ndarray, top_class: np.ndarray, label: np.ndarray, correct: np.ndarray, confusion: np.ndarray,
    typicality: TypicalityBank, rng: np.random.Generator, replicates: int,
) -> CottFit | None:
    """Fit on labelled reference rows (their top-K probabilities, labels and whether the
    prediction was right); None if the plan onto the reference's own labels does not converge."""
    n_classes = confusion.shape[0]
    share = np.bincount(label, minlength=n_classes).astype(np.float64)
    share /= share.sum()
    plan = transport_plan(top_prob, top_class, share)
    if not plan.converged:
        return None
    order = np.argsort(plan.cost.ravel(), kind="stable")
    n = correct.size
    threshold = _threshold(plan, np.ones(n), float(correct.mean()), order)
    reps = np.empty(replicates)
    for r in range(replicates):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        reps[r] = _threshold(plan, counts, float(counts @ correct / n), order)
    totals = confusion.sum(axis=0).astype(np.float64)
    return CottFit(threshold=threshold, replicates=reps, label_share=totals / totals.sum(),
                   confusion=confusion, typicality=typicality)


@dataclass(frozen=True)
class CottWindow:
    """What COTT computed for one window."""

    plan: Plan
    target: np.ndarray          # the label distribution the rows were transported onto
    typical_share: float        # share of rows that look like reference rows of their class


def cott_window(fit: CottFit, *, top_prob: np.ndarray, top_class: np.ndarray, typical: np.ndarray) -> CottWindow:
    predicted = top_class[:, 0].astype(np.int64)
    n_classes = fit.label_share.size
    typical_share = float(typical.mean())
    # The reference-like part of the window: typical rows of each predicted class, divided by
    # the share of reference rows of that class that are typical (about 1 - QUANTILE). Its
    # size relative to the window weighs its estimated prior against the reference's.
    like = np.bincount(predicted[typical], minlength=n_classes) / fit.typicality.class_rate
    weight = min(1.0, float(like.sum()) / predicted.size)
    target = fit.label_share
    if weight > 0:
        prior = estimate_class_prior(fit.confusion, like)
        target = weight * prior + (1.0 - weight) * fit.label_share
    target = target / target.sum()
    plan = transport_plan(top_prob, top_class, target, epsilon=fit.epsilon)
    return CottWindow(plan=plan, target=target, typical_share=typical_share)
