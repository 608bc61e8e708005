"""`driftd status`: ask the running daemon for its status (human table or --json)."""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from monitor.cli.common import add_config_argument, load_config

EPILOG = """example:
  driftd status --config driftd.yaml
  driftd status --config driftd.yaml --json | jq .alarms"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the running daemon's status", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p, required=True)
    p.add_argument("--json", action="store_true", help="print the raw JSON from GET /api/v1/status")
    p.add_argument("--url", help="daemon base URL (default: from the config's http section)")
    p.set_defaults(func=run)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _when(ts: Any) -> str:
    return "-" if not isinstance(ts, (int, float)) else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def format_status(s: dict[str, Any]) -> str:
    lines = [f"model {s['model']}  current version {_fmt(s['current_version'])}  ready {s['ready']}"]
    health = s["health"]
    lines.append(f"health: {'' if health['healthy'] else 'FAILING: '}{health['reason']}")
    cycle = s.get("last_cycle")
    if cycle:
        lines.append(f"last cycle {_when(cycle['finished_at'])}: {cycle['rows']} rows, {cycle['windows']} windows, "
                     f"lag {_fmt(cycle['lag_seconds'])}s")
    for mv, v in s["versions"].items():
        w = v.get("window")
        lines.append(f"\nmodel_version {mv}" + (f"  (window {w['index']}, {w['rows']} rows)" if w else "  (no window yet)"))
        rows = [("signal", "value", "rule", "threshold", "alarm")]
        for name, sig in v["signals"].items():
            if not sig["rules"]:
                rows.append((name, _fmt(sig["value"]), "", "", ""))
            for r in sig["rules"]:
                rows.append((name, _fmt(sig["value"]), r["rule"], f"{r['op']} {_fmt(r['threshold'])}", "ALARM" if r["alarm"] else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    alarms = s["alarms"]
    lines.append("\nalarms: " + (", ".join(f"{a['rule']} ({a['model_version']})" for a in alarms) if alarms else "none"))
    pending = s["policy"]["pending"]
    if pending:
        lines.append(f"pending retrain: rule {pending['rule']}: {pending['detail']}")
    rt = s.get("retrain") or {}
    running = rt.get("running")
    lines.append(f"retrain: {'running ' + running['job_id'] if running else 'idle'}, {len(rt.get('queued', []))} queued")
    last = rt.get("last")
    if last:
        lines.append(f"last retrain {last['job_id']}: {last['outcome']} ({(last.get('result') or {}).get('reason', '')})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from monitor.service.client import DaemonClient  # urllib.request (and ssl): only when talking to the daemon

    config = load_config(args.config)
    status = DaemonClient(args.url or config.service.http.url).request("GET", "/api/v1/status")
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0
