"""Batch MMD permutation test: driftd vs alibi-detect's MMDDrift, and power/time per projection.

Run: .venv/bin/python bench/mmd_bench.py [--skip-alibi] [--repeats N] [--power-windows N]

(a) n_ref=2000, window=500, d=512, 100 permutations: MMD^2 agreement with alibi (and a float64
naive value), decisions on a null and a shifted window, our time vs alibi's and vs the bare
window x reference kernel block. (b) power and time per window for the defaults: raw d=512 vs
PCA-32 vs random-32, n_ref 1000 vs 2000, window 250 vs 500. Times are medians of repeats;
ratios compare figures measured in this run. alibi-detect runs in bench/.venv-alibi (created
here on first use) through bench/alibi_reference.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monitor.config import MmdConfig  # noqa: E402
from monitor.signals.mmd import (  # noqa: E402
    MmdReference,
    PermutationPlan,
    PermutationSchedule,
    gaussian_kernel,
    median_bandwidth,
    mmd_test,
)
from monitor.signals.projection import fit_projection  # noqa: E402

ALIBI_VENV = REPO / "bench" / ".venv-alibi"
ALIBI_PACKAGES = ["torch==2.14.1", "alibi-detect[torch]==0.13.0"]


def alibi_python() -> Path:
    """The alibi-detect venv's interpreter; creates the venv (clean, no system packages) if absent."""
    python = ALIBI_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {ALIBI_VENV} and installing {' '.join(ALIBI_PACKAGES)} (slow, once)", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(ALIBI_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *ALIBI_PACKAGES], check=True)
    return python


def run_alibi(task: str, arrays: dict[str, np.ndarray]) -> dict:
    """Write ``arrays`` to a temp npz, run bench/alibi_reference.py TASK in the alibi venv, read its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.npz", Path(tmp) / "out.json"
        np.savez(src, **arrays)
        subprocess.run(
            [str(alibi_python()), str(REPO / "bench" / "alibi_reference.py"), task, str(src), str(out)],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        return json.loads(out.read_text())


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn within every repeat, so a load spike on
    the shared box hits all of them rather than whichever ran during it."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def feature_model(dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales, rotation) of synthetic backbone features: a decaying spectrum (sd_i ~ i^-1/2)
    in a random orthonormal basis, like pooled CNN features."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    return 1.0 / np.sqrt(np.arange(1, dims + 1)), rotation


def draw(model: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, rows: int, shift: float = 0.0) -> np.ndarray:
    """Rows of the feature model; ``shift`` moves the mean by shift x (one fixed draw's latent)."""
    scales, rotation = model
    z = rng.standard_normal((rows, len(scales)))
    if shift:
        z = z + shift * np.random.default_rng(12345).standard_normal(len(scales))
    return ((z * scales) @ rotation).astype(np.float32)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def naive_mmd2_f64(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Unbiased MMD^2 from the pooled float64 kernel (exact reference value)."""
    z = torch.from_numpy(np.concatenate([x, y]).astype(np.float64))
    z = z - z.mean(0)
    k = torch.exp(-torch.cdist(z, z) ** 2 / (2 * sigma * sigma))
    m, n = len(x), len(y)
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    return float((kxx.sum() - m) / (m * (m - 1)) + (kyy.sum() - n) / (n * (n - 1)) - 2 * kxy.mean())


def versus_alibi(args: argparse.Namespace) -> None:
    print("== (a) permutation test vs alibi-detect MMDDrift: n_ref=2000, window=500, d=512, B=100 ==")
    model = feature_model(512, seed=0)
    rng = np.random.default_rng(1)
    x_ref = draw(model, rng, 2000)
    windows = {"null": draw(model, rng, 500), "shifted": draw(model, rng, 500, shift=0.2)}
    sigma = median_bandwidth(x_ref)
    ref = MmdReference.build(x_ref, sigma)
    redraw = MmdConfig().redraw_permutations_every
    schedule = PermutationSchedule(ref, permutations=100, redraw_every=redraw, seed=2)
    plan = schedule.for_window(0, 500)
    ours = {name: mmd_test(ref, y, plan=plan) for name, y in windows.items()}

    def measure() -> dict[str, dict[str, float]]:
        out = {}
        for name, y in windows.items():
            yt = torch.from_numpy(y) - ref.center
            out[name] = interleaved_medians(
                {
                    # the bare block: the reference's squared norms precomputed, as ours has them
                    "kernel": lambda yt=yt: gaussian_kernel(ref.x, yt, sigma, sq_a=ref.x_sq),
                    "test": lambda y=y: mmd_test(ref, y, plan=plan),
                },
                args.repeats,
            )
        out["plan"] = {"draw": median_seconds(lambda: PermutationPlan.draw(ref, 500, 100, np.random.default_rng(4)), 3)}
        return out

    timings = measure()
    build_s = median_seconds(lambda: MmdReference.build(x_ref, sigma), 3)
    print(f"reference build (K_rr once): {build_s * 1e3:.1f} ms")
    alibi = None
    if not args.skip_alibi:
        alibi = run_alibi(
            "mmd",
            {
                "x_ref": x_ref, "sigma": np.array(sigma), "permutations": np.array(100), "threads": np.array(args.threads),
                "repeats": np.array(max(1, args.repeats // 2)), "window_names": np.array(list(windows)),
                **{f"window_{k}": v for k, v in windows.items()},
            },
        )
        # Measure ours again after alibi's run, so both sides see the same (shared) machine load.
        again = measure()
        timings = {k: {f: (v + again[k][f]) / 2 for f, v in d.items()} for k, d in timings.items()}
    draw_s = timings["plan"]["draw"]
    # A window's cost in the daemon: the test plus its share of the plan draw (one per `redraw` windows).
    ours_s = {name: timings[name]["test"] + draw_s / redraw for name in windows}
    kernel_s = {name: timings[name]["kernel"] for name in windows}
    print(
        f"permutation plan draw (B=100, incl. the S x S sums over K_rr): {draw_s * 1e3:.1f} ms, "
        f"once per {redraw} windows (signals.mmd.redraw_permutations_every) -> "
        f"{draw_s / redraw * 1e3:.1f} ms a window; a fresh draw every window would cost "
        + ", ".join(f"{(timings[n]['test'] + draw_s) / kernel_s[n]:.2f}x K_rw ({n})" for n in windows)
    )
    header = (
        f"{'window':8} {'ours mmd2':>12} {'naive f64':>12} {'alibi mmd2':>12} {'rel(alibi)':>10} "
        f"{'p ours':>7} {'p alibi':>7} {'drift o/a':>9} {'ours ms':>8} {'alibi ms':>9} {'speedup':>8} {'ours/K_rw':>9}"
    )
    print(header)
    for name, y in windows.items():
        r = ours[name]
        naive = naive_mmd2_f64(x_ref, y, sigma)
        a = alibi[name] if alibi else None
        drift = f"{int(r.p_value < 0.05)}/{a['is_drift'] if a else '-'}"
        print(
            f"{name:8} {r.mmd2:12.6e} {naive:12.6e} "
            + (f"{a['mmd2']:12.6e} {rel(r.mmd2, a['mmd2']):10.1e} " if a else f"{'-':>12} {'-':>10} ")
            + f"{r.p_value:7.3f} " + (f"{a['p_value']:7.3f} " if a else f"{'-':>7} ")
            + f"{drift:>9} {ours_s[name] * 1e3:8.1f} "
            + (f"{a['seconds'] * 1e3:9.1f} {a['seconds'] / ours_s[name]:7.1f}x " if a else f"{'-':>9} {'-':>8} ")
            + f"{ours_s[name] / kernel_s[name]:8.2f}x"
        )
    for name, y in windows.items():
        naive = naive_mmd2_f64(x_ref, y, sigma)
        line = f"{name}: |ours - naive f64| / |naive| = {rel(ours[name].mmd2, naive):.1e}"
        if alibi:
            # alibi sums a float32 pooled kernel in float32: its own error shows against float64.
            line += f", |alibi - naive f64| / |naive| = {rel(alibi[name]['mmd2'], naive):.1e}"
        print(line)


def power_table(args: argparse.Namespace) -> None:
    print(f"\n== (b) power over {args.power_windows} windows (shift 0.05) and null rejection rate, B=100, alpha=0.05 ==")
    print(f"{'projection':12} {'n_ref':>6} {'window':>7} {'power':>6} {'null rej':>8} {'ms/window':>10} {'build ms':>9}")
    model = feature_model(512, seed=0)
    for proj_kind, dims in (("none", 512), ("pca", 32), ("random", 32)):
        for n_ref in (1000, 2000):
            for window in (250, 500):
                rng = np.random.default_rng(7)
                x_raw = draw(model, rng, n_ref)
                start = time.perf_counter()
                proj = fit_projection(x_raw, proj_kind, dims, seed=0)
                x = proj.apply(x_raw)
                ref = MmdReference.build(x, median_bandwidth(x))
                build = time.perf_counter() - start
                schedule = PermutationSchedule(
                    ref, permutations=100, redraw_every=MmdConfig().redraw_permutations_every, seed=3
                )
                hits, false, times = 0, 0, []
                for i in range(args.power_windows):
                    shifted, null = draw(model, rng, window, shift=0.05), draw(model, rng, window)
                    start = time.perf_counter()
                    plan = schedule.for_window(2 * i, window)  # incl. its plan draws, amortised
                    hits += mmd_test(ref, proj.apply(shifted), plan=plan).p_value < 0.05
                    times.append(time.perf_counter() - start)
                    plan = schedule.for_window(2 * i + 1, window)
                    false += mmd_test(ref, proj.apply(null), plan=plan).p_value < 0.05
                label = "raw-512" if proj_kind == "none" else f"{proj_kind}-{dims}"
                print(
                    f"{label:12} {n_ref:6d} {window:7d} {hits / args.power_windows:6.2f} "
                    f"{false / args.power_windows:8.2f} {statistics.fmean(times) * 1e3:10.1f} {build * 1e3:9.1f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-alibi", action="store_true", help="only our figures (no baseline venv)")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (median taken)")
    parser.add_argument("--power-windows", type=int, default=50, help="windows per power/null estimate")
    parser.add_argument("--skip-power", action="store_true", help="only (a), the comparison with alibi")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (see bench/README.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu")
    versus_alibi(args)
    if not args.skip_power:
        power_table(args)


if __name__ == "__main__":
    main()
