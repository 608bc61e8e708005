"""HTTP under load: 200 concurrent clients on /metrics and /api/v1/status for 20 s, then 400 idle sockets.

    .venv/bin/python bench/http_bench.py [--clients 200] [--seconds 20] [--idle 400] [--no-baseline]

Runs the real daemon (in a subprocess, on synthetic logs and a reference from the tests'
generator) twice in the same run, serving the same WSGI application:

- ``driftd``: the daemon's server as shipped (waitress, ``http.threads`` workers, keep-alive);
- ``stdlib`` (the baseline): what driftd served with before, the standard library's
  ThreadingHTTPServer at its defaults (a thread per connection, listen backlog 5, HTTP/1.0).

The load: each client is one asyncio connection asking in a closed loop, alternating the two
paths, reconnecting whenever the server closes (always, for HTTP/1.0). A request that takes
over ``--timeout`` seconds counts as a timeout; a refused or reset connection or a non-200 as an
error. Latency includes a reconnect when one was needed (the baseline pays a TCP handshake per
request, as its clients did). Server threads are sampled from /proc every 0.25 s.

Then ``--idle`` sockets connect and send nothing: threads are sampled again, a /healthz is
timed while they are held, and the bench waits for the server to close them.

Prints p50, p99, max, requests/s, errors, timeouts and server threads per server, and the
ratios driftd/stdlib. Targets: p99 < 1 s, 0 timeouts, threads bounded by the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # engine_helpers: the tests' synthetic logs and reference

PATHS = ("/metrics", "/api/v1/status")


# -- the server side (a subprocess: `http_bench.py --serve CONFIG --server NAME`) ------------------

def serve(config_path: str, server: str) -> int:
    from prometheus_client import CollectorRegistry

    from monitor.config import load_config
    from monitor.service.api import Api
    from monitor.service.daemon import Daemon
    from monitor.service.logging_setup import setup_logging
    from monitor.service.notify import Notifier

    setup_logging("text", "WARNING")
    config = load_config(config_path)
    daemon = Daemon(config, config_path=config_path, registry=CollectorRegistry(), notifier=Notifier(None), environ={})
    if server == "stdlib":
        daemon.api.close()  # free the port for the old design, same application behind it
        daemon.api = _StdlibServer(config.service.http.host, config.service.http.port,
                                   Api(daemon, daemon.registry, lambda: daemon._token))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    daemon.start()
    daemon.api.start()
    stop.wait()
    daemon.shutdown()
    return 0


class _StdlibServer:
    """The baseline: ThreadingHTTPServer with its defaults (what api.py was before waitress)."""

    def __init__(self, host: str, port: int, app):
        from http.server import ThreadingHTTPServer
        from wsgiref.simple_server import WSGIRequestHandler

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args):  # the old handler logged at DEBUG only
                pass

        self.server = ThreadingHTTPServer((host, port), Quiet)
        self.server.daemon_threads = True
        self.server.set_app = None
        self.server.get_app = lambda: app
        self.server.base_environ = {"SERVER_NAME": host, "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PORT": str(port),
                                    "REMOTE_HOST": "", "CONTENT_LENGTH": "", "SCRIPT_NAME": ""}
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the client side -------------------------------------------------------------------------------

@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    reconnects: int = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, bool]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: http_bench\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    close = headers.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0")
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()  # until the server closes
        close = True
    return status, close


async def _client(i: int, port: int, deadline: float, timeout: float, stats: Stats, paths: tuple[str, ...]) -> None:
    reader = writer = None
    k = i
    while time.monotonic() < deadline:
        path = paths[k % len(paths)]
        k += 1
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    stats.reconnects += 1
                status, close = await _request(reader, writer, path)
            if status == 200:
                stats.latencies.append(time.monotonic() - t0)
            else:
                stats.error(f"HTTP {status}")
        except TimeoutError:
            stats.timeouts += 1
            close = True
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            stats.error(type(exc).__name__)
            close = True
        if close and writer is not None:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


async def _sample_threads(pid: int, until: float, out: list[int]) -> None:
    while time.monotonic() < until:
        out.append(_threads(pid))
        await asyncio.sleep(0.25)


async def load(port: int, pid: int, clients: int, seconds: float, timeout: float,
               paths: tuple[str, ...]) -> tuple[Stats, list[int], float]:
    stats = Stats()
    threads: list[int] = []
    start = time.monotonic()
    deadline = start + seconds
    sampler = asyncio.create_task(_sample_threads(pid, deadline, threads))
    await asyncio.gather(*(_client(i, port, deadline, timeout, stats, paths) for i in range(clients)))
    elapsed = time.monotonic() - start
    await sampler
    return stats, threads, elapsed


def _get(port: int, path: str, timeout: float = 30.0) -> tuple[int, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), time.monotonic() - t0


def idle_phase(port: int, pid: int, n: int, wait_close: float) -> dict[str, float]:
    before = _threads(pid)
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    time.sleep(1.0)
    held = _threads(pid)
    try:
        status, took = _get(port, "/healthz", timeout=30)
    except OSError:
        status, took = -1, float("nan")
    # how many idle sockets the server has closed after wait_close seconds
    deadline = time.monotonic() + wait_close
    for s in socks:
        s.settimeout(max(0.01, deadline - time.monotonic()))
    closed = 0
    for s in socks:
        try:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            if s.recv(1024) is not None:
                closed += 1  # b"" (closed) or an error page
        except (TimeoutError, socket.timeout):
            pass
        except OSError:
            closed += 1
        s.close()
    return {"opened": len(socks), "threads_before": before, "threads_held": held, "healthz_status": status,
            "healthz_seconds": took, "closed_by_server": closed, "wait_close": wait_close}


# -- orchestration ---------------------------------------------------------------------------------

def setup(tmp: Path, port: int, threads: int | None) -> Path:
    import yaml

    from daemon_helpers import daemon_doc
    from engine_helpers import build_reference, make_rows, write_inference, write_labels

    ref = build_reference(tmp, n=2000)
    rows = make_rows(3000, seed=10)
    write_inference(tmp / "logs", rows, per_file=500, name="a")
    write_labels(tmp / "labels", rows.slice(0, 1500))
    overrides = {"scheduler.interval_seconds": 5.0, "scheduler.retrain_poll_seconds": 1.0,
                 "http.header_timeout_seconds": 10.0}
    if threads is not None:
        overrides["http.threads"] = threads
    doc = daemon_doc(tmp, ref, port, **overrides)
    path = tmp / "driftd.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_one(server: str, config: Path, port: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(config), "--server", server], env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(port, "/readyz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{server}: the daemon did not become ready")
            time.sleep(0.2)
        idle_threads = _threads(proc.pid)
        stats, threads, elapsed = asyncio.run(load(port, proc.pid, args.clients, args.seconds, args.timeout,
                                                    tuple(args.paths.split(","))))
        time.sleep(1.0)
        idle = idle_phase(port, proc.pid, args.idle, wait_close=args.idle_wait)
        return {"server": server, "stats": stats, "threads": threads, "elapsed": elapsed, "idle": idle,
                "threads_idle": idle_threads}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(r: dict) -> dict[str, float]:
    s: Stats = r["stats"]
    lat = s.latencies
    row = {
        "requests": len(lat), "rps": len(lat) / r["elapsed"], "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99),
        "max": max(lat) if lat else float("nan"), "mean": statistics.fmean(lat) if lat else float("nan"),
        "errors": sum(s.errors.values()), "timeouts": s.timeouts, "connects": s.reconnects,
        "threads_idle": r["threads_idle"], "threads_max": max(r["threads"]) if r["threads"] else -1,
    }
    errs = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "none"
    idle = r["idle"]
    print(f"\n[{r['server']}] {row['requests']} ok requests in {r['elapsed']:.1f}s = {row['rps']:.0f}/s over "
          f"{row['connects']} connections")
    print(f"  latency p50 {row['p50'] * 1000:.1f} ms  p99 {row['p99'] * 1000:.1f} ms  max {row['max'] * 1000:.0f} ms")
    print(f"  errors {row['errors']} ({errs})  timeouts {row['timeouts']}")
    print(f"  server threads: {row['threads_idle']} idle, max {row['threads_max']} under load")
    print(f"  {idle['opened']} idle sockets: threads {idle['threads_before']} -> {idle['threads_held']}, /healthz "
          f"{idle['healthz_status']} in {idle['healthz_seconds'] * 1000:.0f} ms, closed by the server within "
          f"{idle['wait_close']:.0f}s: {idle['closed_by_server']}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="a request slower than this is a timeout")
    parser.add_argument("--idle", type=int, default=400, help="idle sockets held after the load")
    parser.add_argument("--idle-wait", type=float, default=15.0, help="seconds to wait for them to be closed")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated paths the clients cycle through")
    parser.add_argument("--threads", type=int, default=None, help="http.threads (default: driftd's default)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the stdlib ThreadingHTTPServer run")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--server", default="driftd", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.server)

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    from daemon_helpers import free_port
    from monitor.service.config import HttpConfig

    print(f"load average before: {open('/proc/loadavg').read().strip()}; {os.cpu_count()} CPUs")
    pool = args.threads if args.threads is not None else HttpConfig().threads
    print(f"{args.clients} clients x {args.seconds:.0f}s on {args.paths}; driftd http.threads={pool}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp:
        port = free_port()
        config = setup(Path(tmp), port, args.threads)
        servers = ["driftd"] if args.no_baseline else ["driftd", "stdlib"]
        for server in servers:
            rows[server] = report(run_one(server, config, port, args))
    print(f"\nload average after: {open('/proc/loadavg').read().strip()}")
    ours = rows["driftd"]
    ok = ours["p99"] < 1.0 and ours["timeouts"] == 0 and ours["errors"] == 0 and ours["threads_max"] <= ours["threads_idle"]
    if "stdlib" in rows:
        base = rows["stdlib"]
        print("\ndriftd / stdlib (same run, same application, same client):")
        for key in ("rps", "p50", "p99", "max"):
            print(f"  {key:5s} {ours[key] / base[key]:.3g}x" if base[key] else f"  {key}: baseline 0")
        print(f"  timeouts {ours['timeouts']} vs {base['timeouts']}, errors {ours['errors']} vs {base['errors']}, "
              f"max threads {ours['threads_max']} vs {base['threads_max']}")
    print(f"\ntargets (p99 < 1 s, 0 timeouts, 0 errors, no thread growth under load): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
