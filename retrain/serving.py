"""The hand-off to serving: an inference service's view of the registry's CURRENT model.

::

    from retrain.serving import CurrentModel

    current = CurrentModel("/var/lib/driftd/registry", device="cuda")

    def predict(images, ids):                    # images: PIL images as they arrive
        served = current.get()                   # one version for the whole request
        x = served.preprocess(images)            # the version's own data config (timm transforms)
        features, probs = served.predict(x)
        log.write_batch(request_id=ids, timestamp=time.time(), model_version=served.version,
                        features=features, probs=probs)
        return probs.argmax(1)

``get()`` looks at the CURRENT file at most every ``check_seconds`` (one ``stat``: its inode
and mtime change on every switch, which is an ``os.replace``). When it changed, the new
version is loaded *beside* the old one, outside any request, and then swapped in with one
reference assignment: a request that already holds its :class:`Served` finishes on the old
version, every later ``get()`` returns the new one, and no request ever mixes the two. A new
CURRENT that cannot be loaded is logged and the old version keeps serving until CURRENT
changes again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrain.model import build_transform, predict
from retrain.registry import ModelMeta, Registry, RegistryError

log = logging.getLogger(__name__)

_Stamp = tuple[int, int, int]   # (inode, mtime ns, size) of the CURRENT file


@dataclass(frozen=True)
class Served:
    """One loaded version: take it once per request and use only it for that request."""

    version: str                            # log this as ``model_version``
    model: torch.nn.Module                  # eval mode, on the device; share it read-only
    transform: Callable[[Any], torch.Tensor]  # PIL image -> float tensor[C, H, W], the version's data config
    meta: ModelMeta
    device: torch.device

    @property
    def data_config(self) -> dict[str, Any]:
        return self.meta.data_config

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> float32[N, C, H, W] exactly as this version was trained and gated."""
        if not images:
            c, h, w = self.meta.data_config["input_size"]
            return torch.zeros((0, c, h, w))
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    def predict(self, x: torch.Tensor, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """``(features float32[N, D], probs float32[N, C])``: what the log contract wants."""
        return predict(self.model, x, batch_size=batch_size, device=self.device)


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class CurrentModel:
    """Serves the registry's CURRENT version and follows promotions and rollbacks.

    ``check_seconds``: how often ``get()`` may stat the CURRENT file (0 = every call).
    ``on_swap(new, old)`` is called after each swap (e.g. to log it or warm up the new model).
    Thread-safe: concurrent ``get()`` calls never block on a load; one of them loads, the
    others keep the version they have until the swap.
    """

    def __init__(self, registry_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 check_seconds: float = 1.0, on_swap: Callable[[Served, Served], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if check_seconds < 0:
            raise ValueError(f"check_seconds must be >= 0, got {check_seconds}")
        self.registry = Registry(Path(registry_dir))
        self.device = torch.device(device)
        self.check_seconds = check_seconds
        self._on_swap = on_swap
        self._clock = clock
        self._pointer = self.registry.path / "CURRENT"
        self._loading = threading.Lock()
        self._stamp = _stamp(self._pointer)
        self._failed: _Stamp | None = None   # a CURRENT that would not load: not retried until it changes
        self.last_error: str | None = None
        self._served = self._load()          # RegistryError when nothing is promoted yet
        self._next_check = clock() + check_seconds

    @property
    def version(self) -> str:
        return self._served.version

    def get(self) -> Served:
        """The version to use for one request (checks for a new CURRENT when a check is due)."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.check_seconds
            self.refresh()
        return self._served

    def refresh(self) -> bool:
        """Check CURRENT now; load and swap in a new version. True when it swapped.

        Returns False at once when another thread is already loading."""
        stamp = _stamp(self._pointer)
        if stamp == self._stamp or stamp is None or stamp == self._failed:
            return False
        if not self._loading.acquire(blocking=False):
            return False
        try:
            stamp = _stamp(self._pointer)  # read again: it may have changed while we waited
            try:
                new = self._load()
            except (RegistryError, OSError, RuntimeError) as exc:
                self._failed, self.last_error = stamp, str(exc)
                log.error("new CURRENT in %s cannot be loaded (%s); still serving %s", self.registry.path, exc,
                          self._served.version)
                return False
            self._stamp, self._failed, self.last_error = stamp, None, None
            if new.version == self._served.version:
                return False  # rewritten with the same version (e.g. a promote of CURRENT itself)
            old, self._served = self._served, new  # the swap: one reference assignment
            log.info("now serving %s (was %s)", new.version, old.version)
            if self._on_swap is not None:
                self._on_swap(new, old)
            return True
        finally:
            self._loading.release()

    def _load(self) -> Served:
        current = self.registry.current()
        if current is None:
            raise RegistryError(f"{self.registry.path}: no promoted model yet; import one with `driftd models import`")
        model = self.registry.load(current, device=self.device)
        return Served(version=current.version, model=model, transform=build_transform(current.meta.data_config),
                      meta=current.meta, device=self.device)
