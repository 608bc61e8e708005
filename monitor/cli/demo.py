"""`driftd demo`: the whole loop on real data in a few minutes, on the embedded default."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from monitor.demo.report import timeline_lines, write_report
    from monitor.demo.scenario import DemoSettings, run_demo

    started = time.time()

    def say(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    settings = DemoSettings(workdir=Path(args.workdir).resolve(), seed=args.seed, serve=args.serve, port=args.port)
    result = run_demo(settings, say)
    files = write_report(result)
    print("\ntimeline")
    print("\n".join("  " + line for line in timeline_lines(result)))
    print(f"\nreport: {files['signals']}, {files['accuracy']}, {files['summary']}")
    print(f"config used: {result.config_path} (try: driftd check --config {result.config_path} --json)")
    ok = result.timeline.retrain_outcome == "promoted"
    if not ok:
        print("the retrain was not promoted this time: see the gate above and daemon.log", file=sys.stderr)
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole loop on real data (digits) in a few minutes",
        description="Train a small timm model on scikit-learn's handwritten digits, serve it while writing "
        "Parquet logs, corrupt the inputs from a known point, and let the real daemon detect the drift, "
        "retrain with the guards, gate and promote. Prints a timeline and writes PNG charts + JSON.",
        epilog="example:\n  driftd demo --workdir /tmp/driftd-demo\n  driftd demo --serve   # keep /metrics up for Grafana",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default="driftd-demo", help="new directory for everything the demo writes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true", help="keep the daemon (and /metrics) running at the end")
    p.add_argument("--port", type=int, help="HTTP port of the daemon (default: a free one)")
    p.set_defaults(func=run)
