"""Label-free accuracy estimators: fitted into the reference, stored, chosen by config, with an interval.

The model is the engine tests' small linear one over Gaussian features (tests/engine_helpers.py):
a large feature shift makes it predict one class with high confidence, which is the failure of
confidence-based estimates that COTT is there to catch. bench/estimate_bench.py measures the
same on a real backbone and real corruptions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from engine_helpers import make_rows
from monitor.config import parse_config
from monitor.errors import ConfigError
from monitor.engine.reference import FORMAT_VERSION, build_reference, load_reference, save_reference
from monitor.signals.estimate import METHODS, WindowEstimator, atc_threshold
from monitor.signals.predictions import normalised_entropy
from monitor.signals.transport import top_k, transport_plan


@pytest.fixture(scope="module")
def reference():
    rows = make_rows(2000, seed=1)
    return build_reference(model_version="v1", features=rows.features, probs=rows.probs, labels=rows.label)


def _estimate(ref, method: str, rows, idx=None, *, index: int = 0, bootstraps: int = 200):
    f, p = rows.features, rows.probs
    if idx is not None:
        f, p = f[idx], p[idx]
    est = WindowEstimator(ref.estimators, method=method, bootstraps=bootstraps, interval=0.9, seed=0,
                          model_version=ref.model_version)
    k = est.top_k(p.shape[1])
    top_prob, top_class, typical = (est.row_data(f, p) if est.keeps_rows else
                                    (np.zeros((0, k), np.float32), np.zeros((0, k), np.int32), np.zeros(0, bool)))
    return est.estimate(max_prob=p.max(1).astype(np.float64), entropy=normalised_entropy(p), top_prob=top_prob,
                        top_class=top_class, typical=typical, index=index)


def _accuracy(rows, idx=None) -> float:
    hit = rows.probs.argmax(1) == rows.label
    return float(hit.mean() if idx is None else hit[idx].mean())


def test_every_method_is_fitted_and_follows_an_undrifted_window(reference):
    assert reference.estimators is not None and reference.estimators.methods() == METHODS
    rows = make_rows(600, seed=50)
    for method in METHODS:
        stats = _estimate(reference, method, rows)
        assert stats.method == method
        assert stats.estimated_accuracy == pytest.approx(_accuracy(rows), abs=0.03), method
        assert stats.lower <= stats.estimated_accuracy <= stats.upper


def test_cott_catches_a_confident_collapse_that_confidence_averaging_misses(reference):
    # Shifted features: the model stops predicting one class and puts its rows in another at
    # ~0.97 confidence; accuracy falls from 0.99 to ~0.72.
    rows = make_rows(600, seed=51, shift=10.0)
    true = _accuracy(rows)
    assert true < reference.accuracy - 0.2
    cbpe = _estimate(reference, "cbpe", rows)
    cott = _estimate(reference, "cott", rows)
    assert cbpe.estimated_accuracy - true > 0.2                 # the failure the issue reports
    assert abs(cott.estimated_accuracy - true) < 0.05
    assert cott.typical_share < 0.5                              # most rows no longer look like the reference


def test_cott_is_not_fooled_by_a_label_prior_shift(reference):
    # Same images, classes resampled: class 0 makes up ~60% of the window. Plain COT (the
    # reference's label prior) would read the prior change as ~0.35 of error.
    rows = make_rows(4000, seed=52)
    weight = np.where(rows.label == 0, 1.0, 0.2)
    idx = np.random.default_rng(0).choice(4000, size=600, replace=False, p=weight / weight.sum())
    stats = _estimate(reference, "cott", rows, idx)
    assert stats.estimated_accuracy == pytest.approx(_accuracy(rows, idx), abs=0.03)
    assert stats.target_shift > 0.2                              # it transported onto the shifted prior
    plain = transport_plan(*top_k(rows.probs[idx], 4), reference.estimators.cott.label_share)
    assert (plain.mass * plain.cost).sum(1).mean() > 0.2


def test_interval_covers_undrifted_windows_and_is_seeded(reference):
    covered = []
    for seed in range(100, 130):
        rows = make_rows(400, seed=seed)
        stats = _estimate(reference, "atc_ne", rows, index=seed)
        covered.append(stats.lower <= _accuracy(rows) <= stats.upper)
    assert np.mean(covered) >= 0.75  # a 90% interval; 30 windows
    rows = make_rows(400, seed=100)
    a, b = _estimate(reference, "cott", rows, index=3), _estimate(reference, "cott", rows, index=3)
    assert (a.lower, a.upper) == (b.lower, b.upper)
    assert a.upper - a.lower < 0.1


def test_atc_threshold_splits_the_reference_at_its_accuracy():
    rng = np.random.default_rng(4)
    score = rng.normal(size=1000)
    t = atc_threshold(score, 0.83)
    assert np.mean(score >= t) == pytest.approx(0.83, abs=1e-3)


def test_reference_round_trip_keeps_every_estimator(tmp_path: Path, reference):
    path = save_reference(reference, tmp_path)
    meta = json.loads((path / "reference.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["estimators"] == list(METHODS)
    loaded = load_reference(path)
    rows = make_rows(300, seed=53)
    for method in METHODS:
        assert _estimate(loaded, method, rows) == _estimate(reference, method, rows)


def test_a_format_1_reference_still_loads_and_falls_back_to_cbpe(tmp_path: Path, reference, caplog):
    # What driftd wrote before the estimators: a CBPE calibrator at the top level of the npz.
    path = save_reference(reference, tmp_path)
    with np.load(path / "arrays.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if not k.startswith("estimate.")}
    arrays["calibrator.x"] = reference.calibrator.x
    arrays["calibrator.y"] = reference.calibrator.y
    np.savez(path / "arrays.npz", **arrays)
    meta = json.loads((path / "reference.json").read_text())
    meta["format_version"] = 1
    del meta["estimators"]
    (path / "reference.json").write_text(json.dumps(meta))
    old = load_reference(path)
    assert old.estimators.methods() == ("cbpe",)
    with caplog.at_level(logging.WARNING):
        stats = _estimate(old, "cott", make_rows(300, seed=54))
    assert stats.method == "cbpe" and stats.lower <= stats.estimated_accuracy <= stats.upper
    assert "signals.estimate.method 'cott'" in caplog.text and "driftd reference build" in caplog.text


def test_no_labels_no_estimate(tmp_path: Path):
    rows = make_rows(300, seed=55)
    ref = build_reference(model_version="v1", features=rows.features, probs=rows.probs, labels=None)
    assert ref.estimators is None
    assert _estimate(ref, "cott", rows) is None


def test_config_selects_and_validates_the_method(tmp_path: Path):
    base = {"logs": {"inference": "./logs"}}
    default = parse_config(base, source="t", base=tmp_path).monitor.signals.estimate
    assert default.method == "cott" and default.bootstraps == 200 and default.interval == 0.9
    chosen = parse_config({**base, "signals": {"estimate": {"method": "atc_ne", "bootstraps": 50}}}, source="t",
                          base=tmp_path).monitor.signals.estimate
    assert (chosen.method, chosen.bootstraps) == ("atc_ne", 50)
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "signals": {"estimate": {"method": "magic", "bootstraps": 3, "interval": 1.5,
                                                        "sed": 1}}}, source="t", base=tmp_path)
    text = str(err.value)
    assert "signals.estimate.method: must be one of 'cbpe', 'doc', 'atc_mc', 'atc_ne', 'cott'" in text
    assert "signals.estimate.bootstraps: must be >= 10" in text
    assert "signals.estimate.interval: must be <= 0.999" in text
    assert "signals.estimate.sed: unknown key" in text


def test_top_k_transport_matches_the_dense_plan():
    # 30 classes kept as their top 16: the plan's cost moves by at most the dropped mass.
    rng = np.random.default_rng(6)
    logits = rng.normal(scale=3.0, size=(400, 30))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    target = rng.dirichlet(np.full(30, 5.0))
    dense = transport_plan(*top_k(probs, 30), target)
    sparse = transport_plan(*top_k(probs, 16), target)
    assert dense.converged and sparse.converged
    dense_cost = (dense.mass * dense.cost).sum(1).mean()
    sparse_cost = (sparse.mass * sparse.cost).sum(1).mean() + (1 - sparse.mass.sum(1)).mean()
    dropped = 1 - top_k(probs, 16)[0].sum(1)
    assert abs(sparse_cost - dense_cost) <= dropped.mean() + 1e-3
    with pytest.raises(ValueError, match="probability distribution"):
        transport_plan(*top_k(probs, 16), np.full(30, np.nan))


def _batch(rows):
    from monitor.ingest.records import InferenceBatch

    return InferenceBatch(source="test", first_row=0, request_id=rows.request_id, timestamp=rows.timestamp,
                          model_version=rows.model_version, features=rows.features, probs=rows.probs,
                          prediction=rows.probs.argmax(1).astype(np.int64), input_uri=None, label=None)


def test_a_checkpointed_window_keeps_its_per_row_estimator_data(tmp_path: Path, reference):
    from engine_helpers import config_doc
    from monitor.engine.window import WindowTracker

    # 600-row windows: COTT's error grows in small windows (transporting a few hundred rows onto
    # a prior they only match up to sampling noise counts that noise as error).
    cfg = parse_config(config_doc(tmp_path, tmp_path / "ref", **{"signals.mmd.enabled": False,
                                                                  "signals.online_mmd.enabled": False,
                                                                  "window.rows": 600}),
                       source="t", base=tmp_path).monitor
    rows = make_rows(1200, seed=56, shift=10.0)
    first, second, third = _batch(rows.slice(0, 450)), _batch(rows.slice(450, 600)), _batch(rows.slice(600, 1200))
    live = WindowTracker(reference, cfg)
    assert live.estimator.method == "cott"
    assert live.add(first, now=0.0) == []
    saved, meta = live.state_dict()
    arrays = {k: np.array(v, copy=True) for k, v in saved.items()}  # as the engine's npz would hold them
    restored = WindowTracker(reference, cfg, state=({k: v.copy() for k, v in arrays.items()}, meta))
    (a,), (b,) = live.add(second, now=1.0), restored.add(second, now=1.0)
    assert a.estimate == b.estimate and a.estimate.method == "cott"
    assert a.estimate.estimated_accuracy == pytest.approx(_accuracy(rows.slice(0, 600)), abs=0.05)
    # A checkpoint from before the per-row data existed: that window goes without an estimate,
    # the next one has it again.
    old = {k: v.copy() for k, v in arrays.items() if k not in ("window.top_prob", "window.top_class", "window.typical")}
    upgraded = WindowTracker(reference, cfg, state=(old, meta))
    (c,) = upgraded.add(second, now=1.0)
    assert c.estimate is None and c.predictions == a.predictions
    (d,) = upgraded.add(third, now=2.0)
    assert d.estimate is not None and d.estimate.method == "cott"


@pytest.mark.parametrize("sharpness", [1.0, 4.0, 40.0], ids=["soft", "confident", "one-hot"])
def test_newton_and_bfgs_find_the_same_transport_plan(sharpness: float, monkeypatch: pytest.MonkeyPatch):
    """Newton serves the usual head (every row lists every class); (almost) one-hot rows, where its
    curvature says nothing, fall back to BFGS. Either way the plan is the entropic optimum."""
    from monitor.signals import transport

    rng = np.random.default_rng(3)
    logits = rng.normal(scale=sharpness, size=(1500, 10))
    logits[np.arange(1500), rng.integers(0, 10, 1500)] += 3 * sharpness
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    target = rng.dirichlet(np.full(10, 8.0))
    top_prob, top_class = top_k(probs, 10)
    plan = transport_plan(top_prob, top_class, target)
    monkeypatch.setattr(transport, "NEWTON_MAX_CLASSES", 0)  # BFGS only
    bfgs = transport_plan(top_prob, top_class, target)
    assert plan.converged and bfgs.converged
    assert np.abs(plan.mass - bfgs.mass).max() < 1e-4
    per_class = np.bincount(top_class.ravel(), weights=plan.mass.ravel(), minlength=10) / len(probs)
    assert np.abs(per_class - target).max() < 1e-4


def test_repeated_rows_solve_as_one_weighted_row():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=2.0, size=(300, 6))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    target = rng.dirichlet(np.full(6, 8.0))
    once = transport_plan(*top_k(probs, 6), target)
    thrice = transport_plan(*top_k(np.repeat(probs, 3, axis=0), 6), target)
    assert once.converged and thrice.converged
    assert np.abs(thrice.mass - np.repeat(once.mass, 3, axis=0)).max() < 1e-6
