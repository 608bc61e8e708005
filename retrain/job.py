"""One retrain, end to end: data -> strategy -> guarded recipe -> gate -> registry -> reference.

``python -m retrain.job --config CONFIG --job-dir DIR [--reason TEXT] [--domain-gap X]``
appends events to ``DIR/progress.jsonl`` and writes ``DIR/result.json`` (see retrain.progress).
Exit 0 when it finished with "promoted" or "rejected", 1 on "failed", 2 on a bad config.
Under torchrun (``WORLD_SIZE`` > 1) every rank trains; rank 0 alone gates and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from monitor.config import Config, load_config
from monitor.errors import ConfigError
from retrain.data import NotEnoughData, RetrainData, load_training_data
from retrain.gate import GateResult, choose_wise_alpha, evaluate_gate
from retrain.model import predict
from retrain.progress import JobResult, ProgressLog, read_progress, read_result, write_result
from retrain.recipe import fine_tune, resolve_device, snapshot
from retrain.registry import ModelMeta, ModelVersion, Registry
from retrain.strategy import StrategyPlan, choose_strategy, domain_gap

__all__ = ["run_job", "read_progress", "read_result", "JobResult", "main"]

log = logging.getLogger(__name__)


def _plan(config: Config, data: RetrainData, model: torch.nn.Module, device: torch.device,
          gap: float | None) -> tuple[StrategyPlan, float]:
    hyper = config.retrain.hyper
    if gap is None:
        # Measured here when the caller has no monitor signal: how far production features moved.
        t = data.training
        if t.features_only:
            ref, prod = t.replay.x.numpy(), t.train.x.numpy()
        else:
            ref, prod = predict(model, t.replay.x, device=device)[0], predict(model, t.train.x, device=device)[0]
        gap = domain_gap(ref, prod)
    if data.mode == "features":
        plan = choose_strategy(data.labelled_rows, gap, requested="head", layer_decay=hyper.layer_decay)
        return dataclasses.replace(
            plan, reason="features mode (inputs not retained): only the head can train; " + plan.reason), gap
    return choose_strategy(data.labelled_rows, gap, requested=config.retrain.strategy,
                           layer_decay=hyper.layer_decay), gap


def _save_reference(config: Config, model: torch.nn.Module, version: str, data: RetrainData,
                    device: torch.device) -> Path:
    """The monitor's reference for the new version: its own features/probs on the source inputs."""
    from monitor.reference import build_reference, save_reference

    x = data.reference_all.x
    if data.mode == "features":
        with torch.no_grad():
            feats = x.numpy()
            probs = torch.softmax(model.get_classifier()(x.to(device)).float(), 1).cpu().numpy()
    else:
        feats, probs = predict(model, x, device=device)
    mmd = config.monitor.signals.mmd  # the projection the monitor's config asks for
    ref = build_reference(model_version=version, features=feats.astype(np.float32), probs=probs.astype(np.float32),
                          labels=data.reference_all.y.numpy(), seed=config.retrain.hyper.seed,
                          source=f"retrain {config.retrain.replay_logs}", projection=mmd.projection,
                          projection_dims=mmd.projection_dims)
    return save_reference(ref, config.monitor.reference_dir)


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


def run_job(config: Config, job_dir: Path, *, reason: str, progress: Callable[[dict], None] | None = None,
            domain_gap_value: float | None = None, clock: Callable[[], float] = time.time) -> JobResult:
    """Run one retrain in this process; never raises for job failures (outcome "failed" instead).

    Rank 0 writes progress.jsonl, result.json, the registry and the reference; other DDP ranks
    only train and return their (unwritten) result.
    """
    job_dir = Path(job_dir)
    rc = config.retrain
    started = clock()
    rank, world, device = _distributed(rc.device)
    emit = ProgressLog(job_dir, callback=progress, clock=clock) if rank == 0 else (lambda event: None)
    emit({"event": "started", "reason": reason, "job_id": job_dir.name, "world_size": world, "device": str(device)})
    registry = Registry(rc.registry_dir, clock=clock)
    state: dict = {"current": None, "candidate": None, "gate": None, "strategy": None, "rows": 0}

    def finish(outcome: str, why: str) -> JobResult:
        result = JobResult(job_id=job_dir.name, outcome=outcome, reason=why, candidate_version=state["candidate"],
                           current_version=state["current"], gate=state["gate"], strategy=state["strategy"],
                           started_at=started, finished_at=clock(), labelled_rows=state["rows"])
        if rank == 0:
            emit({"event": outcome, "message": why, "candidate_version": state["candidate"]})
            write_result(job_dir, result)
        return result

    try:
        current_model, current = registry.load_model(device=device)
        state["current"] = current.version
        try:
            data = load_training_data(config, current.meta.data_config, num_classes=current.meta.num_classes,
                                      now=clock(), model_version=current.version)
        except NotEnoughData as exc:
            return finish("rejected", str(exc))
        state["rows"] = data.labelled_rows
        plan, gap = _plan(config, data, current_model, device, domain_gap_value)
        state["strategy"] = {**dataclasses.asdict(plan), "domain_gap": gap, "mode": data.mode}
        emit({"event": "phase", "phase": "plan", "message": f"strategy {plan.name}: {plan.reason}"})
        candidate = copy.deepcopy(current_model)
        start = snapshot(candidate)
        report = fine_tune(candidate, data.training, rc.hyper, plan, device=device, progress=emit,
                           anchor_data=data.training.replay)
        if rank != 0:
            return finish("rejected", "non-zero rank: rank 0 gates and records")
        gate = _gate(config, candidate, current_model, start, data, device)
        state["gate"] = {**gate.to_json(), "guard": report.guard_message, "weight_drift": report.weight_drift,
                         "phases": [p.__dict__ for p in report.phases], "train_seconds": report.seconds,
                         "recipe": report.to_json()}
        emit({"event": "gate", "message": gate.reason, **gate.to_json()})
        state["candidate"] = registry.add(candidate, _meta(config, current, plan, data, state["gate"], job_dir.name))
        if not gate.promote:
            return finish("rejected", report.outcome_reason("rejected", gate.reason))
        # reference first: the monitor must never find a CURRENT version it has no reference for
        _save_reference(config, candidate, state["candidate"], data, device)
        registry.promote(state["candidate"])
        return finish("promoted", report.outcome_reason("promoted", gate.reason))
    except Exception as exc:  # one catch point per job: the daemon must get a result, not a traceback
        log.exception("retrain job %s failed", job_dir.name)
        return finish("failed", f"{type(exc).__name__}: {exc}")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _gate(config: Config, candidate: torch.nn.Module, current: torch.nn.Module, start: dict, data: RetrainData,
          device: torch.device) -> GateResult:
    features_only = data.mode == "features"
    if config.retrain.hyper.wise_ft:
        return choose_wise_alpha(candidate, start, current, data.production_gate, data.reference_gate,
                                 config.retrain.gate, device, features_only=features_only)
    return evaluate_gate(candidate, current, data.production_gate, data.reference_gate, config.retrain.gate,
                         device, features_only=features_only)


def _meta(config: Config, parent: ModelVersion, plan: StrategyPlan, data: RetrainData, gate: dict,
          job_id: str) -> ModelMeta:
    return ModelMeta(
        architecture=parent.meta.architecture, num_classes=parent.meta.num_classes,
        data_config=parent.meta.data_config, class_names=parent.meta.class_names, parent=parent.version,
        data_window=data.window, strategy=plan.name, strategy_reason=plan.reason,
        hyper={**config.retrain.hyper.__dict__, "layer_decay": plan.layer_decay}, gate=gate,
        source=f"retrain:{job_id}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m retrain.job", description="Run one guarded retrain and record the outcome.",
        epilog="example: python -m retrain.job --config driftd.yaml --job-dir /var/lib/driftd/retrain/j1 "
               "--reason 'accuracy below 0.8'")
    parser.add_argument("--config", required=True, help="driftd config file (YAML or TOML)")
    parser.add_argument("--job-dir", required=True, type=Path, help="where progress.jsonl and result.json go")
    parser.add_argument("--reason", default="manual", help="why this retrain runs (recorded)")
    parser.add_argument("--domain-gap", type=float, default=None,
                        help="the monitor's shift measure in [0, 1] (default: measured by the job)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"retrain.job: error: {exc}", file=sys.stderr)
        return 2
    result = run_job(config, args.job_dir, reason=args.reason, domain_gap_value=args.domain_gap)
    return 0 if result.outcome in ("promoted", "rejected") else 1


if __name__ == "__main__":
    sys.exit(main())
