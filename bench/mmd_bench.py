"""Batch MMD permutation test: driftd vs alibi-detect's MMDDrift and a minimal implementation.

Run: .venv/bin/python bench/mmd_bench.py [--skip-alibi] [--repeats N] [--large]

(a) The fair comparison, at n_ref 2000 x window n in {500, 2000} x d in {512, 2048}, 100
permutations, raw features: alibi-detect's MMDDrift at its default settings and threads (all
cores) against driftd paying what alibi pays per call: a fresh permutation draw (with its
reference-only sums) and the test. Beside it, in the same run and on driftd's thread count:
a minimal implementation that caches K_rr (``MinimalMmd``), and the amortised daemon figure
(the test plus 1/redraw_permutations_every of a draw), labelled as such. Also MMD^2 and
p-value agreement with alibi and with a float64 naive value.
(b) --large: reference build time and peak memory for 10k and 100k rows (blocked K_rr sums).

Times are medians of interleaved repeats, ours timed before and after alibi's subprocess;
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

from monitor.signals.config import MmdConfig  # noqa: E402
from monitor.signals.kernels import gaussian_kernel, median_bandwidth  # noqa: E402
from monitor.signals.mmd import PermutationPlan, mmd_test  # noqa: E402
from monitor.signals.mmd_reference import MmdReference  # noqa: E402

ALIBI_VENV = REPO / "bench" / ".venv-alibi"
N_REF, PERMUTATIONS = 2000, 100
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


class MinimalMmd:
    """The baseline a careful user would write in an afternoon: K_rr computed once; per call
    K_rw and K_ww, the pooled kernel assembled, B fresh permutations as 0/1 window indicators W
    and every statistic from one product W @ K (float32 throughout)."""

    def __init__(self, x_ref: np.ndarray, sigma: float):
        self.x = torch.from_numpy(x_ref)
        self.sigma = sigma
        self.k_rr = gaussian_kernel(self.x, self.x, sigma, same=True)

    def test(self, y: np.ndarray, permutations: int, rng: np.random.Generator) -> tuple[float, float]:
        yt = torch.from_numpy(y)
        m, n = len(self.x), len(yt)
        k_rw = gaussian_kernel(self.x, yt, self.sigma)
        k = torch.cat([torch.cat([self.k_rr, k_rw], 1), torch.cat([k_rw.T, gaussian_kernel(yt, yt, self.sigma, same=True)], 1)])
        w = torch.zeros((1 + permutations, m + n))
        w[0, m:] = 1.0
        sets = rng.random((permutations, m + n)).argpartition(m, axis=1)[:, m:]
        w[1:].scatter_(1, torch.from_numpy(sets), 1.0)
        row_sums = k.sum(1)
        ww = ((w @ k) * w).sum(1)
        a = w @ row_sums
        rr, rw = row_sums.sum() - 2 * a + ww, a - ww
        stats = (rr - m) / (m * (m - 1)) + (ww - n) / (n * (n - 1)) - 2 * rw / (m * n)
        return float(stats[0]), (1 + int((stats[1:] >= stats[0]).sum())) / (1 + permutations)


def fair(args: argparse.Namespace) -> None:
    redraw = MmdConfig().redraw_permutations_every
    print(
        f"== (a) fair comparison: n_ref {N_REF}, B {PERMUTATIONS}, raw features; alibi MMDDrift at its default "
        f"threads, driftd and the minimal on {torch.get_num_threads()} (driftd's default signals.threads) =="
    )
    rows = []
    for dims in (512, 2048):
        model = feature_model(dims, seed=0)
        for n in (500, 2000):
            rng = np.random.default_rng(1)
            x_ref, y = draw(model, rng, N_REF), draw(model, rng, n, shift=0.05)
            sigma = median_bandwidth(x_ref)
            ref, minimal = MmdReference.build(x_ref, sigma), MinimalMmd(x_ref, sigma)
            plan = PermutationPlan.draw(ref, n, PERMUTATIONS, np.random.default_rng(3))
            rngs = {"fresh": np.random.default_rng(4), "minimal": np.random.default_rng(5)}
            fns = {
                # what alibi pays per call: the draw (with its reference-only sums) and the test
                "fresh": lambda: mmd_test(ref, y, plan=PermutationPlan.draw(ref, n, PERMUTATIONS, rngs["fresh"])),
                "test": lambda: mmd_test(ref, y, plan=plan),
                "draw": lambda: PermutationPlan.draw(ref, n, PERMUTATIONS, rngs["fresh"]),
                "minimal": lambda: minimal.test(y, PERMUTATIONS, rngs["minimal"]),
            }
            times = interleaved_medians(fns, args.repeats)
            alibi = None
            if not args.skip_alibi:
                alibi = run_alibi(
                    "mmd",
                    {
                        "x_ref": x_ref, "sigma": np.array(sigma), "permutations": np.array(PERMUTATIONS),
                        "threads": np.array(0), "repeats": np.array(args.alibi_repeats),
                        "window_names": np.array(["shifted"]), "window_shifted": y,
                    },
                )
                again = interleaved_medians(fns, args.repeats)
                times = {k: statistics.median([v, again[k]]) for k, v in times.items()}
            ours = mmd_test(ref, y, plan=plan)
            rows.append((dims, n, times, alibi, ours, minimal.test(y, PERMUTATIONS, np.random.default_rng(6)),
                         naive_mmd2_f64(x_ref, y, sigma) if dims * (N_REF + n) <= 2048 * 4000 else None))
            print(f"  d {dims}, n {n} measured", flush=True)
    print(
        f"{'d':>5} {'n':>5} {'alibi s':>8} {'driftd s':>9} {'alibi/driftd':>12} {'minimal s':>9} {'driftd/minimal':>14} "
        f"{'amortised s':>11} {'alibi/amort':>11} {'rel mmd2':>9} {'p driftd':>8} {'p alibi':>7}"
    )
    for dims, n, t, alibi, ours, mini, naive in rows:
        amortised = t["test"] + t["draw"] / redraw
        a_s = alibi["shifted"]["seconds"] if alibi else float("nan")
        rel_mmd2 = rel(alibi["shifted"]["mmd2"], ours.mmd2) if alibi else float("nan")
        print(
            f"{dims:5d} {n:5d} {a_s:8.2f} {t['fresh']:9.4f} {a_s / t['fresh']:11.1f}x {t['minimal']:9.4f} "
            f"{t['fresh'] / t['minimal']:13.2f}x {amortised:11.4f} {a_s / amortised:10.1f}x {rel_mmd2:9.1e} "
            f"{ours.p_value:8.3f} " + (f"{alibi['shifted']['p_value']:7.3f}" if alibi else f"{'-':>7}")
        )
    print(f"(amortised: the daemon's cost per window, the test plus 1/{redraw} of a draw "
          f"(signals.mmd.redraw_permutations_every); not what one alibi call is compared with)")
    if alibi:
        print(f"alibi threads: {rows[0][3]['threads']}")
    for dims, n, t, alibi, ours, mini, naive in rows:
        if naive is not None:
            line = f"d {dims}, n {n}: |driftd - naive f64| / |naive| = {rel(ours.mmd2, naive):.1e}, minimal {rel(mini[0], naive):.1e}"
            if alibi:
                line += f", alibi {rel(alibi['shifted']['mmd2'], naive):.1e}"
            print(line)


def large(args: argparse.Namespace) -> None:
    print("\n== (b) large references: build (blocked K_rr row sums above 4096 rows) and one test, window 500, B 100 ==")
    print(f"{'rows':>7} {'d':>5} {'build s':>8} {'draw s':>7} {'test s':>7} {'peak RSS MB':>11}")
    for rows, dims in ((10_000, 32), (100_000, 32), (10_000, 512)):
        script = (
            "import json, sys, time, numpy as np, torch\n"
            f"torch.set_num_threads({torch.get_num_threads()})\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from monitor.signals.kernels import median_bandwidth\nfrom monitor.signals.mmd import PermutationPlan, mmd_test\n"
            "from monitor.signals.mmd_reference import MmdReference\n"
            f"rng = np.random.default_rng(0); x = rng.standard_normal(({rows}, {dims})).astype(np.float32)\n"
            "y = rng.standard_normal((500, x.shape[1])).astype(np.float32)\n"
            "t0 = time.perf_counter(); ref = MmdReference.build(x, median_bandwidth(x)); t1 = time.perf_counter()\n"
            "plan = PermutationPlan.draw(ref, 500, 100, rng); t2 = time.perf_counter()\n"
            "mmd_test(ref, y, plan=plan); t3 = time.perf_counter()\n"
            "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024\n"
            "print(json.dumps([t1 - t0, t2 - t1, t3 - t2, peak]))\n"
        )
        out = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
        print(f"{rows:7d} {dims:5d} {out[0]:8.1f} {out[1]:7.2f} {out[2]:7.2f} {out[3]:11.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-alibi", action="store_true", help="only our figures (no baseline venv)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats of ours and the minimal (median taken)")
    parser.add_argument("--alibi-repeats", type=int, default=2, help="alibi predict calls per size (median taken)")
    parser.add_argument("--large", action="store_true", help="also (b): 10k and 100k-row reference builds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of driftd and the minimal (driftd's default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu, load {open('/proc/loadavg').read().split()[0]}")
    fair(args)
    if args.large:
        large(args)
    print(f"load at the end {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
