"""Benchmark (b): end-to-end ingest rate with the default config, as a fraction of pyarrow's raw read.

    .venv/bin/python bench/ingest_bench.py [--rows 200000] [--dim 512]

Writes Parquet logs at d=512 (C=10), builds a reference with the default settings, then in the
same run measures (1) pyarrow's raw read of the same files and columns (the baseline) and
(2) driftd's engine, Parquet -> every signal -> checkpoint, with the default config. Prints the
ratio, the time split by stage, and peak RSS for the same rows written as many small files and
as one big file (memory must stay flat in file size). Each measurement runs in a fresh process so
RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

C = 10


def _fixed(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), values.shape[1])


def write_logs(directory: Path, *, rows: int, dim: int, per_file: int, seed: int, version: str = "v1",
               shift: float = 0.0, labels: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(C, dim)).astype(np.float32)
    start = 1_790_000_000_000
    for k, lo in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - lo)
        label = rng.integers(0, C, size=n)
        x = centres[label] + rng.normal(size=(n, dim)).astype(np.float32) + shift
        logits = x @ centres.T / np.sqrt(dim)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        cols = {
            "request_id": pa.array([f"{seed}-{lo + i}" for i in range(n)]),
            "timestamp": pa.array(start + (lo + np.arange(n)) * 10, type=pa.timestamp("ms", tz="UTC")),
            "model_version": pa.array([version] * n),
            "features": _fixed(x.astype(np.float32)),
            "probs": _fixed(p.astype(np.float32)),
            "prediction": pa.array(p.argmax(1).astype(np.int64)),
        }
        if labels:
            cols["label"] = pa.array(label.astype(np.int64))
        pq.write_table(pa.table(cols), directory / f"part-{k:05d}.parquet", row_group_size=65536)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raw_read(logs: Path) -> dict:
    columns = ["request_id", "timestamp", "model_version", "features", "probs", "prediction"]
    t0 = time.perf_counter()
    rows = 0
    for f in sorted(logs.glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=columns):
            batch.column("features").values.to_numpy()  # include the copy to numpy the engine also needs
            rows += batch.num_rows
    dt = time.perf_counter() - t0
    return {"rows": rows, "seconds": dt, "peak_rss_mb": peak_rss_mb()}


def engine_run(work: Path, logs: Path) -> dict:
    """The engine with the default config, stage times measured by wrapping the stage functions."""
    from monitor import engine as engine_mod
    from monitor.engine import window as window_mod
    from monitor.config import parse_config
    from monitor.ingest import labels as labels_mod
    from monitor.ingest import tail as tail_mod

    stages: dict[str, float] = {}

    def timed(owner, name, stage):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t

        setattr(owner, name, wrapper)

    def timed_iter(owner, name, stage):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            it = original(*a, **k)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t
                    return
                stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t
                yield item

        setattr(owner, name, wrapper)

    timed_iter(tail_mod.Tailer, "read", "read+validate")
    timed(labels_mod.LabelJoiner, "add_predictions", "label-join buffer")
    timed(window_mod.WindowTracker, "_absorb", "window stats+online MMD")
    timed(window_mod.WindowTracker, "_close", "window close (MMD test etc.)")
    timed(engine_mod.Engine, "_checkpoint", "checkpoint")

    cfg = parse_config(
        {"logs": {"inference": str(logs)}, "state_dir": str(work / "state"), "reference_dir": str(work / "ref"),
         "ingest": {"settle_seconds": 0}},
        source="bench", base=work,
    )
    t_init = time.perf_counter()
    eng = engine_mod.Engine(cfg.monitor)
    for version in eng.references:  # calibrate the online detector now: a one-off, then checkpointed
        eng._monitor(version)
    init = time.perf_counter() - t_init
    t0 = time.perf_counter()
    rows = windows = 0
    while True:
        r = eng.run_cycle()
        rows += r.rows
        windows += len(r.windows)
        if r.rows == 0 and r.files == 0:
            break
    dt = time.perf_counter() - t0
    eng.close()
    return {"rows": rows, "seconds": dt, "windows": windows, "init_seconds": init, "stages": stages,
            "peak_rss_mb": peak_rss_mb()}


def _child(mode: str, work: str, logs: str) -> None:
    result = raw_read(Path(logs)) if mode == "raw" else engine_run(Path(work), Path(logs))
    print(json.dumps(result))


def _measure(mode: str, work: Path, logs: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(work), str(logs)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="alternating raw/engine runs per layout (medians)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    from monitor.engine.reference import ReferenceBuilder, save_reference
    from monitor.ingest.tail import Tailer
    from monitor.ingest.config import IngestConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_logs(tmp / "val", rows=5000, dim=args.dim, per_file=5000, seed=1, labels=True)
        builder = ReferenceBuilder()
        tailer = Tailer(str(tmp / "val"), "inference", IngestConfig(settle_seconds=0))
        for info in tailer.discover({}):
            for chunk in tailer.read(info, 0, {}):
                builder.add(chunk.batch)
        for ref in builder.finish().values():
            save_reference(ref, tmp / "small" / "ref")
            save_reference(ref, tmp / "big" / "ref")
        write_logs(tmp / "small" / "logs", rows=args.rows, dim=args.dim, per_file=args.rows // 8, seed=2)
        write_logs(tmp / "big" / "logs", rows=args.rows, dim=args.dim, per_file=args.rows, seed=2)
        size_small = sum(f.stat().st_size for f in (tmp / "small" / "logs").glob("*")) / 8 / 2**20
        size_big = sum(f.stat().st_size for f in (tmp / "big" / "logs").glob("*")) / 2**20

        # Raw read and engine alternate, each in a fresh process, and the medians are compared:
        # the raw rate alone moved 112k-174k rows/s between runs minutes apart on the shared box.
        results = {}
        for layout in ("small", "big"):
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(tmp / layout / "state", ignore_errors=True)
                runs.append((_measure("raw", tmp / layout, tmp / layout / "logs"),
                             _measure("engine", tmp / layout, tmp / layout / "logs")))
            results[layout] = runs

    print(f"ingest benchmark: {args.rows} rows, d={args.dim}, C={C}, default config (bench/ingest_bench.py)")
    print(f"medians of {args.repeats} alternating runs each; 'pairs' = the ratio of each raw/engine pair")
    print(f"{'layout':<28}{'raw rows/s':>12}{'driftd rows/s':>15}{'ratio':>8}{'pairs':>16}{'raw RSS MB':>12}"
          f"{'driftd RSS MB':>15}")
    for layout, label in (("small", f"8 files of {size_small:.0f} MB"), ("big", f"1 file of {size_big:.0f} MB")):
        runs = results[layout]
        raw_rates = [r["rows"] / r["seconds"] for r, _ in runs]
        eng_rates = [e["rows"] / e["seconds"] for _, e in runs]
        rr, er = statistics.median(raw_rates), statistics.median(eng_rates)
        pairs = [e / r for r, e in zip(raw_rates, eng_rates)]
        spread = f"{min(pairs):.2f}-{max(pairs):.2f}"
        raw_rss = max(r["peak_rss_mb"] for r, _ in runs)
        eng_rss = max(e["peak_rss_mb"] for _, e in runs)
        print(f"{label:<28}{rr:>12,.0f}{er:>15,.0f}{er / rr:>8.2f}{spread:>16}{raw_rss:>12.0f}{eng_rss:>15.0f}")
    runs = results["big"]
    eng = sorted((e for _, e in runs), key=lambda e: e["seconds"])[len(runs) // 2]  # the median run
    print(f"\nstage split (1 big file), share of {eng['seconds']:.2f} s engine time "
          f"(+{eng['init_seconds']:.2f} s start-up: reference load, online calibration):")
    for stage, seconds in sorted(eng["stages"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<32}{seconds:>8.2f} s  {seconds / eng['seconds']:>6.1%}")
    print(f"windows closed: {eng['windows']}; target: ratio >= 0.25 and RSS flat in file size")


if __name__ == "__main__":
    main()
