"""How many intra-op threads training gets: measured on the workload itself, not torch's default.

torch starts one OpenMP thread per core. Each parallel region ends on a barrier, so a thread
that shares its core with any other process holds up all the others, which spin while they
wait and take CPU from the very process they wait for. On a shared 2-core host that made
two threads 4-10x slower per training step than one (test_resnet, batch 64, 32 px: 68-83 ms
with 1 thread, 276-327 ms with 2 at load 4.5; 228-286 ms vs 545-3052 ms beside a CPU hog),
and the demo's source training took 276 s instead of 6.6 s. On an idle many-core server the
opposite holds. Neither the core count nor the load average predicts the winner, so we time
a few real steps at each candidate count, interleaved so every count sees the same load, and
keep the fewest threads within ``margin`` of the fastest (fewer threads leave cores to the
inference service beside driftd and degrade least when load arrives later).

``OMP_NUM_THREADS`` set in the environment is an operator's decision and is kept as it is
(torchrun sets it to 1 for its workers).
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from retrain.config import JobSettings

log = logging.getLogger(__name__)

ENV = "OMP_NUM_THREADS"
MARGIN = 0.15          # more threads must be this much faster per step to be worth their cores
ROUNDS = 3             # timed steps per candidate (interleaved), after one untimed warm-up each
DROP = 3.0             # a count this many times slower than the best is not timed any further
SMALL_FRACTION = 0.25  # of the batch, for the screening step


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str                                   # "measured" | "OMP_NUM_THREADS" | "one cpu" | "fallback" | ...
    cpus: int                                     # CPUs this process may run on
    step_seconds: dict[int, float] = field(default_factory=dict)  # count -> median seconds per full step
    note: str = ""
    screened_out: dict[int, float] = field(default_factory=dict)  # count -> slowdown on the small step
    small_step_seconds: dict[int, float] = field(default_factory=dict)  # kept count -> small-step seconds

    def describe(self) -> str:
        def threads(n: int) -> str:
            return f"{n} thread{'s' if n > 1 else ''}"

        parts = []
        if self.step_seconds:
            parts.append("measured per step: " + ", ".join(
                f"{threads(n)} {1000 * s:.0f} ms" for n, s in sorted(self.step_seconds.items())))
        elif self.small_step_seconds:
            parts.append("measured per quarter-batch step: " + ", ".join(
                f"{threads(n)} {1000 * s:.0f} ms" for n, s in sorted(self.small_step_seconds.items())))
        if self.screened_out:
            parts.append(", ".join(f"{threads(n)} {x:.1f}x slower" for n, x in sorted(self.screened_out.items()))
                         + " on a quarter batch, so not timed further")
        if not parts:
            parts.append(self.note or self.source)
        return f"{self.threads} intra-op {threads(self.threads).split(' ', 1)[1]} ({'; '.join(parts)}; {self.cpus} CPUs usable)"


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is all we know
    return max(1, cpus)


def candidates(cpus: int) -> list[int]:
    """1, 2, 4, ... below ``cpus``, and ``cpus`` itself."""
    out, n = [], 1
    while n < cpus:
        out.append(n)
        n *= 2
    return out + [cpus]


def measure(step: Callable[[], None], counts: Sequence[int], *, rounds: int = ROUNDS,
            set_threads: Callable[[int], None] = torch.set_num_threads,
            clock: Callable[[], float] = time.perf_counter) -> dict[int, float]:
    """Median seconds per ``step()`` at each thread count.

    Each count first gets one untimed warm-up (it builds the thread pool); then the counts take
    turns, one timed step each per round, so a change of load mid-measurement reaches all of
    them alike. A count whose warm-up or median is already ``DROP`` x the best median stops
    being timed (on a busy host one such step can take seconds); its figure is that one step.
    """
    times: dict[int, list[float]] = {n: [] for n in counts}
    dropped: dict[int, float] = {}

    def best() -> float | None:
        medians = [statistics.median(t) for t in times.values() if t]
        return min(medians) if medians else None

    def timed(n: int) -> float:
        set_threads(n)
        start = clock()
        step()
        return clock() - start

    for n in sorted(counts):
        warm = timed(n)
        fastest = best()
        if fastest is not None and warm > DROP * fastest:
            dropped[n] = warm
            del times[n]
            continue
        times[n].append(timed(n))
    for _ in range(rounds - 1):
        for n in list(times):
            times[n].append(timed(n))
        fastest = best()
        for n in [n for n, t in times.items() if fastest is not None and statistics.median(t) > DROP * fastest]:
            dropped[n] = statistics.median(times.pop(n))
    return {**{n: statistics.median(t) for n, t in times.items()}, **dropped}


def screen(small_step: Callable[[], None], counts: Sequence[int], *,
           set_threads: Callable[[int], None] = torch.set_num_threads,
           clock: Callable[[], float] = time.perf_counter) -> tuple[dict[int, float], dict[int, float]]:
    """One cheap step (a fraction of the batch) per count, to drop the hopeless ones before any
    full step is spent on them: ``({kept count: seconds}, {dropped count: slowdown vs the fastest})``.

    The fewest-thread count runs it twice (the first run pays torch's lazy start-up); each other
    count once, which also builds its thread pool. A count ``DROP`` x slower than the fastest so
    far is dropped: beside a CPU hog a full two-thread step took 4.5-7.6 s, a quarter of one a
    quarter of that.
    """
    kept: dict[int, float] = {}
    dropped: dict[int, float] = {}
    for i, n in enumerate(sorted(counts)):
        set_threads(n)
        if i == 0:
            small_step()
        start = clock()
        small_step()
        seconds = clock() - start
        fastest = min(kept.values(), default=None)
        if fastest is not None and seconds > DROP * fastest:
            dropped[n] = seconds / fastest
        else:
            kept[n] = seconds
    return kept, dropped


def pick(step_seconds: dict[int, float], margin: float = MARGIN) -> int:
    """The fewest threads whose step time is within ``margin`` of the fastest."""
    best = min(step_seconds.values())
    return min(n for n, s in step_seconds.items() if s <= best * (1 + margin))


def choose_threads(step: Callable[[], None], *, small_step: Callable[[], None] | None = None,
                   cpus: int | None = None, environ: dict[str, str] | None = None,
                   set_threads: Callable[[int], None] = torch.set_num_threads,
                   clock: Callable[[], float] = time.perf_counter, rounds: int = ROUNDS) -> ThreadChoice:
    """Time ``step`` (one representative training step; it must leave no trace) at each
    candidate thread count, set the winner with ``set_threads`` and return the choice.
    ``small_step`` (the same on a fraction of the batch) screens the counts first."""
    cpus = usable_cpus() if cpus is None else cpus
    env = os.environ if environ is None else environ
    if env.get(ENV, "").strip():
        try:
            threads = max(1, int(env[ENV]))
        except ValueError:
            threads = 1
            log.warning("%s=%r is not a whole number: training with 1 thread", ENV, env[ENV])
        set_threads(threads)
        return ThreadChoice(threads, ENV, cpus, note=f"{ENV}={env[ENV]} set in the environment")
    if cpus == 1:
        set_threads(1)
        return ThreadChoice(1, "one cpu", cpus, note="only one CPU usable")
    counts, screened_out, small = candidates(cpus), {}, {}
    if small_step is not None:
        small, screened_out = screen(small_step, counts, set_threads=set_threads, clock=clock)
        counts = sorted(small)
    if len(counts) == 1:  # nothing left to compare: no full step needed
        set_threads(counts[0])
        return ThreadChoice(counts[0], "measured", cpus, screened_out=screened_out, small_step_seconds=small)
    step_seconds = measure(step, counts, rounds=rounds, set_threads=set_threads, clock=clock)
    threads = pick(step_seconds)
    set_threads(threads)
    return ThreadChoice(threads, "measured", cpus, step_seconds, screened_out=screened_out, small_step_seconds=small)


def training_steps(model: nn.Module, batch: torch.Tensor, num_classes: int,
                   fraction: float = SMALL_FRACTION) -> tuple[Callable[[], None], Callable[[], None]]:
    """Probes of one training step of ``model`` at ``batch``'s shape and at ``fraction`` of its
    rows: forward and backward in train mode on a private copy (the weights and BatchNorm
    statistics of ``model`` stay untouched)."""
    probe = copy.deepcopy(model).train()
    target = torch.arange(len(batch)) % num_classes
    rows = max(2, int(len(batch) * fraction))

    def step(x: torch.Tensor = batch, y: torch.Tensor = target) -> None:
        loss = nn.functional.cross_entropy(probe(x), y)
        probe.zero_grad(set_to_none=True)
        loss.backward()

    return step, lambda: step(batch[:rows], target[:rows])


def choose_for_training(model: nn.Module, batch: torch.Tensor, num_classes: int, **kw) -> ThreadChoice:
    """:func:`choose_threads` on probes of ``model``'s training step at ``batch``'s shape."""
    step, small_step = training_steps(model, batch, num_classes)
    return choose_threads(step, small_step=small_step, **kw)


def configure_retrain_threads(config: JobSettings) -> ThreadChoice:
    """The retrain job's thread count, measured on the CURRENT model's architecture at the
    configured batch size and the model's input size (random weights and inputs: a step costs
    the same). Logs the choice. Does not raise for a registry or model problem: the job reports
    those itself, so the measurement falls back to 1 thread and logs why."""
    from monitor.errors import DriftdError
    from retrain.model import create_model
    from retrain.recipe import resolve_device
    from retrain.registry import Registry

    cpus = usable_cpus()
    try:
        if resolve_device(config.retrain.device).type == "cuda":
            choice = ThreadChoice(torch.get_num_threads(), "cuda", cpus,
                                  note="training runs on the GPU; torch's default kept")
        else:
            current = Registry(config.retrain.registry_dir).current()
            if current is None:
                raise LookupError(f"no CURRENT model in {config.retrain.registry_dir}")
            meta = current.meta
            model = create_model(meta.architecture, meta.num_classes)
            batch = torch.randn(config.retrain.hyper.batch_size, *meta.data_config["input_size"])
            choice = choose_for_training(model, batch, meta.num_classes, cpus=cpus)
    except (DriftdError, LookupError, RuntimeError, ValueError, TypeError) as exc:
        torch.set_num_threads(1)
        choice = ThreadChoice(1, "fallback", cpus,
                              note=f"not measured ({type(exc).__name__}: {exc}); 1 is safest on a shared host")
    log.info("retrain threads: %s", choice.describe())
    return choice
