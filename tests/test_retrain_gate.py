"""The promotion rule on paired outcomes: what it promotes, what it refuses, and what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.config import parse_config
from monitor.errors import ConfigError
from retrain.config import GateConfig
from retrain.gate import decide, too_small
from retrain.paired import PairedCounts


def slice_of(rows: int, current: int, better: int, worse: int) -> PairedCounts:
    """``current`` rows right for the current model; the candidate fixes ``better`` and breaks ``worse``."""
    return PairedCounts(rows, better, worse, candidate_correct=current + better - worse, current_correct=current)


GATE = GateConfig(min_gain=0.02, max_forgetting=0.01)


def test_promotes_a_credible_gain_without_credible_forgetting() -> None:
    result = decide(GATE, production=slice_of(400, 200, 90, 10), reference=slice_of(2000, 1900, 5, 4))
    assert result.promote, result.reason
    assert result.reason.startswith("promote: production 0.500 -> 0.700 (400 held-out rows")
    assert result.production.test.startswith("exact McNemar") and result.production.p_value < 1e-12
    assert result.reference.test.startswith("Tango") and result.reference.p_value <= 0.05
    assert result.reference.lower_bound > -0.01 and result.reference_rows == 2000
    doc = json.loads(json.dumps(result.to_json()))  # what result.json and meta.json carry
    assert abs(doc["gain"] - 0.2) < 1e-9 and doc["reference"]["rows"] == 2000 and doc["alpha"] == 0.05


def test_names_every_failed_condition() -> None:
    result = decide(GATE, production=slice_of(400, 200, 12, 8), reference=slice_of(400, 380, 2, 22))
    assert not result.promote
    assert "gain +0.010 < min_gain 0.02" in result.reason and "dropped 0.050 > max_forgetting 0.01" in result.reason


def test_a_gain_within_noise_is_not_promoted() -> None:
    result = decide(GATE, production=slice_of(100, 50, 5, 2), reference=slice_of(2000, 1900, 0, 0))
    assert not result.promote and result.gain >= 0.02
    assert "production gain +0.030 is not significant (exact McNemar (one-sided): p 0.227" in result.reason
    assert "about 211 rows would show it at these rates" in result.reason


def test_forgetting_below_the_margin_must_be_shown_not_just_observed() -> None:
    """1250 rows, observed drop 0.004 < 0.01, but the 95% upper bound is 0.012: not promoted."""
    result = decide(GATE, production=slice_of(400, 200, 90, 10), reference=slice_of(1250, 1105, 15, 20))
    assert not result.promote and 0 < result.forgetting < 0.01
    assert "reference accuracy drop 0.004 not shown below max_forgetting 0.01" in result.reason
    assert "upper bound 0.012 on 1250 rows; about 2244 rows would show it" in result.reason


def test_a_slice_too_small_to_judge_max_forgetting_is_refused_with_the_rows_it_needs() -> None:
    """80 rows: one row is 1.25 points, coarser than the margin; even an unchanged model fails."""
    result = decide(GATE, production=slice_of(400, 200, 90, 10), reference=slice_of(80, 75, 0, 0))
    assert not result.promote and result.forgetting == 0
    assert "reference gate slice has 80 distinct held-out rows, 268 are needed" in result.reason
    assert too_small(GATE, production_rows=400, reference_rows=268) == []
    small = too_small(GateConfig(min_rows=100), production_rows=60, reference_rows=5000)
    assert small == ["production gate slice has 60 distinct held-out rows, the gate needs at least 100 "
                     "(retrain.gate.min_rows): wait for more labelled rows or raise gate_fraction"]


def test_a_negative_min_gain_tests_non_inferiority_on_production_too() -> None:
    gate = GateConfig(min_gain=-0.02, max_forgetting=0.05)
    result = decide(gate, production=slice_of(1000, 800, 10, 12), reference=slice_of(1000, 900, 3, 3))
    assert result.production.margin == 0.02 and result.production.test.startswith("Tango")
    assert result.promote, result.reason


def test_gate_keys_are_validated_by_name() -> None:
    def parse(gate: dict) -> GateConfig:
        return parse_config({"logs": {"inference": "logs"}, "retrain": {"gate": gate}}, source="driftd.yaml",
                            base=Path("/srv")).retrain.gate

    assert parse({}) == GateConfig() and (GateConfig().alpha, GateConfig().min_rows) == (0.05, 50)
    assert parse({"alpha": 0.1, "min_rows": 200}) == GateConfig(alpha=0.1, min_rows=200)
    with pytest.raises(ConfigError) as err:
        parse({"alpha": 0.0, "min_rows": 3})
    assert "retrain.gate.alpha:" in str(err.value) and "retrain.gate.min_rows:" in str(err.value)


def test_forgetting_that_comes_in_groups_needs_more_groups_to_be_shown_small() -> None:
    """300 reference rows, 4 per object: the candidate learns 4 objects and forgets 2. Counted as
    independent rows that passes; judged as 75 objects the upper bound on forgetting widens past
    max_forgetting, and the reason says how the rows were weighed and how many would do."""
    import numpy as np

    from retrain.paired import grouped_counts, paired_counts

    current = np.ones(300, bool)
    current[:16] = False                # objects 0-3: only the candidate gets them right
    candidate = current.copy()
    candidate[:16] = True
    candidate[16:24] = False            # objects 4 and 5: forgotten, all four renders each
    groups = np.repeat(np.arange(75), 4)
    production = slice_of(400, 200, 90, 10)
    plain = decide(GATE, production=production, reference=paired_counts(candidate, current))
    grouped = decide(GATE, production=production, reference=grouped_counts(candidate, current, groups))
    assert plain.promote, plain.reason
    assert not grouped.promote
    assert "300 rows in 75 groups, weighing as 74 independent (design effect 4.05)" in grouped.reason
    assert "reference accuracy drop -0.027 not shown below max_forgetting 0.01" in grouped.reason
    assert "about 685 rows would show it" in grouped.reason
    assert plain.reference.lower_bound > -0.01 > grouped.reference.lower_bound
    doc = grouped.to_json()["reference"]
    assert doc["groups"] == 75 and doc["design_effect"] == pytest.approx(4.05, abs=0.01) and doc["rows"] == 300
