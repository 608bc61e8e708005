"""The ``signals`` config section: what each signal measures and how (activations, batch and
online MMD, accuracy on labels, the label-free estimate), with the checks that keep the online
detector calibratable. Reading it imports neither torch nor the estimators."""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.configutil import Section, setting
from monitor.signals.bootstraps import required_bootstraps  # arithmetic only: no torch here

PROJECTIONS = ("pca", "random", "none")
# Label-free estimators (monitor.signals.estimate.METHODS is this tuple; named here so reading a
# config imports neither the estimators nor scipy).
ESTIMATE_METHODS: tuple[str, ...] = ("cbpe", "doc", "atc_mc", "atc_ne", "cott")


@dataclass(frozen=True)
class ActivationConfig:
    alpha: float = setting(0.05, minimum=1e-9, maximum=1)  # Benjamini-Hochberg false discovery rate
    top_k: int = setting(10, minimum=1)


@dataclass(frozen=True)
class MmdConfig:
    enabled: bool = setting(True)
    # The default rule (p < 0.05 for 3 windows) needs p-values down to 5/101; 200 permutations
    # detected no more in the bench (bench/README.md (f)). A threshold <= 1/(1 + permutations)
    # can never fire.
    permutations: int = setting(100, minimum=1)
    # Windows each draw of the permutations serves (their reference-only sums are the costly
    # part; 8 draws serve consecutive windows in turn). A p-value stays exact because the draw
    # never depends on the window's rows (monitor/signals/mmd.py, PermutationSchedule).
    redraw_permutations_every: int = setting(20, minimum=1)
    alpha: float = setting(0.05, minimum=1e-9, maximum=1)
    max_window_rows: int = setting(500, minimum=2)      # window rows are subsampled to this for the test
    max_reference_rows: int = setting(1000, minimum=2)  # reference rows used by the test (of those stored)
    # Raw features: on real backbone features no projection kept 0.9 of raw's power on every
    # shift (best: random-256, 0.68 of it on a subtle contrast shift; PCA lost dense and sparse
    # shifts); bench/mmd_power_bench.py, bench/README.md.
    projection: str = setting("none", choices=PROJECTIONS)  # "none", "random" or "pca"
    projection_dims: int = setting(256, minimum=1)  # for random/pca: 256 kept the most power of 32-256 (random)
    seed: int = setting(0, minimum=0)


@dataclass(frozen=True)
class OnlineMmdConfig:
    enabled: bool = setting(True)
    window_rows: int = setting(50, minimum=2)          # sliding test window of the sequential detector
    stride_rows: int = setting(25, minimum=1)          # the statistic is tested every this many rows (a mini-batch)
    ert_rows: float = setting(100_000.0, minimum=1)    # expected rows between false alarms on undrifted data
    bootstraps: int = setting(4500, minimum=10)        # calibration samples: at least ~ert_rows / stride_rows
    # The statistic's noise comes mostly from the 50-row window; the sub-reference kernel is the
    # per-row cost, so 500 rows (not 1000) halves it for little power.
    max_reference_rows: int = setting(500, minimum=4)
    # Its own projection, because it pays per row: on raw 1280-d features an update cost ~12x the
    # random-32 one (670 vs 57 us/row, bench/README.md); the batch test keeps raw features.
    projection: str = setting("random", choices=PROJECTIONS)  # random | pca | none
    projection_dims: int = setting(32, minimum=1)
    seed: int = setting(0, minimum=0)


@dataclass(frozen=True)
class AccuracyConfig:
    last_n: int = setting(1000, minimum=1)
    last_seconds: float = setting(3600.0, minimum=1)  # over predictions of the last T seconds of event time
    # Accuracy is judged when labels arrive: at the end of every cycle that joined labels, and
    # every this many labels within one (a backlog caught up in one cycle still gives a series
    # for `consecutive`).
    evaluate_every: int = setting(200, minimum=1)


@dataclass(frozen=True)
class EstimateConfig:
    # Lowest error on the real-backbone bench (bench/README.md, estimate_bench.py); every method
    # is fitted into the reference, so changing this needs no rebuild.
    method: str = setting("cott", choices=ESTIMATE_METHODS)  # cbpe | doc | atc_mc | atc_ne | cott
    bootstraps: int = setting(200, minimum=10, maximum=100_000)  # resamples behind the interval (~0.1 ms each on a 5000-row window)
    interval: float = setting(0.9, minimum=0.5, maximum=0.999)   # confidence level of [lower, upper]
    seed: int = setting(0, minimum=0)


@dataclass(frozen=True)
class SignalsConfig:
    # Signal matrices are small: more intra-op threads mostly contend with each other and with the
    # inference service next to driftd (measured: 2 threads ran 6x slower than 1 on a busy 2-core host).
    threads: int = setting(1, minimum=1)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    mmd: MmdConfig = field(default_factory=MmdConfig)
    online_mmd: OnlineMmdConfig = field(default_factory=OnlineMmdConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)


def check_signals(root: Section, signals: SignalsConfig) -> None:
    """Settings the online detector could not calibrate are config errors, not a failure every cycle."""
    online, key = signals.online_mmd, "signals.online_mmd"
    if online.enabled:
        if online.stride_rows > online.window_rows:
            root.error(f"{key}.stride_rows", f"must be <= window_rows ({online.window_rows}), got {online.stride_rows}")
        elif online.ert_rows <= online.stride_rows:
            root.error(f"{key}.ert_rows", f"must exceed stride_rows ({online.stride_rows}), got {online.ert_rows:g}")
        else:
            needed = required_bootstraps(online.ert_rows, online.window_rows, online.stride_rows)
            if online.bootstraps < needed:
                root.error(
                    f"{key}.bootstraps",
                    f"{online.bootstraps} cannot calibrate ert_rows={online.ert_rows:g} tested every "
                    f"{online.stride_rows} rows: set bootstraps >= {needed}, raise stride_rows, or lower ert_rows",
                )
    if online.max_reference_rows <= 2 * online.window_rows:
        root.error(
            f"{key}.max_reference_rows",
            f"must exceed 2 x window_rows ({2 * online.window_rows}) so the detector can be calibrated",
        )
