"""The temporal, content-aware split: the gate holds the newest inputs, and no input it judges on
is ever trained on, whichever side (production or replay) its copies are on."""

from __future__ import annotations

import numpy as np

from retrain.split import features_content, split_rows


def test_gate_is_the_newest_rows_one_per_input_and_never_trained_on() -> None:
    # 40 rows, arriving in shuffled order; inputs repeat (c0..c14), the last 10 by time are the gate window
    rng = np.random.default_rng(0)
    times = rng.permutation(40).astype(float) + 1_000.0
    content = [f"c{i % 15}" for i in range(40)]
    keys = [f"r{i}" for i in range(40)]
    idx = split_rows(times=times, keys=keys, content=content, replay_content=[], gate_fraction=0.25,
                     validation_fraction=0.2)
    window = np.argsort(times)[-10:]
    recent_inputs = {content[i] for i in window}
    assert {content[i] for i in idx.gate} == recent_inputs and len(idx.gate) == len(recent_inputs)
    assert all(times[i] == max(times[j] for j in window if content[j] == content[i]) for i in idx.gate)
    assert list(times[idx.gate]) == sorted(times[idx.gate])
    trained = {content[i] for i in np.concatenate([idx.train, idx.validation])}
    assert not trained & recent_inputs
    assert idx.gate_copies_merged == 10 - len(recent_inputs)
    assert idx.production_copies_dropped == 30 - len(idx.train) - len(idx.validation) > 0
    # validation and training never share an input either
    assert not {content[i] for i in idx.train} & {content[i] for i in idx.validation}


def test_an_input_held_out_on_one_side_leaves_training_on_the_other() -> None:
    prod = [f"p{i}" for i in range(100)]
    replay = [f"s{i}" for i in range(200)]
    idx0 = split_rows(times=np.arange(100.0), keys=prod, content=prod, replay_content=replay, gate_fraction=0.25,
                      validation_fraction=0.15)
    # copy a production gate input into the replay data, and a reference gate input into production
    gate_input = prod[int(idx0.gate[0])]
    ref_input = replay[int(idx0.replay_gate[0])]
    prod2 = prod[:10] + [ref_input] + prod[11:]
    replay2 = replay + [gate_input, gate_input]
    idx = split_rows(times=np.arange(100.0), keys=prod2, content=prod2, replay_content=replay2, gate_fraction=0.25,
                     validation_fraction=0.15)
    replay_trained = {replay2[i] for i in np.concatenate([idx.replay_train, idx.replay_validation])}
    prod_trained = {prod2[i] for i in np.concatenate([idx.train, idx.validation])}
    assert gate_input not in replay_trained and ref_input not in prod_trained
    assert idx.production_copies_dropped == 1
    assert idx.replay_copies_dropped == (0 if gate_input in {replay2[i] for i in idx.replay_gate} else 2)
    # the split depends on content alone: the same inputs land on the same side on every run
    again = split_rows(times=np.arange(100.0), keys=prod2, content=prod2, replay_content=replay2, gate_fraction=0.25,
                       validation_fraction=0.15)
    assert all(np.array_equal(getattr(idx, f), getattr(again, f)) for f in ("train", "validation", "gate", "replay_gate"))


def test_feature_content_groups_reruns_of_one_input_and_only_those() -> None:
    """Logged features of one input run again (another batch, another device) differ by float
    noise; other inputs, however similar, are far further apart."""
    rng = np.random.default_rng(1)
    f = np.abs(rng.normal(size=(400, 256))).astype(np.float32)  # post-ReLU-like pooled features
    near = f[:50] + 0.02 * rng.standard_normal((50, 256)).astype(np.float32)  # similar, not the same
    reruns = f[:100] * (1 + 3e-7 * rng.standard_normal((100, 256))).astype(np.float32)
    keys = features_content(np.concatenate([f, near, reruns]))
    assert keys[450:] == keys[:100]  # every rerun found its original ...
    assert len(set(keys[:450])) == 450  # ... and no two distinct inputs merged
    assert features_content(f[:5]) == keys[:5]  # a row's key does not depend on the other rows


def test_a_group_is_judged_or_trained_on_never_both() -> None:
    """Photos of one product (a group) are different files: each is its own content, yet a
    candidate trained on some of them would be judged on a product it has seen."""
    rng = np.random.default_rng(4)
    n = 200
    content = [f"photo{i}" for i in range(n)]
    groups = [f"product{int(g)}" for g in rng.integers(0, 40, n)]       # production: 40 products
    replay = [f"src{i}" for i in range(300)]
    replay_groups = [f"object{i // 4}" for i in range(300)]              # replay: 75 objects, 4 photos each
    idx = split_rows(times=np.arange(float(n)), keys=content, content=content, replay_content=replay,
                     gate_fraction=0.25, validation_fraction=0.15, groups=groups, replay_groups=replay_groups)
    judged = {groups[i] for i in idx.gate}
    assert judged == {groups[i] for i in range(n - 50, n)}              # every product of the newest 50 rows
    assert not judged & {groups[i] for i in np.concatenate([idx.train, idx.validation])}
    assert not {groups[i] for i in idx.train} & {groups[i] for i in idx.validation}
    ref_judged = {replay_groups[i] for i in idx.replay_gate}
    assert len(idx.replay_gate) == 4 * len(ref_judged) > 0              # whole objects, one row per photo
    assert not ref_judged & {replay_groups[i] for i in np.concatenate([idx.replay_train, idx.replay_validation])}
    # without groups each photo stands alone: the same products land on both sides
    plain = split_rows(times=np.arange(float(n)), keys=content, content=content, replay_content=replay,
                       gate_fraction=0.25, validation_fraction=0.15)
    assert {groups[i] for i in plain.gate} & {groups[i] for i in plain.train}
