"""Real, small image data for tests, the benchmark and the demo: scikit-learn's bundled digits.

1,797 8x8 grey-level handwritten digits (ships with scikit-learn, nothing downloads), upsampled
to RGB uint8 images, plus real corruptions to play the part of a production shift.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from retrain.threads import ThreadChoice

CORRUPTIONS = ("noise", "blur", "rotate", "contrast")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def load_digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``(uint8[N, size, size, 3], int64[N])``, bilinearly upsampled from 8x8."""
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    digits = load_digits()
    grey = digits.images.astype(np.float32) / 16.0  # sklearn's digits are 0..16
    zoomed = ndimage.zoom(grey, (1, size / 8, size / 8), order=1)
    images = np.clip(np.rint(zoomed * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(images[..., None], 3, axis=3), digits.target.astype(np.int64)


def corrupt(images: np.ndarray, kind: str, severity: float, seed: int) -> np.ndarray:
    """A corrupted copy of uint8[N, H, W, 3] images; ``severity`` in (0, 1] scales the effect.

    noise: additive Gaussian (sigma up to 0.5 of full scale); blur: Gaussian (sigma up to 2.5 px
    at 32 px); rotate: each image by a random angle up to +-90 degrees; contrast: compressed
    toward mid-grey with an offset (down to 10% contrast). Raises ValueError on an unknown kind.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    if not 0 < severity <= 1:
        raise ValueError(f"severity must be in (0, 1], got {severity}")
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8[N, H, W, C], got {images.dtype}{list(images.shape)}")
    rng = np.random.default_rng(seed)
    x = images.astype(np.float32) / 255.0
    if kind == "noise":
        x = x + rng.normal(0.0, 0.5 * severity, size=x.shape[:3] + (1,)).astype(np.float32)
    elif kind == "blur":
        sigma = 2.5 * severity * images.shape[1] / 32
        x = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0))
    elif kind == "rotate":
        angles = rng.uniform(-90.0 * severity, 90.0 * severity, size=len(x))
        x = np.stack([ndimage.rotate(img, a, axes=(0, 1), reshape=False, order=1) for img, a in zip(x, angles)])
    else:
        x = 0.5 + (x - 0.5) * (1.0 - 0.9 * severity) + 0.3 * severity
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def write_images(directory: Path, images: np.ndarray, ids: Sequence[str]) -> list[str]:
    """Write each image as ``<id>.png`` under ``directory``; returns the file names (input_uri
    values relative to ``directory``). Ids must be plain names (no path separators)."""
    from PIL import Image

    if len(ids) != len(images):
        raise ValueError(f"got {len(images)} images but {len(ids)} ids")
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for image, image_id in zip(images, ids):
        if not _SAFE_ID.fullmatch(image_id):
            raise ValueError(f"image id {image_id!r} is not a plain file name (letters, digits, . _ -)")
        name = f"{image_id}.png"
        Image.fromarray(image).save(directory / name)
        names.append(name)
    return names


def train_digits_model(
    images: np.ndarray, labels: np.ndarray, *, architecture: str = "test_resnet", epochs: int = 15,
    seed: int = 0, lr: float = 3e-3, batch_size: int = 64, threads: int | None = None,
    on_threads: Callable[[ThreadChoice], None] | None = None, clock: Callable[[], float] = time.perf_counter,
):
    """A source model for the demo, tests and benchmark: ``architecture`` trained from scratch
    on clean digits (CPU-friendly at 32 px). Returns ``(model in eval mode, data_config)``.

    ``threads``: intra-op threads to train with; None chooses them by timing a few steps of this
    very training (retrain.threads), and again after an epoch whose steps ran twice as slow as the
    first epoch's (load arrived). ``on_threads`` hears each choice. The caller's thread count is
    restored at the end. Results differ in the last float bits between thread counts.
    """
    import timm
    import torch

    from retrain.model import images_to_tensor, resolve_data_config
    from retrain.threads import ThreadChoice, choose_for_training, usable_cpus

    torch.manual_seed(seed)
    model = timm.create_model(architecture, num_classes=10)
    data_config = resolve_data_config(model, images.shape[1])
    x = images_to_tensor(images, data_config)
    y = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = -(-len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    caller_threads = torch.get_num_threads()

    def choose() -> None:
        if threads is not None:
            torch.set_num_threads(threads)
            choice = ThreadChoice(threads, "argument", usable_cpus(), note="set by the caller")
        else:
            choice = choose_for_training(model, x[:batch_size], 10)
        if on_threads is not None:
            on_threads(choice)

    try:
        choose()
        first_epoch_step: float | None = None
        model.train()
        for epoch in range(epochs):
            started = clock()
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            per_step = (clock() - started) / steps_per_epoch
            if first_epoch_step is None:
                first_epoch_step = per_step
            elif threads is None and per_step > 2 * first_epoch_step and epoch < epochs - 1:
                choose()  # the host got busier since the count was chosen: measure again
                first_epoch_step = None
    finally:
        torch.set_num_threads(caller_threads)
    return model.eval(), data_config
