"""Does driftd's retraining recover a real pretrained backbone from real input corruptions, without
forgetting, fast enough on a CPU? (issues 4, 11, 16)

Backbone: torchvision's ImageNet MobileNetV2 in timm (bench/backbone.py) serving 64 px digits,
its head (and a short low-LR pass) trained on clean digits: ``backbone.train_source``. Data:
scikit-learn's 1,797 digits, each drawn as several slightly moved/rotated/scaled renders
("variants"); the digits, not the renders, are split between source training, replay, production
and held-out test, so no digit is on two sides. Shift: retrain/digits.py's corruptions (noise,
blur, contrast, rotate) at two severities. Per seed and corruption:

- no retrain      the source model as served
- naive           every layer, Adam at a normal LR, BatchNorm in train mode, production rows only
- head only       driftd's recipe with strategy "head"
- driftd default  what a job does: choose_strategy + fine_tune with HyperConfig() defaults
- oracle          every layer, BN statistics adapted on the target, early stopping on target
                  validation, no replay and no anchor: the target accuracy to aim for

Each is scored on the held-out test digits (target = corrupted, source = clean) and goes
through the real gate (retrain.gate.evaluate_gate on the gate slices). Then a speed section: a
2000-image retrain with the frozen prefix cached vs the whole network run every step, and the
same retrain beside a CPU hog the bench starts.

    .venv/bin/python bench/retrain_bench.py --quick      # one corruption, one seed, small speed case
    .venv/bin/python bench/retrain_bench.py              # 4 corruptions x 2 severities x 3 seeds + speed
    .venv/bin/python bench/retrain_bench.py --backbone test_resnet --size 32   # the tiny model of the tests
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import multiprocessing
import os
import statistics
import sys
import time
import typing
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import backbone  # noqa: E402
from retrain.baselines import naive_fine_tune, oracle_fine_tune  # noqa: E402
from retrain.batches import Split, TrainingSet  # noqa: E402
from retrain.config import GateConfig, HyperConfig  # noqa: E402
from retrain.digits import CORRUPTIONS, corrupt, train_digits_model  # noqa: E402
from retrain.gate import GateResult, accuracy, choose_wise_alpha, evaluate_gate  # noqa: E402
from retrain.model import images_to_tensor, predict  # noqa: E402
from retrain.recipe import RecipeReport, fine_tune  # noqa: E402
from retrain.strategy import choose_strategy, domain_gap  # noqa: E402

CPU = torch.device("cpu")
SEVERITIES = (0.5, 1.0)
REPLAY_RENDERS = 4
TEST_RENDERS = 2


# -- data ---------------------------------------------------------------------------------------
def render(base: np.ndarray, variants: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``variants`` renders of each digit in ``base`` at ``size`` px: bilinear upsampling plus a
    small random rotation (+-10 deg), scale (0.9-1.1) and shift (+-size/16 px); one variant = the
    plain upsampled digit. Returns (uint8[N, size, size, 3], labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = digits.images.astype(np.float32) / 16.0
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for i in base:
        big = ndimage.zoom(grey[i], size / 8, order=1)
        for _ in range(variants):
            if variants == 1:
                img = big
            else:
                a, s = np.deg2rad(rng.uniform(-10, 10)), rng.uniform(0.9, 1.1)
                mat = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / s
                centre = np.full(2, size / 2 - 0.5)
                img = ndimage.affine_transform(big, mat, offset=centre - mat @ centre + rng.uniform(-size / 16, size / 16, 2),
                                               order=1)
            out.append(img)
            labels.append(digits.target[i])
    images = np.clip(np.rint(np.stack(out) * 255), 0, 255).astype(np.uint8)
    return np.repeat(images[..., None], 3, 3), np.asarray(labels, np.int64)


@dataclasses.dataclass
class Rendered:
    images: np.ndarray
    labels: np.ndarray
    digit: np.ndarray  # which base digit each render came from (splits keep a digit on one side)


def _rendered(base: np.ndarray, variants: int, size: int, seed: int) -> Rendered:
    images, labels = render(base, variants, size, seed)
    return Rendered(images, labels, np.repeat(np.arange(len(base)), variants))


def _three_way(x: torch.Tensor, r: Rendered, seed: int) -> tuple[Split, Split, Split]:
    """train / validation / gate by digit: 60 / 15 / 25 % (the job's gate_fraction 0.25, val 0.15).
    The gate slice carries each row's digit as its group: the renders of one digit are photos of
    one object, and the gate weighs them as such (retrain.group_pattern in a deployment)."""
    n = int(r.digit.max()) + 1
    perm = np.random.default_rng(seed).permutation(n)
    gate = np.isin(r.digit, perm[: round(n * 0.25)])
    val = np.isin(r.digit, perm[round(n * 0.25) : round(n * 0.4)])
    y = torch.as_tensor(r.labels)
    train_split, val_split = (Split(x[torch.from_numpy(m)], y[torch.from_numpy(m)]) for m in (~(gate | val), val))
    return train_split, val_split, Split(x[torch.from_numpy(gate)], y[torch.from_numpy(gate)], r.digit[gate])


@dataclasses.dataclass
class World:
    seed: int
    source: nn.Module
    data_config: dict
    replay: Rendered
    production: Rendered
    test: Rendered
    replay_splits: tuple[Split, Split, Split]
    clean_test: Split


def make_world(seed: int, args: argparse.Namespace, production_digits: int) -> World:
    order = np.random.default_rng(seed).permutation(1797)
    src = order[:700]
    rep = order[700:1000]
    prod = order[1000 : 1000 + production_digits]
    test = order[1400:]
    source_r = _rendered(src, 3, args.size, seed)
    if args.backbone == "mobilenetv2":
        data_config = backbone.SERVED_DATA_CONFIG
        source = backbone.train_source(images_to_tensor(source_r.images, data_config), torch.as_tensor(source_r.labels),
                                       seed=seed)
    else:
        source, data_config = train_digits_model(source_r.images, source_r.labels, architecture=args.backbone,
                                                 epochs=10, seed=seed)
    # 4 renders per replay digit: the gate's reference slice (25% of the digits) then holds 300
    # distinct inputs; with 2 (150) the gate refused every candidate, 268 being needed to resolve
    # max_forgetting 0.01 at alpha 0.05
    replay = _rendered(rep, REPLAY_RENDERS, args.size, seed + 1)
    production = _rendered(prod, 5, args.size, seed + 2)
    # test digits drawn like the source's (moved/rotated/scaled renders): one plain upsampled
    # render each measured a distribution no training set holds (noise:1 seed 1: plain renders
    # 0.937 -> 0.879 while the gate's held-out replay renders went 0.943 -> 0.957)
    test_r = _rendered(test, TEST_RENDERS, args.size, seed + 3)
    x_rep = images_to_tensor(replay.images, data_config)
    return World(seed, source.eval(), data_config, replay, production, test_r, _three_way(x_rep, replay, seed + 4),
                 Split(images_to_tensor(test_r.images, data_config), torch.as_tensor(test_r.labels)))


# -- methods ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    seed: int
    case: str
    method: str
    target: float
    source: float
    promoted: bool
    gate_forgetting: float
    seconds: float
    note: str = ""


def run_case(world: World, kind: str, severity: float, args: argparse.Namespace, hyper: HyperConfig) -> list[Row]:
    case = f"{kind}:{severity:g}"
    cseed = world.seed * 100 + CORRUPTIONS.index(kind) * 10 + int(severity * 4)
    x_prod = images_to_tensor(corrupt(world.production.images, kind, severity, cseed), world.data_config)
    p_train, p_val, p_gate = _three_way(x_prod, world.production, world.seed + 5)
    r_train, r_val, r_gate = world.replay_splits
    target_test = Split(images_to_tensor(corrupt(world.test.images, kind, severity, cseed + 1), world.data_config),
                        world.clean_test.y)
    training = TrainingSet(p_train, p_val, r_train, r_val)
    gate_cfg = GateConfig()
    gap = domain_gap(predict(world.source, r_train.x)[0], predict(world.source, p_train.x)[0])
    labelled = len(p_train) + len(p_val) + len(p_gate)
    rows: list[Row] = []

    def record(method: str, model: nn.Module, seconds: float, note: str = "", gate: GateResult | None = None) -> None:
        g = gate or evaluate_gate(model, world.source, p_gate, r_gate, gate_cfg, CPU)
        rows.append(Row(world.seed, case, method, accuracy(model, target_test, CPU),
                        accuracy(model, world.clean_test, CPU), g.promote, g.forgetting, seconds, note))
        print(f"  {case:12s} seed {world.seed} {method:15s} target {rows[-1].target:.3f} source {rows[-1].source:.3f} "
              f"gate {'promote' if g.promote else 'reject':7s} {seconds:6.1f}s {note}", flush=True)
        if args.gate_reasons:
            print(f"    gate: {g.reason}", flush=True)

    record("no retrain", world.source, 0.0, f"gap {gap:.2f}, {labelled} labelled rows")
    if "naive" not in args.skip:
        t = time.perf_counter()
        naive = naive_fine_tune(copy.deepcopy(world.source), p_train, epochs=args.naive_epochs, lr=args.naive_lr,
                                seed=world.seed)
        record("naive", naive, time.perf_counter() - t, f"Adam lr {args.naive_lr:g}, {args.naive_epochs} epochs")
    if "head" not in args.skip:
        t = time.perf_counter()
        head = copy.deepcopy(world.source)
        fine_tune(head, training, hyper, choose_strategy(labelled, gap, requested="head"), device=CPU)
        record("head only", head, time.perf_counter() - t)
    t = time.perf_counter()
    model = copy.deepcopy(world.source)
    plan = choose_strategy(labelled, gap)
    report = fine_tune(model, training, hyper, plan, device=CPU)
    record("driftd default", model, time.perf_counter() - t, _describe(plan.name, report))
    if args.wise:  # what the job's gate does with hyper.wise_ft: the same candidate, mixed with the served weights
        t = time.perf_counter()
        mixed = copy.deepcopy(model)
        g = choose_wise_alpha(mixed, world.source.state_dict(), world.source, p_gate, r_gate, gate_cfg, CPU)
        record("driftd wise-ft", mixed, time.perf_counter() - t, f"alpha {g.wise_alpha:g} of the fine-tuned weights", g)
    for name in args.strategies:
        t = time.perf_counter()
        other = copy.deepcopy(world.source)
        report = fine_tune(other, training, hyper, choose_strategy(labelled, gap, requested=name), device=CPU)
        record(f"driftd {name}", other, time.perf_counter() - t, _describe(name, report))
    for mode in args.bn_study:
        t = time.perf_counter()
        study = copy.deepcopy(world.source)
        if mode == "floor":  # clamp small variances (changes what the served model computes)
            for m in study.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_var.clamp_(min=1e-3)
        h = dataclasses.replace(hyper, batchnorm="frozen" if mode == "floor" else mode)
        report = fine_tune(study, training, h, dataclasses.replace(plan, adapt_batchnorm=True), device=CPU)
        record(f"bn {mode}", study, time.perf_counter() - t, _describe(plan.name, report))
    if "oracle" not in args.skip:
        t = time.perf_counter()
        oracle = oracle_fine_tune(copy.deepcopy(world.source), p_train, p_val, epochs=args.oracle_epochs,
                                  lr=args.oracle_lr, seed=world.seed)
        record("oracle", oracle, time.perf_counter() - t, f"AdamW lr {args.oracle_lr:g}, BN on target")
    return rows


def _describe(strategy: str, report: RecipeReport) -> str:
    ft = report.phases[-1] if len(report.phases) > 1 else None
    bits = [strategy]
    if ft is not None:
        bits.append(f"lr {ft.lr:.2g}")
        bits.append("kept" if report.finetune_kept else "head-only")
        bn = (report.batchnorm.get("finetune") or {})
        bits.append("BN adapted" if bn.get("adapted") else "BN frozen")
        if report.trips:
            bits.append(f"{len(report.trips)} trip(s): {report.trips[0][:80]}")
    return ", ".join(bits)


# -- speed --------------------------------------------------------------------------------------
def _hog(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def speed(args: argparse.Namespace, hyper: HyperConfig) -> None:
    digits = 400 if not args.quick else 200
    world = make_world(0, args, digits)
    x_prod = images_to_tensor(corrupt(world.production.images, "noise", 1.0, 7), world.data_config)
    p_train, p_val, p_gate = _three_way(x_prod, world.production, 5)
    r_train, r_val, _ = world.replay_splits
    training = TrainingSet(p_train, p_val, r_train, r_val)
    labelled = len(p_train) + len(p_val) + len(p_gate)
    gap = domain_gap(predict(world.source, r_train.x)[0], predict(world.source, p_train.x)[0])
    chosen = choose_strategy(labelled, gap)
    plan = chosen if args.speed_strategy == "auto" else choose_strategy(labelled, gap, requested=args.speed_strategy)
    print(f"\nspeed (the table chose {chosen.name}): {labelled} labelled images at {args.size} px (train {len(p_train)}, replay {len(r_train)}), "
          f"noise:1.0, strategy {plan.name}, {torch.get_num_threads()} torch thread(s), "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    def timed(h: HyperConfig, label: str) -> tuple[float, RecipeReport]:
        model = copy.deepcopy(world.source)
        t = time.perf_counter()
        report = fine_tune(model, training, h, plan, device=CPU)
        seconds = time.perf_counter() - t
        rates = ", ".join(f"{p.name} {p.images_per_second:.0f} img/s, {p.epochs} epoch(s)" for p in report.phases)
        if report.lr_search is not None:  # what the time bought: the rate, and attempts the guards threw away
            rates += f"; lr {report.lr_search['suggestion']:.2g}, {len(report.trips)} trip(s)"
        cache = report.prefix_cache
        print(f"  {label:34s} {seconds:6.1f}s  ({rates}; feature/prefix pass "
              f"{cache.get('feature_pass_images_per_second', 0):.0f} img/s"
              + (f", cached at {cache['at']} {cache['mib']:.0f} MiB" if cache.get("cached") else
                 f", no cache: {cache.get('reason')}") + f"; load {os.getloadavg()[0]:.1f})", flush=True)
        return seconds, report

    prefix_speedup(world.source, plan, training, rounds=args.speed_rounds)
    if args.speed_retrain:
        seconds, _ = timed(hyper, "default recipe (prefix cached)")
        if args.no_hog:
            return
        stop = multiprocessing.Event()
        hog = multiprocessing.Process(target=_hog, args=(stop,), daemon=True)
        hog.start()
        try:
            hogged, _ = timed(hyper, "default recipe beside a CPU hog")
        finally:
            stop.set()
            hog.join(5)
        print(f"  beside the hog: {hogged / seconds:.2f}x the wall time ({hogged:.0f}s vs {seconds:.0f}s); "
              f"target <= 120 s for 2000 images on 2 quiet cores")


def prefix_speedup(source: nn.Module, plan, training: TrainingSet, *, rounds: int, steps: int = 4) -> None:
    """Phase-2 steps (forward, backward, AdamW step; frozen BN in eval) on cached activations vs
    the whole network on images, in alternating rounds in this process, then the cached steps
    again beside a CPU hog: medians of the per-round ratios (the box's load moves by the minute)."""
    from retrain.layer_lrs import set_trainable
    from retrain.trunk import Suffix, find_trunk, prefix_activations

    model = copy.deepcopy(source)
    set_trainable(model, plan)
    trunk = find_trunk(model, training.train.x[:4])
    if trunk is None or trunk.first_trainable() == 0:
        print("  prefix cache: nothing frozen to cache for this strategy")
        return
    start = trunk.first_trainable()
    x, y = training.train.x[:64], training.train.y[:64]
    t = time.perf_counter()
    cached = prefix_activations(trunk, start, training.train.x, device=CPU)
    prefix_rate = len(training.train) / (time.perf_counter() - t)
    suffix = Suffix(model, trunk, start)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run(forward, inp) -> float:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(forward(inp), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps * len(y) / (time.perf_counter() - t0)

    a = cached[:64]
    run(suffix, a), run(model, x)  # warm-up
    ratios, cached_rates, whole_rates = [], [], []
    for _ in range(rounds):
        c, w = run(suffix, a), run(model, x)
        cached_rates.append(c)
        whole_rates.append(w)
        ratios.append(c / w)
    print(f"  phase-2 steps from {trunk.names[start]} ({start}/{len(trunk.units)} units frozen), batch 64, "
          f"{rounds} alternating rounds: cached {statistics.median(cached_rates):.0f} img/s, whole network "
          f"{statistics.median(whole_rates):.0f} img/s -> speed-up {statistics.median(ratios):.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f}); one-time prefix pass {prefix_rate:.0f} img/s; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    quiet, hogged = [], []
    for _ in range(rounds):
        quiet.append(run(suffix, a))
        stop = multiprocessing.Event()
        hog = multiprocessing.Process(target=_hog, args=(stop,), daemon=True)
        hog.start()
        try:
            time.sleep(0.5)
            hogged.append(run(suffix, a))
        finally:
            stop.set()
            hog.join(5)
    print(f"  beside a CPU hog (one busy process): cached steps at {statistics.median(hogged):.0f} img/s vs "
          f"{statistics.median(quiet):.0f} without -> {statistics.median(quiet) / statistics.median(hogged):.2f}x "
          f"the time", flush=True)


# -- report -------------------------------------------------------------------------------------
def summarise(rows: list[Row], max_forgetting: float) -> int:
    by_case: dict[tuple[str, int], dict[str, Row]] = defaultdict(dict)
    for r in rows:
        by_case[(r.case, r.seed)][r.method] = r
    shown = ("no retrain", "naive", "head only", "driftd default", "oracle")
    print(f"\n{'case':12s} {'seed':>4s} " + " ".join(f"{m:>16s}" for m in shown)
          + f" {'vs oracle':>9s} {'d src':>6s} {'gate':>8s}")
    failures = []
    unjudged: set[str] = set()
    for (case, seed), methods in by_case.items():
        d, base = methods["driftd default"], methods["no retrain"]
        o, n = methods.get("oracle"), methods.get("naive")
        cells = " ".join(f"{methods[m].target:7.3f}/{methods[m].source:.3f}  " if m in methods else f"{'-':>16s}"
                         for m in shown)
        ratio = d.target / max(o.target, 1e-9) if o is not None else math.nan
        print(f"{case:12s} {seed:4d} {cells} {ratio:9.3f} {d.source - base.source:+6.3f} "
              f"{'promote' if d.promoted else 'reject':>8s}")
        if o is None or n is None:  # --skip: a target against a baseline that did not run is not judged
            unjudged.update(m for m, r in (("oracle", o), ("naive", n)) if r is None)
        if o is not None and ratio < 0.95:
            failures.append(f"{case} seed {seed}: target {d.target:.3f} < 0.95 x oracle {o.target:.3f}")
        if n is not None and d.target < n.target:
            failures.append(f"{case} seed {seed}: target {d.target:.3f} < naive {n.target:.3f}")
        if d.source < base.source - 0.01:
            failures.append(f"{case} seed {seed}: source {d.source:.3f} lost > 1 point from {base.source:.3f}")
        for m in methods.values():
            if m.promoted and m.gate_forgetting > max_forgetting:
                failures.append(f"{case} seed {seed}: gate promoted {m.method} that forgot {m.gate_forgetting:.3f}")
            if m.promoted and base.source - m.source > max_forgetting:  # the stricter reading: held-out test digits
                failures.append(f"{case} seed {seed}: gate promoted {m.method}, which lost "
                                f"{base.source - m.source:.3f} on the test digits")
    if unjudged:
        print(f"\nnot judged (--skip): the targets against {' and '.join(sorted(unjudged))}")
    print("\ncells: target/source accuracy on the held-out test digits (corrupted / clean)")
    print(f"\n{'method (mean)':16s} {'target':>7s} {'source':>7s} {'promoted':>9s} {'secs':>6s}")
    by_method: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_method[r.method].append(r)
    for method, rs in by_method.items():
        print(f"{method:16s} {statistics.mean(r.target for r in rs):7.3f} {statistics.mean(r.source for r in rs):7.3f} "
              f"{sum(r.promoted for r in rs):5d}/{len(rs):<3d} {statistics.mean(r.seconds for r in rs):6.1f}")
    print("\ntargets: " + ("all met" if not failures else f"{len(failures)} missed:\n  " + "\n  ".join(failures)))
    return len(failures)


def _override(hyper: HyperConfig, item: str) -> HyperConfig:
    key, _, value = item.partition("=")
    if key not in {f.name for f in dataclasses.fields(hyper)}:
        raise SystemExit(f"--hyper {item}: unknown HyperConfig field {key!r}")
    current = getattr(hyper, key)
    if value in ("none", "null"):
        parsed = None
    elif isinstance(current, bool):
        parsed = value == "true"
    elif isinstance(current, int):
        parsed = int(value)
    elif isinstance(current, str):
        parsed = value
    else:  # a float, or an optional int such as max_finetune_steps (unset: None)
        optional_int = int in typing.get_args(typing.get_type_hints(HyperConfig)[key])
        parsed = int(value) if optional_int else float(value)
    return dataclasses.replace(hyper, **{key: parsed})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one corruption (noise:1), seed 0, small speed case")
    parser.add_argument("--backbone", choices=("mobilenetv2", "test_resnet"), default="mobilenetv2")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (the served model's: 64)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", type=int, nargs="+", default=None,
                        help="these seeds instead of 0..seeds-1 (to split the grid over processes)")
    parser.add_argument("--cases", nargs="+", default=None, help="kind:severity, e.g. noise:1 blur:0.5")
    parser.add_argument("--production-digits", type=int, default=120,
                        help="digits in the production set (x5 renders = labelled rows)")
    parser.add_argument("--naive-lr", type=float, default=1e-3)
    parser.add_argument("--naive-epochs", type=int, default=3)
    parser.add_argument("--oracle-lr", type=float, default=1e-3,
                        help="3e-4 reached only 0.264 on noise:1 seed 0, below naive's 0.418 at 1e-3")
    parser.add_argument("--oracle-epochs", type=int, default=5)
    parser.add_argument("--bn-study", nargs="*", default=[], choices=("frozen", "adapt", "floor"),
                        help="also run the recipe with these BatchNorm treatments (BN decision by measurement)")
    parser.add_argument("--strategies", nargs="*", default=[], choices=("top_blocks", "all_but_stem", "full"),
                        help="also run the recipe with these strategies forced")
    parser.add_argument("--hyper", nargs="*", default=[], metavar="KEY=VALUE", help="override HyperConfig fields")
    parser.add_argument("--skip", nargs="*", default=[], choices=("naive", "head", "oracle"),
                        help="leave these methods out (their targets are then not judged): for probing "
                             "driftd's recipe on cells whose baselines were measured before")
    parser.add_argument("--wise", action="store_true",
                        help="also score the WiSE-FT mix of driftd's candidate that the gate picks (hyper.wise_ft)")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--gate-reasons", action="store_true", help="print each gate decision's reason")
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--speed-retrain", action="store_true",
                        help="also time whole 2000-image retrains, quiet and beside a hog (slow on a busy box)")
    parser.add_argument("--speed-strategy", default="top_blocks", choices=("auto", "top_blocks", "all_but_stem", "full"),
                        help="strategy of the speed case (the table picks 'full' for 2000 shifted rows: "
                             "nothing frozen, nothing to cache)")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--no-hog", action="store_true", help="time the whole retrain quiet only, not beside a CPU hog")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on the busy 2-core box, 2 threads ran ~10x slower than 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hyper = HyperConfig()
    for item in args.hyper:
        hyper = _override(hyper, item)
    cases = args.cases or (["noise:1"] if args.quick else [f"{k}:{s:g}" for k in CORRUPTIONS for s in SEVERITIES])
    seeds = [0] if args.quick else (args.seed_list or list(range(args.seeds)))
    started = time.perf_counter()
    # the box matters as much as the code: 2-core AVX2 and AVX-512 machines ran phase 2 3x apart
    print(f"{args.backbone} @ {args.size}px, cases {' '.join(cases)}, seeds {seeds}, load {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
          f"hyper {dataclasses.asdict(hyper)}", flush=True)
    missed = 0
    if not args.speed_only:
        rows: list[Row] = []
        for seed in seeds:
            world = make_world(seed, args, args.production_digits)
            for case in cases:
                kind, severity = case.split(":")
                rows += run_case(world, kind, float(severity), args, hyper)
        missed = summarise(rows, GateConfig().max_forgetting)
    if not args.no_speed and args.backbone == "mobilenetv2":
        speed(args, hyper)
    print(f"\ntotal {time.perf_counter() - started:.0f}s, load now {os.getloadavg()[0]:.1f}")
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
