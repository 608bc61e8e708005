"""`driftd retrain`: ask the running daemon to retrain (or run the job here with --local)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from monitor.cli.common import add_config_argument, load_config
from monitor.errors import DriftdError

EPILOG = """examples:
  driftd retrain --config driftd.yaml --reason "new camera firmware" --wait
  driftd retrain --config driftd.yaml --local          # no daemon: run the job in this process"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="queue a retrain on the daemon, or run one with --local", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p, required=True)
    p.add_argument("--reason", default="requested from the command line", help="why (kept with the job)")
    p.add_argument("--wait", action="store_true", help="poll the daemon until the job has an outcome")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait: give up (exit 1) after this long; the job keeps running")
    p.add_argument("--local", action="store_true", help="run the job in this process with a progress bar")
    p.add_argument("--url", help="daemon base URL (default: from the config's http section)")
    p.add_argument("--poll-seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monitor.service.client import DaemonClient  # urllib.request (and ssl): only when talking to the daemon
    from monitor.service.config import load_token

    config = load_config(args.config)
    if args.local:
        return _local(config, args.reason)
    client = DaemonClient(args.url or config.service.http.url, load_token(config.service.http))
    answer = client.request("POST", "/api/v1/retrain", {"reason": args.reason})
    job_id = answer["job_id"]
    if answer.get("joined"):
        print(f"retrain already queued or running as job {job_id}: your request joined it")
    else:
        print(f"retrain queued as job {job_id}")
    if not args.wait:
        return 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        info = client.request("GET", f"/api/v1/retrain/{job_id}")
        if info["state"] == "finished":
            break
        if deadline is not None and time.monotonic() > deadline:
            raise DriftdError(f"job {job_id} still {info['state']} after {args.timeout:g}s; "
                              f"follow it with `driftd status` (the daemon keeps running it)")
        p = info.get("progress") or {}
        print(f"\r{info['state']}: {p.get('event', 'waiting')} epoch {p.get('epoch', '-')}", end="", file=sys.stderr)
        time.sleep(args.poll_seconds)
    print(file=sys.stderr)
    result = info.get("result") or {}
    print(f"job {job_id}: {result.get('outcome')} ({result.get('reason', '')})")
    return 0 if result.get("outcome") in ("promoted", "rejected") else 1


def _local(config: Any, reason: str) -> int:
    try:
        from retrain.job import run_job
    except ModuleNotFoundError as exc:
        raise DriftdError(f"the retraining package is not installed ({exc.name}); install driftd with retrain support") from None
    job_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-local"
    job_dir = Path(config.monitor.state_dir) / "retrain" / job_id
    job_dir.mkdir(parents=True, exist_ok=True)

    hyper = config.retrain.hyper
    budget = {"head": hyper.epochs_head, "finetune": hyper.epochs_finetune}  # upper bounds: early stop may end sooner

    def progress(event: dict[str, Any]) -> None:
        line = progress_line(event, budget)
        if line is not None:
            print(line, end="", file=sys.stderr, flush=True)

    result = run_job(config, job_dir, reason=reason, progress=progress)
    print(file=sys.stderr)
    print(json.dumps(result.to_json(), default=str, indent=1))
    print(f"job {job_id}: {result.outcome} ({result.reason})")
    return 0 if result.outcome in ("promoted", "rejected") else 1


def progress_line(event: dict[str, Any], budget: dict[str, int]) -> str | None:
    """What ``--local`` prints for one progress event (None: nothing). An "epoch" event carries
    the number of the epoch just finished (1-based), which is what the bar shows. A
    "finetune_budget" event (max_finetune_steps cut phase 2) sets ``budget["finetune"]`` to the
    epochs that will run, so the bars after it count those."""
    kind, phase = event.get("event"), event.get("phase")
    if phase == "finetune_budget" and "epochs" in event:  # max_finetune_steps cut phase 2's epochs
        budget["finetune"] = int(event["epochs"])
    if kind in ("epoch", "step") and phase in budget:
        done, total = int(event.get("epoch", 0)), max(1, budget[phase])
        filled = min(20, round(20 * (done if kind == "epoch" else done - 1) / total))
        losses = (f" train_loss={event.get('train_loss', float('nan')):.4g}"
                  + (f" val_loss={event['val_loss']:.4g}" if "val_loss" in event else f" step {event.get('step')}"))
        return (f"\r[retrain] {phase:<8} [{'#' * filled}{'.' * (20 - filled)}] epoch {done}/{total}{losses}"
                f" grad_norm={event.get('grad_norm', float('nan')):.3g}"
                f" weight_drift={event.get('weight_drift', float('nan')):.3g}    ")
    if kind == "started":
        return f"[retrain] started on {event.get('device')} ({event.get('world_size')} process(es))"
    if kind in ("phase", "guard", "gate", "promoted", "rejected", "failed"):
        return f"\n[retrain] {kind}: {event.get('message', '')}"
    return None
