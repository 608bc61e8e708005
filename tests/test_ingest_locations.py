"""Log locations given as URIs: credentials stay out of messages, quarantine_dir is checked
against URI log prefixes too, and a bad location fails before the state directory is locked."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_helpers import build_reference, config_doc
from monitor.config import parse_config
from monitor.configutil import redact_location
from monitor.engine.cycle import Engine
from monitor.errors import ConfigError, ContractError
from monitor.ingest.store import StateStore


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        ("/var/log/inference", "/var/log/inference"),
        ("s3://bucket/logs?endpoint_override=127.0.0.1:9000&scheme=http",
         "s3://bucket/logs?endpoint_override=127.0.0.1:9000&scheme=http"),
        ("s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/logs?region=eu-west-1", "s3://***@bucket/logs?region=eu-west-1"),
        ("s3://?endpoint_override=127.0.0.1:9", "s3://?endpoint_override=127.0.0.1:9"),
        ("s3://bucket/logs?access_key=AKIDEXAMPLE&secret_key=wJalrXUtnFEMI&session_token=tok&scheme=http",
         "s3://bucket/logs?access_key=***&secret_key=***&session_token=***&scheme=http"),
        # an unencoded AWS secret may contain "/": a URI parser would end the authority there
        ("s3://AKIDEXAMPLE:wJalr/XUtn+FEMI@bucket/logs?region=eu-west-1", "s3://***@bucket/logs?region=eu-west-1"),
        ("s3://bucket/logs/user@host/part-0.parquet", "s3://bucket/logs/user@host/part-0.parquet"),
    ],
    ids=["local", "plain-uri", "userinfo", "no-bucket", "query-keys", "slash-in-secret", "at-in-a-key"],
)
def test_credentials_in_a_location_are_redacted_for_messages(location: str, shown: str) -> None:
    assert redact_location(location) == shown


@pytest.mark.parametrize(
    "logs",
    [
        "s3://AKIDEXAMPLE:wJalrXUtnFEMI@?endpoint_override=127.0.0.1:9",  # no bucket: fails before any I/O
        "s3://AKIDEXAMPLE:wJalr/XUtn%ZZFEMI@bucket/p?request_timeout=5",  # pyarrow quotes the URI it could not parse
    ],
    ids=["no-bucket", "unparsable-with-timeout"],
)
def test_an_unusable_uri_names_the_location_without_its_secret(tmp_path: Path, logs: str) -> None:
    ref = build_reference(tmp_path, n=400)
    cfg = parse_config(config_doc(tmp_path, ref, **{"logs.inference": logs}), source="test", base=tmp_path)
    with pytest.raises(ContractError) as caught:
        Engine(cfg.monitor)
    message = str(caught.value)
    assert "FEMI" not in message and "XUtn" not in message and "s3://***@" in message, message
    # The failed start left the state directory unlocked: the next start (or a CLI) can open it.
    StateStore.open(tmp_path / "state").close()


@pytest.mark.parametrize(
    ("quarantine_dir", "accepted"),
    [
        ("s3://bucket/logs/bad?endpoint_override=127.0.0.1:9000", False),
        ("s3://bucket/logs/_quarantine?endpoint_override=127.0.0.1:9000", True),
        ("s3://bucket/quarantine?endpoint_override=127.0.0.1:9000", True),
        ("s3://other/logs/bad", True),
    ],
    ids=["inside-the-logs", "underscore-name", "beside-the-logs", "other-bucket"],
)
def test_quarantine_dir_inside_a_uri_log_prefix_is_a_config_error(
    tmp_path: Path, quarantine_dir: str, accepted: bool
) -> None:
    doc = config_doc(tmp_path, tmp_path / "ref", **{
        "logs.inference": "s3://bucket/logs?endpoint_override=127.0.0.1:9000&scheme=http",
        "ingest.quarantine_dir": quarantine_dir,
    })
    if accepted:
        parse_config(doc, source="test", base=tmp_path)
        return
    with pytest.raises(ConfigError, match=r"ingest.quarantine_dir.*inside the logs"):
        parse_config(doc, source="test", base=tmp_path)


def test_a_file_uri_quarantine_dir_inside_local_logs_is_a_config_error(tmp_path: Path) -> None:
    doc = config_doc(tmp_path, tmp_path / "ref", **{"ingest.quarantine_dir": f"file://{tmp_path / 'logs' / 'bad'}"})
    with pytest.raises(ConfigError, match=r"ingest.quarantine_dir.*inside the logs"):
        parse_config(doc, source="test", base=tmp_path)
