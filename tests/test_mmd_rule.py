"""The default MMD alert rule can fire: its threshold is above the permutation floor, a shifted
stream of real tests trips it through the real policy, and null windows breach it at no more
than its threshold's rate (bench/mmd_power_bench.py --part rule measures the rest)."""

from __future__ import annotations

import numpy as np

from monitor.signals.config import MmdConfig
from monitor.policy.config import PolicyConfig
from monitor.policy.policy import Policy
from monitor.policy.rules import DEFAULT_RULES
from monitor.signals.kernels import median_bandwidth
from monitor.signals.mmd import PermutationSchedule, mmd_test
from monitor.signals.mmd_reference import MmdReference
from daemon_helpers import make_window
from mmd_helpers import gaussian_rows, one_thread

NOW = 1_800_000_000.0
(RULE,) = [r for r in DEFAULT_RULES if r.signal == "mmd_p_value"]


def test_the_default_threshold_is_above_the_smallest_p_value_the_default_permutations_give() -> None:
    floor = 1.0 / (1 + MmdConfig().permutations)
    assert RULE.op == "below" and floor < RULE.threshold
    # The rule needs `consecutive` windows each with fewer than this many permutations at or
    # above the observed statistic: more than none, so a subtle shift can trip it.
    assert RULE.threshold * (1 + MmdConfig().permutations) - 1 > 1


def test_a_shifted_stream_trips_the_default_rule_through_the_policy() -> None:
    cfg = MmdConfig()
    rng = np.random.default_rng(4)
    x = gaussian_rows(rng, 300, 8)
    ref = MmdReference.build(x, median_bandwidth(x))
    schedule = PermutationSchedule(ref, permutations=cfg.permutations, redraw_every=cfg.redraw_permutations_every, seed=0)
    policy = Policy(PolicyConfig(rules=(RULE,)))
    outcomes = []
    with one_thread():
        for i in range(6):
            shifted = i >= 2
            y = gaussian_rows(rng, 100, 8, shift=0.5 if shifted else 0.0, shifted_dims=2 if shifted else 0)
            p = mmd_test(ref, y, plan=schedule.for_window(i, 100)).p_value
            window = make_window(index=i, mmd_p_value=p)
            outcomes.append([d.outcome for d in policy.evaluate(window)])
    # onset at window 2: the third shifted window (index 4) raises the alert
    assert outcomes[:4] == [[], [], [], []] and outcomes[4] == ["alert"]


def test_null_windows_breach_the_default_threshold_at_most_at_its_rate() -> None:
    cfg = MmdConfig()
    rng = np.random.default_rng(17)
    p = []
    with one_thread():
        for i in range(300):
            x = gaussian_rows(rng, 150, 6)
            ref = MmdReference.build(x, median_bandwidth(x))
            schedule = PermutationSchedule(ref, permutations=cfg.permutations, redraw_every=1, seed=i)
            p.append(mmd_test(ref, gaussian_rows(rng, 40, 6), plan=schedule.for_window(0, 40)).p_value)
    # P(p < 0.05) = 5/101 exactly under the null; Binomial(300, 0.0495): mean 14.9, sd 3.8.
    # At most 27 holds with probability > 0.999.
    assert int((np.array(p) < RULE.threshold).sum()) <= 27
