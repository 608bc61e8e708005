"""retrain.serving.CurrentModel: the registry's CURRENT for an inference service, swapped between requests."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from retrain import CurrentModel as LazyCurrentModel
from retrain.registry import ModelMeta, Registry, RegistryError
from retrain.serving import CurrentModel

SERVED = {"input_size": [3, 40, 40], "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center",
          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _add(registry: Registry, seed: int) -> str:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=4)
    return registry.add(model, ModelMeta(architecture="test_resnet", num_classes=4, data_config=SERVED))


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (57, 71, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "reg")
    reg.promote(_add(reg, 1))
    _add(reg, 2)
    return reg


def test_serves_current_with_its_own_preprocessing(registry: Registry) -> None:
    current = CurrentModel(registry.path)
    served = current.get()
    assert served.version == current.version == "v1" and served.data_config == SERVED
    images = _images()
    expected = torch.stack([T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(40),
                                       T.ToTensor(), T.Normalize(SERVED["mean"], SERVED["std"])])(im) for im in images])
    x = served.preprocess(images)
    assert torch.allclose(x, expected, atol=1e-6)
    features, probs = served.predict(x)
    reference, _ = registry.load_model("v1")
    with torch.no_grad():
        assert np.allclose(probs, reference(x).softmax(1).numpy(), atol=1e-5)
    assert features.shape[0] == 3 and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert LazyCurrentModel is CurrentModel


def test_a_promotion_is_picked_up_between_requests(registry: Registry) -> None:
    clock = Clock()
    swaps = []
    current = CurrentModel(registry.path, check_seconds=5.0, clock=clock, on_swap=lambda new, old: swaps.append(
        (old.version, new.version)))
    in_flight = current.get()                    # a request that started on v1
    registry.promote("v2")
    assert current.get().version == "v1"         # no check due yet: CURRENT is not even stat'ed
    clock.now += 5.0
    assert current.get().version == "v2" and swaps == [("v1", "v2")]
    assert in_flight.version == "v1"             # the request in flight finishes on what it took
    registry.rollback()
    assert current.refresh() and current.version == "v1"
    assert not current.refresh()                 # nothing changed since


def test_a_version_that_will_not_load_keeps_the_old_one_serving(registry: Registry) -> None:
    current = CurrentModel(registry.path, check_seconds=0)
    weights = registry.path / "versions" / "v2" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not safetensors")
    registry.promote("v2")
    assert current.get().version == "v1"
    assert "cannot read weights" in (current.last_error or "")
    weights.write_bytes(good)
    assert current.get().version == "v1"         # the same broken CURRENT is not retried every request
    registry.rollback()
    registry.promote("v2")                       # CURRENT written again: tried again, and now it loads
    assert current.get().version == "v2" and current.last_error is None


def test_concurrent_requests_never_mix_versions(registry: Registry) -> None:
    current = CurrentModel(registry.path, check_seconds=0)
    seen: dict[str, set[int]] = {"v1": set(), "v2": set()}
    lock = threading.Lock()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            served = current.get()
            with lock:
                seen[served.version].add(id(served.model))

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for t in threads:
        t.start()
    registry.promote("v2")
    while not seen["v2"]:
        threading.Event().wait(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert len(seen["v1"]) == 1 and len(seen["v2"]) == 1  # each version is one loaded model
    assert seen["v1"] != seen["v2"]


def test_nothing_promoted_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no promoted model yet; import one with `driftd models import`"):
        CurrentModel(tmp_path / "empty")
