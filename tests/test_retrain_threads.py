"""Training's intra-op thread count, chosen by timing the workload (retrain.threads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from retrain.threads import (
    candidates, choose_threads, configure_retrain_threads, measure, pick, screen, training_steps, usable_cpus,
)


class Host:
    """A fake host: each step costs ``costs[threads]`` seconds of a fake clock (time is the mockable hook)."""

    def __init__(self, costs: dict[int, list[float] | float]):
        self.costs = {n: list(c) if isinstance(c, list) else [c] for n, c in costs.items()}
        self.now = 0.0
        self.threads = 0
        self.steps: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n

    def step(self) -> None:
        costs = self.costs[self.threads]
        self.now += costs.pop(0) if len(costs) > 1 else costs[0]
        self.steps.append(self.threads)

    def clock(self) -> float:
        return self.now


def test_candidates_cover_powers_of_two_and_every_cpu() -> None:
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(6) == [1, 2, 4, 6]


def test_the_fewest_threads_within_the_margin_of_the_fastest_win() -> None:
    assert pick({1: 0.100, 2: 0.060, 4: 0.055}) == 2      # 4 is faster, but not by 15 %
    assert pick({1: 0.080, 2: 0.330}) == 1                # the busy 2-core host of issue 14
    assert pick({1: 0.100, 2: 0.090}) == 1


def test_counts_take_turns_so_they_see_the_same_load() -> None:
    host = Host({1: 0.1, 2: 0.06})
    seconds = measure(host.step, [1, 2], rounds=3, set_threads=host.set_threads, clock=host.clock)
    assert seconds == pytest.approx({1: 0.1, 2: 0.06})
    # warm-up and first timed step per count, then the remaining rounds interleaved
    assert host.steps == [1, 1, 2, 2, 1, 2, 1, 2]


def test_a_count_far_slower_than_the_best_is_not_timed_again() -> None:
    """Beside a CPU hog one two-thread step took seconds: it is measured once, not six times."""
    host = Host({1: 0.2, 2: 4.5})
    seconds = measure(host.step, [1, 2], rounds=3, set_threads=host.set_threads, clock=host.clock)
    assert seconds == {1: pytest.approx(0.2), 2: pytest.approx(4.5)}
    assert host.steps.count(2) == 1


def test_a_hopeless_count_costs_one_small_step_and_no_full_one() -> None:
    """Beside a hog a full two-thread step took up to 7.6 s; screening spends a quarter of one on it."""
    full, small = Host({1: 0.2, 2: 4.5}), Host({1: 0.05, 2: 1.2})
    kept, dropped = screen(small.step, [1, 2], set_threads=small.set_threads, clock=small.clock)
    assert kept == {1: pytest.approx(0.05)} and dropped == {2: pytest.approx(24.0)}
    assert small.steps == [1, 1, 2]

    def set_both(n: int) -> None:
        full.set_threads(n)
        small.set_threads(n)

    small.now = 0.0
    choice = choose_threads(full.step, small_step=small.step, cpus=2, environ={}, set_threads=set_both,
                            clock=lambda: full.now + small.now)
    assert (choice.threads, full.steps) == (1, [])  # one count left: nothing to compare in full
    assert "2 threads 24.0x slower on a quarter batch" in choice.describe()


def test_counts_that_pass_the_screen_are_timed_in_full() -> None:
    full, small = Host({1: 0.10, 2: 0.06}), Host({1: 0.03, 2: 0.02})

    def set_both(n: int) -> None:
        full.set_threads(n)
        small.set_threads(n)

    choice = choose_threads(full.step, small_step=small.step, cpus=2, environ={}, set_threads=set_both,
                            clock=lambda: full.now + small.now)
    assert choice.threads == 2 and choice.step_seconds == pytest.approx({1: 0.10, 2: 0.06})
    assert full.steps.count(1) == full.steps.count(2) == 4  # warm-up + 3 rounds each


def test_choose_sets_the_measured_winner() -> None:
    host = Host({1: 0.08, 2: 0.33})
    choice = choose_threads(host.step, cpus=2, environ={}, set_threads=host.set_threads, clock=host.clock)
    assert (choice.threads, choice.source, host.threads) == (1, "measured", 1)
    assert "1 thread 80 ms, 2 threads 330 ms" in choice.describe()


def test_omp_num_threads_is_the_operators_decision() -> None:
    host = Host({1: 0.08, 2: 0.33, 3: 0.5})
    choice = choose_threads(host.step, cpus=2, environ={"OMP_NUM_THREADS": "3"}, set_threads=host.set_threads,
                            clock=host.clock)
    assert (choice.threads, choice.source, host.threads, host.steps) == (3, "OMP_NUM_THREADS", 3, [])


def test_one_cpu_needs_no_measurement() -> None:
    host = Host({1: 0.08})
    choice = choose_threads(host.step, cpus=1, environ={}, set_threads=host.set_threads, clock=host.clock)
    assert (choice.threads, host.steps) == (1, [])


def test_usable_cpus_honours_a_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")   # 1.5 CPUs: one whole one
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) >= 1


def test_the_probe_step_leaves_the_model_untouched() -> None:
    model = timm.create_model("test_resnet", num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step, small_step = training_steps(model, torch.randn(8, 3, 32, 32), num_classes=10)
    step()
    small_step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_the_retrain_job_falls_back_to_one_thread_when_it_cannot_measure(tmp_path: Path, caplog) -> None:
    from monitor.config import parse_config

    config = parse_config({"logs": {"inference": str(tmp_path)}, "retrain": {"registry_dir": str(tmp_path / "reg"),
                                                                              "device": "cpu"}},
                          source="t.yaml", base=tmp_path)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="retrain.threads"):
            choice = configure_retrain_threads(config)
        assert (choice.threads, choice.source, torch.get_num_threads()) == (1, "fallback", 1)
        assert "no CURRENT model" in choice.note and "retrain threads: 1 intra-op thread" in caplog.text
    finally:
        torch.set_num_threads(before)
