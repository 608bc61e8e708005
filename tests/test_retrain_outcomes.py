"""A job whose fine-tune phase is thrown away says so in its result, progress and log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from monitor.config import load_config
from retrain.job import read_progress, run_job
from retrain_helpers import NOW, build_world, digits, source_checkpoint


@pytest.mark.slow
def test_discarded_fine_tune_is_reported_as_head_only(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    torch.set_num_threads(1)
    d = digits()
    hyper = {"epochs_head": 4, "epochs_finetune": 2, "batch_size": 32, "lr_backbone": 10.0, "max_backoffs": 0}
    world = build_world(tmp_path, source_checkpoint(tmp_path_factory.getbasetemp(), d), d, n_production=300,
                        retrain={"strategy": "top_blocks", "hyper": hyper})
    with caplog.at_level(logging.WARNING, logger="retrain.recipe"):
        result = run_job(load_config(world.config_path), tmp_path / "job", reason="test", clock=lambda: NOW)
    assert result.outcome in ("promoted", "rejected")
    assert result.reason.startswith(f"{result.outcome} head-only: fine-tuning did not improve validation loss (")
    recipe = result.gate.recipe
    assert len(recipe["trips"]) == 1 and "attempt 1 at lr 10" in recipe["trips"][0] and not recipe["finetune_kept"]
    events = read_progress(tmp_path / "job")
    assert any(e["event"] == "guard" for e in events)
    assert events[-1]["message"] == result.reason
    assert any(e["event"] == "phase" and e["phase"] == "batchnorm" and "channels" in e for e in events)
    assert any("retrain guard" in r.getMessage() for r in caplog.records)
    assert any("kept the head-phase weights" in r.getMessage() for r in caplog.records)
