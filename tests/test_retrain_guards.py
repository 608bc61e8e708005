"""Guards, anchor penalties and WiSE-FT in isolation (fast, no training loop); the gate rule: test_retrain_gate."""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch

from retrain.batches import Split
from retrain.config import GateConfig
from retrain.gate import choose_wise_alpha, interpolate
from retrain.guards import Anchor, AnchorWeights, GuardTripped, SpikeDetector


def test_spike_detector_waits_for_warmup_then_flags_a_spike() -> None:
    spike = SpikeDetector(10.0, warmup=3)
    spike.check(100.0, loss=1.0)  # early norms are large and legitimate
    for norm in (1.0, 1.2, 0.9):
        spike.check(norm, loss=1.0)
    with pytest.raises(GuardTripped) as err:
        spike.check(50.0, loss=1.0)
    assert err.value.kind == "grad_spike" and "running median" in str(err.value)
    with pytest.raises(GuardTripped) as err:
        spike.check(1.0, loss=float("nan"))
    assert err.value.kind == "non_finite"
    restored = SpikeDetector(10.0, warmup=3)
    restored.load_state_dict(spike.state_dict())
    assert restored.median() == spike.median() and restored.start_scale() == spike.start_scale()


def test_a_converged_phase_meeting_a_harder_batch_is_not_a_spike() -> None:
    # The head phase on MobileNetV2 (blur:1, 2000 rows) began near 4, fitted its batches down to a
    # median of 0.08, then met a batch at 0.97: 11x the median, far below where it began. Tripping
    # there threw the fine-tune away. An explosion past the starting scale still trips.
    spike = SpikeDetector(10.0, warmup=3)
    for norm in (4.6, 3.6, 2.2) + (0.08,) * 25:
        spike.check(norm, loss=0.01)
    assert spike.start_scale() == pytest.approx(3.6) and spike.median() == pytest.approx(0.08)
    spike.check(0.97, loss=0.05)
    with pytest.raises(GuardTripped) as err:
        spike.check(40.0, loss=3.0)
    assert err.value.kind == "grad_spike" and "starting 3.6" in str(err.value)


def test_anchor_penalties_and_drift() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    names = [n for n, _ in model.named_parameters() if n.startswith("layer4")]
    anchor = Anchor(model, names, AnchorWeights(l2sp=2.0, ewc=1.0))
    assert float(anchor.penalty().detach()) == 0.0 and anchor.drift() == 0.0
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    anchor.estimate_fisher(model, [(x, y)], lambda m, inp: m(inp))
    with torch.no_grad():
        dict(model.named_parameters())[names[0]].add_(0.1)
    moved = dict(model.named_parameters())[names[0]].numel()
    assert anchor.drift() == pytest.approx(0.1 * moved**0.5, rel=1e-4)
    l2sp_only = 0.5 * 2.0 * moved * 0.01
    assert float(anchor.penalty().detach()) > l2sp_only  # the EWC term adds to L2-SP


def test_wise_ft_interpolates_and_keeps_the_chosen_mix() -> None:
    torch.manual_seed(0)
    start_model = timm.create_model("test_resnet", num_classes=3).eval()
    tuned = timm.create_model("test_resnet", num_classes=3).eval()
    start = {k: v.clone() for k, v in start_model.state_dict().items()}
    mixed = interpolate(start, tuned.state_dict(), 0.25)
    w = "fc.weight"
    assert torch.allclose(mixed[w], 0.75 * start[w] + 0.25 * tuned.state_dict()[w])
    original = {k: v.clone() for k, v in tuned.state_dict().items()}
    data = Split(torch.randn(12, 3, 16, 16), torch.randint(0, 3, (12,)))
    result = choose_wise_alpha(tuned, start, start_model, data, data, GateConfig(), torch.device("cpu"))
    assert result.wise_alpha in (0.25, 0.5, 0.75, 1.0)
    kept = interpolate(start, original, result.wise_alpha)
    assert all(torch.equal(v, kept[k]) for k, v in tuned.state_dict().items())


def test_wise_ft_judges_each_of_its_mixes_at_a_bonferroni_share_of_alpha(monkeypatch: pytest.MonkeyPatch) -> None:
    import retrain.gate

    levels: list[float] = []
    real = retrain.gate.evaluate_gate

    def evaluate(*args, **kwargs):  # type: ignore[no-untyped-def]
        levels.append(args[4].alpha)
        return real(*args, **kwargs)

    monkeypatch.setattr(retrain.gate, "evaluate_gate", evaluate)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = Split(torch.randn(12, 3, 16, 16), torch.randint(0, 3, (12,)))
    choose_wise_alpha(model, start, model, data, data, GateConfig(alpha=0.05), torch.device("cpu"))
    # four mixes tried on the same slices: each at 0.05 / 4, so a lucky one passes at most 5% of the time
    assert levels == [pytest.approx(0.0125)] * 4


def test_baseline_guard_trips_on_a_sustained_jump_and_on_a_validation_rise() -> None:
    from retrain.guards import BaselineGuard

    guard = BaselineGuard(2.0, 0.25, factor=10.0, val_rise=1.5)
    for norm in (3.0, 30.0, 5.0, 4.0):  # a single outlier passes: the ratio must hold for 2 steps
        guard.check_step(norm)
    guard.check_step(140.0)
    with pytest.raises(GuardTripped) as err:
        guard.check_step(150.0)  # 70x the head-trained model's norm, twice in a row
    assert err.value.kind == "grad_ratio" and "75x the head-trained model's 2" in str(err.value)
    assert guard.max_ratio == 75.0
    guard.check_val(0.37)
    with pytest.raises(GuardTripped) as err:
        guard.check_val(1.46)
    assert err.value.kind == "val_rise" and "1.46 rose above 1.5x the head phase's 0.25" in str(err.value)
    with pytest.raises(GuardTripped, match="validation loss is nan"):
        guard.check_val(float("nan"))


def test_lr_range_test_suggests_the_divergence_onset_and_stops_there() -> None:
    from retrain.lr_finder import range_test

    seen: list[float] = []

    def step(lr: float) -> float:  # loss falls until lr 1e-2, then blows up
        seen.append(lr)
        return 1.0 - 0.1 * math.log10(lr / 1e-7) if lr <= 1e-2 else 10.0 * (lr / 1e-2)

    test = range_test(step, start=1e-7, end=1.0, steps=36)
    assert test.lrs[0] == pytest.approx(1e-7) and len(seen) < 36  # stopped once the loss ran away
    onset = max(lr for lr in test.lrs if lr <= 1e-2)  # the last LR before the loss turned up
    assert test.suggestion == pytest.approx(onset) and "using it" in test.reason
    third = range_test(step, start=1e-7, end=1.0, steps=36, divisor=3)
    assert third.suggestion == pytest.approx(onset / 3) and "using 1/3 of it" in third.reason
    flip = itertools.count()
    noisy = range_test(lambda lr: 1.0 + 0.05 * (-1) ** next(flip) if lr < 1e-4 else 5.0, steps=30)
    assert 3e-5 < noisy.suggestion < 1e-4  # a flat, noisy start does not pull it down
    nan = range_test(lambda lr: float("nan"), steps=5)
    assert nan.suggestion == 1e-7 and "diverged" in nan.reason
    with pytest.raises(ValueError, match="0 < start < end"):
        range_test(step, start=1.0, end=1e-3)


def test_batchnorm_inspection_counts_collapsed_channels_and_reestimation_is_exact() -> None:
    from retrain.batchnorm import batchnorm_layers, inspect_batchnorm, reestimate

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    layers = batchnorm_layers(model)
    name, bn = layers[3]
    bn.running_var[:5] = 5.6e-45
    report = inspect_batchnorm(model)
    assert report.near_zero == 5 and report.channels == sum(b.num_features for _, b in layers)
    assert report.worst_layers[0] == (name, 5, bn.num_features) and report.smallest_var < 1e-44
    assert "5/" in report.message() and name in report.message()
    # AdaBN: the plain average of the batches' statistics, whatever the momentum was
    stem = model.conv1[0]
    first_bn = model.conv1[1]
    x = torch.randn(24, 3, 16, 16)
    rows = reestimate([first_bn], lambda inp: first_bn(stem(inp)), [x[:8], x[8:16], x[16:]])
    with torch.no_grad():
        h = stem(x)
    assert rows == 24 and first_bn.momentum == 0.1 and not first_bn.training
    assert torch.allclose(first_bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    per_batch = torch.stack([h[i : i + 8].var((0, 2, 3)) for i in (0, 8, 16)]).mean(0)
    assert torch.allclose(first_bn.running_var, per_batch, rtol=1e-4)


def test_collapsed_channels_are_rescaled_without_changing_the_function_and_the_rescale_undoes() -> None:
    from retrain.batchnorm import batchnorm_layers, collapsed_rescale, conv_batchnorm_pairs

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    x = torch.randn(6, 3, 16, 16)
    pairs = conv_batchnorm_pairs(model, x[:1])
    # every BN of test_resnet reads a conv's output directly, and is found once
    assert len(pairs) == len(batchnorm_layers(model)) and len({id(bn) for _, bn in pairs}) == len(pairs)
    conv, bn = pairs[2]
    bn.running_var[:4] = torch.tensor([5.6e-45, 1e-8, 1e-4, 2e-3])
    for c, b in pairs:
        c.weight.requires_grad_(c is conv)  # only a trainable conv is preconditioned
    before = model(x)
    weights = conv.weight.detach().clone()
    rescale = collapsed_rescale(pairs, 1e-3)
    assert [b for _, b, _ in rescale.pairs] == [bn] and rescale.channels == 3  # 2e-3 is above the floor
    rescale.apply()
    assert torch.allclose(bn.running_var[:3], torch.full((3,), 1e-3)) and float(bn.running_var[3]) == pytest.approx(2e-3)
    scale = torch.sqrt(torch.tensor(1e-3 + bn.eps) / (torch.tensor([5.6e-45, 1e-8, 1e-4]) + bn.eps))
    assert torch.allclose(conv.weight[:3].flatten(1).norm(dim=1) / weights[:3].flatten(1).norm(dim=1), scale, rtol=1e-5)
    assert torch.equal(conv.weight[3:], weights[3:])
    assert torch.allclose(model(x), before, atol=1e-5)  # the served function is unchanged
    rescale.undo()
    assert torch.allclose(conv.weight, weights, rtol=1e-6) and float(bn.running_var[1]) == pytest.approx(1e-8, rel=1e-3)
    assert torch.allclose(model(x), before, atol=1e-5)


def test_trunk_is_forward_features_as_a_chain_and_the_suffix_is_the_rest() -> None:
    from retrain.trunk import Suffix, find_trunk, prefix_activations

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    x = torch.randn(4, 3, 16, 16)
    trunk = find_trunk(model, x)
    assert trunk is not None and trunk.names[0] == "conv1.0" and trunk.names[-1].startswith("layer4")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.layer3.parameters():
        p.requires_grad_(True)
    start = trunk.first_trainable()
    assert trunk.names[start] == "layer3.0"
    h = prefix_activations(trunk, start, x, device=torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(Suffix(model, trunk, start)(h), model(x), atol=1e-5)
    vit = timm.create_model("test_vit", num_classes=10).eval()
    size = vit.pretrained_cfg["input_size"][1:]
    assert find_trunk(vit, torch.randn(2, 3, *size)) is None  # position embeddings: not a chain
