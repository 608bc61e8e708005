"""Model registry: versions, atomic CURRENT + history, rollback, imports that never unpickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from retrain.model_import import import_safetensors, import_timm_checkpoint
from retrain.registry import ModelMeta, Registry, RegistryError


def _tiny(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes)


def _meta() -> ModelMeta:
    return ModelMeta(architecture="test_resnet", num_classes=10, data_config={"input_size": [3, 32, 32]})


def test_promote_and_rollback_round_trip(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", clock=lambda: 1_700_000_000.0)
    assert reg.current() is None and reg.list() == []
    v1 = reg.add(_tiny(seed=1), _meta())
    v2 = reg.add(_tiny(seed=2), _meta())
    assert (v1, v2) == ("v1", "v2")
    reg.promote(v1)
    reg.promote(v2)
    assert (tmp_path / "reg" / "CURRENT").read_text().strip() == "v2"
    assert reg.history() == ["v1", "v2"]
    assert reg.rollback() == "v1"
    assert reg.current().version == "v1" and reg.history() == ["v1"]
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()
    assert [v.meta.created_at for v in reg.list()] == [1_700_000_000.0] * 2


def test_load_model_returns_the_stored_weights(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    model = _tiny(seed=3).eval()
    reg.promote(reg.add(model, _meta()))
    loaded, mv = reg.load_model()
    x = torch.randn(2, 3, 32, 32)
    assert mv.version == "v1" and mv.meta.architecture == "test_resnet"
    assert torch.allclose(loaded(x), model(x))


def test_unknown_version_names_known_ones(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.add(_tiny(), _meta())
    with pytest.raises(RegistryError, match=r"version v7 not found \(known: v1\)"):
        reg.get("v7")
    with pytest.raises(RegistryError, match="no promoted model yet"):
        reg.load_model()


def test_import_timm_checkpoint_from_a_local_file(tmp_path: Path) -> None:
    source = _tiny(seed=4).eval()
    checkpoint = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), checkpoint)
    reg = Registry(tmp_path / "reg")
    version = import_timm_checkpoint(reg, "test_resnet", 10, checkpoint, input_size=32)
    model, mv = reg.load_model(version)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), source(x))
    assert mv.meta.data_config["input_size"] == [3, 32, 32]
    assert mv.meta.data_config["mean"] == list(source.pretrained_cfg["mean"])  # timm's own preprocessing
    assert reg.current().version == version


def test_import_keeps_backbone_and_replaces_a_mismatched_head(tmp_path: Path) -> None:
    source = _tiny(num_classes=1000, seed=5)
    checkpoint = tmp_path / "imagenet.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(checkpoint))
    reg = Registry(tmp_path / "reg")
    model, _ = reg.load_model(import_timm_checkpoint(reg, "test_resnet", 10, checkpoint))
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.get_classifier().out_features == 10


def test_import_refuses_pickled_objects(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.0.weight": object()}, protocol=2))
    with pytest.raises(RegistryError, match="not a weights-only checkpoint"):
        import_timm_checkpoint(Registry(tmp_path / "reg"), "test_resnet", 10, evil)


def test_import_safetensors_must_match(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(_tiny(num_classes=3).state_dict(), str(weights))
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="does not fit test_resnet"):
        import_safetensors(reg, "test_resnet", 10, weights)
    version = import_safetensors(reg, "test_resnet", 3, weights, class_names=["a", "b", "c"], promote=False)
    assert reg.current() is None
    assert json.loads((tmp_path / "reg/versions" / version / "meta.json").read_text())["class_names"] == ["a", "b", "c"]
