"""Digits data: real images, real corruptions, PNG files usable as input_uri values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain.digits import CORRUPTIONS, corrupt, load_digits_images, write_images


def test_digits_are_rgb_uint8_with_ten_classes() -> None:
    images, labels = load_digits_images(size=16)
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_changes_images_reproducibly(kind: str) -> None:
    images, _ = load_digits_images(size=16)
    a = corrupt(images[:50], kind, 0.7, seed=3)
    b = corrupt(images[:50], kind, 0.7, seed=3)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - images[:50].astype(int)).mean() > 3


def test_unknown_corruption_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(np.zeros((1, 8, 8, 3), np.uint8), "fog", 0.5, seed=0)


def test_write_images_round_trips(tmp_path: Path) -> None:
    images, _ = load_digits_images(size=16)
    names = write_images(tmp_path, images[:3], ["a", "b", "c"])
    assert names == ["a.png", "b.png", "c.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), images[1])
    with pytest.raises(ValueError, match="not a plain file name"):
        write_images(tmp_path, images[:1], ["../escape"])
