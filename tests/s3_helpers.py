"""A real S3-protocol server (moto) for the S3 ingest tests, spoken to only through pyarrow.

moto lives in its own venv, ``.ci/.venv-s3`` (``sh .ci/install-s3.sh``): botocore's dateutil pin
conflicts with the main venv. The tests start ``moto_server`` on a free 127.0.0.1 port and reach
it with pyarrow's S3 client (``?endpoint_override=...&scheme=http``), as driftd would reach S3.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ops_helpers import REPO, free_port
from waiting import cpu_progress, wait_until

MOTO_SERVER = REPO / ".ci" / ".venv-s3" / "bin" / "moto_server"

# Dummy credentials and no EC2 metadata probe: without them pyarrow's credential chain asks the
# (unreachable) instance metadata endpoint and stalls this network-less process.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "driftd-test",
    "AWS_SECRET_ACCESS_KEY": "driftd-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def require_moto_server() -> Path:
    """Path of moto_server; skips when absent locally, fails under CI (``CI`` set), as require_binary."""
    if MOTO_SERVER.exists():
        return MOTO_SERVER
    message = f"{MOTO_SERVER.relative_to(REPO)} not found: run `sh .ci/install-s3.sh` to install the S3 test server"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class S3Server:
    port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, path: str, **options: str) -> str:
        """``s3://path`` on this server, with extra query options (e.g. ``request_timeout="1"``)."""
        query = "&".join(f"{k}={v}" for k, v in {"endpoint_override": self.endpoint, "scheme": "http", **options}.items())
        return f"s3://{path}?{query}"

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", allow_bucket_creation=True)


@contextmanager
def moto_server(binary: Path, *, timeout: float = 20.0) -> Iterator[S3Server]:
    """Run moto_server on a free port until the block exits; ready when it answers HTTP. Waits as
    long as the server keeps starting (using CPU); fails after ``timeout`` seconds without that."""
    port = free_port()
    # The server logs every request to stderr: a file, not a pipe nobody drains (a full pipe
    # would block the server mid-test).
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)

    def check() -> None:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"moto_server exited with {proc.returncode}: {log.read()[-2000:]}")

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        wait_until(answers, f"moto_server to answer on port {port}", progress=lambda: cpu_progress(proc.pid, quantum=0.2),
                   stall_seconds=timeout, poll_seconds=0.05, check=check)
        yield S3Server(port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def upload(fs: pafs.FileSystem, local: Path, key: str) -> str:
    """Copy a local file to ``key`` (``bucket/prefix/name``) in one PUT; returns the key."""
    with fs.open_output_stream(key) as out:
        out.write(local.read_bytes())
    return key


def read_object(fs: pafs.FileSystem, key: str) -> bytes:
    with fs.open_input_stream(key) as stream:
        return stream.read()


def object_keys(fs: pafs.FileSystem, prefix: str) -> list[str]:
    """Every object (not directory marker) under ``prefix``, sorted."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)
