"""The policy's running state: rules judged observation by observation (streaks, hysteresis,
breach onsets), retrain asks resolved into at most one job, and the state kept across restarts."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

from monitor.errors import StateError
from monitor.policy.config import PolicyConfig
from monitor.policy.decisions import Decision, ReferenceFacts, RetrainPlan, RetrainPreconditions
from monitor.policy.rules import Rule
from monitor.signals.results import LABEL_SIGNALS, LabelEvaluation, WindowSignals, label_signal_values, signal_values

STATE_VERSION = 3  # 2: evaluated windows; 3: per-version retrain state, label evaluations, onsets


@dataclass
class _RuleState:
    breach_streak: int = 0
    ok_streak: int = 0
    active: bool = False
    value: float = math.nan
    threshold: float = math.nan
    onset: float | None = None      # start time of the first observation of the current breach


@dataclass
class _Ask:
    """A version's pending retrain: the rules that asked, and the outcome last logged."""

    decisions: dict[str, Decision] = field(default_factory=dict)
    outcome: str = "ask"
    detail: str = ""
    job_id: str | None = None       # the job it is recorded as joined to


class Policy:
    """Evaluates rules observation by observation and keeps the small state that must survive a
    restart. Not thread-safe: the daemon calls it from its cycle job only (under its lock)."""

    def __init__(self, config: PolicyConfig):
        self.config = config
        self._rules = {r.name: r for r in config.rules}
        self._state: dict[tuple[str, str], _RuleState] = {}
        self.breaches: dict[str, int] = {r.name: 0 for r in config.rules}
        self.deferred_total = 0
        self.cooldown_until: dict[str, float] = {}     # model_version -> wall time its cooldown ends
        self.last_retrain_join: dict[str, int] = {}    # model_version -> join number at its last retrain
        self.last_job: dict[str, str] = {}             # model_version -> its last retrain job
        self.asks: dict[str, _Ask] = {}
        # model_version -> (reference_id, index) of the last window / label evaluation judged: the
        # engine hands them over again after a crash, and each must move a streak exactly once.
        self.evaluated: dict[str, tuple[str, int]] = {}
        self.evaluated_labels: dict[str, tuple[str, int]] = {}

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self, window: WindowSignals, *, reference: ReferenceFacts | None = None) -> list[Decision]:
        """Apply the window-time rules to one closed window; returns the alarms that fired or
        cleared and the retrain asks ("ask"). Callers that may see a window twice check :meth:`is_new`."""
        self.evaluated[window.model_version] = (window.reference_id, window.index)
        return self._judge(window.model_version, signal_values(window), {"rows": window.rows}, window.start_time, reference,
                           label_time=False, errors=_estimate_errors(window))

    def evaluate_labels(self, evaluation: LabelEvaluation, *, reference: ReferenceFacts | None = None) -> list[Decision]:
        """Apply the label-time rules to one label evaluation (see :meth:`evaluate`)."""
        self.evaluated_labels[evaluation.model_version] = (evaluation.reference_id, evaluation.index)
        acc = evaluation.accuracy
        counts = {"accuracy": acc.labels_last_n, "accuracy_labels": acc.labels_last_n,
                  "accuracy_last_seconds": acc.labels_last_seconds}
        return self._judge(evaluation.model_version, label_signal_values(evaluation), counts, evaluation.start_time,
                           reference, label_time=True, errors=_binomial_errors(evaluation))

    def _judge(self, version: str, values: Mapping[str, float], counts: Mapping[str, int], start_time: float,
               reference: ReferenceFacts | None, *, label_time: bool, errors: Mapping[str, float]) -> list[Decision]:
        out: list[Decision] = []
        for rule in self.config.rules:
            if rule.label_time != label_time:
                continue
            value = values.get(rule.signal)
            threshold = _threshold(rule, reference, errors.get(rule.signal, 0.0))
            rows = counts.get(rule.signal, counts.get("rows", 0))  # labels for accuracy, else window rows
            if value is None or threshold is None or rows < rule.min_rows:
                continue  # not measured: neither a breach nor evidence of recovery
            st = self._state.setdefault((rule.name, version), _RuleState())
            st.value, st.threshold = value, threshold
            breach = value > threshold if rule.op == "above" else value < threshold
            if breach:
                self.breaches[rule.name] = self.breaches.get(rule.name, 0) + 1
                if not st.active and st.breach_streak == 0:
                    st.onset = start_time
                st.breach_streak, st.ok_streak = st.breach_streak + 1, 0
                if not st.active and st.breach_streak >= rule.consecutive:
                    st.active = True
                    d = Decision(rule.name, version, rule.signal, rule.op, value, threshold, "alert", "alert only",
                                 st.onset)
                    if rule.action == "retrain":
                        d = d.with_outcome("ask", "retrain asked")
                        self.asks.setdefault(version, _Ask()).decisions[rule.name] = d
                    out.append(d)
            else:
                st.ok_streak, st.breach_streak = st.ok_streak + 1, 0
                if not st.active:
                    st.onset = None
                elif st.ok_streak >= rule.consecutive:
                    st.active, st.onset = False, None
                    out.append(Decision(rule.name, version, rule.signal, rule.op, value, threshold, "cleared"))
                    ask = self.asks.get(version)
                    if ask is not None:
                        ask.decisions.pop(rule.name, None)
                        if not ask.decisions:
                            del self.asks[version]
        return out

    # -- retraining: one job at a time ------------------------------------------------------
    def resolve(self, *, now: float, pre: RetrainPreconditions) -> tuple[list[Decision], RetrainPlan | None]:
        """Turn the pending asks into at most one job. Returns the decisions whose outcome changed
        (one log line each, every rule of the version) and the plan to queue, if any. The caller
        queues it and calls :meth:`note_retrain`."""
        changed: list[Decision] = []
        plan: RetrainPlan | None = None
        for version in sorted(self.asks):
            ask = self.asks[version]
            decisions = sorted(ask.decisions.values(), key=lambda d: (d.onset is None, d.onset or 0.0, d.rule))
            onset = self._onset(version)
            if not pre.served(version):
                changed += [d.with_outcome("dropped", f"model_version {version} is no longer served: retrain not queued")
                            for d in decisions]
                del self.asks[version]
                continue
            busy = pre.active_job_id if plan is None else "(the job queued in this cycle)"
            if busy is not None:
                outcome, detail, job = "joined", f"joined retrain job {busy}, already queued or running", busy
            elif (until := self.cooldown_until.get(version)) is not None and now < until:
                last = self.last_job.get(version)
                outcome, job = "cooldown", last
                detail = (f"joined retrain job {last}; " if last else "") + (
                    f"model_version {version} in cooldown until {_iso(until)}; retried then if the alarm holds")
            else:
                need = pre.min_labelled_rows
                label_free = all(d.signal not in LABEL_SIGNALS for d in decisions)
                if label_free and onset is not None:
                    since = onset if pre.lookback_start is None else max(onset, pre.lookback_start)
                    have = pre.labelled(0, since, version)
                    what = f"labelled rows predicted after the onset at {_iso(onset)}"
                else:
                    have = pre.labelled(self.last_retrain_join.get(version, 0), pre.lookback_start, None)
                    what = "labelled rows joined since the last retrain"
                job = None
                if have < need:
                    outcome, detail = "deferred", f"retrain deferred until {need} {what} (have {have})"
                else:
                    outcome, detail = "retrain", (f"with rules {', '.join(d.rule for d in decisions)}"
                                                  if len(decisions) > 1 else "")
            if outcome == "retrain":
                plan = RetrainPlan(version, tuple(decisions), onset)
                changed += [d.with_outcome("retrain" if i == 0 else "joined",
                                           detail if i == 0 else "joined the retrain queued for rule "
                                           f"{decisions[0].rule}") for i, d in enumerate(decisions)]
                del self.asks[version]
                continue
            # One line per rule when the version's outcome changes; otherwise only for rules that just asked.
            moved = outcome != ask.outcome or detail.split(" (have ")[0] != ask.detail.split(" (have ")[0]
            if outcome == "deferred" and ask.outcome != "deferred":
                self.deferred_total += 1
            changed += [d.with_outcome(outcome, detail) for d in decisions if moved or d.outcome == "ask"]
            ask.outcome, ask.detail, ask.job_id = outcome, detail, job
            ask.decisions = {d.rule: d.with_outcome(outcome, detail) for d in decisions}
        return changed, plan

    def note_retrain(self, version: str, *, now: float, join_seq: int, job_id: str) -> None:
        """A retrain of ``version`` was queued (by a rule or by hand): start its cooldown."""
        self.last_retrain_join[version] = join_seq
        self.cooldown_until[version] = now + self.config.cooldown_seconds
        self.last_job[version] = job_id
        self.asks.pop(version, None)

    def _onset(self, version: str) -> float | None:
        """The earliest onset among the version's alarms on (drift alarms usually fire first)."""
        onsets = [st.onset for (_, mv), st in self._state.items() if mv == version and st.active and st.onset is not None]
        return min(onsets) if onsets else None

    # -- version lifecycle ----------------------------------------------------------------------
    def retire(self, version: str) -> list[str]:
        """Forget ``version``'s alarms, streaks and pending retrain (it is no longer served);
        returns the rules that were on or pending, for the caller's log line."""
        was = sorted({name for (name, mv), st in self._state.items() if mv == version and st.active}
                     | set(self.asks.get(version, _Ask()).decisions))
        self._state = {k: v for k, v in self._state.items() if k[1] != version}
        self.asks.pop(version, None)
        return was

    def versions(self) -> set[str]:
        """Versions with any rule state or pending ask."""
        return {mv for (_, mv) in self._state} | set(self.asks)

    # -- views -----------------------------------------------------------------------------
    def alarms(self) -> dict[str, bool]:
        """rule name -> alarm on for any model_version."""
        out = {r.name: False for r in self.config.rules}
        for (name, _mv), st in self._state.items():
            if name in out and st.active:
                out[name] = True
        return out

    def alarm_states(self, versions: Iterable[str]) -> dict[tuple[str, str], bool]:
        """(rule, model_version) -> alarm on, for every rule and each of ``versions``."""
        return {(r.name, mv): bool(self._state.get((r.name, mv), _RuleState()).active)
                for r in self.config.rules for mv in versions}

    def active(self) -> list[dict[str, Any]]:
        """Alarms currently on, one entry per (rule, model_version)."""
        return [
            {"rule": name, "model_version": mv, "value": st.value, "threshold": st.threshold, "onset": st.onset}
            for (name, mv), st in sorted(self._state.items())
            if st.active and name in self._rules
        ]

    def pending(self) -> list[dict[str, Any]]:
        """Pending retrain asks, one entry per model_version (rules, outcome, what it waits for)."""
        return [{"model_version": mv, "rules": sorted(a.decisions), "outcome": a.outcome, "detail": a.detail,
                 "joined_job": a.job_id, "onset": self._onset(mv),
                 "decisions": [asdict(d) for d in sorted(a.decisions.values(), key=lambda d: d.rule)]}
                for mv, a in sorted(self.asks.items())]

    def thresholds(self, references: Mapping[str, ReferenceFacts], versions: Iterable[str]) -> dict[tuple[str, str], float]:
        """(rule, model_version) -> threshold in force (the last judged one when a margin depends on
        the observation; NaN for a drop rule without a reference)."""
        out: dict[tuple[str, str], float] = {}
        for mv in versions:
            for r in self.config.rules:
                st = self._state.get((r.name, mv))
                t = st.threshold if st is not None and math.isfinite(st.threshold) else _threshold(r, references.get(mv), 0.0)
                out[(r.name, mv)] = math.nan if t is None else t
        return out

    # -- persistence -------------------------------------------------------------------------
    def is_new(self, window: WindowSignals) -> bool:
        """False for a window at or before the last one evaluated for its model_version and reference."""
        return _is_new(self.evaluated, window.model_version, window.reference_id, window.index)

    def is_new_evaluation(self, evaluation: LabelEvaluation) -> bool:
        return _is_new(self.evaluated_labels, evaluation.model_version, evaluation.reference_id, evaluation.index)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "evaluated": {mv: [ref, idx] for mv, (ref, idx) in sorted(self.evaluated.items())},
            "evaluated_labels": {mv: [ref, idx] for mv, (ref, idx) in sorted(self.evaluated_labels.items())},
            "rules": [
                {"rule": n, "model_version": mv, "breach_streak": s.breach_streak, "ok_streak": s.ok_streak,
                 "active": s.active, "value": _finite_or_none(s.value), "threshold": _finite_or_none(s.threshold), "onset": s.onset}
                for (n, mv), s in sorted(self._state.items())
            ],
            "breaches": dict(self.breaches),
            "deferred_total": self.deferred_total,
            "cooldown_until": dict(self.cooldown_until),
            "last_retrain_join": dict(self.last_retrain_join),
            "last_job": dict(self.last_job),
            "asks": {mv: {"outcome": a.outcome, "detail": a.detail, "job_id": a.job_id,
                          "decisions": [asdict(d) for d in a.decisions.values()]} for mv, a in sorted(self.asks.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; rules no longer configured are dropped. A state from
        before per-version retrains (version 2) keeps its alarms and starts the retrain state afresh.

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
                    _nan_if_none(e["value"]), _nan_if_none(e["threshold"]), e.get("onset"),
                )
                for e in state["rules"]
                if e["rule"] in self._rules
            }
            self.breaches = {r: int(state["breaches"].get(r, 0)) for r in self._rules}
            self.deferred_total = int(state["deferred_total"])
            evaluated = state["evaluated"] if version >= 2 else {}
            self.evaluated = {str(mv): (str(ref), int(idx)) for mv, (ref, idx) in evaluated.items()}
            if version >= 3:
                self.evaluated_labels = {str(mv): (str(ref), int(idx))
                                         for mv, (ref, idx) in state["evaluated_labels"].items()}
                self.cooldown_until = {str(k): float(v) for k, v in state["cooldown_until"].items()}
                self.last_retrain_join = {str(k): int(v) for k, v in state["last_retrain_join"].items()}
                self.last_job = {str(k): str(v) for k, v in state["last_job"].items()}
                self.asks = {}
                for mv, a in state["asks"].items():
                    decisions = {d["rule"]: Decision(**d) for d in a["decisions"] if d["rule"] in self._rules}
                    if decisions:
                        self.asks[str(mv)] = _Ask(decisions, str(a["outcome"]), str(a["detail"]), a["job_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"policy state is malformed ({exc!r}); delete policy.json in the state directory to reset alarms") from None


def _threshold(rule: Rule, reference: ReferenceFacts | None, value_error: float) -> float | None:
    """The number the value is compared with; None when a drop rule has no reference accuracy."""
    if rule.threshold is not None:
        return rule.threshold
    if reference is None or reference.accuracy is None or rule.drop_from_reference is None:
        return None
    threshold = reference.accuracy - rule.drop_from_reference
    if rule.confidence > 0:
        ref_error = _binomial_se(reference.accuracy, reference.labelled_rows)
        threshold -= NormalDist().inv_cdf(rule.confidence) * math.hypot(ref_error, value_error)
    return threshold


def _binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy from ``n`` rows (0 for unknown n); shrunk toward 1/2 so a
    perfect small sample is not taken as exact."""
    if n <= 0:
        return 0.0
    q = (p * n + 1.0) / (n + 2.0)
    return math.sqrt(q * (1.0 - q) / n)


def _binomial_errors(evaluation: LabelEvaluation) -> dict[str, float]:
    acc = evaluation.accuracy
    out = {}
    if acc.accuracy_last_n is not None:
        out["accuracy"] = _binomial_se(acc.accuracy_last_n, acc.labels_last_n)
    if acc.accuracy_last_seconds is not None:
        out["accuracy_last_seconds"] = _binomial_se(acc.accuracy_last_seconds, acc.labels_last_seconds)
    return out


def _estimate_errors(window: WindowSignals) -> dict[str, float]:
    """Standard error of the label-free estimate, from its bootstrap interval (signals.estimate.interval,
    two-sided) when it carries one; the bounds themselves are taken as exact."""
    est = window.estimate
    if est is None or est.lower is None or est.upper is None:
        return {}
    return {"estimated_accuracy": max(0.0, est.upper - est.lower) / (2 * NormalDist().inv_cdf(0.5 + est.interval / 2))}


def _is_new(seen: Mapping[str, tuple[str, int]], version: str, reference_id: str, index: int) -> bool:
    last = seen.get(version)
    return last is None or last[0] != reference_id or index > last[1]


def _finite_or_none(x: float) -> float | None:
    """A value for the state file: JSON has no NaN or infinity, so a non-finite value is null."""
    return x if math.isfinite(x) else None


def _nan_if_none(x: Any) -> float:
    """Back from the state file: null is NaN again (the inverse of :func:`_finite_or_none`)."""
    return math.nan if x is None else float(x)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
