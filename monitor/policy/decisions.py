"""What the policy hands the daemon: a rule's decision (one log line's worth), the plan of one
retrain job, and the facts it judges with (the reference's accuracy, the retrain preconditions)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from monitor.signals.results import LABEL_SIGNALS

# What happened to a rule's observation or to a version's retrain ask: one log line each.
OUTCOMES = ("alert", "ask", "retrain", "joined", "deferred", "cooldown", "dropped", "cleared")


@dataclass(frozen=True)
class ReferenceFacts:
    """What a drop rule compares with: the reference's accuracy and how many labelled rows back it."""

    accuracy: float | None
    labelled_rows: int = 0          # 0: unknown, treated as exact


@dataclass(frozen=True)
class RetrainPreconditions:
    """What :meth:`Policy.resolve` needs to decide whether a retrain may start now."""

    # labelled rows joined after join number ``after_join``, predicted at/after ``since`` (event
    # time), of ``model_version`` (None: any)
    labelled: Callable[[int, float | None, str | None], int]
    min_labelled_rows: int
    join_seq: int = 0                     # the last join number now (recorded at each retrain)
    active_job_id: str | None = None      # a retrain queued or running
    lookback_start: float | None = None   # event time before which rows are too old to train on
    served: Callable[[str], bool] = lambda version: True  # a retired version is never retrained


@dataclass(frozen=True)
class Decision:
    """What happened on a rule's breach, or to a version's retrain ask: one log line's worth.

    ``outcome``: "alert"; "ask" (a retrain rule fired; :meth:`Policy.resolve` decides); "retrain"
    (queue one now); "joined" (recorded on the job already queued or running); "deferred" (too
    few labelled rows); "cooldown"; "dropped" (the version is no longer served); "cleared".
    """

    rule: str
    model_version: str
    signal: str
    op: str
    value: float
    threshold: float
    outcome: str
    detail: str = ""
    onset: float | None = None      # event time the breach began (start of its first breaching observation)

    def summary(self) -> str:
        """Which rule, on what value vs threshold, for which model_version."""
        return (f"rule {self.rule}: {self.signal}={self.value:.4g} {self.op} threshold {self.threshold:.4g} "
                f"for model_version {self.model_version}")

    def message(self, job_id: str | None = None) -> str:
        """The one log line: :meth:`summary` and what happens next."""
        head = self.summary()
        if self.outcome == "cleared":
            return f"rule {self.rule}: alarm cleared for model_version {self.model_version} ({self.signal}={self.value:.4g})"
        if self.outcome == "retrain":
            return f"{head}: retrain queued as job {job_id}" + (f" ({self.detail})" if self.detail else "")
        return f"{head}: {self.detail}"

    def with_outcome(self, outcome: str, detail: str) -> "Decision":
        return Decision(self.rule, self.model_version, self.signal, self.op, self.value, self.threshold, outcome,
                        detail, self.onset)


@dataclass(frozen=True)
class RetrainPlan:
    """One job to queue for ``model_version``: every rule that asked, first the earliest."""

    model_version: str
    decisions: tuple[Decision, ...]
    onset: float | None              # the earliest breach onset among the version's alarms

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(d.rule for d in self.decisions)

    @property
    def label_free(self) -> bool:
        return all(d.signal not in LABEL_SIGNALS for d in self.decisions)

    def reason(self) -> str:
        return "; ".join(d.summary() for d in self.decisions)
