"""Real backbone features for the MMD benchmarks: what the inference service would log.

The served model is ``backbone.train_source`` (ImageNet MobileNetV2 in timm, new head, trained on
800 clean digits at 64 px, preprocessed by ``SERVED_DATA_CONFIG`` through the model's own
transform). Production traffic is the 997 held-out digits, each photographed again: a random
small affine jitter (rotation up to 5 degrees, shift up to 2 px, scale 0.95-1.05) per copy, so a
pool of tens of thousands of distinct inputs comes from one population. Shifted traffic is the
same process followed by one of ``retrain.digits.corrupt``'s real corruptions.

Pools are the 1280-d pooled pre-logits (``retrain.model.pooled_features``), cached under
bench/out/ by their recipe, with the model's accuracy on each (to tell benign from harmful).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import backbone  # noqa: E402
from retrain.digits import corrupt, load_digits_images  # noqa: E402
from retrain.model import images_to_tensor, pooled_features  # noqa: E402

TRAIN_ROWS = 800
SIZE = 64


@dataclass(frozen=True)
class Pool:
    features: np.ndarray   # (rows, 1280) float32
    accuracy: float        # the served model's accuracy on these inputs


def _jitter(images: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """``copies`` randomly jittered copies of each uint8[N, H, W, 3] image (copy-major order)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.tile(images, (copies, 1, 1, 1))).permute(0, 3, 1, 2).float()
    n = len(x)
    angle = np.deg2rad(rng.uniform(-5, 5, n))
    scale = rng.uniform(0.95, 1.05, n)
    shift = rng.uniform(-2, 2, (n, 2)) * 2 / images.shape[1]  # pixels -> normalised coordinates
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = np.cos(angle) / scale, -np.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = np.sin(angle) / scale, np.cos(angle) / scale
    theta[:, :, 2] = shift
    out = []
    for lo in range(0, n, 2048):
        part = x[lo:lo + 2048]
        grid = torch.nn.functional.affine_grid(torch.from_numpy(theta[lo:lo + 2048]), list(part.shape), align_corners=False)
        out.append(torch.nn.functional.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.cat(out).clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ServedModel:
    """The production model and the held-out digits it serves."""

    def __init__(self, seed: int = 0):
        images, labels = load_digits_images(SIZE)
        order = np.random.default_rng(seed).permutation(len(images))
        train, held = order[:TRAIN_ROWS], order[TRAIN_ROWS:]
        x_train = images_to_tensor(images[train], backbone.SERVED_DATA_CONFIG)
        self.model = backbone.train_source(x_train, torch.from_numpy(labels[train]), seed=seed).eval()
        # channels_last: 1.9x the CPU throughput of MobileNetV2's depthwise convolutions here
        self.model = self.model.to(memory_format=torch.channels_last)
        self.images, self.labels = images[held], labels[held]
        self.seed = seed
        self._key = hashlib.sha256(
            json.dumps([seed, TRAIN_ROWS, SIZE, backbone.SERVED_DATA_CONFIG]).encode()
        ).hexdigest()[:10]

    def pool(self, copies: int, kind: str | None = None, severity: float = 0.0, stream: int = 0) -> Pool:
        """Features of ``copies`` jittered copies of each held-out digit, corrupted by ``kind`` at
        ``severity`` (None: clean). ``stream`` picks independent jitter draws."""
        name = f"clean" if kind is None else f"{kind}{severity:g}"
        cache = backbone.OUT / f"mmd-features-{self._key}-{name}-c{copies}-s{stream}.npz"
        if cache.is_file():
            with np.load(cache) as data:
                return Pool(data["features"], float(data["accuracy"]))
        images = _jitter(self.images, copies, seed=1000 * stream + 17)
        if kind is not None:
            images = corrupt(images, kind, severity, seed=stream)
        labels = np.tile(self.labels, copies)
        feats, correct = [], 0
        with torch.inference_mode():
            for lo in range(0, len(images), 256):
                x = images_to_tensor(images[lo:lo + 256], backbone.SERVED_DATA_CONFIG)
                f = pooled_features(self.model, x.to(memory_format=torch.channels_last))
                correct += int((self.model.get_classifier()(f).argmax(1).numpy() == labels[lo:lo + 256]).sum())
                feats.append(f.numpy().astype(np.float32))
        pool = Pool(np.concatenate(feats), correct / len(images))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, features=pool.features, accuracy=np.array(pool.accuracy))
        return pool
