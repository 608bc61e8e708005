"""Does the guarded recipe recover a shifted model without forgetting? (issue 4)

Real data: scikit-learn's digits as the source domain, a real corruption (default: contrast
0.6) as the production shift. Per seed: train a source test_resnet on clean digits, then compare
no retrain, a naive full fine-tune (all layers, Adam, production data only), head only, and the
guarded recipe at several layer_decay values. Every candidate goes through the real gate.
Target accuracy is reported as a ratio to the no-retrain baseline measured in the same run.

    .venv/bin/python bench/retrain_bench.py                      # 3 seeds, ~5-8 min on 2 cores
    .venv/bin/python bench/retrain_bench.py --seeds 1 --size 16  # quick look
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrain.baselines import naive_fine_tune  # noqa: E402
from retrain.batches import Split, TrainingSet  # noqa: E402
from retrain.config import GateConfig, HyperConfig  # noqa: E402
from retrain.digits import corrupt, load_digits_images, train_digits_model  # noqa: E402
from retrain.gate import evaluate_gate  # noqa: E402
from retrain.model import images_to_tensor, predict  # noqa: E402
from retrain.recipe import fine_tune  # noqa: E402
from retrain.strategy import choose_strategy, domain_gap  # noqa: E402

CPU = torch.device("cpu")


def _slices(x: torch.Tensor, y: torch.Tensor, fractions: tuple[float, float]) -> list[Split]:
    a, b = int(len(y) * fractions[0]), int(len(y) * fractions[1])
    return [Split(x[:a], y[:a]), Split(x[a:b], y[a:b]), Split(x[b:], y[b:])]


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    images, labels = load_digits_images(args.size)
    order = np.random.default_rng(seed).permutation(len(images))
    src, rep, prod = order[:500], order[500:1200], order[1200:]
    t0 = time.perf_counter()
    source, data_config = train_digits_model(images[src], labels[src], epochs=args.source_epochs, seed=seed)
    source_seconds = time.perf_counter() - t0
    kind, severity = args.shift.split(":")
    shifted = images_to_tensor(corrupt(images[prod], kind, float(severity), seed=seed), data_config)
    clean = images_to_tensor(images[rep], data_config)
    p_train, p_val, p_gate = _slices(shifted, torch.as_tensor(labels[prod]), (0.55, 0.7))
    r_train, r_val, r_gate = _slices(clean, torch.as_tensor(labels[rep]), (0.55, 0.7))
    training = TrainingSet(p_train, p_val, r_train, r_val)
    gate_cfg = GateConfig()
    overrides = (("lr_backbone", args.lr_backbone), ("epochs_finetune", args.epochs_finetune),
                 ("replay_fraction", args.replay_fraction), ("l2sp_weight", args.l2sp_weight))
    hyper = dataclasses.replace(HyperConfig(), seed=seed, **{k: v for k, v in overrides if v is not None})
    gap = domain_gap(predict(source, r_train.x)[0], predict(source, p_train.x)[0])
    rows: list[dict] = []

    def record(method: str, model: torch.nn.Module, seconds: float, note: str = "") -> None:
        g = evaluate_gate(model, source, p_gate, r_gate, gate_cfg, CPU)
        rows.append({"seed": seed, "method": method, "target": g.candidate_production, "source": g.candidate_reference,
                     "base_target": g.current_production, "base_source": g.current_reference,
                     "promoted": g.promote, "seconds": seconds, "note": note})

    record("no retrain", source, 0.0, f"source model trained in {source_seconds:.0f}s")
    t = time.perf_counter()
    naive = naive_fine_tune(copy.deepcopy(source), p_train, epochs=args.naive_epochs, lr=args.naive_lr, seed=seed)
    record(f"naive full (lr {args.naive_lr:g})", naive, time.perf_counter() - t)
    t = time.perf_counter()
    head = copy.deepcopy(source)
    fine_tune(head, training, hyper, choose_strategy(len(p_train), gap, requested="head"), device=CPU)
    record("head only", head, time.perf_counter() - t)
    for decay in args.layer_decay:
        plan = choose_strategy(len(p_train), gap, layer_decay=decay)
        t = time.perf_counter()
        model = copy.deepcopy(source)
        report = fine_tune(model, training, hyper, plan, device=CPU)
        record(f"guarded {plan.name} ld={decay:g}", model, time.perf_counter() - t,
               f"gap {gap:.2f}" + (f"; guard: {report.guard_message}" if report.guard_message else ""))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--shift", default="contrast:0.6", help="corruption kind:severity")
    parser.add_argument("--layer-decay", type=float, nargs="+", default=[0.5, 0.65, 0.8, 0.9])
    parser.add_argument("--source-epochs", type=int, default=10)
    parser.add_argument("--lr-backbone", type=float, default=None, help="override HyperConfig.lr_backbone")
    parser.add_argument("--epochs-finetune", type=int, default=None, help="override HyperConfig.epochs_finetune")
    parser.add_argument("--replay-fraction", type=float, default=None, help="override HyperConfig.replay_fraction")
    parser.add_argument("--l2sp-weight", type=float, default=None, help="override HyperConfig.l2sp_weight")
    parser.add_argument("--only-seed", type=int, default=None, help="run just this seed")
    parser.add_argument("--naive-lr", type=float, default=1e-2)
    parser.add_argument("--naive-epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a busy 2-core box, 2 threads ran ~10x slower than 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = [args.only_seed] if args.only_seed is not None else range(args.seeds)
    rows = [r for seed in seeds for r in run_seed(seed, args)]
    print(f"\nshift {args.shift}, {args.size}px test_resnet, {args.seeds} seeds, gate: min_gain 0.02, "
          f"max_forgetting 0.01\n")
    print(f"{'method':28s} {'seed':>4s} {'target':>7s} {'x base':>7s} {'source':>7s} {'d src':>7s} "
          f"{'gate':>8s} {'secs':>6s}  note")
    for r in rows:
        print(f"{r['method']:28s} {r['seed']:4d} {r['target']:7.3f} {r['target'] / max(r['base_target'], 1e-9):7.2f} "
              f"{r['source']:7.3f} {r['source'] - r['base_source']:+7.3f} "
              f"{'promote' if r['promoted'] else 'reject':>8s} {r['seconds']:6.1f}  {r['note']}")
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    print(f"\n{'method (mean over seeds)':28s} {'target':>7s} {'x base':>7s} {'d src':>7s} {'promoted':>9s}")
    for method, rs in by_method.items():
        target = statistics.mean(r["target"] for r in rs)
        base = statistics.mean(r["base_target"] for r in rs)
        d_src = statistics.mean(r["source"] - r["base_source"] for r in rs)
        print(f"{method:28s} {target:7.3f} {target / max(base, 1e-9):7.2f} {d_src:+7.3f} "
              f"{sum(r['promoted'] for r in rs):5d}/{len(rs)}")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
