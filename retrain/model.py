"""Building a registered model and its preprocessing: always timm's own, never retyped.

The data config (input size, interpolation, mean/std, crop) is recorded when a version is first
imported (from the checkpoint, a file or flags: retrain.dataconfig), stored in meta.json, and
turned into transforms here. The retrain job's data, the gate's slices and
``retrain.serving.CurrentModel`` all go through :func:`build_transform`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import timm
import timm.data
import torch
from torch import nn

from retrain.dataconfig import DataConfig


def resolve_data_config(model: nn.Module, input_size: int | None = None) -> DataConfig:
    """timm's data config for ``model``; ``input_size`` (pixels) overrides the square input size."""
    config = dict(timm.data.resolve_model_data_config(model))
    if input_size is not None:
        channels = config["input_size"][0]
        config["input_size"] = (channels, int(input_size), int(input_size))
    # JSON has no tuples; normalise so a config read back from meta.json compares equal.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def build_transform(data_config: Mapping[str, Any], *, training: bool = False) -> Callable[[Any], torch.Tensor]:
    """The model's own eval transform (PIL image -> float tensor[C, H, W]).

    Training uses the eval transform too: fine-tuning on a shift should see inputs exactly as
    production does, and random augmentation of 32 px digits destroys them.
    """
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return timm.data.create_transform(**cfg, is_training=False)


def images_to_tensor(images: np.ndarray, data_config: Mapping[str, Any]) -> torch.Tensor:
    """uint8[N, H, W, 3] arrays -> float32[N, C, H', W'] through the model's transform."""
    from PIL import Image

    transform = build_transform(data_config)
    return torch.stack([transform(Image.fromarray(image)) for image in images])


def create_model(architecture: str, num_classes: int) -> nn.Module:
    """An uninitialised-from-hub timm model (weights come from the registry)."""
    return timm.create_model(architecture, pretrained=False, num_classes=num_classes)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled pre-logits (what the inference service logs as ``features``)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 256, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(features float32[N, D], probs float32[N, C])`` in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    feats, probs = [], []
    try:
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size].to(device)
            f = pooled_features(model, batch)
            logits = model.get_classifier()(f)
            feats.append(f.float().cpu())
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()
