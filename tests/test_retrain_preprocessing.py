"""The preprocessing recorded at import is exactly what the retrain job and the gate apply.

A model served at 64 px, crop_pct 1.0, bilinear, ImageNet mean/std (not test_resnet's timm
default: crop_pct 0.95, mean/std 0.5) is imported with --data-config; every input the job
loads, for training and for both gate slices, equals that transform built by hand in torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from torchvision import transforms as T

import retrain.data
from monitor.cli import main
from monitor.config import load_config
from retrain.data import load_training_data
from retrain.job import run_job
from retrain.registry import Registry
from retrain_helpers import NOW, build_world, digits

SERVED = {"input_size": [3, 64, 64], "crop_pct": 1.0, "interpolation": "bilinear",
          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _by_hand(path: Path) -> torch.Tensor:
    transform = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(64), T.ToTensor(),
                           T.Normalize(SERVED["mean"], SERVED["std"])])
    with Image.open(path) as image:
        return transform(image.convert("RGB"))


def _matches(rows: torch.Tensor, expected: torch.Tensor) -> None:
    """Each row equals one distinct expected tensor (the slices are shuffled by a hash)."""
    flat = expected.flatten(1)
    distances = torch.cdist(rows.flatten(1), flat, compute_mode="donot_use_mm_for_euclid_dist")  # exact
    nearest = distances.argmin(1)
    assert distances.min(1).values.max() < 1e-4
    assert len(set(nearest.tolist())) == len(rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("pre")
    start = tmp / "start.safetensors"
    torch.manual_seed(0)
    safetensors.torch.save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(start))
    d = digits(n_source=0, n_replay=240, n_production=240)
    w = build_world(tmp / "world", start, d, retrain={"hyper": {"epochs_head": 1, "epochs_finetune": 1,
                                                              "batch_size": 32}})
    served = tmp / "served.json"
    served.write_text(json.dumps(SERVED))
    assert main(["models", "import", "--config", str(w.config_path), "--arch", "test_resnet", "--num-classes", "10",
                 "--checkpoint", str(start), "--exact", "--data-config", str(served)]) == 0
    return w


def test_import_recorded_the_served_config(world) -> None:
    current = Registry(world.root / "registry").current()
    assert current.version == "v2"
    assert current.meta.data_config == {**SERVED, "crop_mode": "center"}


def test_training_and_both_gate_slices_see_the_served_transform(world) -> None:
    config = load_config(world.config_path)
    current = Registry(world.root / "registry").current()
    data = load_training_data(config, current.meta.data_config, num_classes=10)
    assert data.mode == "images"
    production = torch.stack([_by_hand(p) for p in sorted((world.root / "inputs" / "production").glob("*.png"))])
    source = torch.stack([_by_hand(p) for p in sorted((world.root / "inputs" / "source").glob("*.png"))])
    for split in (data.training.train, data.training.val, data.production_gate):
        _matches(split.x, production)
    for split in (data.training.replay, data.training.replay_val, data.reference_gate):
        _matches(split.x, source)


def test_the_job_builds_its_transforms_from_the_recorded_config(world, monkeypatch) -> None:
    used = []
    real = retrain.data.build_transform

    def recording(data_config, **kw):  # a spy: the real transform, and a note of what it was built from
        used.append(dict(data_config))
        return real(data_config, **kw)

    monkeypatch.setattr(retrain.data, "build_transform", recording)
    result = run_job(load_config(world.config_path), world.root / "job", reason="test", clock=lambda: NOW)
    assert result.outcome in ("promoted", "rejected"), result.reason
    assert result.gate is not None  # the gate ran, on slices built with that transform
    assert used and all(u == {**SERVED, "crop_mode": "center"} for u in used)
    if result.candidate_version is not None:
        candidate = Registry(world.root / "registry").get(result.candidate_version)
        assert candidate.meta.data_config == {**SERVED, "crop_mode": "center"}  # inherited, never re-guessed
