"""One retrain, end to end: data -> strategy -> guarded recipe -> gate -> registry -> reference.

:func:`run_job` appends events to ``DIR/progress.jsonl`` and writes ``DIR/result.json`` (see
retrain.jobdir). The daemon passes what it knows about the breach: its onset (event time of the
start of the first breaching window) and its own shift measurement. Its process is
``python -m monitor.cli.job`` (the launchers start it): loading the whole config file belongs to
the top layer, so this module reads only what a retrain needs of it (``retrain.config.JobSettings``).
Under torchrun (``WORLD_SIZE`` > 1) every rank trains; rank 0 alone gates and writes.
"""

from __future__ import annotations

import dataclasses
import copy
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from retrain.config import JobSettings
from retrain.data import NotEnoughData, RetrainData, load_training_data
from retrain.gate import GateResult, choose_wise_alpha, evaluate_gate, too_small
from retrain.hooks import run_on_promote
from retrain.jobdir import ProgressLog, read_progress, read_result, write_result
from retrain.model import predict
from retrain.recipe import fine_tune, resolve_device, snapshot
from retrain.registry import ModelMeta, ModelVersion, Registry
from retrain.result import JobGate, JobResult, JobStrategy, ReferenceSummary, ShiftSummary
from retrain.strategy import StrategyPlan, choose_strategy, domain_gap

__all__ = ["run_job", "read_progress", "read_result", "JobResult"]

log = logging.getLogger(__name__)


# A monitor reference from fewer rows makes its own drift tests noisy; below this many held-out
# production rows the newest training rows top it up (their features sit a little tighter).
MIN_REFERENCE_ROWS = 200
# Rows per side for the job's domain gap: a share of dims with |mean difference| > 0.5 sd is
# stable well before 1000 rows, and a forward pass over every row would cost as much as an epoch.
GAP_ROWS = 1000


def _spread(x: torch.Tensor, k: int) -> torch.Tensor:
    """At most ``k`` rows of ``x``, evenly spaced (deterministic, keeps the time spread)."""
    return x if len(x) <= k else x[torch.linspace(0, len(x) - 1, k).long()]


def _measure_gap(data: RetrainData, model: torch.nn.Module, device: torch.device) -> tuple[float, int]:
    """The job's own domain gap: the rows it trains on (after the onset, when given) against the
    replay rows, through the current model's backbone. Returns (gap, production rows measured)."""
    t = data.training
    ref, prod = _spread(t.replay.x, GAP_ROWS), _spread(t.train.x, GAP_ROWS)
    if t.features_only:
        return domain_gap(ref.numpy(), prod.numpy()), len(prod)
    return domain_gap(predict(model, ref, device=device)[0], predict(model, prod, device=device)[0]), len(prod)


def _plan(config: JobSettings, data: RetrainData, model: torch.nn.Module, device: torch.device,
          monitor_gap: float | None, monitor_mmd: float | None) -> tuple[StrategyPlan, ShiftSummary]:
    hyper = config.retrain.hyper
    job_gap, gap_rows = _measure_gap(data, model, device)
    # The monitor's share of shifted dimensions, when the daemon passes it, is the signal the
    # strategy thresholds stand for; the job's measurement is the stand-in otherwise.
    gap, source = (monitor_gap, "monitor") if monitor_gap is not None else (job_gap, "job")
    shift = ShiftSummary(monitor_domain_gap=monitor_gap, monitor_mmd=monitor_mmd, job_domain_gap=job_gap,
                         job_domain_gap_rows=gap_rows, strategy_domain_gap=gap, strategy_domain_gap_from=source)
    others = ([f"job {job_gap:.2f} on {gap_rows} training rows"] if source == "monitor" else
              [f"measured by the job on {gap_rows} training rows"])
    if monitor_mmd is not None:
        others.append(f"monitor MMD^2 {monitor_mmd:.3g}")
    gap_text = f"gap from the {source} ({'; '.join(others)})"
    head_only = ("features mode (inputs not retained): only the head can train" if data.mode == "features"
                 else data.head_only_reason)
    if head_only is not None:
        plan = choose_strategy(data.labelled_rows, gap, requested="head", layer_decay=hyper.layer_decay)
        reason = f"{head_only}; {data.labelled_rows} labelled rows, domain gap {gap:.2f}, {gap_text}"
        return dataclasses.replace(plan, reason=reason), shift
    plan = choose_strategy(data.labelled_rows, gap, requested=config.retrain.strategy, layer_decay=hyper.layer_decay)
    return dataclasses.replace(plan, reason=f"{plan.reason}, {gap_text}"), shift


def _save_reference(config: JobSettings, model: torch.nn.Module, version: str, data: RetrainData,
                    device: torch.device) -> ReferenceSummary:
    """The monitor's reference for the new version: what it will see, as it will see it.

    Its own features and probabilities on the newest production inputs, one row per distinct
    input: held-out ones (gate and validation slices, never trained on) first, topped up to
    MIN_REFERENCE_ROWS with the newest training inputs; accuracy and the estimator's calibration
    from the held-out labelled rows only. Replay (source) rows stay out: a reference that mixes in
    another distribution than the stream it watches makes the MMD tests alarm on unchanged
    traffic, and so does one that counts an input twice (it looks tighter than fresh traffic).
    """
    from monitor.engine.reference import build_reference, save_reference

    rows = data.monitor_rows
    total = max(data.monitor_heldout, min(MIN_REFERENCE_ROWS, len(rows)))
    x, labels = rows.x[:total], rows.y[:total].clone()
    top_up = total - data.monitor_heldout
    labels[data.monitor_heldout:] = -1  # trained on: kept out of accuracy and calibration
    if data.mode == "features":
        with torch.no_grad():
            feats = x.numpy()
            probs = torch.softmax(model.get_classifier()(x.to(device)).float(), 1).cpu().numpy()
    else:
        feats, probs = predict(model, x, device=device)
    mmd = config.monitor.signals.mmd  # the projection the monitor's config asks for
    heldout = data.monitor_heldout
    ref = build_reference(model_version=version, features=feats.astype(np.float32), probs=probs.astype(np.float32),
                          labels=labels.numpy(), seed=config.retrain.hyper.seed,
                          source=f"retrain: {version} on {heldout} held-out + {top_up} training production rows",
                          projection=mmd.projection, projection_dims=mmd.projection_dims)
    path = save_reference(ref, config.monitor.reference_dir)
    return ReferenceSummary(model_version=version, heldout_rows=heldout, training_rows=top_up,
                            labelled_rows=ref.labelled_rows, accuracy=ref.accuracy, path=str(path))


def _distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def run_job(config: JobSettings, job_dir: Path, *, reason: str, progress: Callable[[dict], None] | None = None,
            domain_gap_value: float | None = None, onset: float | None = None, mmd_value: float | None = None,
            clock: Callable[[], float] = time.time) -> JobResult:
    """Run one retrain in this process; never raises for job failures (outcome "failed" instead).

    ``onset``: event time (epoch s) the breach began: only rows predicted after it train and
    judge. ``domain_gap_value`` / ``mmd_value``: the monitor's share of shifted feature dimensions
    and batch MMD^2 on the breaching window (recorded; the share chooses the strategy). Rank 0
    writes progress.jsonl, result.json, the registry and the reference; other DDP ranks only train
    and return their (unwritten) result.
    """
    job_dir = Path(job_dir)
    rc = config.retrain
    started = clock()
    rank, world, device = _distributed(rc.device)
    emit = ProgressLog(job_dir, callback=progress, clock=clock) if rank == 0 else (lambda event: None)
    emit({"event": "started", "reason": reason, "job_id": job_dir.name, "world_size": world, "device": str(device)})
    registry = Registry(rc.registry_dir, clock=clock)
    state: dict = {"current": None, "candidate": None, "gate": None, "strategy": None, "rows": 0, "data": None,
                   "shift": None, "reference": None}

    def finish(outcome: str, why: str) -> JobResult:
        result = JobResult(job_id=job_dir.name, outcome=outcome, reason=why, candidate_version=state["candidate"],
                           current_version=state["current"], gate=state["gate"], strategy=state["strategy"],
                           started_at=started, finished_at=clock(), labelled_rows=state["rows"], data=state["data"],
                           shift=state["shift"], reference=state["reference"])
        if rank == 0:
            emit({"event": outcome, "message": why, "candidate_version": state["candidate"]})
            write_result(job_dir, result)
        return result

    try:
        current_model, current = registry.load_model(device=device)
        state["current"] = current.version
        try:
            data = load_training_data(config, current.meta.data_config, num_classes=current.meta.num_classes,
                                      model_version=current.version, onset=onset)
        except NotEnoughData as exc:
            return finish("rejected", str(exc))
        state["rows"], state["data"] = data.labelled_rows, data.summary
        # Slices the gate could never judge: say so now rather than after the training.
        unjudgeable = too_small(rc.gate, production_rows=len(data.production_gate),
                                reference_rows=len(data.reference_gate))
        if unjudgeable:
            return finish("rejected", "; ".join(unjudgeable))
        plan, shift = _plan(config, data, current_model, device, domain_gap_value, mmd_value)
        state["shift"] = shift
        state["strategy"] = JobStrategy(**dataclasses.asdict(plan), domain_gap=shift.strategy_domain_gap,
                                        mode=data.mode, onset=onset, rows_before_onset=data.summary.rows_before_onset,
                                        rows_after_onset=data.summary.rows_after_onset,
                                        job_domain_gap=shift.job_domain_gap, monitor_domain_gap=domain_gap_value,
                                        monitor_mmd=mmd_value, head_only=data.head_only_reason)
        emit({"event": "phase", "phase": "plan", "message": f"strategy {plan.name}: {plan.reason}"})
        candidate = copy.deepcopy(current_model)
        start = snapshot(candidate)
        report = fine_tune(candidate, data.training, rc.hyper, plan, device=device, progress=emit,
                           anchor_data=data.training.replay)
        if rank != 0:
            return finish("rejected", "non-zero rank: rank 0 gates and records")
        gate = _gate(config, candidate, current_model, start, data, device)
        state["gate"] = JobGate.of(gate, guard=report.guard_message, weight_drift=report.weight_drift,
                                   phases=[p.__dict__ for p in report.phases], train_seconds=report.seconds,
                                   recipe=report.to_json())
        emit({"event": "gate", "message": gate.reason, **gate.to_json()})
        state["candidate"] = registry.add(candidate, _meta(config, current, plan, data, state["gate"].to_json(),
                                                              job_dir.name))
        if not gate.promote:
            return finish("rejected", report.outcome_reason("rejected", gate.reason))
        # reference first: the monitor must never find a CURRENT version it has no reference for
        state["reference"] = _save_reference(config, candidate, state["candidate"], data, device)
        registry.promote(state["candidate"])
        # the hand-off to serving (retrain.on_promote): logged and counted, never fails the job
        run_on_promote(config, event="promotion", version=state["candidate"], previous=state["current"],
                       by=f"retrain job {job_dir.name}")
        return finish("promoted", report.outcome_reason("promoted", gate.reason))
    except Exception as exc:  # one catch point per job: the daemon must get a result, not a traceback
        log.exception("retrain job %s failed", job_dir.name)
        return finish("failed", f"{type(exc).__name__}: {exc}")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _gate(config: JobSettings, candidate: torch.nn.Module, current: torch.nn.Module, start: dict, data: RetrainData,
          device: torch.device) -> GateResult:
    features_only = data.mode == "features"
    if config.retrain.hyper.wise_ft:
        return choose_wise_alpha(candidate, start, current, data.production_gate, data.reference_gate,
                                 config.retrain.gate, device, features_only=features_only)
    return evaluate_gate(candidate, current, data.production_gate, data.reference_gate, config.retrain.gate,
                         device, features_only=features_only)


def _meta(config: JobSettings, parent: ModelVersion, plan: StrategyPlan, data: RetrainData, gate: dict,
          job_id: str) -> ModelMeta:
    return ModelMeta(
        architecture=parent.meta.architecture, num_classes=parent.meta.num_classes,
        data_config=parent.meta.data_config, class_names=parent.meta.class_names, parent=parent.version,
        data_window=data.window, strategy=plan.name, strategy_reason=plan.reason,
        hyper={**config.retrain.hyper.__dict__, "layer_decay": plan.layer_decay}, gate=gate,
        source=f"retrain:{job_id}", data_config_source=f"inherited from {parent.version}",
    )
