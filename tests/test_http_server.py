"""The HTTP server under hostile and heavy use: every bad request is a 4xx, idle sockets hold no
thread, keep-alive and pipelining work, disconnects are not errors, a second daemon never listens.

One real daemon (in this process, real engine and state) serves every test of the module, with
short read deadlines so the timeout cases take about a second.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from daemon_helpers import REPO, TOKEN, DaemonProcess, daemon_doc, free_port, write_config
from engine_helpers import build_reference, make_rows, write_inference
from monitor.config import parse_config
from monitor.errors import StateError
from monitor.service.api import Coalesced
from monitor.service.http_messages import MAX_BODY_BYTES, MAX_REASON_CHARS
from monitor.service.daemon import Daemon
from monitor.service.notify import Notifier

TIMEOUTS = {"http.header_timeout_seconds": 1.0, "http.body_timeout_seconds": 1.0, "http.idle_timeout_seconds": 2.0,
            "http.threads": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("http")
    ref = build_reference(tmp, n=500)
    write_inference(tmp / "logs", make_rows(400, seed=10), per_file=200, name="a")
    port = free_port()
    doc = daemon_doc(tmp, ref, port, **TIMEOUTS)
    config = parse_config(doc, source=str(tmp / "driftd.yaml"), base=tmp)
    write_config(tmp, doc)
    daemon = Daemon(config, config_path=str(tmp / "driftd.yaml"), registry=CollectorRegistry(),
                    notifier=Notifier(None), environ={})
    daemon.start()
    proc = DaemonProcess(tmp / "driftd.yaml", port)
    proc.wait_for(lambda: proc.get("/readyz")[0] == 200, desc="ready")
    yield daemon, port, tmp
    assert daemon.shutdown() == 0


def _http_errors(daemon: Daemon) -> float:
    return daemon.registry.get_sample_value("driftd_job_errors_total", {"model": "test-model", "job": "http"})


def _read_responses(sock: socket.socket, want: int, timeout: float = 10.0,
                    no_body: tuple[int, ...] = ()) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse up to ``want`` HTTP responses (Content-Length framed; those at ``no_body``, answers
    to HEAD, have none) from ``sock``."""
    sock.settimeout(timeout)
    buf, out = b"", []
    while len(out) < want:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = 0 if len(out) in no_body else int(headers.get("content-length", "0"))
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        out.append((int(lines[0].split()[1]), headers, buf[:length]))
        buf = buf[length:]
    return out


def _exchange(port: int, data: bytes, want: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return _read_responses(sock, want)


def _post(body: bytes, *, length: str | None = None, token: str | None = TOKEN, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    cl = str(len(body)) if length is None else length
    return (f"POST /api/v1/retrain HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {cl}\r\n{extra}"
            "Content-Type: application/json\r\n\r\n").encode() + body


HOSTILE = {
    # the torture run: 500 (a ValueError in the handler) and a 202 that crashed the job
    "negative Content-Length": (_post(b"", length="-5"), 400, b"Content-Length"),
    "non-numeric Content-Length": (_post(b"{}", length="12abc"), 400, b"Content-Length"),
    "huge Content-Length": (_post(b"", length="99999999999999999999"), 413, b""),
    "body over the limit": (_post(b"{" + b" " * MAX_BODY_BYTES + b"}"), 413, b""),
    "NUL in the reason": (_post(json.dumps({"reason": "drift\u0000now"}).encode()), 400, b"U+0000 at position 5"),
    "newline in the reason": (_post(json.dumps({"reason": "a\nb"}).encode()), 400, b"non-printable"),
    "escape sequence in the reason": (_post(json.dumps({"reason": "\x1b[31mred"}).encode()), 400, b"U+001B"),
    "over-long reason": (_post(json.dumps({"reason": "x" * (MAX_REASON_CHARS + 1)}).encode()), 400, b"at most"),
    "empty reason": (_post(b'{"reason": "   "}'), 400, b"non-empty string"),
    "reason not a string": (_post(b'{"reason": 7}'), 400, b"non-empty string"),
    "unknown field": (_post(b'{"reason": "x", "priority": "high"}'), 400, b"'priority'"),
    "not JSON": (_post(b"{not json"), 400, b"not valid JSON"),
    "not UTF-8": (_post(b'{"reason": "\xff\xfe"}'), 400, b"not valid JSON"),
    "JSON but not an object": (_post(b'["x"]'), 400, b"JSON object"),
    "no token": (_post(b'{"reason": "x"}', token=None), 401, b"bearer token"),
    "wrong token": (_post(b'{"reason": "x"}', token="nope"), 401, b"bearer token"),
    "bad chunk size": (f"POST /api/v1/retrain HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n"
                       "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode(), 400, b""),
    "garbage request line": (b"\x00\x01 nonsense\r\n\r\n", 400, b""),
    "unsupported HTTP version": (b"GET /metrics HTTP/9.9\r\nHost: t\r\n\r\n", 400, b"HTTP/9.9"),
    "no HTTP version (HTTP/0.9)": (b"GET /metrics\r\n\r\n", 400, b"without an HTTP version"),
    "header block over the limit": (b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431, b""),
    "header without a colon": (b"GET /metrics HTTP/1.1\r\nHost: t\r\nnocolon\r\n\r\n", 400, b""),
    "unknown path": (b"GET /admin HTTP/1.1\r\nHost: t\r\n\r\n", 404, b"no such endpoint"),
    "wrong method": (b"DELETE /metrics HTTP/1.1\r\nHost: t\r\n\r\n", 405, b"accepts GET, HEAD"),
    "status of an unknown job": (f"GET /api/v1/retrain/../../etc HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}"
                                 "\r\n\r\n".encode(), 404, b""),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_every_hostile_request_gets_a_4xx_and_changes_nothing(served, name: str) -> None:
    daemon, port, tmp = served
    data, status, says = HOSTILE[name]
    [(code, _, body)] = _exchange(port, data)
    assert code == status, body
    assert says in body, body
    assert daemon.status()["retrain"]["queued"] == [] and daemon.status()["retrain"]["running"] is None
    assert not (tmp / "state" / "retrain").exists() or not any((tmp / "state" / "retrain").iterdir())
    assert _http_errors(daemon) == 0


def test_requests_that_never_finish_arriving_get_408(served) -> None:
    daemon, port, _ = served
    started = time.monotonic()
    # a body shorter than its Content-Length, and headers trickled one line every 0.3 s
    [(code, headers, body)] = _exchange(port, _post(b"{", length="10"))
    assert code == 408 and headers["connection"] == "close" and b"not received in time" in body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        with pytest.raises(OSError):  # the server answers 408 and closes while we still trickle
            for _ in range(40):
                sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.3)
    assert time.monotonic() - started < 20
    assert _http_errors(daemon) == 0


def test_keep_alive_pipelining_and_head(served) -> None:
    _, port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(3):  # one connection, several requests: HTTP/1.1 keep-alive
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            [(code, headers, body)] = _read_responses(sock, 1)
            assert code == 200 and body.startswith(b"ok") and headers.get("connection", "") != "close"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /readyz HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        healthz, readyz, head = _read_responses(sock, 3, no_body=(2,))
        assert healthz[0] == readyz[0] == head[0] == 200
        assert readyz[2].startswith(b"ready")
        assert int(head[1]["content-length"]) > 1000 and head[2] == b""  # HEAD: the headers of GET, no body


def test_idle_sockets_hold_no_thread_and_are_closed(served) -> None:
    daemon, port, _ = served
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - before < 5  # the old server: +300 threads
        assert sum(t.name.startswith("waitress-") for t in threading.enumerate()) == TIMEOUTS["http.threads"]
        started = time.monotonic()
        [(code, _, _)] = _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert code == 200 and time.monotonic() - started < 5
        for sock in idle:  # connections that never send a request are closed after header_timeout
            sock.settimeout(15)
            assert sock.recv(1024) == b""
    finally:
        for sock in idle:
            sock.close()
    assert _http_errors(daemon) == 0


def test_client_disconnects_are_not_errors(served, caplog: pytest.LogCaptureFixture) -> None:
    daemon, port, _ = served
    caplog.set_level(logging.INFO)
    for _ in range(30):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        sock.close()
    [(code, _, _)] = _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert code == 200
    assert _http_errors(daemon) == 0
    noisy = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("waitress", "driftd.http"))]
    assert noisy == []


def test_a_second_daemon_on_the_same_state_refuses_before_it_listens(served) -> None:
    daemon, _, tmp = served
    port = free_port()
    doc = daemon_doc(tmp, tmp / "reference", port, **TIMEOUTS)
    config = parse_config(doc, source=str(tmp / "second.yaml"), base=tmp)
    with pytest.raises(StateError, match=r"already in use by another driftd"):
        Daemon(config, config_path=str(tmp / "second.yaml"), registry=CollectorRegistry(), notifier=Notifier(None),
               environ={})
    with socket.socket() as probe:  # the port was never taken
        probe.bind(("127.0.0.1", port))
    # the same through the CLI: exit 1 with the reason, and never "listening"
    cfg = write_config(tmp, doc, "second.yaml")
    result = subprocess.run([sys.executable, "-m", "monitor", "run", "--config", str(cfg)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    assert "already in use by another driftd" in result.stderr and "listening" not in result.stderr


def test_coalesced_renders_start_after_the_request_and_are_shared() -> None:
    """Callers arriving during a render wait for the next one and share it."""
    release, entered = threading.Event(), threading.Event()
    renders: list[int] = []

    def render() -> int:
        renders.append(len(renders) + 1)
        if len(renders) == 1:
            entered.set()
            release.wait(10)
        return len(renders)

    coalesced = Coalesced(render)
    results: dict[str, int] = {}
    first = threading.Thread(target=lambda: results.__setitem__("first", coalesced()))
    first.start()
    assert entered.wait(10)
    late = [threading.Thread(target=lambda i=i: results.__setitem__(f"late{i}", coalesced())) for i in range(10)]
    for t in late:
        t.start()
    time.sleep(0.2)  # let them queue behind render 1
    release.set()
    for t in [first, *late]:
        t.join(10)
    assert renders == [1, 2]  # eleven callers, two renders
    assert results.pop("first") == 1
    assert set(results.values()) == {2}  # never the render that began before they arrived


def test_the_server_bounds_take_effect_after_a_restart_not_on_sighup(tmp_path: Path) -> None:
    import dataclasses

    from monitor.service.daemon import restart_keys

    old = parse_config({"logs": {"inference": "logs"}}, source="t", base=tmp_path)
    new = dataclasses.replace(old, service=dataclasses.replace(old.service, http=dataclasses.replace(
        old.service.http, threads=4, header_timeout_seconds=3.0, token_env="T")))
    assert restart_keys(old, new) == ["http.threads", "http.header_timeout_seconds"]  # the token reloads
