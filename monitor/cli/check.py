"""`driftd check`: process what is new since the cursor once and print each window's signals.

Labels are joined first and windows scored after: every window's own predictions are scored
against whatever labels the pass joined (``win_acc``/``win_lab``), whatever the order of the
inference and label files; ``acc``/``acc_n`` are the last-N accuracy as the window closed."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from typing import TYPE_CHECKING

from monitor.cli.common import add_config_argument, config_from_flags

if TYPE_CHECKING:
    from monitor.signals.results import WindowSignals

_FLAGS = {
    "logs": "logs.inference",
    "labels": "logs.labels",
    "reference": "reference_dir",
    "state": "state_dir",
    "window_rows": "window.rows",
}

_COLUMNS = (
    ("version", lambda w: w.model_version),
    ("win", lambda w: w.index),
    ("rows", lambda w: w.rows),
    ("start", lambda w: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(w.start_time))),
    ("act_max_z", lambda w: w.activations.max_abs_shift),
    ("act_sig", lambda w: w.activations.share_significant),
    ("entropy", lambda w: w.predictions.entropy_mean),
    ("max_prob", lambda w: w.predictions.max_prob_mean),
    ("class_tvd", lambda w: w.predictions.class_tvd),
    ("mmd2", lambda w: None if w.mmd is None else w.mmd.mmd2),
    ("mmd_p", lambda w: None if w.mmd is None else w.mmd.p_value),
    ("online", lambda w: f"{w.online.statistic:.4f}/{w.online.threshold:.4f}{'!' if w.online.alarm else ''}"),
    ("acc", lambda w: w.accuracy.accuracy_last_n),
    ("acc_n", lambda w: w.accuracy.labels_last_n),
    ("est_acc", lambda w: None if w.estimate is None else w.estimate.estimated_accuracy),
)
# (labels, correct) of each window's own predictions, scored after the pass
_SCORED = (
    ("win_acc", lambda n, hits: hits / n if n else None),
    ("win_lab", lambda n, hits: n),
)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}"
    return str(value)


def format_table(windows: list[WindowSignals], scored: list[tuple[int, int]] | None = None) -> str:
    scored = scored if scored is not None else [(0, 0)] * len(windows)
    rows = [[name for name, _ in _COLUMNS] + [name for name, _ in _SCORED]] + [
        [_cell(get(w)) for _, get in _COLUMNS] + [_cell(get(*s)) for _, get in _SCORED]
        for w, s in zip(windows, scored)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(widths[i]) for i, c in enumerate(r)) for r in rows)


def run(args: argparse.Namespace) -> int:
    config = config_from_flags(args, _FLAGS)
    from monitor.engine.cycle import Engine  # torch and scipy load only for commands that need them
    from monitor.signals.results import to_json

    state_dir = config.monitor.state_dir
    existed = state_dir.exists()
    engine = Engine(config.monitor)  # a missing log directory fails here, before the state directory is made
    try:
        windows, evaluations = engine.catch_up_with_labels()
        scored = [engine.window_accuracy(w) for w in windows]  # join first, then score
        counters = engine.counters()
        watermark = engine.watermark
    finally:
        engine.close()
    # On stderr, so --json stays one document: where the cursor lives decides what the next run reads.
    how = "continuing from its cursor" if existed else "created now"
    print(f"state: {state_dir} ({how}; the next check starts after the rows read now; delete it, or pass "
          "another --state, to start over)", file=sys.stderr)
    if args.json:
        json.dump(
            {
                "state_dir": str(state_dir),
                "windows": [{**to_json(w), "labelled": {"labels": n, "accuracy": hits / n if n else None}}
                            for w, (n, hits) in zip(windows, scored)],
                "label_evaluations": [to_json(e) for e in evaluations],
                "event_time": watermark,
                "counters": [{"name": n, "key": k, "value": v} for (n, k), v in sorted(counters.items())],
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        if windows:
            print(format_table(windows, scored))
        else:
            print("no window closed: no new rows since the last check (or fewer than window.rows)")
        summary = ", ".join(f"{n}[{k}]={v:g}" for (n, k), v in sorted(counters.items()))
        print(f"totals: {summary}" if summary else "totals: nothing ingested yet")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="process new log rows once and print each window's signals",
        description="Process what is new since the cursor and print every closed window's drift signals. "
        "The cursor and signal state live in the state directory: state_dir of --config (default "
        "./driftd-state beside the config file), or --state DIR, else ./driftd-state in the current "
        "directory; check says which on stderr. Run it again later to continue where it stopped.",
        epilog="examples:\n  driftd check --config driftd.yaml\n"
        "  driftd check --logs logs/inference --labels logs/labels --reference ref/ --state .driftd-state --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--logs", metavar="PATH", help="inference log directory or URI (logs.inference)")
    p.add_argument("--labels", metavar="PATH", help="label log directory or URI (logs.labels)")
    p.add_argument("--reference", metavar="DIR", help="reference directory (reference_dir)")
    p.add_argument("--state", metavar="DIR", help="state directory for the cursor and signal state (state_dir)")
    p.add_argument("--window-rows", dest="window_rows", type=int, metavar="N", help="rows per window (window.rows)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
