"""Batch MMD on real backbone features: power per projection, what reference size buys, and the
default alert rule's false-alarm rate and detection delay.

Run: .venv/bin/python bench/mmd_power_bench.py [--part projections|reference|rule|all]
     [--references 2] [--windows 40] [--projection none] [--subtle "blur 0.1" ...]

projections: power per projection on every shift; reference: power by n_ref; rule: per-window
false-alarm rates of p-value rules on null windows and their detection of subtle shifts.

Features are what the inference service logs for a real ImageNet MobileNetV2 (timm) with a head
trained on clean digits (bench/real_features.py): a clean pool (the held-out digits, jittered
copies) and real corruptions of independent copies (retrain.digits.corrupt), plus dense and
sparse synthetic mean shifts added to clean rows. Each test is the daemon's: the reference is a
2000-row sample (projection and median bandwidth fitted on it, as ``reference build`` does), the
test uses ``max_reference_rows`` of it and ``max_window_rows`` window rows, with the daemon's
PermutationSchedule. Windows are the same across projections (paired), so power differences are
not window luck.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from real_features import ServedModel

from monitor.signals.config import MmdConfig
from monitor.signals.kernels import median_bandwidth
from monitor.signals.mmd import (
    _TIE_TOLERANCE,
    PermutationSchedule,
    _mmd2_from_sums,
    _permuted_mmd2,
    _window_sums,
    mmd_test,
)
from monitor.signals.mmd_reference import MmdReference
from monitor.signals.projection import fit_projection

REFERENCE_SAMPLE = 2000  # reference build's default max_rows
PROJECTIONS = (
    ("none", 0), ("random", 32), ("random", 64), ("random", 128), ("random", 256),
    ("pca", 32), ("pca", 64), ("pca", 128), ("pca", 256),
)
# Real corruptions (kind, severity) chosen subtle: raw features detect each in some but not
# all windows at the defaults, so the comparison has room to show a loss.
CORRUPTIONS = (("blur", 0.075), ("blur", 0.1), ("contrast", 0.01), ("rotate", 0.02), ("noise", 0.002))
DENSE_SHIFT = 0.05    # every dimension's mean moved by this many sd (random signs)
SPARSE_SHIFT = 0.15   # 10% of dimensions moved by this many sd (the peers' sparse shape)


@dataclass(frozen=True)
class Data:
    clean: np.ndarray
    sd: np.ndarray
    pools: dict[str, np.ndarray]
    accuracy: dict[str, float]


def load_data(seed: int) -> Data:
    served = ServedModel(seed)
    clean = served.pool(16)
    pools, accuracy = {}, {"null": clean.accuracy}
    for kind, severity in CORRUPTIONS:
        pool = served.pool(4, kind, severity, stream=1)
        pools[f"{kind} {severity:g}"], accuracy[f"{kind} {severity:g}"] = pool.features, pool.accuracy
    return Data(clean.features, clean.features.std(0), pools, accuracy)


Window = Callable[[np.random.Generator, np.ndarray, int], np.ndarray]


def families(data: Data, seed: int) -> dict[str, Window]:
    """name -> window(rng, clean rows outside the reference, rows)."""
    rng = np.random.default_rng([seed, 99])
    dims = data.clean.shape[1]
    signs = rng.choice([-1.0, 1.0], dims).astype(np.float32)
    live = np.flatnonzero(data.sd > 0)
    sparse = rng.choice(live, max(1, len(live) // 10), replace=False)
    dense_delta = (DENSE_SHIFT * data.sd * signs).astype(np.float32)
    sparse_delta = np.zeros(dims, dtype=np.float32)
    sparse_delta[sparse] = SPARSE_SHIFT * data.sd[sparse]

    def clean(r: np.random.Generator, rest: np.ndarray, n: int) -> np.ndarray:
        return data.clean[r.choice(rest, n, replace=False)]

    out: dict[str, Window] = {
        "null": clean,
        f"dense {DENSE_SHIFT:g}sd": lambda r, rest, n: clean(r, rest, n) + dense_delta,
        f"sparse10% {SPARSE_SHIFT:g}sd": lambda r, rest, n: clean(r, rest, n) + sparse_delta,
    }
    for name, pool in data.pools.items():
        out[name] = lambda r, rest, n, pool=pool: pool[r.choice(len(pool), n, replace=False)]
    return out


def label(kind: str, dims: int) -> str:
    return "raw" if kind == "none" else f"{kind}-{dims}"


def build(sample: np.ndarray, kind: str, dims: int, ref_rows: int, seed: int):
    """(projection, MmdReference) as the daemon builds them from a reference sample."""
    proj = fit_projection(sample, kind, max(dims, 1), seed=seed)
    z = proj.apply(sample)
    return proj, MmdReference.build(z[:ref_rows], median_bandwidth(z, seed=seed))


def projections(args: argparse.Namespace, data: Data) -> None:
    cfg = MmdConfig()
    n, m = cfg.max_window_rows, cfg.max_reference_rows
    fams = families(data, args.seed)
    print(f"== power at alpha {cfg.alpha} by projection: n_ref {m} (of a {REFERENCE_SAMPLE}-row sample), window {n}, "
          f"B {cfg.permutations}, {args.references} references x {args.windows} windows per shift ==")
    print("served model accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in data.accuracy.items())
          + f" (synthetic shifts: the clean rows' {data.accuracy['null']:.3f})")
    hits = {label(k, d): {f: 0 for f in fams} for k, d in PROJECTIONS}
    ms = {label(k, d): [] for k, d in PROJECTIONS}
    builds = {label(k, d): [] for k, d in PROJECTIONS}
    for r in range(args.references):
        rng = np.random.default_rng([args.seed, r])
        order = rng.permutation(len(data.clean))
        sample, rest = data.clean[order[:REFERENCE_SAMPLE]], order[REFERENCE_SAMPLE:]
        for kind, dims in PROJECTIONS:
            name = label(kind, dims)
            start = time.perf_counter()
            proj, ref = build(sample, kind, dims, m, seed=r)
            builds[name].append(time.perf_counter() - start)
            schedule = PermutationSchedule(ref, permutations=cfg.permutations, redraw_every=cfg.redraw_permutations_every, seed=r)
            for f_index, (family, window) in enumerate(fams.items()):
                wrng = np.random.default_rng([args.seed, r, f_index])  # the same windows for every projection
                for i in range(args.windows):
                    y = window(wrng, rest, n)
                    start = time.perf_counter()
                    result = mmd_test(ref, proj.apply(y), plan=schedule.for_window(f_index * args.windows + i, n))
                    ms[name].append(time.perf_counter() - start)
                    hits[name][family] += result.p_value <= cfg.alpha
        print(f"  reference {r + 1}/{args.references} done", flush=True)
        _power_table(hits, ms, builds, (r + 1) * args.windows, fams)


def _power_table(hits, ms, builds, total: int, fams) -> None:
    shifted = [f for f in fams if f != "null"]
    width = max(len(f) for f in fams) + 1
    print(f"{'projection':11} " + " ".join(f"{f:>{width}}" for f in fams) + f" {'min ratio':>9} {'ms/window':>9} {'build ms':>8}")
    raw = {f: hits["raw"][f] / total for f in fams}
    for name, h in hits.items():
        power = {f: h[f] / total for f in fams}
        ratio = min(power[f] / raw[f] for f in shifted if raw[f] > 0)
        print(f"{name:11} " + " ".join(f"{power[f]:>{width}.3f}" for f in fams)
              + f" {ratio:9.2f} {statistics.fmean(ms[name]) * 1e3:9.1f} {statistics.median(builds[name]) * 1e3:8.0f}")
    print(f"(null column: rejection rate under no shift; binomial sd over {total} windows ~{np.sqrt(0.25 / total):.3f} at 0.5)")


def reference_size(args: argparse.Namespace, data: Data) -> None:
    """Power by reference rows used (max_reference_rows), at the window size and projection of
    the defaults, on the same windows for every size."""
    cfg = MmdConfig()
    n, kind, dims = cfg.max_window_rows, args.projection, args.projection_dims
    fams = {f: w for f, w in families(data, args.seed).items() if f == "null" or f.startswith(tuple(args.subtle))}
    sizes = [int(v) for v in args.reference_rows]
    print(f"\n== power at alpha {cfg.alpha} by reference rows: {label(kind, dims)}, window {n}, B {cfg.permutations}, "
          f"{args.references} references x {args.windows} windows per shift ==")
    hits = {m: {f: 0 for f in fams} for m in sizes}
    ms = {m: [] for m in sizes}
    for r in range(args.references):
        rng = np.random.default_rng([args.seed, 200 + r])
        order = rng.permutation(len(data.clean))
        sample, rest = data.clean[order[:max(sizes)]], order[max(sizes):]
        for m in sizes:
            proj, ref = build(sample[:max(m, REFERENCE_SAMPLE)], kind, dims, m, seed=r)
            schedule = PermutationSchedule(ref, permutations=cfg.permutations, redraw_every=cfg.redraw_permutations_every, seed=r)
            for f_index, (family, window) in enumerate(fams.items()):
                wrng = np.random.default_rng([args.seed, 200 + r, f_index])
                for i in range(args.windows):
                    y = proj.apply(window(wrng, rest, n))
                    start = time.perf_counter()
                    hits[m][family] += mmd_test(ref, y, plan=schedule.for_window(f_index * args.windows + i, n)).p_value <= cfg.alpha
                    ms[m].append(time.perf_counter() - start)
            print(f"  n_ref {m} done", flush=True)
    total = args.references * args.windows
    print(f"{'n_ref':>6} " + " ".join(f"{f:>17}" for f in fams) + f" {'ms/window':>9}")
    for m in sizes:
        print(f"{m:6d} " + " ".join(f"{hits[m][f] / total:17.3f}" for f in fams) + f" {statistics.fmean(ms[m]) * 1e3:9.1f}")


def _p_values(ref: MmdReference, y: np.ndarray, plan, budgets: tuple[int, ...]) -> dict[int, float]:
    """p-values of one window with the first B permutations of ``plan`` for each B in ``budgets``
    (the first B of a uniform draw are a uniform draw of B: exactly the test with B). Uses the
    test's internals to share one kernel block; the tie rule is mmd_test's."""
    sums = _window_sums(ref, y, plan)
    n = sums.window_rows
    pooled = ref.rr_total + 2.0 * sums.rw_total + sums.ww_total
    observed = float(_mmd2_from_sums(ref, n, pooled, sums.rw_total + sums.ww_total, sums.ww_total))
    stats = _permuted_mmd2(ref, sums, plan).numpy()
    out = {}
    for b in budgets:
        spread = float(stats[:b].std())
        tol = min(_TIE_TOLERANCE, 1e-3 * spread) if spread > 0 else _TIE_TOLERANCE
        out[b] = (1 + int((stats[:b] >= observed - tol).sum())) / (1 + b)
    return out


def _fires(p: np.ndarray, threshold: float, consecutive: int) -> np.ndarray:
    """Window indices where the rule 'p below threshold for `consecutive` windows' starts firing
    (a run of breaches reaching `consecutive`; a longer run fires once, as the policy's alarm)."""
    run, out = 0, []
    for i, breach in enumerate(p < threshold):
        run = run + 1 if breach else 0
        if run == consecutive:
            out.append(i)
    return np.array(out, dtype=int)


RULES = tuple((t, k) for t in (0.01, 0.02, 0.05) for k in (1, 2, 3))
BUDGETS = (100, 200)


def rule(args: argparse.Namespace, data: Data) -> None:
    cfg = MmdConfig()
    n, m = cfg.max_window_rows, cfg.max_reference_rows
    kind, dims = args.projection, args.projection_dims
    fams = families(data, args.seed)
    subtle = [f for f in fams if f.startswith(tuple(args.subtle))]
    print(f"\n== default rule: {label(kind, dims)}, n_ref {m}, window {n}; {args.rule_references} references x "
          f"{args.null_windows} null windows, then {args.streams} streams of {args.stream_windows} shifted windows "
          f"per subtle shift ({', '.join(subtle)}) ==")
    null = {b: [] for b in BUDGETS}      # per reference: (null windows,) p-values
    shifted = {f: {b: [] for b in BUDGETS} for f in subtle}  # per stream
    for r in range(args.rule_references):
        rng = np.random.default_rng([args.seed, 500 + r])
        order = rng.permutation(len(data.clean))
        sample, rest = data.clean[order[:REFERENCE_SAMPLE]], order[REFERENCE_SAMPLE:]
        proj, ref = build(sample, kind, dims, m, seed=r)
        schedule = PermutationSchedule(ref, permutations=max(BUDGETS), redraw_every=cfg.redraw_permutations_every, seed=r)
        index = 0
        ps = {b: [] for b in BUDGETS}
        for _ in range(args.null_windows):
            got = _p_values(ref, proj.apply(fams["null"](rng, rest, n)), schedule.for_window(index, n), BUDGETS)
            index += 1
            for b in BUDGETS:
                ps[b].append(got[b])
        for b in BUDGETS:
            null[b].append(np.array(ps[b]))
        for f in subtle:
            for _ in range(args.streams):
                ps = {b: [] for b in BUDGETS}
                for _ in range(args.stream_windows):
                    got = _p_values(ref, proj.apply(fams[f](rng, rest, n)), schedule.for_window(index, n), BUDGETS)
                    index += 1
                    for b in BUDGETS:
                        ps[b].append(got[b])
                for b in BUDGETS:
                    shifted[f][b].append(np.array(ps[b]))
        print(f"  reference {r + 1}/{args.rule_references} done", flush=True)
    windows = args.rule_references * args.null_windows
    print(f"{'rule':22} {'B':>4} {'P(p<t) null':>11} {'fires/window null':>17} {'implied':>9} "
          + " ".join(f"{f + ' detect':>18} {'delay':>5}" for f in subtle))
    for t, k in RULES:
        for b in BUDGETS:
            per_ref = np.array([float((p < t).mean()) for p in null[b]])
            fires = sum(len(_fires(p, t, k)) for p in null[b])
            # Given the reference, windows use independent draws and rows: a run of k breaches
            # starts at rate ~ r^k (1 - r); averaged over references (a reference has luck).
            implied = float(np.mean(per_ref ** k * (1 - per_ref)))
            cells = []
            for f in subtle:
                first = [(_fires(p, t, k)[:1] + 1).tolist() for p in shifted[f][b]]
                hit = [x[0] for x in first if x]
                cells.append(f"{len(hit) / len(first):>18.2f} {statistics.median(hit) if hit else float('nan'):>5.1f}")
            name = f"p < {t:g} for {k} window(s)"
            print(f"{name:22} {b:4d} {float(np.mean(per_ref)):11.4f} {fires / windows:17.5f} {implied:9.1e} " + " ".join(cells))
    print(f"(fires/window null: rule firings counted over {windows} null windows; implied: E_ref[r^k (1-r)] from each "
          f"reference's rate r; detect: share of shifted streams of {args.stream_windows} windows that fire, delay: "
          "median windows from the onset to the firing, counting the firing window)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["projections", "reference", "rule", "all"], default="all")
    parser.add_argument("--references", type=int, default=2, help="reference samples (each with its own windows)")
    parser.add_argument("--windows", type=int, default=40, help="windows per shift and reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projection", default=MmdConfig.projection, help="rule/reference parts: projection kind")
    parser.add_argument("--projection-dims", type=int, default=MmdConfig.projection_dims)
    parser.add_argument("--rule-references", type=int, default=4)
    parser.add_argument("--null-windows", type=int, default=400, help="rule: null windows per reference")
    parser.add_argument("--streams", type=int, default=5, help="rule: shifted streams per subtle shift and reference")
    parser.add_argument("--stream-windows", type=int, default=10, help="rule: windows per shifted stream")
    parser.add_argument("--reference-rows", nargs="+", default=["500", "1000", "2000", "4000"],
                        help="reference: n_ref values (the clean pool has ~16k rows)")
    parser.add_argument("--subtle", nargs="+", default=["blur 0.075", "sparse"], help="rule: shifts (name prefixes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the daemon's default is 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu")
    data = load_data(args.seed)
    if args.part in ("projections", "all"):
        projections(args, data)
    if args.part in ("reference", "all"):
        reference_size(args, data)
    if args.part in ("rule", "all"):
        rule(args, data)


if __name__ == "__main__":
    main()
