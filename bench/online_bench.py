"""Online (sequential) MMD: driftd's OnlineMmd vs alibi-detect's MMDDriftOnline.

Run: .venv/bin/python bench/online_bench.py [--skip-alibi] [--bootstraps N] [--alibi-rows N]

n_ref=2000, d=512, window=100, ERT=50, equal bootstraps and sigma on both sides. Prints the
calibration time ratio, update throughput (alibi's predict row by row vs our 1000-row
mini-batches; our row-by-row figure too), and our mean run length to a false alarm on a null
stream beside the ERT. Ratios compare figures measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mmd_bench import draw, feature_model, median_seconds, run_alibi

from monitor.signals.kernels import median_bandwidth
from monitor.signals.online_mmd import OnlineMmd

N_REF, DIMS, WINDOW, ERT = 2000, 512, 100, 50.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-alibi", action="store_true", help="only our figures (no baseline venv)")
    parser.add_argument("--bootstraps", type=int, default=1000, help="bootstraps on both sides (alibi default 1000)")
    parser.add_argument("--alibi-rows", type=int, default=300, help="rows fed to alibi's predict, one at a time")
    parser.add_argument("--runs", type=int, default=100, help="false alarms collected for the mean run length")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (see bench/README.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu")
    print(f"== online MMD: n_ref={N_REF}, d={DIMS}, window={WINDOW}, ERT={ERT:g}, bootstraps={args.bootstraps} ==")
    model = feature_model(DIMS, seed=0)
    rng = np.random.default_rng(1)
    x_ref = draw(model, rng, N_REF)
    sigma = median_bandwidth(x_ref)

    def calibrate(seed: int = 0) -> OnlineMmd:
        return OnlineMmd.calibrate(
            x_ref, sigma=sigma, window_rows=WINDOW, ert_rows=ERT, bootstraps=args.bootstraps, seed=seed
        )

    def measure_ours() -> tuple[list[float], list[float], list[float]]:
        """(calibration s, s per 1000-row batch, s per single-row update) samples."""
        cal = [median_seconds(calibrate, 1) for _ in range(2)]
        det = calibrate()
        batch = [median_seconds(lambda b=draw(model, rng, 1000): det.update(b), 1) for _ in range(6)]
        single = draw(model, rng, 100)
        one = [median_seconds(lambda: [det.update(row[None]) for row in single], 1) / len(single)]
        return cal, batch, one

    # Ours is measured before and after alibi's run and the medians taken, so both sides see
    # the same (shared, noisy) machine load.
    cal, batch, one = measure_ours()

    alibi = None
    if not args.skip_alibi:
        alibi = run_alibi(
            "online",
            {
                "x_ref": x_ref, "sigma": np.array(sigma), "ert": np.array(ERT), "window": np.array(WINDOW),
                "bootstraps": np.array(args.bootstraps), "stream": draw(model, rng, args.alibi_rows),
                "threads": np.array(args.threads),
            },
        )
    if alibi:
        more = measure_ours()
        cal, batch, one = cal + more[0], batch + more[1], one + more[2]
    cal_s = statistics.median(cal)
    ours_rps, ours_single_rps = 1000 / statistics.median(batch), 1 / statistics.median(one)
    print(f"{'':34} {'ours':>12} {'alibi':>12} {'ratio':>8}")
    a_cal = alibi["calibration_seconds"] if alibi else float("nan")
    a_rps = alibi["rows_per_second"] if alibi else float("nan")
    print(f"{'calibration seconds':34} {cal_s:12.2f} {a_cal:12.2f} {a_cal / cal_s:7.1f}x")
    print(f"{'update rows/s (ours 1000-row batch)':34} {ours_rps:12.0f} {a_rps:12.1f} {ours_rps / a_rps:7.1f}x")
    print(f"{'update rows/s (ours row by row)':34} {ours_single_rps:12.0f} {a_rps:12.1f} {ours_single_rps / a_rps:7.1f}x")
    det = calibrate()
    if alibi:
        for step in (1, WINDOW - 1):
            label = f"threshold at step {step}"
            print(f"{label:34} {det.thresholds[step]:12.3e} {alibi['thresholds'][step]:12.3e}")

    # Mean run length to a false alarm on fresh null rows (each alarm resets the detector).
    det = calibrate(seed=1)
    alarms: list[int] = []
    seen = 0
    start = time.perf_counter()
    while len(alarms) < args.runs + 1:
        alarms += [seen + a for a in det.update(draw(model, rng, 1000)).alarm_rows]
        seen += 1000
    runs = np.diff([-1] + alarms)[: args.runs]
    sem = runs.std(ddof=1) / np.sqrt(len(runs))
    print(
        f"null stream: mean run length {runs.mean():.1f} +- {sem:.1f} rows over {len(runs)} false alarms "
        f"(ERT {ERT:g}); {seen} rows in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
