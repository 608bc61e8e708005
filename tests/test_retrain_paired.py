"""The paired statistics behind the gate, checked against first principles: the likelihood they
maximise, the binomial they reduce to, and their error rate at the boundary of the hypothesis."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from retrain.paired import (PairedCounts, _restricted_better, floor_rows, grouped_counts, lower_bound, p_value,
                            paired_counts, rows_needed)


def counts(rows: int, better: int, worse: int) -> PairedCounts:
    return PairedCounts(rows, better, worse, candidate_correct=better, current_correct=worse)


def test_counts_come_from_per_row_outcomes() -> None:
    c = paired_counts(np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 1, 0, 0], bool))
    assert (c.rows, c.better, c.worse, c.candidate_correct, c.current_correct) == (5, 2, 1, 3, 2)
    assert c.difference == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one length"):
        paired_counts(np.ones(3, bool), np.ones(4, bool))


@pytest.mark.parametrize(("worse", "better", "rows", "delta"), [(20, 15, 1250, 0.01), (7, 30, 200, 0.05),
                                                                 (3, 0, 80, 0.02), (40, 41, 300, 0.1)])
def test_restricted_mle_maximises_the_constrained_likelihood(worse: int, better: int, rows: int, delta: float) -> None:
    def nll(x: float) -> float:
        ties = rows - worse - better
        return -(worse * math.log(x + delta) + (better * math.log(x) if better else 0.0)
                 + ties * math.log(1 - 2 * x - delta))

    best = optimize.minimize_scalar(nll, bounds=(1e-12, (1 - delta) / 2 - 1e-9), method="bounded",
                                    options={"xatol": 1e-12}).x
    assert _restricted_better(worse, better, rows, delta) == pytest.approx(best, abs=1e-7)


def test_margin_zero_is_the_exact_one_sided_mcnemar_test() -> None:
    c = counts(150, 9, 2)
    assert p_value(c, 0.0) == pytest.approx(stats.binom.sf(8, 11, 0.5))
    assert p_value(counts(150, 0, 0), 0.0) == 1.0  # no discordant row, no evidence


def test_non_inferiority_keeps_its_level_at_the_boundary() -> None:
    """True forgetting exactly at the margin: the test passes a candidate about alpha of the time."""
    rng = np.random.default_rng(0)
    cells = rng.multinomial(500, [0.03, 0.02, 0.95], size=4000)  # worse, better, agree
    passed = np.mean([p_value(counts(500, int(b), int(w)), 0.01) <= 0.05 for w, b, _ in cells])
    assert 0.035 < passed < 0.065


def test_bound_and_p_value_agree() -> None:
    for rows, better, worse in [(1250, 15, 20), (300, 0, 0), (155, 2, 3), (400, 30, 10)]:
        c = counts(rows, better, worse)
        for margin in (0.01, 0.05):
            assert (p_value(c, margin) <= 0.05) == (lower_bound(c, 0.05) > -margin)


def test_floor_is_the_size_where_an_unchanged_model_can_just_pass() -> None:
    n = floor_rows(0.01, 0.05)
    assert n == 268
    assert p_value(counts(n, 0, 0), 0.01) <= 0.05 < p_value(counts(n - 1, 0, 0), 0.01)
    assert floor_rows(0.0, 0.05) is None


def test_rows_needed_would_pass_at_the_observed_rates() -> None:
    c = counts(1250, 15, 20)
    assert p_value(c, 0.01) > 0.05
    n = rows_needed(c, 0.01, 0.05)
    assert n is not None and n > 1250
    scaled = counts(n, round(15 * n / 1250), round(20 * n / 1250))
    assert p_value(scaled, 0.01) == pytest.approx(0.05, abs=0.01)
    assert rows_needed(counts(300, 0, 9), 0.01, 0.05) is None  # a 3-point loss passes at no size


def _grouped_slice(rng: np.random.Generator, groups: int, size: int, worse: float, better: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate, current, group) per row: each group of ``size`` rows is wholly broken by the
    candidate (p ``worse``), wholly fixed (p ``better``) or unchanged, as when it forgets an object."""
    u = rng.random(groups)
    state = np.repeat(np.where(u < worse, -1, np.where(u < worse + better, 1, 0)), size)
    current, candidate = state != 1, state != -1
    return candidate, current, np.repeat(np.arange(groups), size)


def test_rows_that_fail_together_are_judged_as_groups_and_the_test_keeps_its_level() -> None:
    """Forgetting exactly at the margin, in whole groups of 4: counted as independent rows the
    test passes the candidate about 4x too often; with its groups, about alpha of the time."""
    rng = np.random.default_rng(1)
    ungrouped = grouped = 0
    effects = []
    for _ in range(400):
        candidate, current, groups = _grouped_slice(rng, 400, 4, worse=0.06, better=0.04)
        ungrouped += p_value(paired_counts(candidate, current), 0.02) <= 0.05
        c = grouped_counts(candidate, current, groups)
        effects.append(c.design_effect)
        grouped += p_value(c, 0.02) <= 0.05
    assert ungrouped / 400 > 0.12
    assert grouped / 400 < 0.09
    assert np.mean(effects) == pytest.approx(4.0, rel=0.05)  # each disagreement comes four at a time


def test_scattered_disagreements_cost_grouped_rows_nothing() -> None:
    rng = np.random.default_rng(2)
    current = rng.random(1200) < 0.9
    candidate = np.where(rng.random(1200) < 0.05, ~current, current)  # flips independent of the groups
    groups = np.repeat(np.arange(300), 4)
    plain, grouped = paired_counts(candidate, current), grouped_counts(candidate, current, groups)
    assert grouped.design_effect < 1.3 and grouped.groups == 300
    assert (grouped.rows, grouped.better, grouped.worse) == (plain.rows, plain.better, plain.worse)
    # one group per row is the ungrouped test exactly
    single = grouped_counts(candidate, current, np.arange(1200))
    assert single.design_effect == 1.0 and p_value(single, 0.01) == p_value(plain, 0.01)
    assert lower_bound(single, 0.05) == lower_bound(plain, 0.05)
    with pytest.raises(ValueError, match="one key per row"):
        grouped_counts(candidate, current, groups[:10])


def test_grouped_rows_need_more_rows_and_an_identical_candidate_is_no_evidence_of_grouping() -> None:
    candidate, current, groups = _grouped_slice(np.random.default_rng(0), 300, 4, worse=0.025, better=0.03)
    plain, grouped = paired_counts(candidate, current), grouped_counts(candidate, current, groups)
    assert grouped.design_effect > 3 and grouped.effective_rows < plain.rows / 3
    assert lower_bound(grouped, 0.05) < lower_bound(plain, 0.05)  # a wider bound on forgetting
    needed_plain, needed_grouped = rows_needed(plain, 0.01, 0.05), rows_needed(grouped, 0.01, 0.05)
    assert needed_plain is not None and needed_grouped is not None and needed_grouped > 3 * needed_plain
    same = grouped_counts(current, current, groups)
    assert same.design_effect == 1.0 and same.effective_rows == 1200
