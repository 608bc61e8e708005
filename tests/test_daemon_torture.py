"""Torture: the real daemon with its state on a real filesystem that fills up, then empties.

The state directory is a small tmpfs of its own, filled to ENOSPC by a filler file, so SQLite and
the policy-state writes hit a genuinely full filesystem (not a mocked error). Mounting needs root
(CI runs as root); elsewhere the test skips and says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_helpers import DaemonProcess, daemon_doc, free_port, write_config
from engine_helpers import build_reference, make_rows, write_inference
from monitor.cli import main

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the duration; skips when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("a full filesystem needs a small tmpfs, and mounting one needs root (CI runs as root)")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:  # root without CAP_SYS_ADMIN (an unprivileged container): impossible here
        pytest.skip(f"cannot mount a tmpfs at {path}: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC; returns it (delete it to free the space)."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _count(text: str, needle: str) -> int:
    return text.count(needle)


def test_a_full_state_filesystem_turns_healthz_503_and_back_with_nothing_lost(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = tmp_path / "state"
    with small_filesystem(state, "32m"):
        ref = build_reference(tmp_path, n=500)
        logs = tmp_path / "logs"
        write_inference(logs, make_rows(1000, seed=10), per_file=250, name="a")
        port = free_port()
        doc = daemon_doc(tmp_path, ref, port, **{"scheduler.unhealthy_after_seconds": 2.0})
        cfg = write_config(tmp_path, doc)
        rows = lambda d: d.metric("driftd_ingest_rows_total", model_version="v1")  # noqa: E731
        cycle_errors = lambda d: d.metric("driftd_job_errors_total", job="cycle")  # noqa: E731

        d = DaemonProcess(cfg, port).start()
        try:
            d.wait_ready()
            d.wait_for(lambda: rows(d) == 1000, desc="1000 rows")
            assert d.get("/healthz")[0] == 200

            # 1. the filesystem fills up; new logs arrive: every cycle fails, /healthz turns 503
            filler = fill(state)
            write_inference(logs, make_rows(1000, seed=11, prefix="b"), per_file=250, name="b")
            code, body = d.wait_for(lambda: (r := d.get("/healthz"))[0] == 503 and r, desc="/healthz 503")
            reason = body.decode()
            assert reason.startswith("no progress for ") and "scheduler.unhealthy_after_seconds=2" in reason
            assert "the filesystem holding the state is full" in reason and "free space or grow the volume" in reason
            ready_code, ready_body = d.get("/readyz")
            assert ready_code == 503 and ready_body.decode().startswith("not ready: no progress for ")
            health = d.json("/api/v1/status")["health"]
            assert health["healthy"] is False and health["failure"]["kind"] == "disk_full"
            assert main(["status", "--config", str(cfg)]) == 0
            assert "\nhealth: FAILING: no progress for " in capsys.readouterr().out
            d.wait_for(lambda: cycle_errors(d) >= 5, desc="several failed cycles")
            log = d.log()
            # logged once per state change, not once per failed cycle
            assert _count(log, "ingest/evaluate cycle failed: ") == 1, log
            assert _count(log, "unhealthy (/healthz 503, no WATCHDOG=1)") == 1, log
            assert "Traceback" not in log
            assert rows(d) in (1000, 1250, 1500, 1750, 2000)  # whole files only: a file's rows or none

            # 2. space returns: the next cycle succeeds, /healthz is 200 again, every row counted once
            filler.unlink()
            d.wait_for(lambda: d.get("/healthz")[0] == 200, desc="/healthz 200 again")
            d.wait_for(lambda: rows(d) == 2000, desc="all 2000 rows")
            assert "ingest/evaluate cycle succeeded again after" in d.log()
            assert d.metric("driftd_ingest_files_total", kind="inference") == 8

            # 3. full again, then SIGTERM: exit 0, saying what could not be checkpointed
            errors_before = cycle_errors(d)
            filler = fill(state)
            write_inference(logs, make_rows(500, seed=12, prefix="c"), per_file=250, name="c")
            d.wait_for(lambda: cycle_errors(d) >= errors_before + 2, desc="failing again")
            assert d.stop() == 0
            log = d.log()
            assert "stopping without checkpointing " in log and "read again, exactly once, at the next start" in log
            assert "internal error" not in log
        finally:
            d.kill()

        # 4. restart with space: the rows that were not committed are read again, exactly once
        filler.unlink()
        again = DaemonProcess(cfg, port).start()
        try:
            again.wait_ready()
            again.wait_for(lambda: rows(again) == 2500, desc="2500 rows after the restart")
            assert again.metric("driftd_ingest_files_total", kind="inference") == 10
            status = again.json("/api/v1/status")
            assert status["health"]["healthy"] is True and status["health"]["failure"] is None
            assert json.loads((state / "policy.json").read_text())  # the policy state was written again
            assert again.stop() == 0
        finally:
            again.kill()
