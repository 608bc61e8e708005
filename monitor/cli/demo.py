"""`driftd demo`: the whole loop on real data in a few minutes, on the embedded default."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitor.demo.timeline import Timeline


def outcome_message(t: Timeline) -> str | None:
    """What went short of a promotion, in words (None when the promoted model was served)."""
    if t.retrain_outcome == "promoted" and t.switch is not None:
        return None
    if t.time_limit_hit:
        return (f"the demo stopped at its time limit: {t.stop_reason}. The daemon was stopped with it; an "
                "unfinished retrain is re-run at the daemon's next start. Run again with a larger --time-limit, "
                "or on a less busy machine; see daemon.log")
    if t.retrain_outcome in ("rejected", "failed"):
        return (f"the retrain was {t.retrain_outcome}: {t.retrain_message}. "
                "The gate's figures are above; the job's log is under state/retrain/ in the workdir")
    return f"no promotion: {t.stop_reason}"


def run(args: argparse.Namespace) -> int:
    from monitor.demo.report import timeline_lines, write_report
    from monitor.demo.scenario import DemoSettings, run_demo

    started = time.time()

    def say(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    settings = DemoSettings(workdir=Path(args.workdir).resolve(), seed=args.seed, serve=args.serve, port=args.port,
                            time_limit_seconds=args.time_limit)
    result = run_demo(settings, say)
    files = write_report(result)
    print("\ntimeline")
    print("\n".join("  " + line for line in timeline_lines(result)))
    print(f"\nreport: {files['accuracy']}\n        {files['signals']}\n        {files['summary']}")
    print(f"config used: {result.config_path} (try: driftd check --config {result.config_path} --json)")
    print(f"wall time: {time.time() - started:.0f} s")
    problem = outcome_message(result.timeline)
    if problem:
        print(problem, file=sys.stderr)
    return 0 if problem is None else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole loop on real data (digits) in a few minutes",
        description="Train a small timm model on scikit-learn's handwritten digits, serve it while writing "
        "Parquet logs, corrupt the inputs from a known point, and let the real daemon detect the drift, "
        "retrain with the guards, gate and promote. Prints a timeline and writes PNG charts + JSON. "
        "Exits 0 once the promoted model serves, 1 when the gate rejected it, the retrain failed or the "
        "time limit was reached (the message says which).",
        epilog="example:\n  driftd demo --workdir /tmp/driftd-demo\n  driftd demo --serve   # keep /metrics up for Grafana",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default="driftd-demo", help="new directory for everything the demo writes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true", help="keep the daemon (and /metrics) running at the end")
    p.add_argument("--port", type=int, help="HTTP port of the daemon (default: a free one)")
    p.add_argument("--time-limit", type=float, default=1800.0, metavar="SECONDS",
                   help="stop the traffic after this long even if the retrain has not finished (default 1800)")
    p.set_defaults(func=run)
