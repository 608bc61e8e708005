"""retrain.on_promote: a command and a webhook run after every promotion and rollback, counted."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
import yaml

from monitor.cli import main
from monitor.config import load_config, parse_config
from monitor.errors import ConfigError
from retrain.hooks import read_counts, run_on_promote
from retrain.registry import ModelMeta, Registry

HOOK = """import json, os, sys
event = json.load(sys.stdin)
env = {k: v for k, v in os.environ.items() if k.startswith("DRIFTD_")}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"event": event, "env": env}) + "\\n")
sys.exit(int(os.environ.get("HOOK_EXIT", "0")))
"""


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []
    status = 204

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"body": json.loads(body), "auth": self.headers.get("Authorization"),
                                    "type": self.headers.get("Content-Type")})
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def webhook() -> Iterator[type[_Receiver]]:
    handler = type("Receiver", (_Receiver,), {"received": [], "status": 204})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/driftd"
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def _world(tmp: Path, on_promote: dict) -> Path:
    (tmp / "hook.py").write_text(HOOK)
    registry = Registry(tmp / "reg")
    model = timm.create_model("test_resnet", num_classes=3)
    meta = ModelMeta(architecture="test_resnet", num_classes=3, data_config={"input_size": [3, 32, 32]})
    for gate in ({}, {"promote": True, "gain": 0.4, "forgetting": 0.0}):
        registry.add(model, ModelMeta(**{**meta.__dict__, "gate": gate}))
    registry.promote("v1")
    config = tmp / "driftd.yaml"
    config.write_text(yaml.safe_dump({"model": "digits", "logs": {"inference": "logs"},
                                      "retrain": {"registry_dir": "reg", "on_promote": on_promote}}))
    return config


def test_promote_and_rollback_run_the_command_and_the_webhook(tmp_path: Path, webhook, monkeypatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "s3cret")
    config = _world(tmp_path, {"command": [sys.executable, "./hook.py", str(tmp_path / "calls.jsonl")],
                               "webhook": webhook.url, "webhook_token_env": "HOOK_TOKEN"})
    assert main(["models", "promote", "v2", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "on_promote command: ok (exit 0)" in out and "on_promote webhook: ok (HTTP 204)" in out
    assert main(["models", "rollback", "--config", str(config)]) == 0

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [(c["event"]["event"], c["event"]["version"], c["event"]["previous_version"]) for c in calls] == [
        ("promotion", "v2", "v1"), ("rollback", "v1", "v2")]
    first = calls[0]["event"]
    assert first["gate"] == {"promote": True, "gain": 0.4, "forgetting": 0.0}
    assert first["weights"] == str(tmp_path / "reg" / "versions" / "v2" / "model.safetensors")
    assert Path(first["weights"]).is_file() and first["model"] == "digits" and first["by"] == "driftd models promote"
    assert calls[0]["env"]["DRIFTD_VERSION"] == "v2" and calls[0]["env"]["DRIFTD_PREVIOUS_VERSION"] == "v1"
    assert [r["body"] for r in webhook.received] == [c["event"] for c in calls]
    assert {r["auth"] for r in webhook.received} == {"Bearer s3cret"}
    assert {r["type"] for r in webhook.received} == {"application/json"}
    assert read_counts(tmp_path / "reg") == {("command", "ok"): 2, ("command", "failed"): 0,
                                             ("webhook", "ok"): 2, ("webhook", "failed"): 0}


def test_a_failing_hook_is_reported_counted_and_the_promotion_stands(tmp_path: Path, webhook, monkeypatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HOOK_EXIT", "3")
    webhook.status = 500
    config = _world(tmp_path, {"command": f"{sys.executable} ./hook.py {tmp_path / 'calls.jsonl'}",
                               "webhook": webhook.url})
    assert main(["models", "promote", "v2", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "CURRENT is v2, but retrain.on_promote failed (command: exit 3; webhook: HTTP 500" in err
    assert "run `driftd models promote v2` again" in err
    assert Registry(tmp_path / "reg").current().version == "v2"
    counts = read_counts(tmp_path / "reg")
    assert counts[("command", "failed")] == 1 and counts[("webhook", "failed")] == 1
    assert counts[("command", "ok")] == 0
    # fixed: promoting CURRENT again repeats the hand-off
    monkeypatch.setenv("HOOK_EXIT", "0")
    webhook.status = 200
    assert main(["models", "promote", "v2", "--config", str(config)]) == 0
    assert "(it already was)" in capsys.readouterr().out
    assert read_counts(tmp_path / "reg")[("webhook", "ok")] == 1


def test_an_unreachable_webhook_never_raises(tmp_path: Path) -> None:
    config = load_config(_world(tmp_path, {"webhook": "http://127.0.0.1:1/x", "timeout_seconds": 2}))
    Registry(tmp_path / "reg").promote("v2")
    (outcome,) = run_on_promote(config, event="promotion", version="v2", previous="v1", by="retrain job j1")
    assert not outcome.ok and "cannot reach http://127.0.0.1:1/..." in outcome.detail
    assert read_counts(tmp_path / "reg")[("webhook", "failed")] == 1


def test_a_program_that_does_not_exist_is_a_failed_run(tmp_path: Path) -> None:
    config = load_config(_world(tmp_path, {"command": ["/nonexistent/reload-service"]}))
    (outcome,) = run_on_promote(config, event="promotion", version="v2", previous="v1", by="test")
    assert not outcome.ok and outcome.detail == "program not found: /nonexistent/reload-service (retrain.on_promote.command)"


def test_no_hooks_configured_runs_and_writes_nothing(tmp_path: Path) -> None:
    config = load_config(_world(tmp_path, {}))
    assert run_on_promote(config, event="promotion", version="v2", previous="v1", by="test") == []
    assert not (tmp_path / "reg" / "on_promote.json").exists()
    assert read_counts(tmp_path / "nowhere") == {(k, o): 0 for k in ("command", "webhook") for o in ("ok", "failed")}
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("on_promote, message", [
    ({"webhook": "ftp://x/y"}, "retrain.on_promote.webhook: expected an http:// or https:// URL"),
    ({"webhook_token_env": "T"}, "retrain.on_promote.webhook_token_env: set without retrain.on_promote.webhook"),
    ({"command": "reload 'unbalanced"}, "retrain.on_promote.command: cannot split"),
    ({"command": []}, "retrain.on_promote.command: is empty"),
    ({"command": [1, 2]}, "retrain.on_promote.command: expected a list of strings"),
    ({"timeout_seconds": 0}, "retrain.on_promote.timeout_seconds: must be >= 0.1"),
    ({"comand": ["x"]}, "retrain.on_promote.comand: unknown key"),
], ids=["scheme", "token-alone", "quotes", "empty", "types", "timeout", "typo"])
def test_on_promote_config_errors_name_the_key(tmp_path: Path, on_promote: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        parse_config({"logs": {"inference": "x"}, "retrain": {"on_promote": on_promote}}, source="t", base=tmp_path)
    assert message in str(info.value)


def test_a_command_string_is_split_and_a_relative_program_is_beside_the_config(tmp_path: Path) -> None:
    cfg = parse_config({"logs": {"inference": "x"}, "retrain": {"on_promote": {"command": "./reload.sh --graceful 'a b'"}}},
                       source="t", base=tmp_path)
    assert cfg.retrain.on_promote.command == (str(tmp_path / "reload.sh"), "--graceful", "a b")
