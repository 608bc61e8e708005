"""What a rule is: one signal against a fixed threshold or the reference accuracy minus a drop,
the default rules, and the signal sets rules are checked against (see ``monitor.policy``)."""

from __future__ import annotations

from dataclasses import dataclass

from monitor.configutil import Reading, setting
from monitor.signals.results import LABEL_SIGNALS

ACTIONS = ("alert", "retrain")
OPS = ("above", "below")
# Signals a drop_from_reference rule may use; min_rows counts their labels rather than window rows.
ACCURACY_SIGNALS = ("accuracy", "accuracy_last_seconds", "estimated_accuracy", "estimated_accuracy_lower",
                    "estimated_accuracy_upper")
# Signals confined to [0, 1]: a rule whose threshold lies outside what its signal can take never fires.
UNIT_SIGNALS = ("activation_share_significant", "entropy_mean", "entropy_p90", "max_prob_mean", "class_tvd",
                "class_chi2_p_value", "online_mmd_alarm", "mmd_p_value", "accuracy", "accuracy_last_seconds",
                "estimated_accuracy", "estimated_accuracy_lower", "estimated_accuracy_upper", "class_prior_tvd")


def _op(r: Reading) -> str:
    """A drop_from_reference rule fires below the reference, so its op defaults to "below"."""
    return r.section.choice(r.name, OPS, "below" if r.section.has("drop_from_reference") else "above")


@dataclass(frozen=True)
class Rule:
    """One entry of ``policy.rules``; its keys and their bounds are read from these fields."""

    name: str
    signal: str
    op: str = setting("above", parse=_op)   # "above" | "below"
    threshold: float | None = setting(None)  # fixed threshold, or ...
    drop_from_reference: float | None = setting(None, minimum=0)  # ... fires when value < reference accuracy - drop
    min_rows: int = setting(0, minimum=0)    # window rows (labels for accuracy) needed to judge
    consecutive: int = setting(1, minimum=1)  # breaching observations to fire, observations inside to clear
    action: str = setting("alert", choices=ACTIONS)  # "alert" | "retrain"
    confidence: float = setting(0.0, minimum=0.0, maximum=0.999)  # drop rules: one-sided confidence of "below" (0 = point values)

    @property
    def label_time(self) -> bool:
        """Judged on label evaluations (True) or on feature windows (False)."""
        return self.signal in LABEL_SIGNALS


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("online_mmd_alarm", "online_mmd_alarm", "above", threshold=0.5, action="alert"),
    Rule("mmd_p_value", "mmd_p_value", "below", threshold=0.05, consecutive=3, action="alert"),
    Rule("accuracy_drop", "accuracy", "below", drop_from_reference=0.05, min_rows=200, consecutive=2,
         action="retrain", confidence=0.95),
    Rule("estimated_accuracy_drop", "estimated_accuracy", "below", drop_from_reference=0.05, consecutive=3,
         action="retrain", confidence=0.95),
)


def signal_floor(signal: str, *, permutations: int) -> float | None:
    """The smallest value ``signal`` can take, when it is bounded below (None otherwise)."""
    if signal == "mmd_p_value":
        return 1.0 / (1 + permutations)  # (1 + k) / (1 + B) with k = 0
    return 0.0 if signal in UNIT_SIGNALS else None
