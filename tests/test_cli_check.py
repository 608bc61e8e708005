"""`driftd reference build` and `driftd check` driven through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine_helpers import make_rows, write_inference, write_labels
from monitor.cli import main
from monitor.ingest.counters import ROWS


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    write_inference(tmp_path / "val", make_rows(1500, seed=3, prefix="val"), per_file=500, with_label=True)
    write_inference(tmp_path / "logs", make_rows(400, seed=4), per_file=200, name="a")
    write_inference(tmp_path / "logs", make_rows(400, seed=5, shift=1.5, start=1_790_001_000), per_file=200, name="b")
    (tmp_path / "labels").mkdir()  # a configured log directory must exist (see test_missing_log_directory_*)
    return tmp_path


def _config(tmp: Path) -> Path:
    path = tmp / "driftd.yaml"
    path.write_text(yaml.safe_dump({
        "model": "digits",
        "logs": {"inference": "logs", "labels": "labels"},
        "state_dir": "state",
        "reference_dir": "ref",
        "ingest": {"settle_seconds": 0},
        "window": {"rows": 200, "min_rows": 20},
        "signals": {
            "mmd": {"permutations": 100, "projection_dims": 8},
            "online_mmd": {"window_rows": 20, "stride_rows": 5, "ert_rows": 1000, "bootstraps": 600, "max_reference_rows": 300},
        },
    }))
    return path


def test_reference_build_then_check_table_and_resume(logs: Path, capsys):
    cfg = _config(logs)
    assert main(["reference", "build", "--logs", str(logs / "val"), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "model_version v1: 1500 rows" in out and "accuracy" in out
    assert (logs / "ref" / "v1" / "reference.json").exists()

    assert main(["check", "--config", str(cfg)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["version", "win", "rows"]
    body = [line.split() for line in table[1:5]]
    assert [row[1] for row in body] == ["0", "1", "2", "3"]
    assert "totals:" in table[-1] and "rows[v1]=800" in table[-1]

    # Nothing new: the cursor persisted, no row is counted twice.
    assert main(["check", "--config", str(cfg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["windows"] == []
    assert {"name": ROWS, "key": "v1", "value": 800.0} in doc["counters"]


def test_check_json_reports_drift_in_the_shifted_half(logs: Path, capsys):
    cfg = _config(logs)
    main(["reference", "build", "--logs", str(logs / "val"), "--config", str(cfg)])
    capsys.readouterr()
    write_labels(logs / "labels", make_rows(400, seed=4))
    assert main(["check", "--config", str(cfg), "--json"]) == 0
    windows = json.loads(capsys.readouterr().out)["windows"]
    assert len(windows) == 4
    assert windows[0]["mmd"]["p_value"] > 0.01 and windows[3]["mmd"]["p_value"] < 0.05
    assert windows[3]["activations"]["top_dims"][0]["dim"] < 8  # the shift is in the first half of dims


def test_check_with_flags_only(logs: Path, capsys):
    main(["reference", "build", "--logs", str(logs / "val"), "--out", str(logs / "ref")])
    capsys.readouterr()
    code = main(["check", "--logs", str(logs / "logs"), "--reference", str(logs / "ref"),
                 "--state", str(logs / "st"), "--window-rows", "400"])
    assert code == 0
    assert "rows[v1]=800" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message, code",
    [
        (["check"], "pass --config FILE", 2),
        (["check", "--config", "missing.yaml"], "config file not found", 2),
        (["reference", "build", "--logs", "nowhere", "--out", "x"], "--logs: nowhere does not exist", 2),
        (["reference", "build", "--logs", "val", "--out", "x", "--max-rows", "1"], "--max-rows must be at least 2", 2),
    ],
    ids=["no-config", "missing-config", "missing-logs", "bad-max-rows"],
)
def test_cli_errors_are_one_line_with_exit_codes(logs: Path, capsys, monkeypatch, argv, message, code):
    monkeypatch.chdir(logs)
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_config_keys_are_all_named(tmp_path: Path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"logs": {"inference": "x"}, "windw": {"rows": 5},
                                   "signals": {"mmd": {"permutations": 0, "redraw_permutations_every": 0, "seed": -1}}}))
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "windw: unknown key" in err and "signals.mmd.permutations: must be >= 1, got 0" in err
    assert "signals.mmd.redraw_permutations_every: must be >= 1, got 0" in err
    assert "signals.mmd.seed: must be >= 0, got -1" in err  # numpy's generators take no negative seed


def test_toml_config_works_the_same(logs: Path, capsys):
    cfg = logs / "driftd.toml"
    cfg.write_text(
        'model = "digits"\nstate_dir = "state"\nreference_dir = "ref"\n'
        '[logs]\ninference = "logs"\n[ingest]\nsettle_seconds = 0\n[window]\nrows = 400\nseconds = 100000\nmin_rows = 20\n'
        '[signals.mmd]\npermutations = 100\nprojection_dims = 8\n'
    )
    assert main(["reference", "build", "--logs", str(logs / "val"), "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["check", "--config", str(cfg), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["windows"]) == 2


def test_a_missing_log_directory_is_a_start_up_error_naming_the_key(logs: Path, capsys):
    cfg = _config(logs)
    main(["reference", "build", "--logs", str(logs / "val"), "--config", str(cfg)])
    capsys.readouterr()
    doc = yaml.safe_load(cfg.read_text())
    doc["logs"]["inference"] = "logz"  # a typo: it used to read as an empty log, and exit 0
    cfg.write_text(yaml.safe_dump(doc))
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"logs.inference: {logs / 'logz'} does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (logs / "state").exists()  # nothing was created
    assert main(["config", "validate", "--config", str(cfg)]) == 2
    assert f"logs.inference: {logs / 'logz'} does not exist" in capsys.readouterr().err
    assert main(["config", "validate", "--config", str(cfg), "--skip-paths"]) == 0


def test_check_says_where_it_keeps_its_state(logs: Path, capsys, monkeypatch):
    main(["reference", "build", "--logs", str(logs / "val"), "--out", str(logs / "ref")])
    capsys.readouterr()
    work = logs / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["check", "--logs", str(logs / "logs"), "--reference", str(logs / "ref"), "--json"]) == 0
    captured = capsys.readouterr()
    assert f"state: {work / 'driftd-state'} (created now;" in captured.err
    assert json.loads(captured.out)["state_dir"] == str(work / "driftd-state")
    assert main(["check", "--logs", str(logs / "logs"), "--reference", str(logs / "ref")]) == 0
    assert f"state: {work / 'driftd-state'} (continuing from its cursor;" in capsys.readouterr().err


def test_config_validate_names_missing_retraining_paths(tmp_path: Path, capsys):
    (tmp_path / "logs").mkdir()
    cfg = tmp_path / "driftd.yaml"
    cfg.write_text(yaml.safe_dump({"logs": {"inference": "logs"},
                                   "retrain": {"replay_logs": "val-logs", "input_root": "inputs"}}))
    assert main(["config", "validate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"retrain.replay_logs: {tmp_path / 'val-logs'} does not exist" in err
    assert f"retrain.input_root: {tmp_path / 'inputs'} does not exist" in err
    assert "logs.inference" not in err


def test_reference_build_warns_when_few_labels_back_its_accuracy(tmp_path: Path, capsys):
    write_inference(tmp_path / "val", make_rows(300, seed=3, prefix="val"), per_file=300, with_label=True)
    assert main(["reference", "build", "--logs", str(tmp_path / "val"), "--out", str(tmp_path / "ref")]) == 0
    out = capsys.readouterr().out
    assert "warning: only 300 labelled rows back the accuracy of v1 (standard error ~" in out
    assert "build from >= 1000 labelled rows" in out
