"""A model's preprocessing (timm's data config), recorded at import and never guessed.

The data config is what turns a served image into the tensor the model saw: input size,
resize interpolation, crop_pct (resize the shorter side to size / crop_pct, then centre-crop),
mean and std. Retraining and the promotion gate must see inputs exactly as production does, so
``driftd models import`` records it from the checkpoint's own ``pretrained_cfg``, from a JSON
file, or from flags, and refuses to fall back to the architecture's default without being told.

Plain data and validation only (no torch): the CLI reads and prints these before any model loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monitor.errors import DriftdError

DataConfig = dict[str, Any]

REQUIRED = ("input_size", "interpolation", "crop_pct", "mean", "std")
# timm's eval-time interpolations (timm.data.transforms.str_to_interp_mode; "random" is training only)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
# The file names timm's save_for_hf / the Hugging Face hub layout use for a model directory.
CONFIG_JSON = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


class DataConfigError(DriftdError):
    """A data config is incomplete or has a value timm cannot use (exit 2: fix the input)."""

    exit_code = 2


def _number_list(value: Any, key: str, where: str, errors: list[str]) -> list[float]:
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        errors.append(f"{key}: expected a list of numbers, got {value!r}")
        return []
    return [float(v) for v in value]


def parse_data_config(doc: Mapping[str, Any], where: str) -> DataConfig:
    """Validate a data config (timm's keys; other keys, as in a full pretrained_cfg, are ignored).

    ``input_size`` may be ``[C, H, W]`` or one integer (square, 3 channels). Returns the
    normalised form stored in meta.json (lists, not tuples). Raises DataConfigError listing
    every missing or bad key, prefixed with ``where``.
    """
    if not isinstance(doc, Mapping):
        raise DataConfigError(f"{where}: a data config must be a JSON object, got {type(doc).__name__}")
    errors: list[str] = []
    missing = [k for k in REQUIRED if doc.get(k) is None]
    if missing:
        errors.append(f"missing {', '.join(missing)}")
    out: DataConfig = {}
    size = doc.get("input_size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [3, size, size]
    if size is not None:
        if (not isinstance(size, (list, tuple)) or len(size) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            errors.append(f"input_size: expected [channels, height, width] of positive integers, got {size!r}")
        else:
            out["input_size"] = [int(v) for v in size]
    interpolation = doc.get("interpolation")
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            errors.append(f"interpolation: must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        else:
            out["interpolation"] = interpolation
    crop = doc.get("crop_pct")
    if crop is not None:
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
            errors.append(f"crop_pct: must be a number in (0, 1] (1.0 = resize to the input size, no crop), got {crop!r}")
        else:
            out["crop_pct"] = float(crop)
    mode = doc.get("crop_mode", "center")
    if mode not in CROP_MODES:
        errors.append(f"crop_mode: must be one of {', '.join(CROP_MODES)}, got {mode!r}")
    out["crop_mode"] = mode
    channels = out.get("input_size", [None])[0]
    for key in ("mean", "std"):
        if doc.get(key) is None:
            continue
        values = _number_list(doc[key], key, where, errors)
        if values and channels is not None and len(values) != channels:
            errors.append(f"{key}: {len(values)} values for {channels} input channels")
        elif values and key == "std" and min(values) <= 0:
            errors.append(f"std: every value must be > 0, got {values}")
        elif values:
            out[key] = values
    if errors:
        raise DataConfigError(f"{where}: invalid data config: " + "; ".join(errors))
    return out


def read_data_config_file(path: Path) -> DataConfig:
    """A JSON data config file: timm's keys at the top, or a ``pretrained_cfg`` inside (config.json)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataConfigError(f"--data-config {path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise DataConfigError(f"--data-config {path}: not readable JSON: {exc}") from None
    if isinstance(doc, Mapping) and isinstance(doc.get("pretrained_cfg"), Mapping):
        doc = doc["pretrained_cfg"]
    return parse_data_config(doc, f"--data-config {path}")


def weights_in(directory: Path) -> Path | None:
    """The weights file of a model directory in timm's save_for_hf layout, if there is one."""
    return next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)


def embedded_data_config(checkpoint: Path, architecture: str, checkpoint_dict: Mapping[str, Any] | None = None
                         ) -> tuple[DataConfig, str] | None:
    """The preprocessing a checkpoint carries, with where it was found, or None.

    Looked for in a ``pretrained_cfg`` entry of a checkpoint dictionary (``checkpoint_dict``, the
    file's loaded top level) and in a ``config.json`` beside the weights (timm's ``save_for_hf``
    and the Hugging Face hub layout: ``{"architecture": ..., "pretrained_cfg": {...}}``), whose
    architecture must then be ``architecture``.
    """
    if checkpoint_dict is not None and isinstance(checkpoint_dict.get("pretrained_cfg"), Mapping):
        where = f"{checkpoint} (its pretrained_cfg entry)"
        return parse_data_config(checkpoint_dict["pretrained_cfg"], where), where
    config_json = Path(checkpoint).parent / CONFIG_JSON
    if not config_json.is_file():
        return None
    try:
        doc = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataConfigError(f"{config_json}: not readable JSON: {exc}; fix or remove it") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("pretrained_cfg"), Mapping):
        return None  # some other config.json: not ours to interpret
    named = doc.get("architecture")
    if named is not None and named != architecture:
        raise DataConfigError(f"{config_json}: describes architecture {named!r}, but --arch is {architecture!r}; "
                              "pass the architecture the weights were saved from")
    where = f"{config_json} (pretrained_cfg)"
    return parse_data_config(doc["pretrained_cfg"], where), where


def describe(cfg: Mapping[str, Any]) -> str:
    """One line a user can check against their serving code (timm's names and values)."""
    c, h, w = cfg["input_size"]
    mean = ", ".join(f"{v:g}" for v in cfg["mean"])
    std = ", ".join(f"{v:g}" for v in cfg["std"])
    return (f"input_size {c}x{h}x{w}, interpolation {cfg['interpolation']}, crop_pct {cfg['crop_pct']:g} "
            f"(crop_mode {cfg.get('crop_mode', 'center')}), mean [{mean}], std [{std}]")
