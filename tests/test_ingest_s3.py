"""Ingest over the S3 protocol: real Parquet objects in a real local S3 server (moto), real engine.

The log contract promises any ``pyarrow.fs`` URI; these tests hold driftd to it for ``s3://``:
hive-partitioned objects are read once and in order, labels join, a second run resumes, corrupt
objects are quarantined (never deleted), and a bad location fails fast with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from engine_helpers import build_reference, config_doc, make_rows, write_inference, write_labels
from monitor.cli import main
from monitor.config import parse_config
from monitor.engine.cycle import Engine
from monitor.ingest.counters import FILES, JOINED, LABELS, QUARANTINED_FILES, ROWS, UNREADABLE
from monitor.ingest.quarantine import QuarantineRecord
from s3_helpers import S3_ENV, S3Server, moto_server, object_keys, read_object, require_moto_server, upload

T0 = 1_795_683_600.0  # 2026-11-26 09:00 UTC
DAY = "dt=2026-11-26"
GARBAGE = b"PAR1 these bytes are not a Parquet file PAR1"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    binary = require_moto_server()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in S3_ENV.items():
            mp.setenv(key, value)
        with moto_server(binary) as server:
            yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference(tmp_path_factory.mktemp("s3-reference"))


@pytest.fixture
def bucket(s3: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test, named after it (the server is shared by the module)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_")).strip("-")
    name = slug if len(slug) <= 63 else f"{slug[:54]}-{hashlib.sha1(slug.encode()).hexdigest()[:8]}"
    s3.filesystem().create_dir(name)
    return name


def _put_hour(s3: S3Server, bucket: str, stage: Path, hour: int, *, seed: int) -> None:
    """One hour of traffic: 200 inference rows and their labels, as hive-partitioned objects."""
    rows = make_rows(200, seed=seed, start=T0 + 3600 * (hour - 9))
    fs = s3.filesystem()
    [logs] = write_inference(stage / f"logs-{hour}", rows, per_file=200)
    labels = write_labels(stage / f"labels-{hour}", rows)
    upload(fs, logs, f"{bucket}/logs/{DAY}/hour={hour}/part-0.parquet")
    upload(fs, labels, f"{bucket}/labels/{DAY}/hour={hour}/part-0.parquet")


def _check_json(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[dict], dict[tuple[str, str], float]]:
    assert main(["check", "--config", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    return doc["windows"], {(c["name"], c["key"]): c["value"] for c in doc["counters"]}


def test_check_reads_partitioned_objects_once_joins_labels_and_resumes(
        s3: S3Server, bucket: str, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    stage = tmp_path / "stage"
    # hour=10 is uploaded first: the order of processing comes from the names, not upload times
    _put_hour(s3, bucket, stage, 10, seed=41)
    _put_hour(s3, bucket, stage, 9, seed=40)
    fs = s3.filesystem()
    with fs.open_output_stream(f"{bucket}/logs/{DAY}/_SUCCESS") as out:
        out.write(b"")
    with fs.open_output_stream(f"{bucket}/logs/{DAY}/hour=10/.part-1.parquet") as out:
        out.write(GARBAGE)  # a producer's temporary object: skipped, not quarantined
    config = tmp_path / "driftd.yaml"
    config.write_text(yaml.safe_dump(config_doc(
        tmp_path, reference, **{"logs.inference": s3.uri(f"{bucket}/logs"), "logs.labels": s3.uri(f"{bucket}/labels")})))

    windows, counters = _check_json(config, capsys)
    assert [(w["index"], w["rows"]) for w in windows] == [(0, 200), (1, 200)]
    # hour=9 before hour=10 (digit runs compare as numbers)
    assert [w["start_time"] for w in windows] == [T0, T0 + 3600]
    assert counters[(ROWS, "v1")] == 400
    assert counters[(FILES, "inference")] == 2 and counters[(FILES, "labels")] == 2
    assert counters[(LABELS, JOINED)] == 400
    assert not any(name == "quarantined_files" for name, _ in counters)

    _put_hour(s3, bucket, stage, 11, seed=42)
    windows, counters = _check_json(config, capsys)  # a new engine on the same state_dir
    assert [(w["index"], w["rows"], w["start_time"]) for w in windows] == [(2, 200, T0 + 7200)]
    assert counters[(ROWS, "v1")] == 600 and counters[(FILES, "inference")] == 3
    assert counters[(LABELS, JOINED)] == 600
    # the labels joined in the first run reached the accuracy the second run reports
    earlier = [make_rows(200, seed=s, start=T0 + 3600 * k) for k, s in enumerate((40, 41))]
    correct = sum(int((r.probs.argmax(1) == r.label).sum()) for r in earlier)
    assert windows[0]["accuracy"]["labels_last_n"] == 400
    assert windows[0]["accuracy"]["accuracy_last_n"] == pytest.approx(correct / 400)

    windows, counters = _check_json(config, capsys)  # nothing new: nothing counted twice
    assert windows == [] and counters[(ROWS, "v1")] == 600


def _engine(tmp_path: Path, reference: Path, logs: str, **overrides: object) -> Engine:
    doc = config_doc(tmp_path, reference, **{"logs.inference": logs, "logs.labels": None, **overrides})
    return Engine(parse_config(doc, source="test", base=tmp_path).monitor)


def _quarantine_once(tmp_path: Path, reference: Path, logs: str, state: str, quarantine_dir: str | None
                     ) -> tuple[list[QuarantineRecord], dict[tuple[str, str], float]]:
    """One `catch_up` with a new engine on ``tmp_path/state``: the quarantine records and counters."""
    engine = _engine(tmp_path, reference, logs, state_dir=str(tmp_path / state), **{"ingest.quarantine_dir": quarantine_dir})
    try:
        engine.catch_up()
        return engine.quarantine.records(), engine.counters()
    finally:
        engine.close()


BAD = f"{DAY}/hour=9/part-1.parquet"


@pytest.mark.parametrize(
    "where, expected_move",
    [
        (lambda s3, bucket, tmp: None, None),
        (lambda s3, bucket, tmp: s3.uri(f"{bucket}/quarantine"), "{bucket}/quarantine/inference/" + BAD),
        (lambda s3, bucket, tmp: str(tmp / "quarantine"), None),
    ],
    ids=["no-quarantine-dir", "s3-quarantine-dir", "local-quarantine-dir"],
)
def test_corrupt_object_is_quarantined_never_deleted(
        s3: S3Server, bucket: str, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        where: Callable[[S3Server, str, Path], str | None], expected_move: str | None):
    fs = s3.filesystem()
    [good] = write_inference(tmp_path / "stage", make_rows(200, seed=50, start=T0), per_file=200)
    upload(fs, good, f"{bucket}/logs/{DAY}/hour=9/part-0.parquet")
    with fs.open_output_stream(f"{bucket}/logs/{BAD}") as out:
        out.write(GARBAGE)
    quarantine_dir = where(s3, bucket, tmp_path)

    with caplog.at_level(logging.WARNING):
        records, counters = _quarantine_once(tmp_path, reference, s3.uri(f"{bucket}/logs"), "state", quarantine_dir)
    [record] = records
    assert (record.path, record.reason, record.whole_file) == (f"{bucket}/logs/{BAD}", UNREADABLE, True)
    assert f"{bucket}/logs/{BAD}: not a readable Parquet file" in record.message
    assert counters[(QUARANTINED_FILES, UNREADABLE)] == 1 and counters[(ROWS, "v1")] == 200

    moved = None if expected_move is None else expected_move.format(bucket=bucket)
    assert record.moved_to == moved
    if moved is None:  # left in place, untouched, and skipped from now on
        assert read_object(fs, f"{bucket}/logs/{BAD}") == GARBAGE
    else:
        assert read_object(fs, moved) == GARBAGE
        assert f"{bucket}/logs/{BAD}" not in object_keys(fs, f"{bucket}/logs")
    if quarantine_dir is not None and moved is None:
        assert any("could not move quarantined file" in r.getMessage() and "different filesystems" in r.getMessage()
                   for r in caplog.records)
        assert not (tmp_path / "quarantine").exists()

    records, counters = _quarantine_once(tmp_path, reference, s3.uri(f"{bucket}/logs"), "state", quarantine_dir)
    assert len(records) == 1 and counters[(QUARANTINED_FILES, UNREADABLE)] == 1  # not read again


def test_quarantine_on_s3_never_overwrites_an_earlier_object(
        s3: S3Server, bucket: str, reference: Path, tmp_path: Path):
    fs = s3.filesystem()
    logs, quarantine_dir = s3.uri(f"{bucket}/logs"), s3.uri(f"{bucket}/_quarantine")
    with fs.open_output_stream(f"{bucket}/logs/{BAD}") as out:
        out.write(GARBAGE)
    [first] = _quarantine_once(tmp_path, reference, logs, "state-a", quarantine_dir)[0]
    # the producer writes the same name again; a fresh state_dir (say, after a reset) meets it
    with fs.open_output_stream(f"{bucket}/logs/{BAD}") as out:
        out.write(GARBAGE + b" again")
    [second] = _quarantine_once(tmp_path, reference, logs, "state-b", quarantine_dir)[0]
    assert first.moved_to == f"{bucket}/_quarantine/inference/{BAD}"
    assert second.moved_to == f"{bucket}/_quarantine/inference/{BAD}.1"
    assert read_object(fs, first.moved_to) == GARBAGE and read_object(fs, second.moved_to) == GARBAGE + b" again"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers: a stalled endpoint."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "location, message",
    [
        (lambda s3, b, silent: s3.uri(f"{b}/logs", bogus="1"), "Unexpected query parameter"),
        (lambda s3, b, silent: s3.uri(f"{b}/logs", request_timeout="soon"), "request_timeout must be"),
        (lambda s3, b, silent: s3.uri(""), "names no bucket"),
        (lambda s3, b, silent: s3.uri("no-such-bucket/logs"), "bucket 'no-such-bucket' does not exist"),
        # without the two timeouts this takes about 100 s
        (lambda s3, b, silent: S3Server(silent).uri(f"{b}/logs", connect_timeout="1", request_timeout="1"),
         "cannot list inference logs"),
    ],
    # A refused connection fails the same way, after pyarrow's retries (2.5-6 s): left out for time.
    ids=["unknown-option", "bad-timeout", "no-bucket", "missing-bucket", "stalled-endpoint"],
)
def test_bad_location_fails_fast_with_one_line_naming_it(
        s3: S3Server, bucket: str, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        silent_port: int, location: Callable[[S3Server, str, int], str], message: str):
    uri = location(s3, bucket, silent_port)
    started = time.monotonic()
    code = main(["check", "--logs", uri, "--reference", str(reference), "--state", str(tmp_path / "state")])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith(f"driftd: error: {uri}: ") and message in err, err
    assert elapsed < 15, f"took {elapsed:.1f}s"
