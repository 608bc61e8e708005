"""The recipe's guard and speed keys in ``retrain.hyper``: defaults, "auto", key-named errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import parse_config
from monitor.errors import ConfigError


def _hyper(hyper: dict):
    return parse_config({"logs": {"inference": "logs"}, "retrain": {"hyper": hyper}}, source="driftd.yaml",
                        base=Path("/srv")).retrain.hyper


def test_defaults_choose_the_lr_by_measurement_and_guard_against_the_head_phase() -> None:
    h = _hyper({})
    assert h.lr_backbone is None and h.batchnorm == "auto" and h.max_backoffs == 2
    assert (h.grad_ratio, h.val_rise, h.cache_mb) == (10.0, 1.5, 2048)
    assert _hyper({"lr_backbone": "auto"}).lr_backbone is None
    assert _hyper({"lr_backbone": 1e-4, "batchnorm": "frozen", "cache_mb": 0}).lr_backbone == 1e-4


def test_bad_guard_keys_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        _hyper({"lr_backbone": "fast", "batchnorm": "floating", "grad_ratio": 1.0, "val_rise": 0.5,
                "max_backoffs": 9, "cache_mb": -1})
    text = str(err.value)
    for key in ("retrain.hyper.lr_backbone: expected a number", "retrain.hyper.batchnorm: must be one of",
                "retrain.hyper.grad_ratio: must be >= 1.5", "retrain.hyper.val_rise: must be >= 1.0",
                "retrain.hyper.max_backoffs: must be <= 6", "retrain.hyper.cache_mb: must be >= 0"):
        assert key in text
