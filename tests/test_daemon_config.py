"""The http/scheduler sections and the control token."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import parse_config
from monitor.errors import ConfigError
from monitor.service.config import HttpConfig, load_token


def _cfg(tmp_path: Path, **sections):
    return parse_config({"logs": {"inference": "logs"}, **sections}, source="t.yaml", base=tmp_path)


def test_defaults(tmp_path: Path) -> None:
    svc = _cfg(tmp_path).service
    assert (svc.http.host, svc.http.port, svc.http.url) == ("127.0.0.1", 9464, "http://127.0.0.1:9464")
    assert (svc.scheduler.interval_seconds, svc.scheduler.shutdown_grace_seconds, svc.scheduler.retrain_poll_seconds) == (30, 30, 5)


def test_non_loopback_without_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"http.host: '0.0.0.0' is not a loopback address.*token_file"):
        _cfg(tmp_path, http={"host": "0.0.0.0"})
    svc = _cfg(tmp_path, http={"host": "0.0.0.0", "token_env": "T"}).service
    assert svc.http.url == "http://127.0.0.1:9464"


def test_bad_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, http={"port": 70000, "tokn": "x"}, scheduler={"interval_seconds": 0})
    msg = str(err.value)
    assert "http.port: must be <= 65535" in msg and "http.tokn: unknown key" in msg
    assert "scheduler.interval_seconds: must be >= 0.05" in msg


def test_token_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("s3cret\n")
    assert load_token(HttpConfig(token_file=f)) == "s3cret"
    assert load_token(HttpConfig(token_env="DRIFTD_T"), {"DRIFTD_T": "abc"}) == "abc"
    assert load_token(HttpConfig()) is None
    with pytest.raises(ConfigError, match="DRIFTD_T is unset or empty"):
        load_token(HttpConfig(token_env="DRIFTD_T"), {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(HttpConfig(token_file=tmp_path / "missing"))
