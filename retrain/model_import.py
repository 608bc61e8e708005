"""Importing a model into the registry from a local checkpoint, never unpickling objects.

A checkpoint is read as a safetensors file, a weights-only .pth/.bin (a bare state dict or one
wrapped as timm's training script saves it) or a model directory in timm's ``save_for_hf`` layout;
the preprocessing recorded with the new version is the one given, else the checkpoint's own, else
timm's default for the architecture. Apart from retrain.registry because only imports need timm's
checkpoint handling, and reading the registry must stay free of torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrain.dataconfig import DataConfig, embedded_data_config, parse_data_config, weights_in
from retrain.registry import ModelMeta, Registry, RegistryError

if TYPE_CHECKING:
    import torch
    from torch import nn


def _classifier_outputs(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    name = model.pretrained_cfg.get("classifier")
    names = (name,) if isinstance(name, str) else tuple(name or ())
    for n in names:
        weight = state.get(f"{n}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _new_model(architecture: str, num_classes: int) -> nn.Module:
    from retrain.model import create_model

    try:
        return create_model(architecture, num_classes)
    except RuntimeError as exc:
        raise RegistryError(f"unknown timm architecture {architecture!r}: {exc}") from None


@dataclass(frozen=True)
class Checkpoint:
    """A weights file read for import: its state dict and the preprocessing it carries, if any."""

    path: Path                                  # the weights file (inside the directory, for a model directory)
    state: dict[str, Any]                       # parameter name -> tensor
    data_config: DataConfig | None              # from the checkpoint's pretrained_cfg, when present
    data_config_source: str                     # where that was found ("" when absent)


# Keys timm's load_state_dict looks under, in its order (EMA weights first).
_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_checkpoint(path: Path, architecture: str) -> Checkpoint:
    """Read a local checkpoint without unpickling objects: a .safetensors file, a .pth/.bin via
    ``torch.load(weights_only=True)`` (a bare state dict or one wrapped as timm's training script
    saves it), or a model directory in timm's ``save_for_hf`` layout (weights + config.json)."""
    import safetensors
    import safetensors.torch
    import torch
    from timm.models import clean_state_dict

    path = Path(path)
    if path.is_dir():
        weights = weights_in(path)
        if weights is None:
            raise RegistryError(f"{path}: a directory without model.safetensors or pytorch_model.bin; "
                                "pass the weights file itself")
        path = weights
    if not path.is_file():
        raise RegistryError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            top: Any = safetensors.torch.load_file(str(path))
        else:
            top = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError/... for non-weight files
        raise RegistryError(f"{path}: not a weights-only checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(top, dict):
        raise RegistryError(f"{path}: holds a {type(top).__name__}, not a state dict")
    key = next((k for k in _STATE_KEYS if isinstance(top.get(k), dict)), None)
    state = clean_state_dict(top[key] if key else top)
    embedded = embedded_data_config(path, architecture, top)
    return Checkpoint(path=path, state=state, data_config=None if embedded is None else embedded[0],
                      data_config_source="" if embedded is None else f"checkpoint: {embedded[1]}")


def architecture_data_config(architecture: str, num_classes: int, input_size: int | None = None) -> DataConfig:
    """timm's default preprocessing for ``architecture`` (what its pretrained_cfg says), at
    ``input_size`` when given: the right one only for a model trained with exactly it."""
    from retrain.model import resolve_data_config

    return resolve_data_config(_new_model(architecture, num_classes), input_size)


def _store_import(registry: Registry, model: nn.Module, architecture: str, num_classes: int, file: Path,
                  class_names: Sequence[str], data_config: DataConfig, data_config_source: str,
                  promote: bool) -> str:
    if class_names and len(class_names) != num_classes:
        raise RegistryError(f"got {len(class_names)} class names for num_classes={num_classes}")
    meta = ModelMeta(architecture=architecture, num_classes=num_classes,
                     data_config=parse_data_config(data_config, data_config_source or str(file)),
                     class_names=tuple(class_names), source=f"import:{file}", data_config_source=data_config_source)
    version = registry.add(model, meta)
    if promote:
        registry.promote(version)
    return version


def _choose_data_config(model: nn.Module, checkpoint: Checkpoint, data_config: Mapping[str, Any] | None,
                        data_config_source: str, input_size: int | None) -> tuple[DataConfig, str]:
    if data_config is not None:
        return dict(data_config), data_config_source or "given"
    if checkpoint.data_config is not None:
        return checkpoint.data_config, checkpoint.data_config_source
    from retrain.model import resolve_data_config

    at = "" if input_size is None else f" at input size {input_size}"
    return resolve_data_config(model, input_size), f"timm's default for {model.pretrained_cfg.get('architecture')}{at}"


def import_timm_checkpoint(
    registry: Registry,
    architecture: str,
    num_classes: int,
    checkpoint_file: Path | Checkpoint,
    *,
    class_names: Sequence[str] = (),
    data_config: Mapping[str, Any] | None = None,
    data_config_source: str = "",
    input_size: int | None = None,
    promote: bool = True,
) -> str:
    """Import a local timm checkpoint (see :func:`read_checkpoint`) through
    ``timm.create_model(pretrained=True, pretrained_cfg_overlay=file)``.

    A checkpoint with a different classifier size (e.g. ImageNet's 1000) gets a fresh head of
    ``num_classes``. Nothing is downloaded. The preprocessing recorded is ``data_config`` when
    given, else the checkpoint's own, else timm's default for the architecture (at
    ``input_size``), which `driftd models import` only uses when told to. Returns the new version
    (promoted unless told not to).
    """
    import timm

    checkpoint = (checkpoint_file if isinstance(checkpoint_file, Checkpoint)
                  else read_checkpoint(Path(checkpoint_file), architecture))
    probe = _new_model(architecture, num_classes)
    checkpoint_classes = _classifier_outputs(probe, checkpoint.state) or num_classes
    try:
        model = timm.create_model(
            architecture,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=dict(file=str(checkpoint.path), num_classes=checkpoint_classes),
        )
    except RuntimeError as exc:
        raise RegistryError(f"{checkpoint.path}: does not fit {architecture}: {str(exc).splitlines()[0]}") from None
    cfg, source = _choose_data_config(model, checkpoint, data_config, data_config_source, input_size)
    return _store_import(registry, model, architecture, num_classes, checkpoint.path, class_names, cfg, source,
                         promote)


def import_safetensors(
    registry: Registry,
    architecture: str,
    num_classes: int,
    weights_file: Path | Checkpoint,
    *,
    class_names: Sequence[str] = (),
    data_config: Mapping[str, Any] | None = None,
    data_config_source: str = "",
    input_size: int | None = None,
    promote: bool = True,
) -> str:
    """Import a full state dict (safetensors or weights-only .pth) that matches the architecture
    exactly; the preprocessing is chosen as in :func:`import_timm_checkpoint`."""
    checkpoint = (weights_file if isinstance(weights_file, Checkpoint)
                  else read_checkpoint(Path(weights_file), architecture))
    model = _new_model(architecture, num_classes)
    try:
        model.load_state_dict(checkpoint.state, strict=True)
    except RuntimeError as exc:
        raise RegistryError(f"{checkpoint.path}: does not fit {architecture}: {str(exc).splitlines()[0]}") from None
    cfg, source = _choose_data_config(model, checkpoint, data_config, data_config_source, input_size)
    return _store_import(registry, model, architecture, num_classes, checkpoint.path, class_names, cfg, source,
                         promote)
