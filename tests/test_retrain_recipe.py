"""The guarded recipe on a real tiny timm model and real digits under a real input shift."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from retrain.baselines import naive_fine_tune
from retrain.gate import evaluate_gate
from retrain.recipe import fine_tune
from retrain.strategy import choose_strategy
from retrain_helpers import FAST_HYPER, TEST_GATE_CONFIG, digits, in_memory_data, load_source, source_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    d = digits()
    source = load_source(source_checkpoint(tmp_path_factory.getbasetemp(), d))
    return source, *in_memory_data(source, d)


@pytest.mark.slow
def test_guarded_recipe_recovers_shifted_accuracy_without_forgetting(setup) -> None:
    source, training, prod_gate, ref_gate = setup
    candidate = copy.deepcopy(source)
    plan = choose_strategy(len(training.train), domain_gap=1.0)
    events: list[dict] = []
    report = fine_tune(candidate, training, FAST_HYPER, plan, device=CPU, progress=events.append)
    gate = evaluate_gate(candidate, source, prod_gate, ref_gate, TEST_GATE_CONFIG, CPU)
    assert plan.name == "full"
    # the stem trained too (an input-level shift); its BatchNorm statistics stayed as served
    stem, stem_source = candidate.conv1.state_dict(), source.conv1.state_dict()
    assert not torch.equal(stem["0.weight"], stem_source["0.weight"])
    assert all(torch.equal(stem[k], stem_source[k]) for k in stem if "running" in k)
    assert [p.name for p in report.phases] == ["head", "finetune"] and report.guard_message is None
    assert gate.current_production < 0.3 and gate.candidate_production > gate.current_production + 0.3
    assert gate.forgetting <= 0.01 and gate.promote, gate.reason
    epochs = [e for e in events if e["event"] == "epoch" and e["phase"] == "finetune"]
    assert epochs and all(e["grad_norm"] > 0 and e["weight_drift"] > 0 for e in epochs)


@pytest.mark.slow
def test_naive_full_fine_tune_forgets_and_is_rejected(setup) -> None:
    source, training, prod_gate, ref_gate = setup
    naive = naive_fine_tune(copy.deepcopy(source), training.train, epochs=3, lr=1e-2, seed=0)
    gate = evaluate_gate(naive, source, prod_gate, ref_gate, TEST_GATE_CONFIG, CPU)
    assert gate.forgetting > 0.05 and not gate.promote
    assert "max_forgetting" in gate.reason


@pytest.mark.slow
def test_gradient_explosion_trips_the_guard_and_restores_best_weights(setup) -> None:
    source, training, _, _ = setup
    model = copy.deepcopy(source)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    calls = {"n": 0}

    def record(event: dict) -> None:  # weights as they were when each epoch (0 = phase start) was scored
        if event.get("phase") == "finetune" and event["event"] in ("phase", "epoch"):
            snapshots[event.get("epoch", 0)] = {k: v.clone() for k, v in model.state_dict().items()}

    def explode(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or not any(p.requires_grad for p in module.parameters()):
            return None
        calls["n"] += 1
        return output * 1e6 if calls["n"] == 20 else None  # mid phase 2, after the spike window warmed up

    model.layer4[-1].register_forward_hook(explode)  # a block: the recipe runs blocks, not stage containers
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=1, epochs_finetune=4, patience=5, schedule="onecycle")
    events: list[dict] = []
    report = fine_tune(model, training, hyper, choose_strategy(10, 1.0), device=CPU,
                       progress=lambda e: (record(e), events.append(e)))
    finetune = report.phases[-1]
    # the spike stopped the first attempt before it improved: the phase restarted at backoff_factor (0.3) the LR
    assert len(report.trips) == 1 and "attempt 1 at lr 0.002" in report.trips[0] and "running median" in report.trips[0]
    assert [e["guard"] for e in events if e["event"] == "guard"] == ["grad_spike", "backoff"]
    assert finetune.lr == pytest.approx(6e-4) and not finetune.stopped.startswith("guard:")
    best = snapshots[finetune.best_epoch]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_strategy_table_and_override() -> None:
    assert choose_strategy(100, 0.0).name == "head"
    assert choose_strategy(5000, 0.0).name == "top_blocks"
    assert choose_strategy(100, 0.9).name == "full"  # small and dissimilar too (bench/README.md)
    assert choose_strategy(5000, 0.9).name == "full"
    plan = choose_strategy(100, 0.0, requested="full", layer_decay=0.5)
    assert plan.name == "full" and plan.layer_decay == 0.5 and "set in config" in plan.reason


@pytest.mark.slow
def test_cached_prefix_trains_like_the_whole_network_and_the_lr_comes_from_a_range_test(setup) -> None:
    source, training, _, _ = setup
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=2, epochs_finetune=2, lr_backbone=None)
    plan = choose_strategy(len(training.train), 0.0, requested="top_blocks")
    runs = {}
    for cache_mb in (2048, 0):
        model, events = copy.deepcopy(source), []
        report = fine_tune(model, training, dataclasses.replace(hyper, cache_mb=cache_mb), plan, device=CPU,
                           progress=events.append)
        runs[cache_mb] = (model, report, events)
    (cached, report, events), (whole, whole_report, _) = runs[2048], runs[0]
    assert report.prefix_cache["cached"] and report.prefix_cache["at"].startswith("layer")
    assert not whole_report.prefix_cache["cached"] and "cache_mb 0" in whole_report.prefix_cache["reason"]
    # the same steps on the same batches: only where the frozen layers' output came from differs
    assert report.lr_search["suggestion"] == pytest.approx(whole_report.lr_search["suggestion"], rel=1e-3)
    # phase 2 ran at the range test's rate, or at backoff_factor x it per guard trip before it
    backoffs = sum(1 for t in report.trips if t.startswith("finetune attempt"))
    assert report.phases[-1].lr == pytest.approx(report.lr_search["suggestion"] * hyper.backoff_factor ** backoffs)
    assert report.phases[-1].best_val_loss == pytest.approx(whole_report.phases[-1].best_val_loss, rel=1e-2)
    assert any(e["event"] == "phase" and e["phase"] == "lr_range_test" for e in events)
    steps = [e for e in events if e["event"] == "step"]
    assert steps and all({"epoch", "grad_norm", "weight_drift"} <= e.keys() for e in steps)
    assert all(b["step"] - a["step"] <= 25 for a, b in zip(steps, steps[1:]))
    assert report.phases[-1].images_per_second > 0 and report.batchnorm["inspection"]["channels"] > 0


@pytest.mark.slow
def test_a_diverging_fine_tune_backs_off_then_keeps_the_head_phase_and_says_so(setup) -> None:
    source, training, _, _ = setup
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=2, epochs_finetune=2, lr_backbone=10.0, max_backoffs=1,
                                backoff_factor=0.1)
    model, events = copy.deepcopy(source), []
    report = fine_tune(model, training, hyper, choose_strategy(len(training.train), 0.0, requested="top_blocks"),
                       device=CPU, progress=events.append)
    assert len(report.trips) == 2 and "attempt 1 at lr 10" in report.trips[0] and "attempt 2 at lr 1" in report.trips[1]
    guards = [e for e in events if e["event"] == "guard"]
    assert "backoff" in [e["guard"] for e in guards] and all(e["message"] for e in guards)
    assert not report.finetune_kept
    assert report.head_only_reason.startswith("fine-tuning did not improve validation loss (head phase ")
    assert report.outcome_reason("promoted", "promote: x").startswith(
        "promoted head-only: fine-tuning did not improve validation loss (")
    # what is left is the head-only model (its features came through the cached prefix: float rounding apart)
    head_only = copy.deepcopy(source)
    fine_tune(head_only, training, hyper, choose_strategy(10, 0.0, requested="head"), device=CPU)
    assert all(torch.allclose(v.float(), head_only.state_dict()[k].float(), atol=1e-3)
               for k, v in model.state_dict().items())


@pytest.mark.slow
def test_a_fine_tune_that_never_beats_the_head_phase_backs_off_without_a_guard_trip(setup) -> None:
    # No guard can trip (bounds out of reach), yet at this rate validation loss stays above the
    # head phase's until patience stops the phase: that is retried at a tenth of the rate too.
    source, training, _, _ = setup
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=2, epochs_finetune=2, lr_backbone=0.3, max_backoffs=1,
                                backoff_factor=0.1,
                                val_rise=1e9, grad_ratio=1e9, spike_factor=1e9, patience=1)
    model, events = copy.deepcopy(source), []
    report = fine_tune(model, training, hyper, choose_strategy(len(training.train), 0.0, requested="top_blocks"),
                       device=CPU, progress=events.append)
    assert "attempt 1 at lr 0.3: validation loss stayed above the head phase's" in report.trips[0], report.trips
    backoffs = [e for e in events if e["event"] == "guard" and e["guard"] == "backoff"]
    assert len(backoffs) == 1 and "retrying the phase from the head-trained weights at lr 0.03" in backoffs[0]["message"]


@pytest.mark.slow
@pytest.mark.parametrize("batchnorm, replay", [("frozen", 0.5), ("adapt", 0.7)])
def test_the_replay_floor_applies_only_while_statistics_adapt(setup, monkeypatch, batchnorm, replay) -> None:
    # full raises replay to 0.7 so that adapted BN statistics stay mostly source; with the
    # served statistics frozen, phase 2's batches mix the configured share (fewer steps per epoch).
    import retrain.phase

    source, training, _, _ = setup
    seen: list[float] = []
    real = retrain.phase.mixed_batches
    monkeypatch.setattr(retrain.phase, "mixed_batches",
                        lambda data, size, fraction, *a, **k: (seen.append(fraction), real(data, size, fraction, *a, **k))[1])
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=1, epochs_finetune=1, lr_backbone=1e-4, batchnorm=batchnorm,
                                replay_fraction=0.5)
    plan = choose_strategy(len(training.train), 1.0)
    assert plan.name == "full" and plan.replay_fraction(0.5) == 0.7
    report = fine_tune(copy.deepcopy(source), training, hyper, plan, device=CPU)
    assert report.batchnorm["finetune"]["adapted"] is (batchnorm == "adapt")
    assert report.batchnorm["finetune"]["replay_fraction"] == replay
    assert seen[0] == 0.5 and seen[1:] == [replay]  # the head phase's epoch, then phase 2's


@pytest.mark.slow
def test_a_long_epoch_is_checked_for_divergence_every_50_steps_within_it(setup) -> None:
    # An epoch of ~175 steps (batch 4) at a rate that diverges: the validation check 50 steps
    # into the epoch trips the guard; the epoch never reaches its end.
    source, training, _, _ = setup
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=2, epochs_finetune=1, batch_size=4, lr_backbone=1.0,
                                max_backoffs=0, grad_ratio=1e9, spike_factor=1e9)
    events: list[dict] = []
    report = fine_tune(copy.deepcopy(source), training, hyper,
                       choose_strategy(len(training.train), 0.0, requested="top_blocks"), device=CPU,
                       progress=events.append)
    phase2 = [e for e in events if e.get("phase") == "finetune"]
    trip = next(i for i, e in enumerate(phase2) if e["event"] == "guard")
    assert phase2[trip]["guard"] == "val_rise" and phase2[trip]["epoch"] == 1
    assert [e["step"] for e in phase2[:trip] if e["event"] == "step"] == [25, 50]
    assert not [e for e in phase2[:trip] if e["event"] == "epoch"]
    assert report.phases[-1].stopped == "guard:val_rise"


@pytest.mark.slow
def test_an_epoch_shorter_than_50_steps_is_validated_at_its_end_only(setup, monkeypatch) -> None:
    # 3 epochs of ~22 steps: one validation pass per epoch, none in between (on a global step
    # count, step 50 fell inside epoch 3 and paid an extra pass)
    import retrain.phase

    source, training, _, _ = setup
    order: list[str] = []
    real = retrain.phase.val_loss
    monkeypatch.setattr(retrain.phase, "val_loss", lambda *a, **k: (order.append("val"), real(*a, **k))[1])
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=1, epochs_finetune=3, lr_backbone=1e-4, patience=5)
    fine_tune(copy.deepcopy(source), training, hyper, choose_strategy(len(training.train), 0.0, requested="top_blocks"),
              device=CPU, progress=lambda e: order.append(f"{e['event']}:{e.get('phase')}:{e.get('step', '')}"))
    phase2 = order[order.index("phase:finetune:"):]
    steps = [e for e in phase2 if e.startswith("step:")]
    assert len(steps) >= 2 and steps[-1] == "step:finetune:50"  # the run passed global step 50
    assert phase2.count("val") == 3 and phase2.count("epoch:finetune:") == 3


def test_max_finetune_steps_cuts_phase_two_to_whole_epochs_and_says_so(setup) -> None:
    from monitor.cli.retrain import progress_line

    source, training, _, _ = setup
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=1, epochs_finetune=4, lr_backbone=1e-4, patience=5,
                                max_finetune_steps=1)
    events: list[dict] = []
    report = fine_tune(copy.deepcopy(source), training, hyper,
                       choose_strategy(len(training.train), 0.0, requested="top_blocks"), device=CPU,
                       progress=events.append)
    assert report.phases[-1].name == "finetune" and report.phases[-1].epochs == 1  # one whole epoch, not one step
    capped = report.epochs_capped
    assert capped is not None and (capped["epochs"], capped["of"], capped["max_finetune_steps"]) == (1, 4, 1)
    assert report.to_json()["epochs_capped"] == capped
    budget_event = next(e for e in events if e.get("phase") == "finetune_budget")
    assert "at most 1 of epochs_finetune 4 epochs" in budget_event["message"]
    budget = {"head": 1, "finetune": 4}
    assert "max_finetune_steps 1" in (progress_line(budget_event, budget) or "")
    epoch = next(e for e in events if e["event"] == "epoch" and e.get("phase") == "finetune")
    assert "epoch 1/1" in (progress_line(epoch, budget) or "")  # the bar counts the capped epochs
    uncapped = fine_tune(copy.deepcopy(source), training, dataclasses.replace(hyper, max_finetune_steps=10_000),
                         choose_strategy(len(training.train), 0.0, requested="top_blocks"), device=CPU)
    assert uncapped.epochs_capped is None


@pytest.mark.slow
@pytest.mark.parametrize("lr_backbone", [1e-4, 10.0])
def test_collapsed_channels_are_preconditioned_in_phase_two_and_the_model_ends_as_parametrised(setup, lr_backbone) -> None:
    # A BN layer the fine-tune trains, with collapsed channels as ImageNet MobileNetV2 has; at a
    # sane rate the phase keeps its weights, at 10 it is thrown away: either way the model ends
    # in the served parametrisation (the rescale undone, or the head-phase weights restored).
    from retrain.batchnorm import batchnorm_layers

    source, training, _, _ = setup
    model = copy.deepcopy(source)
    name, bn = batchnorm_layers(model)[-1]
    bn.running_var[:3] = 1e-9
    hyper = dataclasses.replace(FAST_HYPER, epochs_head=1, epochs_finetune=1, lr_backbone=lr_backbone, max_backoffs=0,
                                batchnorm="frozen", bn_var_floor=1e-3)
    events: list[dict] = []
    report = fine_tune(model, training, hyper, choose_strategy(len(training.train), 0.0, requested="top_blocks"),
                       device=CPU, progress=events.append)
    rescaled = report.batchnorm["finetune"]["collapsed_rescale"]
    assert rescaled["floor"] == 1e-3 and rescaled["channels"] >= 3 and rescaled["layers"] >= 1
    assert any("preconditioned" in e.get("message", "") and "collapsed BatchNorm channels" in e["message"]
               for e in events)
    assert report.finetune_kept is (lr_backbone < 1)
    after = dict(batchnorm_layers(model))[name]
    assert torch.allclose(after.running_var[:3], torch.full((3,), 1e-9), rtol=1e-3)  # not left at the floor


@pytest.mark.slow
def test_the_head_phase_is_pulled_toward_the_served_head(setup) -> None:
    source, training, _, _ = setup
    served = source.get_classifier().weight.detach()
    moved = {}
    for weight in (0.0, 1.0):
        model, events = copy.deepcopy(source), []
        hyper = dataclasses.replace(FAST_HYPER, epochs_head=3, l2sp_head=weight)
        fine_tune(model, training, hyper, choose_strategy(len(training.train), 0.0, requested="head"), device=CPU,
                  progress=events.append)
        moved[weight] = float((model.get_classifier().weight.detach() - served).norm())
        # the weight-drift gauge reads the backbone's drift, which the head phase leaves at 0
        drift = [e["weight_drift"] for e in events if e["event"] == "epoch" and e["phase"] == "head"]
        assert drift and all(d == 0 for d in drift)
    assert 0 < moved[1.0] < 0.5 * moved[0.0], moved
