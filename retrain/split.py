"""Which labelled rows train, which validate, which judge: a temporal, content-aware split.

Production traffic repeats itself (client retries, the same product photographed again), so a
split by request id puts copies of one input on both sides and the gate scores the candidate on
inputs it was trained on. Here:

- the production gate slice is the most recent ``gate_fraction`` of the rows by prediction time
  (production validation is always on data newer than the training data);
- rows with the same input content (a hash of the input file's bytes, or, for logged feature
  vectors, equality up to float noise) stay on one side: a content that appears in a gate slice leaves training and validation
  entirely, including copies on the other (replay <-> production) side;
- each gate slice holds one row per content (the newest), so no input counts twice in the paired
  test, whose rows must be independent;
- when rows come in groups (``groups``: photos of one product, scans of one patient, named by
  retrain.group_pattern), a group is judged or trained on, never both: the candidate is judged
  on objects it has never seen, and the gate counts a group's rows as dependent (retrain.paired);
- the replay (source) gate slice and both validation slices are drawn by a hash of the content,
  so every run of the job splits the same inputs the same way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def hash_fraction(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) for ``key``: the same input lands in the same slice on every run."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def bytes_content(data: bytes) -> str:
    """Content key of an input file: identical bytes, identical key."""
    return hashlib.sha256(data).hexdigest()


def features_content(features: np.ndarray, *, tolerance: float = 1e-4, seed: int = 0) -> list[str]:
    """Content keys of logged feature vectors (rows of ``features``): rows within ``tolerance``
    (relative Euclidean distance) of each other are one input and share a key.

    The same input run through the backbone again, in another batch or on another device, differs
    in the last float32 bits, so hashing the raw vector would miss the repeat; distinct inputs (even
    the same product photographed twice) are orders of magnitude further apart than 1e-4. Rows are
    sorted along one random direction, where copies are within ``tolerance * |x|`` of each other,
    so only those near neighbours are compared in full. A group's key is the hash of its first
    member at float16 precision: a row without copies keeps the same key from one job to the next.
    """
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return []
    norms = np.linalg.norm(x, axis=1)
    direction = np.random.default_rng(seed).standard_normal(x.shape[1])
    proj = x @ (direction / np.linalg.norm(direction))
    order = np.argsort(proj, kind="stable")
    sorted_proj = proj[order]
    ends = np.searchsorted(sorted_proj, sorted_proj + tolerance * norms.max(), side="right")
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pos in np.flatnonzero(ends > np.arange(n) + 1).tolist():
        i, near = order[pos], order[pos + 1 : ends[pos]]
        close = np.linalg.norm(x[near] - x[i], axis=1) <= tolerance * np.maximum(norms[near], norms[i])
        for j in near[close].tolist():
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)  # the lowest index represents the group
    rounded = np.ascontiguousarray(x.astype(np.float16))
    keys = {}
    out = []
    for i in range(n):
        r = root(i)
        if r not in keys:
            keys[r] = hashlib.sha256(rounded[r].tobytes()).hexdigest()
        out.append(keys[r])
    return out


@dataclass(frozen=True)
class SplitIndex:
    """Row indices (into the production rows and into the replay rows) of every slice."""

    train: np.ndarray               # production rows for gradient steps, oldest first
    validation: np.ndarray          # production rows for early stopping
    gate: np.ndarray                # production gate: newest row of each recent content, oldest first
    replay_train: np.ndarray
    replay_validation: np.ndarray
    replay_gate: np.ndarray         # reference (forgetting) gate: one row per content
    production_copies_dropped: int  # older production rows left out: their content is in a gate slice
    replay_copies_dropped: int      # replay rows left out of training for the same reason
    gate_copies_merged: int         # rows of the recent window folded into one row per content
    replay_gate_copies_merged: int
    distinct: np.ndarray            # one production row per content: gate, then validation, then training newest first
    distinct_heldout: int           # how many of ``distinct`` were never trained on (gate + validation)


def _first_per_content(order: np.ndarray, content: Sequence[str]) -> np.ndarray:
    """Of ``order`` (row indices), the first row of each distinct content, in that order."""
    seen: set[str] = set()
    keep = []
    for i in order.tolist():
        if content[i] not in seen:
            seen.add(content[i])
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def split_rows(
    *, times: np.ndarray, keys: Sequence[str], content: Sequence[str], replay_content: Sequence[str],
    gate_fraction: float, validation_fraction: float, salt: str = "",
    groups: Sequence[str] | None = None, replay_groups: Sequence[str] | None = None,
) -> SplitIndex:
    """Split production rows (prediction ``times``, tie-broken by request id ``keys``) and replay
    rows, each with its ``content`` key, into training, validation and gate slices. ``groups`` /
    ``replay_groups``: a group key per row, kept on one side like a content (None: each content
    its own group)."""
    n = len(content)
    if not (len(times) == len(keys) == n):
        raise ValueError(f"times, keys and content must have one entry per row: {len(times)}, {len(keys)}, {n}")
    side = content if groups is None else groups
    replay_side = replay_content if replay_groups is None else replay_groups
    if len(side) != n or len(replay_side) != len(replay_content):
        raise ValueError(f"groups must have one key per row: {len(side)} for {n}, {len(replay_side)} for "
                         f"{len(replay_content)} replay rows")
    order = np.lexsort((np.asarray(keys, dtype=object).astype(str), np.asarray(times, dtype=np.float64)))
    recent = order[n - math.ceil(gate_fraction * n):]
    # newest copy of each recent content (its label is the latest word), then back to time order
    gate = _first_per_content(recent[::-1], content)[::-1].copy()
    gate_content = {content[i] for i in gate.tolist()}

    replay_gate_side = {g for g in set(replay_side) if hash_fraction(g, f"{salt}-reference-gate") < gate_fraction}
    in_replay_gate = np.array([g in replay_gate_side for g in replay_side], dtype=bool)
    replay_gate = _first_per_content(np.flatnonzero(in_replay_gate), replay_content)
    judged = gate_content | {replay_content[i] for i in replay_gate.tolist()}
    judged_side = {side[i] for i in recent.tolist()} | replay_gate_side

    def rest(contents: Sequence[str], sides: Sequence[str], candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        free = [i for i in candidates.tolist() if contents[i] not in judged and sides[i] not in judged_side]
        val = np.array([hash_fraction(sides[i], f"{salt}-validation") < validation_fraction for i in free], dtype=bool)
        free_arr = np.asarray(free, dtype=np.int64)
        return free_arr[~val], free_arr[val], len(candidates) - len(free)

    # every row of the recent window has its content (and group) in the gate: only older rows can train
    train, validation, dropped = rest(content, side, order[: n - len(recent)])
    replay_train, replay_validation, replay_dropped = rest(replay_content, replay_side, np.flatnonzero(~in_replay_gate))
    # a sample that counts one input twice looks tighter than traffic: one row per content
    heldout = np.concatenate([gate[::-1], _first_per_content(validation[::-1], content)])
    distinct = np.concatenate([heldout, _first_per_content(train[::-1], content)])
    return SplitIndex(
        train=train, validation=validation, gate=gate,
        replay_train=replay_train, replay_validation=replay_validation, replay_gate=replay_gate,
        production_copies_dropped=dropped, replay_copies_dropped=replay_dropped,
        gate_copies_merged=len(recent) - len(gate), replay_gate_copies_merged=int(in_replay_gate.sum()) - len(replay_gate),
        distinct=distinct.astype(np.int64), distinct_heldout=len(heldout),
    )
