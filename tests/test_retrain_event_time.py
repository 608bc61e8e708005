"""The job on the stream's own clock: lookback from the newest prediction, rows chosen by their
prediction time, and the breach onset the daemon passes (rows after it train and judge)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from monitor.cli.job import main
from monitor.config import load_config
from retrain.data import NotEnoughData, load_training_data
from retrain.job import _measure_gap, run_job
from retrain.launch.ddp import torchrun_command
from retrain.launch.job_args import Breach
from retrain.launch.local import job_command
from retrain.jobdir import read_result
from retrain.result import JobGate, JobResult, JobStrategy
from retrain_helpers import NOW, World, build_world, digits, source_checkpoint

DAY = 86400.0
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return source_checkpoint(tmp_path_factory.getbasetemp(), digits())


def _load(world: World, onset: float | None = None):
    current = world.registry.current()
    return load_training_data(load_config(world.config_path), current.meta.data_config, num_classes=10,
                              model_version=current.version, onset=onset)


def test_logs_stamped_70_days_ago_are_recent_by_their_own_clock(tmp_path: Path, checkpoint: Path) -> None:
    """Predictions 70 days old, labels given 70 days after them: the 7-day lookback counts from the
    newest prediction, on prediction time, so every row is in; rows 8 days older than it are not."""
    d = digits(n_production=300)
    old = NOW - 70 * DAY
    times = old - 3600 + np.arange(300) * 10.0
    times[:40] -= 8 * DAY  # a week and a day before the rest
    world = build_world(tmp_path, checkpoint, d, timestamps=times, labeled_at=NOW)
    data = _load(world)
    assert data.labelled_rows == 260
    assert data.summary.until == pytest.approx(times.max()) and data.summary.since == pytest.approx(times.max() - 7 * DAY)
    assert data.summary.rows_after_onset == 260 and data.summary.onset is None


def test_the_onset_selects_the_shifted_rows_and_the_gap_is_measured_on_them(tmp_path: Path, checkpoint: Path) -> None:
    world = build_world(tmp_path, checkpoint, digits(), clean_rows=300)  # rows 300.. are shifted
    onset = NOW - 3600 + 300 * 0.1
    mixed, after = _load(world), _load(world, onset=onset)
    assert (after.summary.rows_before_onset, after.summary.rows_after_onset) == (300, 297)
    assert after.labelled_rows == 297 and after.summary.rows_used_after_onset == 297
    assert after.summary.rows_used_before_onset == 0 and after.head_only_reason is None
    model, _ = world.registry.load_model()
    gap_mixed, _ = _measure_gap(mixed, model, CPU)
    gap_after, rows = _measure_gap(after, model, CPU)
    assert rows == after.summary.train_rows
    assert gap_after > 0.5 and gap_after > gap_mixed + 0.2, (gap_after, gap_mixed)


@pytest.mark.slow
def test_the_cli_passes_onset_and_the_monitors_shift_into_the_plan(tmp_path: Path, checkpoint: Path) -> None:
    world = build_world(tmp_path, checkpoint, digits(), clean_rows=300)
    onset = NOW - 3600 + 300 * 0.1
    argv = job_command(str(world.config_path), tmp_path / "job", reason="accuracy_drop",
                       breach=Breach(onset=onset, domain_gap=0.61, mmd=0.12))[2:]  # drop "python -m"
    assert main(argv[1:]) == 0
    result = read_result(tmp_path / "job")
    assert result is not None and result.outcome in ("promoted", "rejected"), result
    plan = result.strategy
    assert plan.onset == onset and plan.rows_before_onset == 300 and plan.rows_after_onset == 297
    assert plan.domain_gap == 0.61 and plan.monitor_domain_gap == 0.61 and plan.monitor_mmd == 0.12
    assert plan.name == "full" and "gap from the monitor (job " in plan.reason
    assert result.shift is not None and result.shift.strategy_domain_gap_from == "monitor"
    assert result.shift.job_domain_gap == plan.job_domain_gap > 0.5
    assert result.data is not None and result.data.onset == onset


@pytest.mark.slow
def test_too_few_rows_after_the_onset_train_the_head_only_and_say_so(tmp_path: Path, checkpoint: Path) -> None:
    world = build_world(tmp_path, checkpoint, digits(), clean_rows=537, retrain={"gate": {"min_rows": 10}})
    onset = NOW - 3600 + 537 * 0.1
    result = run_job(load_config(world.config_path), tmp_path / "job", reason="estimated_accuracy_drop",
                     onset=onset, clock=lambda: NOW)
    assert result.outcome in ("promoted", "rejected"), result.reason
    why = "only 60 labelled rows after the breach onset"
    assert result.strategy.name == "head" and result.strategy.reason.startswith(why)
    assert result.data.head_only_reason.startswith(why) and result.strategy.head_only.startswith(why)
    assert result.data.rows_after_onset == 60 and result.data.production_gate_rows == 15
    assert read_result(tmp_path / "job") == result  # the typed summaries round-trip through result.json


def test_no_row_after_the_onset_is_a_rejection_that_says_so(tmp_path: Path, checkpoint: Path) -> None:
    world = build_world(tmp_path, checkpoint, digits(n_production=120))
    with pytest.raises(NotEnoughData, match=r"0 labelled rows predicted after the breach onset .* \(120 before it"):
        _load(world, onset=NOW)
    result = run_job(load_config(world.config_path), tmp_path / "job", reason="x", onset=NOW, clock=lambda: NOW)
    assert result.outcome == "rejected" and "after the breach onset" in result.reason


def test_bad_breach_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--onset", "-5"], "expected epoch seconds"), (["--domain-gap", "1.5"], "in [0, 1]"),
                          (["--mmd", "nan"], "finite")):
        with pytest.raises(SystemExit) as exit_:
            main(["--config", "c.yaml", "--job-dir", str(tmp_path), *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="domain_gap must be a share"):
        Breach(domain_gap=2.0)


def test_every_launcher_passes_the_breach(tmp_path: Path) -> None:
    breach = Breach(onset=1_790_000_123.25, domain_gap=0.43)
    tail = ["--onset", "1790000123.25", "--domain-gap", "0.43"]
    assert job_command("c.yaml", tmp_path, reason="r", breach=breach, python="py")[-4:] == tail
    assert torchrun_command("c.yaml", tmp_path, reason="r", nproc_per_node=2, breach=breach, python="py")[-4:] == tail
    assert "--onset" not in job_command("c.yaml", tmp_path, reason="r", python="py")
    from monitor.config import parse_config
    from retrain.launch.kubernetes import render_job

    config = parse_config({"logs": {"inference": "/data/logs"}, "state_dir": "/var/lib/driftd/state",
                           "reference_dir": "/var/lib/driftd/reference",
                           "retrain": {"registry_dir": "/var/lib/driftd/registry", "launcher": "kubernetes",
                                       "kubernetes": {"image": "driftd:1", "state_pvc": "state"}}},
                          source="/etc/driftd/driftd.yaml", base=tmp_path)
    job = render_job(config, job_id="j1", reason="r", breach=breach, job_dir=PurePosixPath("/var/lib/driftd/retrain/j1"))
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-4:] == tail


def test_result_files_written_before_the_typed_summaries_still_read(tmp_path: Path) -> None:
    old = {"job_id": "j0", "outcome": "promoted", "reason": "promote: ...", "candidate_version": "v2",
           "current_version": "v1", "gate": {"promote": True, "gain": 0.1}, "strategy": {"name": "head"},
           "started_at": 1.0, "finished_at": 2.0, "labelled_rows": 300}
    (tmp_path / "j0").mkdir()
    (tmp_path / "j0" / "result.json").write_text(json.dumps(old))
    result = read_result(tmp_path / "j0")
    assert result is not None and result.data is None and result.shift is None and result.reference is None
    assert result.gate == JobGate(promote=True, gain=0.1) and result.strategy == JobStrategy(name="head")
    failed = {"job_id": "j1", "outcome": "failed", "reason": "killed", "candidate_version": None,
              "current_version": None, "gate": {}, "started_at": 1.0, "finished_at": 2.0}  # as the daemon writes it
    assert JobResult.from_json(failed).labelled_rows is None
