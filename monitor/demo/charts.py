"""The demo's charts. One x-axis for everything: rows served since traffic began (seconds on top).

Rows rather than seconds because a busy host stretches time but not the story: detection,
retrain and recovery happen after the same traffic wherever the demo runs. Every event is a
vertical line, every threshold is drawn and named, the served version and the retrain are
shaded spans, and legends sit outside the plotting area.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from monitor.demo.timeline import DemoResult, Mark

_VERSION_COLOURS = ("tab:blue", "tab:green", "tab:brown", "tab:pink", "tab:olive")
_RETRAIN_RULES = ("accuracy_drop", "estimated_accuracy_drop")

_PANELS: tuple[tuple[str, Callable[[dict], float | None], str], ...] = (
    ("activation max |shift| (standard errors)", lambda w: w["activations"]["max_abs_shift"], "log"),
    ("share of feature dims shifted (BH)", lambda w: w["activations"]["share_significant"], "linear"),
    ("prediction entropy (mean, normalised)", lambda w: w["predictions"]["entropy_mean"], "linear"),
    ("max class probability (mean)", lambda w: w["predictions"]["max_prob_mean"], "linear"),
    ("predicted-class TVD vs reference", lambda w: w["predictions"]["class_tvd"], "linear"),
    ("MMD² vs reference (unbiased)", lambda w: w["mmd"]["mmd2"] if w["mmd"] else None, "linear"),
    ("MMD permutation p-value", lambda w: w["mmd"]["p_value"] if w["mmd"] else None, "log"),
    ("online MMD statistic", lambda w: w["online"]["statistic"], "linear"),
)


class RowAxis:
    """Maps wall-clock times to rows served, and rows to seconds since traffic began."""

    def __init__(self, r: DemoResult):
        t0 = r.timeline.traffic_started or (r.ticks[0].time if r.ticks else 0.0)
        self.times = np.array([t0] + [t.time for t in r.ticks])
        self.rows = np.array([0] + [t.rows for t in r.ticks], dtype=float)
        self.t0 = t0

    def row_at(self, when: float) -> float:
        """Rows served by ``when`` (a batch stamped at ``when`` counts)."""
        i = int(np.searchsorted(self.times, when, side="right")) - 1
        return float(self.rows[max(0, i)])

    def seconds(self, rows: np.ndarray) -> np.ndarray:
        return np.interp(rows, self.rows, self.times - self.t0)

    def rows_of(self, seconds: np.ndarray) -> np.ndarray:
        return np.interp(seconds, self.times - self.t0, self.rows)


def _colours(r: DemoResult) -> dict[str, str]:
    versions = list(dict.fromkeys([r.start_version] + [t.model_version for t in r.ticks]
                                  + [w["model_version"] for w in r.windows]))
    return {v: _VERSION_COLOURS[i % len(_VERSION_COLOURS)] for i, v in enumerate(versions)}


def _spans(r: DemoResult) -> list[tuple[str, float, float]]:
    """(version, first row, last row) of each stretch of traffic one version served."""
    spans: list[tuple[str, float, float]] = []
    for tick in r.ticks:
        if spans and spans[-1][0] == tick.model_version:
            spans[-1] = (tick.model_version, spans[-1][1], float(tick.rows))
        else:
            spans.append((tick.model_version, float(tick.rows - tick.batch_rows), float(tick.rows)))
    return spans


def _marks(r: DemoResult) -> list[tuple[Mark, str, str, str]]:
    """(mark, colour, line style, legend label) for each event that happened."""
    t = r.timeline
    out = []
    if t.onset:
        out.append((t.onset, "tab:red", "-", f"onset of '{r.settings['corruption']}' (row {t.onset.row})"))
    if t.first_alarm:
        out.append((t.first_alarm, "tab:orange", "--", f"first alarm: {t.first_alarm_rule} (row {t.first_alarm.row})"))
    if t.retrain_requested:
        rule = (t.retrain_reason or "").removeprefix("rule ").split(":")[0]
        out.append((t.retrain_requested, "tab:purple", ":", f"retrain requested: {rule} (row {t.retrain_requested.row})"))
    if t.retrain_started:
        out.append((t.retrain_started, "tab:purple", "-.", f"retrain job started (row {t.retrain_started.row})"))
    if t.retrain_finished:
        label = (f"promoted {t.promoted_version}" if t.retrain_outcome == "promoted" else f"retrain {t.retrain_outcome}")
        out.append((t.retrain_finished, "black", ":", f"{label} (row {t.retrain_finished.row})"))
    if t.switch:
        out.append((t.switch, "tab:green", "-", f"service serves {t.promoted_version} (row {t.switch.row})"))
    return out


def _decorate(ax: Any, r: DemoResult, colours: dict[str, str], *, band_labels: bool) -> None:
    """Served-version spans, the retrain span and the event lines on one axes."""
    t = r.timeline
    for version, start, end in _spans(r):
        ax.axvspan(start, end, color=colours[version], alpha=0.06, linewidth=0)
        if band_labels:
            ax.text(start + 0.005 * _xmax(r), 1.15, f"serving {version}", fontsize=8, color=colours[version],
                    va="center", fontweight="bold")
    if t.retrain_started:
        end = t.retrain_finished.row if t.retrain_finished else r.rows_served
        ax.axvspan(t.retrain_started.row, end, facecolor="none", edgecolor="0.75", hatch="//", linewidth=0, alpha=0.4)
        if band_labels:
            took = ("still running when traffic stopped" if t.retrain_finished is None else
                    f"{t.retrain_finished.time - t.retrain_started.time:.0f} s")
            ax.text((t.retrain_started.row + end) / 2, 1.06, f"retrain running ({took})", fontsize=8, ha="center",
                    va="center", color="0.3")
    for mark, colour, style, _ in _marks(r):
        ax.axvline(mark.row, color=colour, linestyle=style, linewidth=1.2)


def _xmax(r: DemoResult) -> float:
    return float(max(1, r.rows_served))


def _time_axis(ax: Any, axis: RowAxis) -> None:
    """Seconds since traffic started along the top; ticks where they do not crowd (traffic
    slows while a retrain runs, so equal seconds are unequal rows)."""
    top = ax.secondary_xaxis("top", functions=(axis.seconds, axis.rows_of))
    span = float(axis.times[-1] - axis.t0)
    step = next(s for s in (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600) if span / s <= 12)
    min_gap = 0.035 * float(axis.rows[-1] or 1)
    ticks: list[float] = []
    for sec in np.arange(0.0, span + 1e-9, step):
        row = float(axis.rows_of(np.array([sec]))[0])
        if not ticks or row - float(axis.rows_of(np.array([ticks[-1]]))[0]) >= min_gap:
            ticks.append(float(sec))
    top.set_xticks(ticks)
    top.set_xlabel("seconds since traffic started", fontsize=9)


def _event_handles(r: DemoResult) -> tuple[list[Any], list[str]]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Line2D([], [], color=c, linestyle=s, linewidth=1.2) for _, c, s, _ in _marks(r)]
    labels = [label for *_, label in _marks(r)]
    if r.timeline.retrain_started:
        handles.append(Patch(facecolor="none", edgecolor="0.75", hatch="//"))
        labels.append("retrain running")
    return handles, labels


def estimate_note(r: DemoResult, axis: RowAxis) -> str | None:
    """Why the label-free estimate and the truth differ after the onset, with this run's figures."""
    t = r.timeline
    if t.onset is None:
        return None
    v = r.start_version
    end = t.switch.row if t.switch else math.inf
    est = [w["estimate"]["estimated_accuracy"] for w in r.windows if w["model_version"] == v and w["estimate"]
           and t.onset.row + r.settings["window_rows"] <= axis.row_at(w["end_time"]) <= end]
    truth = [k.accuracy for k in r.ticks if k.shifted and k.model_version == v]
    if not est or not truth:
        return None
    methods = sorted({str(w["estimate"]["method"]) for w in r.windows if w["estimate"] and "method" in w["estimate"]})
    how = f" ({', '.join(methods)})" if methods else ""
    gap = float(np.mean(est)) - float(np.mean(truth))
    figures = (f"After the onset the label-free estimate{how} for {v} averaged {np.mean(est):.2f} while its true "
               f"accuracy was {np.mean(truth):.2f}.")
    if abs(gap) < 0.1:
        return figures + " The estimate tracked the truth within 0.1 before any label arrived."
    return figures + (
        " A label-free estimate can only judge new inputs by what the model and the clean reference tell it. "
        "Under covariate shift the model is often confidently wrong on inputs unlike the reference, so the "
        "estimate lags the truth; the accuracy measured on delayed labels is what settles it, which is why the "
        "retrain rules watch both.")


def accuracy_chart(r: DemoResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = RowAxis(r)
    colours = _colours(r)
    fig, ax = plt.subplots(figsize=(13, 6))
    _decorate(ax, r, colours, band_labels=True)
    ax.plot([k.rows for k in r.ticks], [k.accuracy for k in r.ticks], color="0.75", linewidth=1,
            label="true accuracy of each batch (known only to the demo)")
    thresholds_drawn: set[str] = set()
    for version, start, end in _spans(r):
        c = colours[version]
        acc = [(x.row, x.accuracy) for x in r.live if x.model_version == version and x.accuracy is not None
               and start <= x.row <= end]
        est = [(axis.row_at(w["end_time"]), w["estimate"]["estimated_accuracy"]) for w in r.windows
               if w["model_version"] == version and w["estimate"]]
        first = version not in thresholds_drawn
        if acc:
            ax.plot(*zip(*acc), color=c, linewidth=1.8, marker="o", markersize=2.5,
                    label=f"{version}: accuracy on delayed labels, as driftd showed it" if first else None)
        if est:
            ax.plot(*zip(*est), color=c, linestyle="--", marker="x", markersize=4, linewidth=1,
                    label=f"{version}: label-free estimate, per window" if first else None)
        threshold = _threshold(r, version)
        if threshold is not None:
            ax.hlines(threshold, start, end, colors=c, linestyles=(0, (1, 1)), linewidth=1.5,
                      label=f"{version}: retrain below {threshold:.3f} ({' / '.join(_RETRAIN_RULES)})" if first else None)
            ax.text(start + 0.005 * _xmax(r), threshold + 0.012, f"{threshold:.3f}", color=c, fontsize=8, va="bottom")
        thresholds_drawn.add(version)
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_xlim(0, _xmax(r))
    ax.set_ylabel("accuracy")
    ax.set_xlabel("rows served since traffic started")
    _time_axis(ax, axis)
    ax.set_title("accuracy: what driftd measured on delayed labels, what it estimated before they arrived, "
                 "and the truth", fontsize=11)
    handles, labels = ax.get_legend_handles_labels()
    extra_h, extra_l = _event_handles(r)
    ax.legend(handles + extra_h, labels + extra_l, loc="upper left", bbox_to_anchor=(1.04, 1.0), fontsize=8,
              frameon=False)
    note = estimate_note(r, axis)
    if note:
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap(note, 150)), fontsize=8, va="bottom", color="0.25")
    fig.subplots_adjust(left=0.06, right=0.70, top=0.86, bottom=0.2 if note else 0.12)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _threshold(r: DemoResult, version: str) -> float | None:
    """The retrain threshold in force for ``version`` as driftd reported it (last poll)."""
    for view in reversed(r.live):
        if view.model_version == version:
            for rule in _RETRAIN_RULES:
                if rule in view.thresholds:
                    return view.thresholds[rule]
    return None


def _rule_threshold(r: DemoResult, rule: str) -> float | None:
    values = [v.thresholds[rule] for v in r.live if rule in v.thresholds]
    return values[-1] if values else None


def signals_chart(r: DemoResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    axis = RowAxis(r)
    colours = _colours(r)
    fig, axes = plt.subplots(4, 2, figsize=(13, 13), sharex=True)
    p_threshold = _rule_threshold(r, "mmd_p_value")
    for ax, (title, get, scale) in zip(axes.flat, _PANELS):
        _decorate(ax, r, colours, band_labels=False)
        for version in colours:
            windows = [w for w in r.windows if w["model_version"] == version]
            pts = [(axis.row_at(w["end_time"]), get(w)) for w in windows if get(w) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", color=colours[version])
            if title.startswith("online"):
                thr = [(axis.row_at(w["end_time"]), w["online"]["threshold"]) for w in windows]
                if thr:
                    ax.plot(*zip(*thr), color=colours[version], linestyle=(0, (1, 1)), linewidth=1.5)
                alarmed = [(axis.row_at(w["end_time"]), w["online"]["statistic"]) for w in windows if w["online"]["alarm"]]
                if alarmed:
                    ax.scatter(*zip(*alarmed), s=60, facecolors="none", edgecolors="tab:red", linewidths=1.2, zorder=3)
        if title.startswith("MMD permutation") and p_threshold is not None:
            ax.axhline(p_threshold, color="tab:red", linestyle=(0, (1, 1)), linewidth=1.5)
            floor = 1 / (1 + int(r.settings["mmd_permutations"]))
            title += (f"\nrule mmd_p_value: alert below {p_threshold:g} (red dotted); "
                      f"{r.settings['mmd_permutations']} permutations: smallest p {floor:.4f}")
            ax.set_ylim(floor / 2, 1.2)
        if title.startswith("online"):
            title = ("online MMD statistic at window close\nalarms when above its threshold (dotted) and restarts; "
                     "red ring: an alarm in that window")
        ax.set_title(title, fontsize=10)
        if scale == "log":
            ax.set_yscale(scale)
        ax.set_xlim(0, _xmax(r))
    for ax in axes[0]:
        _time_axis(ax, axis)
    for ax in axes[-1]:
        ax.set_xlabel("rows served since traffic started")
    handles: list[Any] = [Line2D([], [], color=c, marker=".") for c in colours.values()]
    labels = [f"windows of {v}" for v in colours]
    extra_h, extra_l = _event_handles(r)
    fig.legend(handles + extra_h, labels + extra_l, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle("driftd demo: every drift signal, one point per window (shading: version served)", fontsize=13)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.92, bottom=0.1, hspace=0.45, wspace=0.15)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path

