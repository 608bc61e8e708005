"""``retrain.on_promote``: tell the serving side that CURRENT changed.

After every promotion (a retrain job's, or `driftd models promote`) and every rollback, the
configured command and/or webhook get one JSON event::

    {"event": "promotion" | "rollback", "model": ..., "version": "v3", "previous_version": "v2",
     "gate": {...the version's gate figures...}, "weights": ".../versions/v3/model.safetensors",
     "meta": ".../versions/v3/meta.json", "data_config": {...}, "registry": ..., "by": ..., "at": epoch s}

The command gets it on stdin (and DRIFTD_EVENT, DRIFTD_VERSION, DRIFTD_PREVIOUS_VERSION,
DRIFTD_WEIGHTS, DRIFTD_REGISTRY in its environment) and succeeds with exit status 0; the webhook
gets it as a POST (``Content-Type: application/json``, a bearer token from
``webhook_token_env``) and succeeds with a 2xx answer. A hook never undoes a promotion: its
outcome is logged and counted in ``on_promote.json`` in the registry directory (where every
process that promotes can write it, and the daemon reads it: :func:`read_counts`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retrain.config import JobSettings, OnPromoteConfig
from retrain.files import write_atomic
from retrain.registry import Registry, RegistryError

log = logging.getLogger(__name__)

COUNTS_FILE = "on_promote.json"
COUNTS_FORMAT = 1
KINDS = ("command", "webhook")
OUTCOMES = ("ok", "failed")
EVENTS = ("promotion", "rollback")
_KEEP_LAST = 20          # recent outcomes kept in the counts file, for `cat` and the runbook
_OUTPUT_TAIL = 500       # characters of a failed command's output kept in the log line


@dataclass(frozen=True)
class HookOutcome:
    kind: str            # "command" | "webhook"
    ok: bool
    detail: str          # "exit 0", "HTTP 204", or what went wrong
    seconds: float

    @property
    def outcome(self) -> str:
        return "ok" if self.ok else "failed"


def promotion_event(registry: Registry, *, model: str, event: str, version: str, previous: str | None,
                    by: str, at: float) -> dict[str, Any]:
    """The JSON body every hook gets (see the module docstring)."""
    if event not in EVENTS:
        raise ValueError(f"event must be one of {EVENTS}, got {event!r}")
    mv = registry.get(version)
    return {
        "event": event, "model": model, "version": version, "previous_version": previous,
        "gate": mv.meta.gate, "weights": str(mv.path / "model.safetensors"), "meta": str(mv.path / "meta.json"),
        "data_config": mv.meta.data_config, "registry": str(registry.path), "by": by, "at": at,
    }


def _shown(url: str) -> str:
    """A webhook URL fit for logs: scheme and host only (chat webhooks carry their secret in the path)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}/..."


def _run_command(argv: tuple[str, ...], body: bytes, event: Mapping[str, Any], timeout: float,
                 environ: Mapping[str, str], cwd: Path | None) -> tuple[bool, str]:
    env = {**environ, "DRIFTD_EVENT": event["event"], "DRIFTD_VERSION": event["version"],
           "DRIFTD_PREVIOUS_VERSION": event["previous_version"] or "", "DRIFTD_WEIGHTS": event["weights"],
           "DRIFTD_REGISTRY": event["registry"]}
    try:
        done = subprocess.run(list(argv), input=body, capture_output=True, timeout=timeout, env=env,
                              cwd=cwd, check=False)
    except FileNotFoundError:
        return False, f"program not found: {argv[0]} (retrain.on_promote.command)"
    except PermissionError:
        return False, f"not executable: {argv[0]} (retrain.on_promote.command)"
    except subprocess.TimeoutExpired:
        return False, f"still running after {timeout:g}s (retrain.on_promote.timeout_seconds): killed"
    if done.returncode == 0:
        return True, "exit 0"
    output = (done.stderr or done.stdout or b"").decode("utf-8", "replace").strip()
    return False, f"exit {done.returncode}" + (f": {output[-_OUTPUT_TAIL:]}" if output else "")


def _post(url: str, body: bytes, token_env: str | None, timeout: float, environ: Mapping[str, str]) -> tuple[bool, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    if token_env is not None:
        token = environ.get(token_env, "").strip()
        if not token:
            return False, f"environment variable {token_env} (retrain.on_promote.webhook_token_env) is unset or empty"
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return True, f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"cannot reach {_shown(url)}: {getattr(exc, 'reason', exc)}"


def run_hooks(hooks: OnPromoteConfig, event: Mapping[str, Any], *, environ: Mapping[str, str] = os.environ,
              cwd: Path | None = None, clock: Callable[[], float] = time.monotonic) -> list[HookOutcome]:
    """Run the configured command (in ``cwd``), then the webhook, with ``event``; never raises
    for a hook's failure."""
    body = json.dumps(event, default=str).encode()
    outcomes = []
    jobs: list[tuple[str, Callable[[], tuple[bool, str]]]] = []
    if hooks.command:
        jobs.append(("command", lambda: _run_command(hooks.command, body, event, hooks.timeout_seconds, environ,
                                                                 cwd)))
    if hooks.webhook is not None:
        url = hooks.webhook
        jobs.append(("webhook", lambda: _post(url, body, hooks.webhook_token_env, hooks.timeout_seconds, environ)))
    for kind, job in jobs:
        started = clock()
        ok, detail = job()
        outcome = HookOutcome(kind=kind, ok=ok, detail=detail, seconds=clock() - started)
        target = hooks.command[0] if kind == "command" else _shown(hooks.webhook or "")
        if ok:
            log.info("on_promote %s %s for %s %s: %s in %.2fs", kind, target, event["event"], event["version"],
                     detail, outcome.seconds)
        else:
            log.error("on_promote %s %s for %s %s failed: %s; the serving side may still use %s", kind, target,
                      event["event"], event["version"], detail, event["previous_version"] or "the previous model")
        outcomes.append(outcome)
    return outcomes


@contextmanager
def _locked(registry_dir: Path) -> Iterator[None]:
    with open(registry_dir / f".{COUNTS_FILE}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"format": COUNTS_FORMAT, "counts": {}, "last": []}
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: unreadable on_promote counts: {exc}; delete it to start counting again") from None
    if data.get("format") != COUNTS_FORMAT:
        raise RegistryError(f"{path}: format {data.get('format')!r} is not {COUNTS_FORMAT}; "
                            "it was written by a different driftd version")
    return data


def record(registry_dir: Path, event: Mapping[str, Any], outcomes: list[HookOutcome]) -> None:
    """Add ``outcomes`` to the counts in ``registry_dir/on_promote.json`` (atomically, under a lock)."""
    if not outcomes:
        return
    registry_dir = Path(registry_dir)
    path = registry_dir / COUNTS_FILE
    with _locked(registry_dir):
        data = _read(path)
        counts = data["counts"]
        for o in outcomes:
            per_kind = counts.setdefault(o.kind, {})
            per_kind[o.outcome] = int(per_kind.get(o.outcome, 0)) + 1
        last = data["last"] + [{**asdict(o), "event": event["event"], "version": event["version"], "at": event["at"]}
                               for o in outcomes]
        data["last"] = last[-_KEEP_LAST:]
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def read_counts(registry_dir: Path) -> dict[tuple[str, str], int]:
    """``{(kind, outcome): runs}`` for every kind and outcome (0 when none ran); creates nothing.

    What the daemon exports as ``driftd_on_promote_runs_total{kind, outcome}``; a counter that
    survives restarts because the file does."""
    data = _read(Path(registry_dir) / COUNTS_FILE)
    return {(k, o): int(data["counts"].get(k, {}).get(o, 0)) for k in KINDS for o in OUTCOMES}


def run_on_promote(config: JobSettings, *, event: str, version: str, previous: str | None, by: str,
                   environ: Mapping[str, str] = os.environ, clock: Callable[[], float] = time.time
                   ) -> list[HookOutcome]:
    """Run ``config.retrain.on_promote`` for a change of CURRENT and count the outcomes.

    ``config``: the whole driftd Config. Call it after the registry switched CURRENT:
    ``event="promotion"`` (a retrain job or `driftd models promote`) or ``"rollback"``, ``version``
    the new CURRENT, ``previous`` the one it replaced, ``by`` who did it (logged and sent).
    The command runs in the config file's directory. Never raises for a hook's failure (it is
    logged and counted); returns the outcomes.
    """
    hooks: OnPromoteConfig = config.retrain.on_promote
    if not hooks.command and hooks.webhook is None:
        return []
    registry = Registry(config.retrain.registry_dir)
    body = promotion_event(registry, model=config.monitor.model, event=event, version=version, previous=previous,
                           by=by, at=clock())
    source = Path(config.source)
    # Relative paths in a config are relative to its file; so is the command's working directory.
    outcomes = run_hooks(hooks, body, environ=environ, cwd=source.parent if source.is_file() else None)
    try:
        record(registry.path, body, outcomes)
    except (OSError, RegistryError) as exc:  # counting must not turn a delivered hook into a failure
        log.error("on_promote outcomes not counted: %s", exc)
    return outcomes
