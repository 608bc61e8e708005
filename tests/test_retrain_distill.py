"""Replay distillation: replay rows carry the served model's logits through the batches, and the
recipe's candidate stays closer to the served model on source rows while still learning the shift."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from retrain.batches import Split, TrainingSet, mixed_batches, with_replay_teacher
from retrain.distill import TEMPERATURE, distill_loss
from retrain.model import pooled_features
from retrain.recipe import fine_tune
from retrain.strategy import choose_strategy
from retrain_helpers import FAST_HYPER, digits, in_memory_data, load_source, source_checkpoint

CPU = torch.device("cpu")


def _rows(start: int, n: int) -> Split:
    """Rows whose input is their id, so a batch row can be traced to where it came from."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    return Split(ids[:, None].repeat(1, 3), torch.arange(n) % 4)


def test_mixed_batches_carry_the_served_logits_of_their_replay_rows_only() -> None:
    replay = _rows(1000, 40)
    teacher = torch.randn(40, 4)
    data = with_replay_teacher(TrainingSet(_rows(0, 50), _rows(100, 5), replay, _rows(2000, 5)), teacher)
    for world in (1, 2):  # DDP ranks stride the global batch: the logits must stay with their rows
        for rank in range(world):
            seen = 0
            for batch in mixed_batches(data, 16, 0.25, torch.Generator().manual_seed(3), rank=rank, world_size=world):
                assert batch.teacher is not None and batch.distilled is not None
                ids = batch.x[:, 0].long()
                from_replay = ids >= 1000
                assert torch.equal(batch.distilled, from_replay)
                assert torch.equal(batch.teacher[from_replay], teacher[ids[from_replay] - 1000])
                seen += int(from_replay.sum())
            assert seen > 0
    plain = next(mixed_batches(TrainingSet(_rows(0, 50), _rows(100, 5), replay, _rows(2000, 5)), 16, 0.25,
                               torch.Generator().manual_seed(3)))
    assert plain.teacher is None and plain.distilled is None


def test_a_split_refuses_teacher_logits_that_do_not_match_its_rows() -> None:
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="4 rows but 3 teacher rows"):
        Split(x, y, None, torch.zeros(3, 5), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher logits without the rows"):
        Split(x, y, None, torch.zeros(4, 5), None)


def test_distill_loss_is_the_softened_kl_on_distilled_rows_only() -> None:
    logits, teacher = torch.randn(6, 4), torch.randn(6, 4)
    distilled = torch.tensor([False, False, True, True, True, False])
    batch = Split(torch.zeros(6, 1), torch.zeros(6, dtype=torch.long), None, teacher, distilled)
    p = torch.softmax(teacher[distilled] / TEMPERATURE, 1)
    q = torch.softmax(logits[distilled] / TEMPERATURE, 1)
    expected = 0.5 * TEMPERATURE**2 * float((p * (p.log() - q.log())).sum(1).mean())
    loss = distill_loss(logits, batch, 0.5)
    assert loss is not None and float(loss) == pytest.approx(expected, rel=1e-5)
    same = Split(torch.zeros(6, 1), torch.zeros(6, dtype=torch.long), None, logits, distilled)
    assert float(distill_loss(logits, same, 1.0)) == pytest.approx(0.0, abs=1e-6)  # type: ignore[arg-type]
    assert distill_loss(logits, batch, 0.0) is None
    none = Split(torch.zeros(6, 1), torch.zeros(6, dtype=torch.long), None, teacher, torch.zeros(6, dtype=torch.bool))
    assert distill_loss(logits, none, 1.0) is None


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory):
    """The tiny source model's pooled features of clean replay and contrast-shifted production digits."""
    torch.set_num_threads(1)
    d = digits()
    source = load_source(source_checkpoint(tmp_path_factory.getbasetemp(), d))
    training, prod_gate, ref_gate = in_memory_data(source, d)
    with torch.no_grad():
        def pooled(s: Split) -> Split:
            return Split(pooled_features(source, s.x), s.y)

        data = TrainingSet(*(pooled(s) for s in (training.train, training.val, training.replay, training.replay_val)),
                           features_only=True)
        return source, data, pooled(prod_gate), pooled(ref_gate)


def _agreement(head: torch.nn.Module, served: torch.nn.Module, rows: Split) -> tuple[float, float, float]:
    """(share of rows where head and served predict alike, KL(served || head), head's accuracy)."""
    with torch.no_grad():
        mine, theirs = head(rows.x), served(rows.x)
    kl = torch.nn.functional.kl_div(mine.log_softmax(1), theirs.log_softmax(1), log_target=True, reduction="batchmean")
    return (float((mine.argmax(1) == theirs.argmax(1)).float().mean()), float(kl),
            float((mine.argmax(1) == rows.y).float().mean()))


@pytest.mark.slow
def test_distillation_keeps_the_candidate_closer_to_the_served_model_on_source_rows(features) -> None:
    source, data, prod_gate, ref_gate = features
    served = copy.deepcopy(source.get_classifier()).eval()
    plan = choose_strategy(len(data.train), domain_gap=0.0, requested="head")
    results = {}
    for weight in (0.0, 1.0):
        model = copy.deepcopy(source)
        hyper = dataclasses.replace(FAST_HYPER, distill_weight=weight, epochs_head=15, patience=15)
        fine_tune(model, data, hyper, plan, device=CPU)
        head = model.get_classifier().eval()
        results[weight] = (_agreement(head, served, ref_gate), _agreement(head, served, prod_gate)[2])
    (agree_off, kl_off, src_off), prod_off = results[0.0]
    (agree_on, kl_on, src_on), prod_on = results[1.0]
    # held-out source rows: closer to what the served model said, and no less accurate
    assert kl_on < 0.8 * kl_off and agree_on >= agree_off, results
    assert src_on >= src_off - 0.01, results
    # and the shift is still learnt: production accuracy well above the served head's
    served_prod = _agreement(served, served, prod_gate)[2]
    assert prod_on > served_prod + 0.3, (served_prod, results)


@pytest.mark.slow
def test_phase_two_distils_but_its_range_test_reads_the_label_loss(features, monkeypatch: pytest.MonkeyPatch) -> None:
    import retrain.finetune
    import retrain.phase

    source = features[0]
    training, _, _ = in_memory_data(source, digits())
    seen: dict[str, list] = {"range_test": [], "distilled_steps": []}
    real_test, real_loss = retrain.finetune.lr_range_test, retrain.phase.Trainer.loss

    def range_test(model, tr, plan, ctx):  # type: ignore[no-untyped-def]
        seen["range_test"].append(ctx.hyper.distill_weight)
        return real_test(model, tr, plan, ctx)

    def loss(self, batch, ctx):  # type: ignore[no-untyped-def]
        if batch.x.ndim == 4:  # image batches: phase 2 (the head phase trains on pooled features)
            seen["distilled_steps"].append(batch.distilled is not None and bool(batch.distilled.any()))
        return real_loss(self, batch, ctx)

    monkeypatch.setattr(retrain.finetune, "lr_range_test", range_test)
    monkeypatch.setattr(retrain.phase.Trainer, "loss", loss)
    hyper = dataclasses.replace(FAST_HYPER, lr_backbone=None, epochs_head=2, epochs_finetune=1, distill_weight=1.0)
    events: list[dict] = []
    report = fine_tune(copy.deepcopy(source), training, hyper, choose_strategy(len(training.train), 1.0), device=CPU,
                       progress=events.append)
    assert [p.name for p in report.phases] == ["head", "finetune"] and report.lr_search is not None
    said = [e["message"] for e in events if e.get("phase") == "distill"]
    assert said == [f"distilling {len(training.replay)} replay rows toward the served model's predictions "
                    "(distill_weight 1, temperature 2)"]
    assert seen["range_test"] == [0.0]
    assert seen["distilled_steps"] and all(seen["distilled_steps"])
