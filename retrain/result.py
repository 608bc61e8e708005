"""What a retrain job concluded (``result.json``): :class:`JobResult` and the typed records in it,
the gate's verdict (:class:`GateResult`, computed by retrain.gate) among them.

Separate from the code that writes and reads the job directory (retrain.jobdir) and free of
torch, so that the daemon, the CLI and the tests share one typed view of a result. Every record reads files
written before its later fields existed: a key missing on disk reads back as None. The keys on
disk are the dataclass field names, so ``to_json()`` writes what older versions wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar


T = TypeVar("T")


def _from_json(kind: type[T], raw: dict[str, Any], nested: dict[str, type] | None = None) -> T:
    """``kind`` from a JSON object: missing keys read as None, unknown keys are ignored, and the
    fields named in ``nested`` are built from their own JSON objects."""
    values = {f.name: raw.get(f.name) for f in fields(kind)}  # type: ignore[arg-type]
    for name, sub in (nested or {}).items():
        if isinstance(values[name], dict):
            values[name] = _from_json(sub, values[name])
    return kind(**values)


@dataclass(frozen=True)
class DataSummary:
    """Which labelled rows the job used and where each went (also the registry's ``data_window``).

    Times are event time: prediction timestamps, epoch seconds, up to the stream's newest."""

    since: float                    # oldest prediction time considered (until - lookback_seconds)
    until: float                    # the stream's clock: newest prediction timestamp
    rows: int                       # production rows selected (after the onset when one was given)
    model_versions: list[str]       # model versions that served those rows
    mode: str                       # "images" | "features"
    onset: float | None             # breach onset (event time) the daemon passed, if any
    rows_before_onset: int          # labelled rows in the lookback predicted before the onset
    rows_after_onset: int           # ... and at or after it (all rows when no onset was given)
    rows_used_before_onset: int     # of those, rows used to train, validate or gate
    rows_used_after_onset: int
    train_rows: int
    validation_rows: int
    production_gate_rows: int       # distinct inputs among the most recent rows
    replay_rows: int
    replay_train_rows: int
    replay_validation_rows: int
    reference_gate_rows: int        # distinct replay inputs held out for the forgetting test
    production_copies_dropped: int  # older rows left out: the same input (or group) is in a gate slice
    replay_copies_dropped: int
    gate_copies_merged: int         # repeated inputs among the most recent rows, counted once
    head_only_reason: str | None    # why the job trains the head only (too few post-onset rows)
    group_pattern: str | None = None          # retrain.group_pattern the split and the gate grouped rows by
    production_gate_groups: int | None = None  # groups among the production gate rows (None: ungrouped)
    reference_gate_groups: int | None = None


@dataclass(frozen=True)
class ShiftSummary:
    """How far the inputs moved, by the monitor's measurement and by the job's own."""

    monitor_domain_gap: float | None   # share of feature dims shifted, as the daemon passed it
    monitor_mmd: float | None          # the monitor's batch MMD^2 on the breaching window
    job_domain_gap: float              # measured by the job on the rows it trains on vs the replay rows
    job_domain_gap_rows: int
    strategy_domain_gap: float         # the gap that chose the strategy
    strategy_domain_gap_from: str      # "monitor" | "job"


@dataclass(frozen=True)
class ReferenceSummary:
    """What the promoted version's monitor reference was built from."""

    model_version: str
    heldout_rows: int               # production rows it was not trained on (gate + validation)
    training_rows: int              # production training rows added to reach the minimum size
    labelled_rows: int              # rows behind its accuracy and calibration (held-out only)
    accuracy: float | None
    path: str


@dataclass(frozen=True)
class SliceTest:
    """Both models on one held-out slice, and the paired test that judged them (retrain.gate)."""

    rows: int                   # distinct held-out inputs
    candidate_accuracy: float
    current_accuracy: float
    better: int                 # rows only the candidate gets right
    worse: int                  # rows only the current model gets right
    test: str                   # retrain.paired.MCNEMAR or TANGO
    margin: float               # H1: candidate - current > -margin
    p_value: float
    lower_bound: float          # one-sided (1 - alpha) bound on candidate - current accuracy
    min_rows: int               # the slice size below which this criterion is not judged
    rows_needed: int | None     # rows at which it would pass at the observed rates (when it failed)
    passed: bool
    groups: int | None = None   # groups the rows came in (retrain.group_pattern); None: rows independent
    design_effect: float | None = None  # variance inflation of grouped rows; the test's counts were divided by it


@dataclass(frozen=True)
class GateResult:
    """The promotion gate's verdict (retrain.gate.decide); ``to_json()`` is its part of JobGate."""

    promote: bool
    reason: str
    candidate_production: float     # accuracy 0..1 on the held-out production slice
    current_production: float
    candidate_reference: float      # accuracy 0..1 on the held-out reference slice
    current_reference: float
    production_rows: int
    reference_rows: int
    wise_alpha: float | None = None  # WiSE-FT mixing weight of the fine-tuned model, when used
    production: SliceTest | None = None
    reference: SliceTest | None = None
    alpha: float | None = None

    @property
    def gain(self) -> float:
        return self.candidate_production - self.current_production

    @property
    def forgetting(self) -> float:
        return self.current_reference - self.candidate_reference

    def to_json(self) -> dict:
        return {**asdict(self), "gain": self.gain, "forgetting": self.forgetting}


@dataclass(frozen=True)
class JobGate:
    """The gate's verdict as the job records it: :class:`GateResult` (its fields,
    ``gain`` and ``forgetting``) plus what the guarded training reported. Also the registry's
    ``meta.gate`` (as JSON)."""

    promote: bool | None = None
    reason: str | None = None
    candidate_production: float | None = None
    current_production: float | None = None
    candidate_reference: float | None = None
    current_reference: float | None = None
    production_rows: int | None = None
    reference_rows: int | None = None
    wise_alpha: float | None = None
    production: SliceTest | None = None
    reference: SliceTest | None = None
    alpha: float | None = None
    gain: float | None = None
    forgetting: float | None = None
    guard: str | None = None            # the last guard trip's message, if any
    weight_drift: float | None = None
    phases: list[dict[str, Any]] | None = None
    train_seconds: float | None = None
    recipe: dict[str, Any] | None = None  # retrain.recipe.FineTuneReport.to_json()

    @classmethod
    def of(cls, gate: GateResult, *, guard: str | None, weight_drift: float, phases: list[dict[str, Any]],
           train_seconds: float, recipe: dict[str, Any]) -> "JobGate":
        return cls(**{k: getattr(gate, k) for k in gate.to_json()}, guard=guard, weight_drift=weight_drift,
                   phases=phases, train_seconds=train_seconds, recipe=recipe)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobGate":
        return _from_json(cls, data, {"production": SliceTest, "reference": SliceTest})


@dataclass(frozen=True)
class JobStrategy:
    """The strategy the job chose (retrain.strategy.StrategyPlan's fields) and the evidence it
    chose it on."""

    name: str | None = None
    reason: str | None = None
    layer_decay: float | None = None
    l2sp_scale: float | None = None
    adapt_batchnorm: bool | None = None
    min_replay_fraction: float | None = None
    domain_gap: float | None = None         # the gap that chose it (ShiftSummary.strategy_domain_gap)
    mode: str | None = None                 # "images" | "features"
    onset: float | None = None
    rows_before_onset: int | None = None
    rows_after_onset: int | None = None
    job_domain_gap: float | None = None
    monitor_domain_gap: float | None = None
    monitor_mmd: float | None = None
    head_only: str | None = None            # why only the head trains, when it does

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobStrategy":
        return _from_json(cls, data)


_TYPED = {"data": DataSummary, "shift": ShiftSummary, "reference": ReferenceSummary}


@dataclass(frozen=True)
class JobResult:
    job_id: str
    outcome: str                    # "promoted" | "rejected" | "failed" | "dropped" (by the daemon)
    reason: str
    candidate_version: str | None
    current_version: str | None
    gate: JobGate | None            # when the gate ran ("gate": {} on disk reads as None)
    strategy: JobStrategy | None    # when a strategy was chosen
    started_at: float | None
    finished_at: float
    labelled_rows: int | None
    # Added later: result.json files written before them read back as None.
    data: DataSummary | None = None
    shift: ShiftSummary | None = None
    reference: ReferenceSummary | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobResult":
        values = {f.name: data.get(f.name) for f in fields(cls)}
        for name, kind in _TYPED.items():
            if isinstance(values[name], dict):
                values[name] = _from_json(kind, values[name])
        gate, strategy = values["gate"], values["strategy"]
        values["gate"] = JobGate.from_json(gate) if isinstance(gate, dict) and gate else None
        values["strategy"] = JobStrategy.from_json(strategy) if isinstance(strategy, dict) and strategy else None
        return cls(**values)
