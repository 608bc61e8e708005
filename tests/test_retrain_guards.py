"""Guards, anchor penalties and WiSE-FT in isolation (fast, no training loop); the gate rule: test_retrain_gate."""

from __future__ import annotations

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
    assert restored.median() == spike.median()


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
