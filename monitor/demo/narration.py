"""The demo's words for a retrain's progress events and for the gate's decision.

Both read what the job wrote (retrain.progress events, the result's ``gate`` object) and say it
plainly; a figure the job did not report is left out rather than guessed, and the gate's own
``reason`` is always quoted, so whatever the gate decides is reported as it decided it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_PHASES = {"head": "the new head on frozen features", "finetune": "guarded fine-tuning of the backbone"}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def progress_line(event: Mapping[str, Any], max_epochs: Mapping[str, int]) -> str | None:
    """One line for a progress event (None for events that say nothing new to a user)."""
    kind = event.get("event")
    phase = event.get("phase")
    if kind == "started":
        return f"retrain job running on {event.get('device', '?')}"
    if kind == "phase" and phase == "plan":
        return f"plan: {event.get('message', '')}"
    if kind == "phase":
        val = _num(event.get("val_loss"))
        start = f" (validation loss {val:.3f})" if val is not None else ""
        return f"phase {phase}: {_PHASES.get(str(phase), str(phase))}{start}"
    if kind == "epoch":
        parts = [f"{phase} epoch {event.get('epoch')}/{max_epochs.get(str(phase), '?')}"]
        for key, label in (("val_loss", "validation loss"), ("train_loss", "train loss"),
                           ("grad_norm", "max grad norm"), ("weight_drift", "weight drift")):
            value = _num(event.get(key))
            if value is not None and not (key == "weight_drift" and phase == "head"):
                parts.append(f"{label} {value:.3f}")
        return ", ".join(parts)
    if kind in ("guard", "failed"):
        return f"{kind}: {event.get('message', '')}"
    return None  # gate / promoted / rejected: the result, with the gate's figures, follows


def gate_lines(gate: Mapping[str, Any], thresholds: Mapping[str, float]) -> list[str]:
    """The gate's figures against the thresholds it applied, then its verdict in its own words."""
    lines = []
    cur_p, cand_p = _num(gate.get("current_production")), _num(gate.get("candidate_production"))
    cur_r, cand_r = _num(gate.get("current_reference")), _num(gate.get("candidate_reference"))
    if cur_p is not None and cand_p is not None:
        rows = gate.get("production_rows")
        need = thresholds.get("min_gain")
        lines.append(
            f"recent production data: accuracy {cur_p:.3f} -> {cand_p:.3f}, gain {cand_p - cur_p:+.3f}"
            + (f" (needs >= {need:+.3f})" if need is not None else "")
            + (f" on {rows} held-out rows" if rows is not None else ""))
    if cur_r is not None and cand_r is not None:
        rows = gate.get("reference_rows")
        allowed = thresholds.get("max_forgetting")
        lines.append(
            f"source data (forgetting): accuracy {cur_r:.3f} -> {cand_r:.3f}, drop {cur_r - cand_r:+.3f}"
            + (f" (allowed <= {allowed:.3f})" if allowed is not None else "")
            + (f" on {rows} held-out rows" if rows is not None else ""))
    alpha = _num(gate.get("wise_alpha"))
    if alpha is not None:
        lines.append(f"WiSE-FT mix: alpha {alpha:g} of the fine-tuned weights")
    seconds = _num(gate.get("train_seconds"))
    if seconds is not None:
        lines.append(f"training took {seconds:.1f} s" + (
            f"; guard stopped it: {gate['guard']}" if gate.get("guard") else ""))
    if gate.get("reason"):
        lines.append(f"verdict: {gate['reason']}")
    return lines
