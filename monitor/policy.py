"""Trigger policy: rules over a window's signals -> alarms and retrain decisions, with reasons.

A rule compares one signal of ``monitor.signals.results.signal_values(window)`` with a fixed
threshold, or (accuracy signals only) with the reference accuracy minus a drop. It fires after
``consecutive`` breaching windows of one model_version and clears after as many windows back
inside (hysteresis). A firing ``retrain`` rule queues a retrain unless the global cooldown is
running or too few labelled rows exist since the last training; then it is *pending* and is
retried every cycle while its alarm stays on.

Default rules (used when ``policy.rules`` is absent): drift alerts, accuracy retrains.

==========================  ===================================================  =======
name                        condition                                            action
==========================  ===================================================  =======
online_mmd_alarm            online_mmd_alarm above 0.5 (the detector alarmed)    alert
mmd_p_value                 mmd_p_value below 0.01 for 3 windows                 alert
accuracy_drop               accuracy < reference - 0.05, >= 200 labels, 2 windows retrain
estimated_accuracy_drop     estimated_accuracy < reference - 0.05, 3 windows     retrain
==========================  ===================================================  =======
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from monitor.configutil import Section
from monitor.errors import StateError
from monitor.signals.results import SIGNAL_NAMES, WindowSignals, signal_values

STATE_VERSION = 2  # 2: evaluated (last window evaluated per model_version)
ACTIONS = ("alert", "retrain")
OPS = ("above", "below")
# Signals a drop_from_reference rule may use; min_rows counts their labels rather than window rows.
ACCURACY_SIGNALS = ("accuracy", "accuracy_last_seconds", "estimated_accuracy")
_LABEL_COUNTED = ("accuracy", "accuracy_last_seconds")


@dataclass(frozen=True)
class Rule:
    name: str
    signal: str
    op: str = "above"                       # "above" | "below"
    threshold: float | None = None          # fixed threshold, or ...
    drop_from_reference: float | None = None  # ... fires when value < reference accuracy - drop
    min_rows: int = 0                       # window rows (labels for accuracy) needed to judge
    consecutive: int = 1                    # breaching windows to fire, windows inside to clear
    action: str = "alert"                   # "alert" | "retrain"

    def effective_threshold(self, reference_accuracy: float | None) -> float | None:
        """The number the value is compared with; None when a drop rule has no reference accuracy."""
        if self.threshold is not None:
            return self.threshold
        if reference_accuracy is None or self.drop_from_reference is None:
            return None
        return reference_accuracy - self.drop_from_reference

    def describe(self) -> str:
        if self.threshold is not None:
            cond = f"{self.signal} {self.op} {self.threshold:g}"
        else:
            cond = f"{self.signal} below reference - {self.drop_from_reference:g}"
        return f"{cond} for {self.consecutive} window(s) -> {self.action}"


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("online_mmd_alarm", "online_mmd_alarm", "above", threshold=0.5, action="alert"),
    Rule("mmd_p_value", "mmd_p_value", "below", threshold=0.05, consecutive=3, action="alert"),
    Rule("accuracy_drop", "accuracy", "below", drop_from_reference=0.05, min_rows=200, consecutive=2, action="retrain"),
    Rule("estimated_accuracy_drop", "estimated_accuracy", "below", drop_from_reference=0.05, consecutive=3, action="retrain"),
)


@dataclass(frozen=True)
class PolicyConfig:
    cooldown_seconds: float = 3600.0        # no new retrain this long after one was queued
    rules: tuple[Rule, ...] = DEFAULT_RULES
    default_rules: bool = True              # True when policy.rules was absent


def parse_policy(section: Section) -> PolicyConfig:
    """Read the ``policy`` section; errors (naming the rule and key) are collected in ``section``."""
    cooldown = section.float("cooldown_seconds", PolicyConfig.cooldown_seconds, minimum=0)
    if not section.has("rules"):
        section.finish()
        return PolicyConfig(cooldown_seconds=cooldown)
    rules: list[Rule] = []
    seen: set[str] = set()
    for rs in section.sections("rules"):
        rule = _parse_rule(rs)
        rs.finish()
        name = rs.data.get("name")
        if isinstance(name, str) and name in seen:
            rs.error("name", f"duplicate rule name {name!r}; names must be unique")
        seen.add(name if isinstance(name, str) else "")
        if rule is not None:
            rules.append(rule)
    section.finish()
    return PolicyConfig(cooldown_seconds=cooldown, rules=tuple(rules), default_rules=False)


def _parse_rule(rs: Section) -> Rule | None:
    name = rs.str("name")
    signal = rs.str("signal")
    op = rs.choice("op", OPS, "below" if rs.has("drop_from_reference") else "above")
    threshold = rs.float("threshold", None)
    drop = rs.float("drop_from_reference", None, minimum=0)
    min_rows = rs.int("min_rows", 0, minimum=0)
    consecutive = rs.int("consecutive", 1, minimum=1)
    action = rs.choice("action", ACTIONS, "alert")
    where = f"rule {name!r}" if isinstance(name, str) and name else "rule"
    ok = True
    if isinstance(signal, str) and signal and signal not in SIGNAL_NAMES:
        rs.error("signal", f"{where}: unknown signal {signal!r}; allowed: {', '.join(SIGNAL_NAMES)}")
        ok = False
    if (threshold is None) == (drop is None):
        rs.error("threshold", f"{where}: set exactly one of threshold or drop_from_reference")
        ok = False
    if drop is not None:
        if signal not in ACCURACY_SIGNALS:
            rs.error("drop_from_reference", f"{where}: only for {', '.join(ACCURACY_SIGNALS)}, not {signal!r}")
            ok = False
        if op != "below":
            rs.error("op", f"{where}: drop_from_reference rules fire below the reference; use op: below")
            ok = False
    if not ok or not name or not signal:
        return None
    return Rule(name, signal, op, threshold, drop, min_rows, consecutive, action)


@dataclass(frozen=True)
class RetrainBudget:
    """What the policy needs to know to decide whether a retrain may start now."""

    labelled_since: Callable[[float | None], int]  # labelled rows since an epoch time (None: ever)
    min_labelled_rows: int
    busy_job: str | None = None                     # id of a retrain already queued or running


@dataclass(frozen=True)
class Decision:
    """What happened on a rule's breach: one log line's worth.

    ``outcome``: "alert", "retrain" (queue one now), "deferred" (too few labels), "cooldown",
    "busy" (a retrain is already queued), or "cleared" (the alarm went back to normal).
    """

    rule: str
    model_version: str
    signal: str
    op: str
    value: float
    threshold: float
    outcome: str
    detail: str = ""

    def summary(self) -> str:
        """Which rule, on what value vs threshold, for which model_version."""
        return (f"rule {self.rule}: {self.signal}={self.value:.4g} {self.op} threshold {self.threshold:.4g} "
                f"for model_version {self.model_version}")

    def message(self, job_id: str | None = None) -> str:
        """The one log line of a breach: :meth:`summary` and what happens next."""
        head = self.summary()
        if self.outcome == "cleared":
            return f"rule {self.rule}: alarm cleared for model_version {self.model_version} ({self.signal}={self.value:.4g})"
        if self.outcome == "retrain":
            return f"{head}: retrain queued as job {job_id}"
        return f"{head}: {self.detail}"


@dataclass
class _RuleState:
    breach_streak: int = 0
    ok_streak: int = 0
    active: bool = False
    value: float = math.nan
    threshold: float = math.nan


class Policy:
    """Evaluates rules window by window and keeps the small state that must survive a restart.

    Not thread-safe: the daemon calls it from its cycle job only.
    """

    def __init__(self, config: PolicyConfig):
        self.config = config
        self._rules = {r.name: r for r in config.rules}
        self._state: dict[tuple[str, str], _RuleState] = {}
        self.breaches: dict[str, int] = {r.name: 0 for r in config.rules}
        self.deferred_total = 0
        self.cooldown_until: float | None = None
        self.last_retrain_at: float | None = None
        self.pending: Decision | None = None  # a retrain decision waiting for labels or cooldown
        # model_version -> (reference_id, index) of the last window evaluated: the engine hands
        # windows over again after a crash, and each must move a streak exactly once.
        self.evaluated: dict[str, tuple[str, int]] = {}

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(
        self, window: WindowSignals, *, reference_accuracy: float | None, now: float, budget: RetrainBudget
    ) -> list[Decision]:
        """Apply every rule to one closed window; returns decisions for alarms that fired or cleared.

        Callers that may see a window twice (the daemon after a crash) check :meth:`is_new` first."""
        self.evaluated[window.model_version] = (window.reference_id, window.index)
        values = signal_values(window)
        out: list[Decision] = []
        for rule in self.config.rules:
            value = values.get(rule.signal)
            threshold = rule.effective_threshold(reference_accuracy)
            if value is None or threshold is None or _rows_for(rule, window) < rule.min_rows:
                continue  # not measured: neither a breach nor evidence of recovery
            st = self._state.setdefault((rule.name, window.model_version), _RuleState())
            st.value, st.threshold = value, threshold
            breach = value > threshold if rule.op == "above" else value < threshold
            if breach:
                self.breaches[rule.name] = self.breaches.get(rule.name, 0) + 1
                st.breach_streak, st.ok_streak = st.breach_streak + 1, 0
                if not st.active and st.breach_streak >= rule.consecutive:
                    st.active = True
                    base = Decision(rule.name, window.model_version, rule.signal, rule.op, value, threshold, "alert", "alert only")
                    out.append(self._decide(rule, base, now, budget))
            else:
                st.ok_streak, st.breach_streak = st.ok_streak + 1, 0
                if st.active and st.ok_streak >= rule.consecutive:
                    st.active = False
                    out.append(Decision(rule.name, window.model_version, rule.signal, rule.op, value, threshold, "cleared"))
                    if self.pending is not None and (self.pending.rule, self.pending.model_version) == (rule.name, window.model_version):
                        self.pending = None
        return out

    def retry_pending(self, *, now: float, budget: RetrainBudget) -> Decision | None:
        """Re-decide a deferred / cooling-down retrain; returns the decision when its outcome changed."""
        if self.pending is None:
            return None
        before = self.pending
        decision = self._decide(self._rules[before.rule], before, now, budget, retry=True)
        if decision.outcome == before.outcome:
            return None
        return decision

    def _decide(self, rule: Rule, base: Decision, now: float, budget: RetrainBudget, retry: bool = False) -> Decision:
        if rule.action != "retrain":
            return base

        def with_(outcome: str, detail: str) -> Decision:
            return Decision(base.rule, base.model_version, base.signal, base.op, base.value, base.threshold, outcome, detail)

        if self.cooldown_until is not None and now < self.cooldown_until:
            d = with_("cooldown", f"in cooldown until {_iso(self.cooldown_until)}; retrain retried then if the alarm holds")
            self.pending = d
            return d
        if budget.busy_job is not None:
            d = with_("busy", f"retrain already queued as job {budget.busy_job}; not queueing another")
            self.pending = None
            return d
        have = budget.labelled_since(self.last_retrain_at)
        if have < budget.min_labelled_rows:
            d = with_("deferred", f"retrain deferred until {budget.min_labelled_rows} labelled rows (have {have})")
            if not retry or self.pending is None or self.pending.outcome != "deferred":
                self.deferred_total += 1
            self.pending = d
            return d
        self.pending = None
        return with_("retrain", "retrain queued")

    def note_retrain(self, now: float) -> None:
        """A retrain was queued (by a rule or by hand): start the global cooldown."""
        self.last_retrain_at = now
        self.cooldown_until = now + self.config.cooldown_seconds
        self.pending = None

    # -- views -----------------------------------------------------------------------------
    def alarms(self) -> dict[str, bool]:
        """rule name -> alarm on for any model_version."""
        out = {r.name: False for r in self.config.rules}
        for (name, _mv), st in self._state.items():
            if name in out and st.active:
                out[name] = True
        return out

    def active(self) -> list[dict[str, Any]]:
        """Alarms currently on, one entry per (rule, model_version)."""
        return [
            {"rule": name, "model_version": mv, "value": st.value, "threshold": st.threshold}
            for (name, mv), st in sorted(self._state.items())
            if st.active and name in self._rules
        ]

    def thresholds(self, reference_accuracy: Mapping[str, float | None], model_version: str | None) -> dict[str, float]:
        """rule -> threshold in force for ``model_version`` (NaN for a drop rule without a reference)."""
        ref = reference_accuracy.get(model_version) if model_version is not None else None
        out: dict[str, float] = {}
        for r in self.config.rules:
            t = r.effective_threshold(ref)
            out[r.name] = math.nan if t is None else t
        return out

    # -- persistence -------------------------------------------------------------------------
    def is_new(self, window: WindowSignals) -> bool:
        """False for a window at or before the last one evaluated for its model_version and reference."""
        last = self.evaluated.get(window.model_version)
        return last is None or last[0] != window.reference_id or window.index > last[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "evaluated": {mv: [ref, idx] for mv, (ref, idx) in sorted(self.evaluated.items())},
            "version": STATE_VERSION,
            "rules": [
                {"rule": n, "model_version": mv, "breach_streak": s.breach_streak, "ok_streak": s.ok_streak,
                 "active": s.active, "value": _num(s.value), "threshold": _num(s.threshold)}
                for (n, mv), s in sorted(self._state.items())
            ],
            "breaches": dict(self.breaches),
            "deferred_total": self.deferred_total,
            "cooldown_until": self.cooldown_until,
            "last_retrain_at": self.last_retrain_at,
            "pending": None if self.pending is None else vars(self.pending).copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; rules no longer configured are dropped.

        Raises StateError for a state written by a newer driftd or not in this format.
        """
        version = state.get("version")
        if not isinstance(version, int) or version > STATE_VERSION:
            raise StateError(
                f"policy state version {version!r} is newer than this driftd understands ({STATE_VERSION}); "
                "upgrade driftd or delete policy.json in the state directory to reset alarms"
            )
        try:
            self._state = {
                (e["rule"], e["model_version"]): _RuleState(
                    int(e["breach_streak"]), int(e["ok_streak"]), bool(e["active"]),
                    _float(e["value"]), _float(e["threshold"]),
                )
                for e in state["rules"]
                if e["rule"] in self._rules
            }
            self.breaches = {r: int(state["breaches"].get(r, 0)) for r in self._rules}
            self.deferred_total = int(state["deferred_total"])
            self.cooldown_until = state["cooldown_until"]
            self.last_retrain_at = state["last_retrain_at"]
            p = state["pending"]
            self.pending = Decision(**p) if p is not None and p["rule"] in self._rules else None
            evaluated = state["evaluated"] if version >= 2 else {}
            self.evaluated = {str(mv): (str(ref), int(idx)) for mv, (ref, idx) in evaluated.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"policy state is malformed ({exc!r}); delete policy.json in the state directory to reset alarms") from None


def _rows_for(rule: Rule, window: WindowSignals) -> float:
    if rule.signal == "accuracy":
        return window.accuracy.labels_last_n
    if rule.signal == "accuracy_last_seconds":
        return window.accuracy.labels_last_seconds
    return window.rows


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
