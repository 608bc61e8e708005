"""The demo's report: a timeline on the terminal, a JSON summary and PNG charts of every signal."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monitor.demo.scenario import DemoResult

_PANELS = (
    ("activation max |shift| (SE units)", lambda w: w["activations"]["max_abs_shift"], "log"),
    ("share of dims shifted (BH)", lambda w: w["activations"]["share_significant"], "linear"),
    ("prediction entropy (mean, normalised)", lambda w: w["predictions"]["entropy_mean"], "linear"),
    ("max probability (mean)", lambda w: w["predictions"]["max_prob_mean"], "linear"),
    ("predicted-class TVD vs reference", lambda w: w["predictions"]["class_tvd"], "linear"),
    ("MMD² (unbiased)", lambda w: w["mmd"]["mmd2"] if w["mmd"] else None, "linear"),
    ("MMD permutation p-value", lambda w: w["mmd"]["p_value"] if w["mmd"] else None, "log"),
    ("online MMD statistic / threshold", lambda w: w["online"]["statistic"], "linear"),
)


def timeline_lines(r: DemoResult) -> list[str]:
    t = r.timeline
    rel = lambda x: "-" if x is None else f"{x - t.started:7.1f} s"  # noqa: E731
    lines = [f"{'event':<34}{'time':>10}  detail"]
    lines.append(f"{'onset of the shift':<34}{rel(t.onset_time):>10}  row {t.onset_row}")
    if t.first_alarm_time is not None and t.onset_time is not None:
        lines.append(
            f"{'first alarm':<34}{rel(t.first_alarm_time):>10}  rule {t.first_alarm_rule}: "
            f"{t.first_alarm_row - (t.onset_row or 0)} rows / {t.first_alarm_time - t.onset_time:.1f} s after onset"
        )
    else:
        lines.append(f"{'first alarm':<34}{'-':>10}  none")
    lines.append(f"{'retrain requested':<34}{rel(t.retrain_requested_time):>10}  {t.retrain_reason or ''}")
    lines.append(f"{'retrain started':<34}{rel(t.retrain_started_time):>10}")
    lines.append(f"{'retrain finished':<34}{rel(t.retrain_finished_time):>10}  outcome {t.retrain_outcome}")
    if t.gate:
        lines.append(f"{'  gate':<34}{'':>10}  {json.dumps(t.gate, sort_keys=True)[:160]}")
    lines.append(f"{'service switched to new version':<34}{rel(t.switch_time):>10}  {t.promoted_version or '-'}")
    for v in r.shifted_accuracy:
        lines.append(
            f"{'  ' + v + ' accuracy':<34}{'':>10}  shifted {r.shifted_accuracy[v]:.3f}, clean {r.clean_accuracy[v]:.3f} (held out)"
        )
    return lines


def _markers(ax: Any, r: DemoResult) -> None:
    t = r.timeline
    for when, colour, label in (
        (t.onset_time, "tab:red", "onset"),
        (t.first_alarm_time, "tab:orange", "first alarm"),
        (t.retrain_started_time, "tab:purple", "retrain start"),
        (t.switch_time, "tab:green", "promoted model serving"),
    ):
        if when is not None:
            ax.axvline(when - t.started, color=colour, linestyle="--", linewidth=1, label=label)


def write_report(r: DemoResult) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = r.report_dir
    out.mkdir(parents=True, exist_ok=True)
    t0 = r.timeline.started
    # Windows are in event time; the demo's rows carry wall-clock timestamps, so both share an axis.
    versions = sorted({w["model_version"] for w in r.windows})
    colours = dict(zip(versions, ("tab:blue", "tab:green", "tab:brown", "tab:gray")))

    fig, axes = plt.subplots(4, 2, figsize=(13, 12), sharex=True)
    for ax, (title, get, scale) in zip(axes.flat, _PANELS):
        for v in versions:
            pts = [(w["end_time"] - t0, get(w)) for w in r.windows if w["model_version"] == v and get(w) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", color=colours[v], label=f"windows of {v}")
            if title.startswith("online"):
                thr = [(w["end_time"] - t0, w["online"]["threshold"]) for w in r.windows if w["model_version"] == v]
                if thr:
                    ax.plot(*zip(*thr), color=colours[v], linestyle=":", label=f"threshold ({v})")
        ax.set_title(title, fontsize=10)
        ax.set_yscale(scale)
        _markers(ax, r)
    axes[0][0].legend(fontsize=7, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the demo started")
    fig.suptitle("driftd demo: drift signals per window", fontsize=13)
    fig.tight_layout()
    signals_png = out / "signals.png"
    fig.savefig(signals_png, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot([s["time"] - t0 for s in r.served], [s["accuracy"] for s in r.served], color="lightgray",
            label="true accuracy per tick (known only to the demo)")
    for v in versions:
        # Measured accuracy as the daemon showed it live: labels arrive after their window closed.
        acc = [(x["time"] - t0, x["accuracy"]) for x in r.live if x["model_version"] == v and x["accuracy"] is not None]
        est = [(w["end_time"] - t0, w["estimate"]["estimated_accuracy"]) for w in r.windows
               if w["model_version"] == v and w["estimate"]]
        if acc:
            ax.plot(*zip(*acc), marker="o", color=colours[v], label=f"measured accuracy, delayed labels ({v})")
        if est:
            ax.plot(*zip(*est), marker="x", linestyle="--", color=colours[v], label=f"estimated accuracy, no labels ({v})")
    _markers(ax, r)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("seconds since the demo started")
    ax.set_title("accuracy: measured on delayed labels vs estimated before they arrive")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    accuracy_png = out / "accuracy.png"
    fig.savefig(accuracy_png, dpi=90)
    plt.close(fig)

    summary = {
        "timeline": asdict(r.timeline),
        "start_version": r.start_version,
        "final_version": r.final_version,
        "held_out_accuracy": {"shifted": r.shifted_accuracy, "clean": r.clean_accuracy},
        "rows_served": r.served[-1]["rows"] if r.served else 0,
        "windows": len(r.windows),
        "config": str(r.config_path),
    }
    summary_json = out / "summary.json"
    summary_json.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return {"signals": signals_png, "accuracy": accuracy_png, "summary": summary_json}
