"""Baseline side of the MMD benchmarks: runs alibi-detect inside its own venv (bench/.venv-alibi).

Usage: python bench/alibi_reference.py {mmd,online} IN.npz OUT.json
Imports nothing from driftd; the driftd bench scripts write IN.npz, run this, and read OUT.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch


def _mmd(data: dict[str, np.ndarray]) -> dict[str, object]:
    from alibi_detect.cd import MMDDrift

    sigma, permutations, repeats = float(data["sigma"]), int(data["permutations"]), int(data["repeats"])
    detector = MMDDrift(
        data["x_ref"], backend="pytorch", p_val=0.05, sigma=np.array([sigma], dtype=np.float32),
        n_permutations=permutations, device="cpu",
    )
    out = {}
    for name in [str(n) for n in data["window_names"]]:
        window = data[f"window_{name}"]
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = detector.predict(window)["data"]
            times.append(time.perf_counter() - start)
        out[name] = {
            "mmd2": float(result["distance"]),
            "p_value": float(result["p_val"]),
            "is_drift": int(result["is_drift"]),
            "seconds": statistics.median(times),
        }
    return out


def _online(data: dict[str, np.ndarray]) -> dict[str, object]:
    from alibi_detect.cd import MMDDriftOnline

    start = time.perf_counter()
    detector = MMDDriftOnline(
        data["x_ref"], ert=float(data["ert"]), window_size=int(data["window"]), backend="pytorch",
        n_bootstraps=int(data["bootstraps"]), sigma=np.array([float(data["sigma"])], dtype=np.float32),
        device="cpu", verbose=False,
    )
    calibration = time.perf_counter() - start
    stream = data["stream"]
    stats = []
    start = time.perf_counter()
    for row in stream:
        stats.append(float(detector.predict(row)["data"]["test_stat"]))
    seconds = time.perf_counter() - start
    return {
        "calibration_seconds": calibration,
        "rows": len(stream),
        "rows_per_second": len(stream) / seconds,
        "statistics": stats,
        "thresholds": [float(t) for t in detector._detector.thresholds],  # all W steps
    }


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] not in ("mmd", "online"):
        print(__doc__, file=sys.stderr)
        return 2
    with np.load(argv[2], allow_pickle=False) as npz:
        data = dict(npz)
    if int(data["threads"]) > 0:  # 0: torch's default (all cores), as a user runs alibi-detect
        torch.set_num_threads(int(data["threads"]))
    result_threads = torch.get_num_threads()
    result = _mmd(data) if argv[1] == "mmd" else _online(data)
    result["threads"] = result_threads
    with open(argv[3], "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
