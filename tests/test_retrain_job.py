"""The retrain job end to end on disk: SQLite labelled rows, PNG inputs, replay Parquet logs,
registry, monitor reference; plus the subprocess launcher and the data guards."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from monitor.cli.job import main
from monitor.config import load_config
from monitor.engine.reference import load_references
from retrain.data import DataError, resolve_input
from retrain.job import read_progress, read_result, run_job
from retrain.launch.local import launch_local
from retrain_helpers import NOW, build_world, digits, source_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return source_checkpoint(tmp_path_factory.getbasetemp(), digits())


@pytest.mark.slow
def test_job_promotes_a_better_model_and_writes_its_reference(tmp_path: Path, checkpoint: Path) -> None:
    world = build_world(tmp_path, checkpoint, digits())
    events: list[dict] = []
    result = run_job(load_config(world.config_path), tmp_path / "job1", reason="accuracy fell",
                     progress=events.append, clock=lambda: NOW)
    assert result.outcome == "promoted", result.reason
    assert (result.current_version, result.candidate_version) == ("v1", "v2")
    assert result.strategy.name == "full" and result.strategy.mode == "images"
    assert result.gate.gain >= 0.02 and result.gate.forgetting <= 0.01
    assert world.registry.current().version == "v2" and world.registry.history() == ["v1", "v2"]
    meta = world.registry.get("v2").meta
    assert meta.parent == "v1" and meta.strategy == "full" and meta.gate["promote"] is True
    assert meta.data_window["rows"] == result.labelled_rows == 597
    ref = load_references(tmp_path / "reference")["v2"]
    assert ref.model_version == "v2"
    kinds = [e["event"] for e in read_progress(tmp_path / "job1")]
    assert kinds[0] == "started" and kinds[-1] == "promoted" and {"phase", "epoch", "gate"} <= set(kinds)
    assert [e["event"] for e in events] == kinds
    assert read_result(tmp_path / "job1") == result


@pytest.mark.slow
def test_features_mode_trains_the_head_on_logged_features(tmp_path: Path, checkpoint: Path) -> None:
    world = build_world(tmp_path, checkpoint, digits(), retrain={"mode": "features", "gate": {"min_gain": 0.05}})
    result = run_job(load_config(world.config_path), tmp_path / "job", reason="test", clock=lambda: NOW)
    assert result.strategy.mode == "features" and result.strategy.name == "head"
    assert result.outcome in ("promoted", "rejected") and result.gate is not None
    assert result.gate.candidate_production > result.gate.current_production


def test_too_few_labelled_rows_is_a_rejection_not_a_failure(tmp_path: Path, checkpoint: Path) -> None:
    world = build_world(tmp_path, checkpoint, digits(n_production=40), retrain={"min_labelled_rows": 100})
    result = run_job(load_config(world.config_path), tmp_path / "job", reason="test", clock=lambda: NOW)
    assert result.outcome == "rejected"
    assert "40 labelled rows" in result.reason and "min_labelled_rows (100)" in result.reason
    assert world.registry.current().version == "v1"


def test_missing_registry_model_fails_with_a_result(tmp_path: Path) -> None:
    config = tmp_path / "driftd.yaml"
    config.write_text(yaml.safe_dump({"logs": {"inference": "logs"}, "retrain": {"registry_dir": "empty"}}))
    assert main(["--config", str(config), "--job-dir", str(tmp_path / "job")]) == 1
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    assert result["outcome"] == "failed" and "no promoted model yet" in result["reason"]


def test_input_uri_traversal_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    (root / "a").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert resolve_input("a/x.png", root) == root.resolve() / "a" / "x.png"
    assert resolve_input(f"file://{root}/a/x.png", root) == root.resolve() / "a" / "x.png"
    for uri in ("../secret.png", "a/../../secret.png", str(tmp_path / "secret.png"), "link.png",
                f"file://{tmp_path}/secret.png"):
        with pytest.raises(DataError, match="outside retrain.input_root"):
            resolve_input(uri, root)
    with pytest.raises(DataError, match="scheme 's3' is not supported"):
        resolve_input("s3://bucket/x.png", root)


@pytest.mark.slow
def test_launch_local_runs_the_job_in_its_own_process(tmp_path: Path, checkpoint: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    build_world(tmp_path, checkpoint, digits(n_production=40), retrain={"min_labelled_rows": 100})
    monkeypatch.chdir(tmp_path)  # relative paths, as a user would type them
    job = launch_local("driftd.yaml", Path("job"), reason="from test")
    assert job.pid != os.getpid() and os.getpgid(job.pid) == job.pid  # own process group
    assert job.wait(120) == 0
    result = read_result(tmp_path / "job")
    assert result is not None and result.outcome == "rejected"
    assert (tmp_path / "job" / "job.log").exists()


def test_terminate_stops_a_running_job(tmp_path: Path) -> None:
    config = tmp_path / "driftd.yaml"
    config.write_text(yaml.safe_dump({"logs": {"inference": "logs"}}))
    job = launch_local(str(config), tmp_path / "job", reason="x", nproc_per_node=1)
    # the child is still importing torch: SIGTERM to its process group ends it
    assert job.terminate(grace_seconds=5) == -signal.SIGTERM
    assert job.poll() == -signal.SIGTERM


def test_features_mode_refuses_replay_features_of_another_backbone(tmp_path: Path) -> None:
    """Logged features belong to the backbone that produced them: replay rows of v1 cannot train v2's head."""
    import numpy as np

    from monitor.ingest.writer import LogWriter
    from retrain.data import read_replay

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=30).astype(np.float32)
    with LogWriter(tmp_path / "replay") as w:
        w.write_batch(request_id=[f"r{i}" for i in range(30)], timestamp=1_790_000_000.0, model_version="v1",
                      features=rng.normal(size=(30, 8)).astype(np.float32), probs=probs, label=probs.argmax(1))
    assert len(read_replay(str(tmp_path / "replay"), max_rows=30, num_classes=3, seed=0, features_of="v1")["label"])
    with pytest.raises(DataError, match="no labelled replay rows logged by model_version v2"):
        read_replay(str(tmp_path / "replay"), max_rows=30, num_classes=3, seed=0, features_of="v2")


@pytest.mark.slow
def test_grouped_rows_are_split_and_judged_by_group(tmp_path: Path, checkpoint: Path) -> None:
    """Files whose names differ only in the last digit are one group (say, photos of one
    product): a group never trains and judges, and the gate weighs each slice by its groups."""
    pattern = r"^((?:source|production)/[a-z]+-\d*)\d\.png$"
    world = build_world(tmp_path, checkpoint, digits(), retrain={"group_pattern": pattern})
    result = run_job(load_config(world.config_path), tmp_path / "job", reason="test", clock=lambda: NOW)
    assert result.outcome in ("promoted", "rejected"), result.reason
    data, gate = result.data, result.gate
    assert data is not None and gate is not None and data.group_pattern == pattern
    assert gate.reference is not None and gate.production is not None
    assert gate.reference.groups == data.reference_gate_groups and 0 < data.reference_gate_groups < data.reference_gate_rows
    assert gate.production.groups == data.production_gate_groups
    assert gate.reference.design_effect is not None and gate.reference.design_effect >= 1.0
    assert "groups, weighing as" in result.reason
    # the older rows of every product in the newest window left training
    assert data.production_copies_dropped > 0


def test_a_row_outside_the_group_pattern_fails_the_job_naming_it(tmp_path: Path, checkpoint: Path) -> None:
    world = build_world(tmp_path, checkpoint, digits(n_production=120),
                        retrain={"group_pattern": r"^production/([a-z]+-\d*)\d\.png$"})
    result = run_job(load_config(world.config_path), tmp_path / "job", reason="test", clock=lambda: NOW)
    assert result.outcome == "failed"
    assert "replay row src-" in result.reason and "does not match retrain.group_pattern" in result.reason
