"""A shortened `driftd demo`: real digits, real daemon, real retraining job, real promotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.demo.report import timeline_lines, write_report
from monitor.demo.scenario import DemoSettings, run_demo


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_short_demo_detects_retrains_promotes_and_recovers(tmp_path: Path):
    said: list[str] = []
    settings = DemoSettings(
        workdir=tmp_path / "demo", seed=1, source_epochs=6, clean_ticks=12, after_promotion_ticks=4,
        retrain_epochs_head=4, retrain_epochs_finetune=3, max_seconds=600,
    )
    result = run_demo(settings, said.append)
    t = result.timeline

    assert t.retrain_outcome == "promoted", "\n".join(said)
    # The events happened, in the order the product promises.
    assert t.onset_time < t.first_alarm_time <= t.retrain_requested_time
    assert t.retrain_requested_time <= t.retrain_started_time < t.retrain_finished_time
    assert t.switch_time is not None and t.switch_time > t.retrain_started_time
    assert t.first_alarm_row >= t.onset_row
    # The promoted model beats the starting one on held-out shifted data and still knows the clean task.
    new, old = t.promoted_version, result.start_version
    assert result.shifted_accuracy[new] > result.shifted_accuracy[old] + 0.1
    assert result.clean_accuracy[new] >= result.clean_accuracy[old] - 0.03
    assert result.final_version == new
    # The monitor switched to the new version's reference: windows of it were computed.
    assert {w["model_version"] for w in result.windows} == {old, new}

    files = write_report(result)
    summary = json.loads(files["summary"].read_text())
    assert summary["timeline"]["promoted_version"] == new
    assert files["signals"].stat().st_size > 10_000 and files["accuracy"].stat().st_size > 10_000
    assert any("first alarm" in line and "after onset" in line for line in timeline_lines(result))


def test_demo_refuses_a_non_empty_workdir(tmp_path: Path):
    from monitor.errors import DriftdError

    (tmp_path / "something").write_text("x")
    with pytest.raises(DriftdError, match="not empty"):
        run_demo(DemoSettings(workdir=tmp_path), lambda _: None)
