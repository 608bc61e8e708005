"""Source-model training with torch's default intra-op threads vs the count retrain.threads measures.

    .venv/bin/python bench/threads_bench.py                # as the host is
    .venv/bin/python bench/threads_bench.py --hog 1        # beside one busy-looping process

Both sides train the same test_resnet on the same 900 clean digits (retrain.digits), in turn
(default, measured, default, measured, ...) so each sees the same load; the measured side pays
for its measurement (a few probe steps) inside its time. Prints each run and the ratio of the
medians (default / measured: above 1 means measuring was faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hog", type=int, default=0, help="busy-looping processes to run beside the training")
    args = parser.parse_args()

    import torch

    from retrain.digits import load_digits_images, train_digits_model
    from retrain.threads import usable_cpus

    default_threads = torch.get_num_threads()
    images, labels = load_digits_images(32)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hog)]
    try:
        times: dict[str, list[float]] = {"default": [], "measured": []}
        chosen: list[str] = []
        for _ in range(args.repeats):
            for side in ("default", "measured"):
                started = time.perf_counter()
                train_digits_model(images[:900], labels[:900], epochs=args.epochs, seed=0,
                                   threads=default_threads if side == "default" else None,
                                   on_threads=lambda c: chosen.append(c.describe()) if side == "measured" else None)
                times[side].append(time.perf_counter() - started)
                print(f"{side:>8}: {times[side][-1]:7.1f} s   load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(f"torch {torch.__version__}; {usable_cpus()} usable CPUs; torch's default {default_threads} threads; "
          f"{args.hog} hog(s); {args.epochs} epochs of 900 digits")
    for line in dict.fromkeys(chosen):
        print(f"measured choice: {line}")
    d, m = statistics.median(times["default"]), statistics.median(times["measured"])
    print(f"median: default {d:.1f} s, measured {m:.1f} s, default / measured = {d / m:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
