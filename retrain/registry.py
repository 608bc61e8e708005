"""A local model registry: immutable versions, an atomic CURRENT pointer and a promotion history.

Layout under the registry directory::

    versions/<version>/model.safetensors   weights (never pickled)
    versions/<version>/meta.json           ModelMeta (architecture, data config, lineage, gate, ...)
    CURRENT                                the promoted version's name (switched with os.replace)
    history.json                           {"format": 1, "promoted": [...]} for rollback
    .lock                                  flock held while the registry changes
    on_promote.json                        outcomes of retrain.on_promote runs (retrain.hooks)

Reading (list, show, current, history) needs no torch and creates nothing; torch, timm and
safetensors load only to read or write weights, so `driftd models list` answers at once.

Importing a model from a local checkpoint file is retrain.model_import; this module holds the
stored versions and the pointer.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.errors import DriftdError
from retrain.dataconfig import DataConfig
from retrain.files import write_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

META_FORMAT = 1
HISTORY_FORMAT = 1
_VERSION = re.compile(r"v([0-9]+)")


class RegistryError(DriftdError):
    """The registry is missing, a version does not exist, or its files cannot be used."""


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a version and to explain where it came from."""

    architecture: str
    num_classes: int
    data_config: DataConfig
    class_names: tuple[str, ...] = ()
    parent: str | None = None
    created_at: float = 0.0                    # epoch seconds; set by Registry.add when 0
    data_window: dict[str, Any] = field(default_factory=dict)   # since/until/rows used to train
    strategy: str | None = None
    strategy_reason: str | None = None
    hyper: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    source: str = ""                           # "import:<file>" or "retrain:<job id>"
    data_config_source: str = ""               # where the preprocessing came from (checkpoint, file, flags)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        return {"format": META_FORMAT, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "ModelMeta":
        fmt = data.get("format")
        if fmt != META_FORMAT:
            raise RegistryError(
                f"{where}: meta.json format {fmt!r} is not {META_FORMAT}; it was written by a different driftd version"
            )
        known = {f.name for f in fields(cls)}
        missing = {"architecture", "num_classes", "data_config"} - set(data)
        if missing:
            raise RegistryError(f"{where}: meta.json lacks {', '.join(sorted(missing))}")
        values = {k: v for k, v in data.items() if k in known}
        values["class_names"] = tuple(values.get("class_names", ()))
        return cls(**values)


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path                                 # the version's directory
    meta: ModelMeta


class Registry:
    """Versions of one model in a local directory. ``clock`` supplies creation times (epoch s)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._clock = clock

    # -- reading ---------------------------------------------------------------------------
    @property
    def _versions(self) -> Path:
        return self.path / "versions"

    def list(self) -> list[ModelVersion]:
        """All versions, oldest first."""
        if not self._versions.is_dir():
            return []
        names = [p.name for p in self._versions.iterdir() if _VERSION.fullmatch(p.name)]
        return [self.get(n) for n in sorted(names, key=lambda n: int(n[1:]))]

    def get(self, version: str) -> ModelVersion:
        if not _VERSION.fullmatch(version):
            raise RegistryError(f"{version!r} is not a version name (expected v1, v2, ...)")
        directory = self._versions / version
        meta_file = directory / "meta.json"
        if not meta_file.is_file():
            known = ", ".join(v.name for v in sorted(self._versions.glob("v*"))) if self._versions.is_dir() else ""
            raise RegistryError(
                f"{self.path}: version {version} not found (known: {known or 'none'}); "
                "see `driftd models list`"
            )
        try:
            data = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{meta_file}: unreadable meta.json: {exc}") from None
        return ModelVersion(version=version, path=directory, meta=ModelMeta.from_json(data, str(meta_file)))

    def current(self) -> ModelVersion | None:
        """The promoted version, or None before anything was promoted."""
        pointer = self.path / "CURRENT"
        if not pointer.exists():
            return None
        return self.get(pointer.read_text(encoding="utf-8").strip())

    def history(self) -> list[str]:
        """Promoted versions, oldest first (a rollback pops the last one)."""
        path = self.path / "history.json"
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path}: unreadable promotion history: {exc}") from None
        if data.get("format") != HISTORY_FORMAT:
            raise RegistryError(f"{path}: history format {data.get('format')!r} is not {HISTORY_FORMAT}")
        return list(data["promoted"])

    def load_model(self, version: str | None = None, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelVersion]:
        """The model of ``version`` (default: CURRENT) in eval mode, weights from safetensors."""
        mv = self._resolve(version)
        return self.load(mv, device=device), mv

    def load(self, mv: ModelVersion, *, device: str | torch.device = "cpu") -> nn.Module:
        """``mv``'s model in eval mode on ``device``, weights from its safetensors file."""
        import safetensors
        import safetensors.torch

        from retrain.model import create_model

        model = create_model(mv.meta.architecture, mv.meta.num_classes)
        weights = mv.path / "model.safetensors"
        try:
            state = safetensors.torch.load_file(str(weights), device=str(device))
        except (OSError, safetensors.SafetensorError) as exc:
            raise RegistryError(f"{weights}: cannot read weights: {exc}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise RegistryError(f"{weights}: weights do not fit {mv.meta.architecture}: {first}") from None
        return model.to(device).eval()

    def _resolve(self, version: str | None) -> ModelVersion:
        if version is not None:
            return self.get(version)
        current = self.current()
        if current is None:
            raise RegistryError(
                f"{self.path}: no promoted model yet; import one with `driftd models import ...`"
            )
        return current

    # -- changing --------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        # No mkdir here: only add() creates a registry; promote and rollback need an existing one.
        with open(self.path / ".lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def add(self, model: nn.Module, meta: ModelMeta) -> str:
        """Store a new immutable version; returns its name (v1, v2, ...). Does not promote."""
        import safetensors.torch

        from retrain.model import unwrap

        if meta.created_at == 0.0:
            meta = ModelMeta(**{**{f.name: getattr(meta, f.name) for f in fields(meta)}, "created_at": self._clock()})
        self._versions.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self._versions, prefix=".staging-"))
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
            safetensors.torch.save_file(state, str(staging / "model.safetensors"))
            (staging / "meta.json").write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True), encoding="utf-8")
            for name in ("model.safetensors", "meta.json"):
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
            with self._locked():
                numbers = [int(p.name[1:]) for p in self._versions.iterdir() if _VERSION.fullmatch(p.name)]
                version = f"v{max(numbers, default=0) + 1}"
                os.rename(staging, self._versions / version)
        except BaseException:
            for child in staging.glob("*") if staging.exists() else ():
                child.unlink()
            if staging.exists():
                staging.rmdir()
            raise
        return version

    def promote(self, version: str) -> ModelVersion:
        """Make ``version`` CURRENT and append it to the history."""
        mv = self.get(version)
        with self._locked():
            history = self.history()
            if history and history[-1] == version and self._pointer() == version:
                return mv
            self._switch([*history, version])
        return mv

    def rollback(self) -> str:
        """Return CURRENT to the previously promoted version; returns that version."""
        if not self.path.is_dir():
            raise RegistryError(f"{self.path}: nothing to roll back to (no registry here yet)")
        with self._locked():
            history = self.history()
            if len(history) < 2:
                raise RegistryError(f"{self.path}: nothing to roll back to (promotion history: {history or 'empty'})")
            self.get(history[-2])
            self._switch(history[:-1])
            return history[-2]

    def _pointer(self) -> str | None:
        pointer = self.path / "CURRENT"
        return pointer.read_text(encoding="utf-8").strip() if pointer.exists() else None

    def _switch(self, history: Sequence[str]) -> None:
        # History first: if we die between the two writes CURRENT still names a valid version
        # and the next promote/rollback rewrites both.
        write_atomic(self.path / "history.json", json.dumps({"format": HISTORY_FORMAT, "promoted": list(history)}))
        write_atomic(self.path / "CURRENT", history[-1] + "\n")
