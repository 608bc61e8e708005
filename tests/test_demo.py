"""`driftd demo` end to end beside a CPU hog: real digits, real daemon, real retraining job, real promotion.

The demo has no wall-clock budget of its own (it waits on the daemon's progress), so a busy
host makes it slower, never wrong: this test makes the host busy on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from monitor.demo.narration import gate_lines, progress_line
from monitor.demo.report import timeline_lines, write_report
from monitor.demo.scenario import DemoSettings, run_demo


@pytest.fixture
def cpu_hog():
    """One process spinning on a core for the test's duration: the load that made torch's default
    thread count 40x slower and stranded the retrain past a fixed traffic budget (issue 14)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait()


def _rows(directory: Path) -> int:
    return pads.dataset(str(directory), format="parquet").count_rows()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a safety net only: the demo itself stops at time_limit_seconds and says so
def test_demo_beside_a_cpu_hog_detects_retrains_promotes_and_recovers(
        tmp_path: Path, cpu_hog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the demo and its retrain job measure their threads
    said: list[str] = []
    settings = DemoSettings(
        workdir=tmp_path / "demo", seed=1, source_epochs=6, clean_ticks=12, after_ticks=30,  # 10 windows of v2
        retrain_epochs_head=4, retrain_epochs_finetune=3,
    )
    result = run_demo(settings, said.append)
    t = result.timeline
    log = "\n".join(said)
    assert cpu_hog.poll() is None, "the hog must have run throughout"
    assert t.retrain_outcome == "promoted", log
    assert not t.time_limit_hit and t.stop_reason.startswith(f"{t.promoted_version} served"), log

    # The events happened in the order the product promises, in rows served and in time.
    marks = [t.onset, t.first_alarm, t.retrain_requested, t.retrain_started, t.retrain_finished]
    assert all(m is not None for m in marks), log
    assert [m.row for m in marks] == sorted(m.row for m in marks)
    assert [m.time for m in marks] == sorted(m.time for m in marks)
    assert t.onset.row == settings.clean_ticks * settings.rows_per_tick
    assert t.switch is not None and t.switch.time > t.retrain_started.time
    # The retrain's progress was narrated while the user waited, and its gate figures printed.
    assert any("finetune epoch 1/3" in line for line in said), log
    assert any("gate: recent production data: accuracy" in line for line in said), log
    assert any("gate: source data (forgetting)" in line for line in said), log

    # The promoted model beats the starting one on held-out shifted data and still knows the clean task.
    new, old = t.promoted_version, result.start_version
    assert result.shifted_accuracy[new] > result.shifted_accuracy[old] + 0.1
    assert result.clean_accuracy[new] >= result.clean_accuracy[old] - 0.03
    assert result.final_version == new
    # The monitor switched to the new version's reference: windows of it were computed.
    assert {w["model_version"] for w in result.windows} == {old, new}
    # ... and that reference describes what the new version sees: over 10 windows of the same
    # (shifted) traffic after the switch, no online or batch MMD alarm on it, and v1 was retired.
    served_after = [w for w in result.windows if w["model_version"] == new]
    assert len(served_after) >= 10, len(served_after)
    assert not any(w["online"]["alarm"] for w in served_after)
    daemon_log = (settings.workdir / "daemon.log").read_text()
    assert f"model_version {old} is no longer served (CURRENT is {new}): cleared its alarms" in daemon_log
    for rule in ("online_mmd_alarm", "mmd_p_value"):
        assert f"rule {rule}: " not in "".join(l for l in daemon_log.splitlines(True) if f"model_version {new}" in l)

    files = write_report(result)
    summary = json.loads(files["summary"].read_text())
    workdir = settings.workdir
    # Counts agree with what is on disk and with driftd's own counters (rows_served once said 40
    # while the logs held 11,400).
    assert summary["rows_served"] == _rows(workdir / "logs" / "inference") == result.rows_served
    assert summary["labels_written"] == _rows(workdir / "logs" / "labels") == summary["rows_served"]
    assert summary["rows_ingested"] == summary["rows_served"]
    assert sum(summary["rows_by_version"].values()) == summary["rows_served"]
    assert set(summary["rows_by_version"]) == {old, new}
    assert summary["windows"] == {v: sum(w["model_version"] == v for w in result.windows) for v in (old, new)}
    assert (summary["outcome"], summary["promoted_version"], summary["final_version"]) == ("promoted", new, new)
    assert summary["events"]["onset"]["row"] == t.onset.row
    assert summary["events"]["switch"]["row"] == t.switch.row
    assert summary["detection"]["rows_after_onset"] == t.first_alarm.row - t.onset.row
    # The gate figures are the job's own record, not a retelling.
    job_result = json.loads((workdir / "state" / "retrain" / t.retrain_job / "result.json").read_text())
    assert summary["retrain"]["gate"] == job_result["gate"]
    assert summary["retrain"]["message"] == job_result["reason"]
    assert summary["wall_seconds"]["total"] > summary["wall_seconds"]["traffic"] > 0
    assert summary["source_training"]["threads"][0]["source"] == "measured"
    job_log = (workdir / "state" / "retrain" / t.retrain_job / "job.log").read_text()
    assert "retrain threads: " in job_log and "measured per" in job_log  # the job measured its own

    from PIL import Image

    for name in ("signals", "accuracy"):
        with Image.open(files[name]) as png:
            assert png.format == "PNG" and png.width >= 1000 and png.height >= 500
    lines = timeline_lines(result)
    assert any(line.strip().startswith("first alarm") and "after the onset" in line for line in lines)
    assert any("gain" in line and "needs >=" in line for line in lines)


def test_demo_refuses_a_non_empty_workdir(tmp_path: Path) -> None:
    from monitor.errors import DriftdError

    (tmp_path / "something").write_text("x")
    with pytest.raises(DriftdError, match="not empty"):
        run_demo(DemoSettings(workdir=tmp_path), lambda _: None)


def test_the_gate_is_reported_in_its_own_words_and_figures() -> None:
    gate = {"promote": False, "current_production": 0.70, "candidate_production": 0.90, "production_rows": 341,
            "current_reference": 0.978, "candidate_reference": 0.957, "reference_rows": 93,
            "reason": "reference accuracy dropped 0.021 > max_forgetting 0.02: keeping current model"}
    lines = gate_lines(gate, {"min_gain": 0.02, "max_forgetting": 0.02})
    assert lines[0] == "recent production data: accuracy 0.700 -> 0.900, gain +0.200 (needs >= +0.020) on 341 held-out rows"
    assert lines[1] == "source data (forgetting): accuracy 0.978 -> 0.957, drop +0.021 (allowed <= 0.020) on 93 held-out rows"
    assert lines[-1] == f"verdict: {gate['reason']}"
    # A gate that reports other figures (or fewer) is quoted, never filled in.
    assert gate_lines({"reason": "promote: lower confidence bound +0.05"}, {}) == [
        "verdict: promote: lower confidence bound +0.05"]


def test_progress_events_read_as_sentences() -> None:
    epochs = {"head": 6, "finetune": 6}
    line = progress_line({"event": "epoch", "phase": "finetune", "epoch": 2, "val_loss": 0.2301,
                          "train_loss": 0.0815, "grad_norm": 3.5, "weight_drift": 1.18}, epochs)
    assert line == ("finetune epoch 2/6, validation loss 0.230, train loss 0.082, max grad norm 3.500, "
                    "weight drift 1.180")
    assert progress_line({"event": "guard", "message": "gradient spike"}, epochs) == "guard: gradient spike"
    assert progress_line({"event": "promoted"}, epochs) is None


def test_the_demo_names_its_time_limit_and_the_gates_verdict() -> None:
    from monitor.cli.demo import outcome_message
    from monitor.demo.timeline import Mark, Timeline

    stopped = Timeline(time_limit_hit=True, retrain_requested=Mark(1.0, 900),
                       stop_reason="time limit: 1800 s of traffic passed and the retrain had not finished")
    message = outcome_message(stopped)
    assert message.startswith("the demo stopped at its time limit: time limit: 1800 s of traffic passed and "
                              "the retrain had not finished")
    assert "--time-limit" in message and "re-run at the daemon's next start" in message
    rejected = Timeline(retrain_outcome="rejected", retrain_message="reference accuracy dropped 0.021 > max_forgetting 0.02")
    assert "the retrain was rejected: reference accuracy dropped 0.021 > max_forgetting 0.02" in outcome_message(rejected)
    served = Timeline(retrain_outcome="promoted", promoted_version="v2", switch=Mark(2.0, 3000))
    assert outcome_message(served) is None
