"""Reference sets: what "normal" looks like for one model_version, built once, loaded by the engine.

A reference holds a capped uniform sample of backbone features (for the MMD tests), exact
per-dimension mean/variance over every row it saw (for activation shifts), the predicted-class
distribution, the projection and kernel bandwidth fixed at build time, and a confidence
calibrator fitted on labelled rows (for the label-free accuracy estimate).

On disk: ``<reference_dir>/<model_version>/reference.json`` (metadata, format version) and
``arrays.npz`` (numpy arrays only; loaded with ``allow_pickle=False``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.config import MmdConfig
from monitor.errors import ReferenceMissingError
from monitor.ingest.records import InferenceBatch
from monitor.signals.estimate import Calibrator, fit_calibrator
from monitor.signals.mmd import median_bandwidth
from monitor.signals.projection import Projection, fit_projection

FORMAT_VERSION = 1
DEFAULT_MAX_ROWS = 2000
_MAX_CALIBRATION_ROWS = 100_000


@dataclass(frozen=True)
class Reference:
    model_version: str
    created_at: float
    source: str                    # where it was built from (logs path, or "retrain job <id>")
    rows_seen: int                 # rows the statistics were computed over
    feature_mean: np.ndarray       # float64[D]
    feature_var: np.ndarray        # float64[D], sample variance
    sample: np.ndarray             # float32[m, D], uniform sample of the rows, m <= max_rows
    class_counts: np.ndarray       # int64[C], predicted-class counts over all rows
    projection: Projection         # fitted on the sample; applied before the MMD tests
    bandwidth: float               # Gaussian kernel sigma in the projected space (median heuristic)
    accuracy: float | None         # on labelled rows, when there were labels
    calibrator: Calibrator | None  # max-prob -> P(correct), when there were labels
    labelled_rows: int
    reference_id: str = ""         # content hash, to tell references apart in state and status

    @property
    def feature_dim(self) -> int:
        return int(self.feature_mean.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.class_counts.shape[0])


class _Accumulator:
    """Streaming statistics for one model_version: exact moments, bottom-k uniform samples."""

    def __init__(self, max_rows: int, rng: np.random.Generator):
        self.max_rows = max_rows
        self.rng = rng
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.class_counts: np.ndarray | None = None
        self.sample_keys = np.zeros(0)
        self.sample: np.ndarray | None = None
        self.cal_keys = np.zeros(0)
        self.cal_conf = np.zeros(0)
        self.cal_hit = np.zeros(0)
        self.labelled = 0
        self.correct = 0

    def add(self, features: np.ndarray, probs: np.ndarray, prediction: np.ndarray, label: np.ndarray | None) -> None:
        x = features.astype(np.float64)
        k = x.shape[0]
        if k == 0:
            return
        if self.mean is None:
            self.mean = np.zeros(x.shape[1])
            self.m2 = np.zeros(x.shape[1])
            self.class_counts = np.zeros(probs.shape[1], dtype=np.int64)
            self.sample = np.zeros((0, x.shape[1]), dtype=np.float32)
        elif x.shape[1] != self.mean.shape[0] or probs.shape[1] != self.class_counts.shape[0]:
            raise ValueError(
                f"feature/probs width changed within one model_version: {x.shape[1]}/{probs.shape[1]} "
                f"vs {self.mean.shape[0]}/{self.class_counts.shape[0]}"
            )
        # Chan et al.'s parallel merge of mean and sum of squared deviations.
        b_mean = x.mean(axis=0)
        b_m2 = ((x - b_mean) ** 2).sum(axis=0)
        total = self.n + k
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + b_m2 + delta**2 * (self.n * k / total)
        self.n = total
        self.class_counts += np.bincount(prediction, minlength=self.class_counts.size)[: self.class_counts.size]

        keys = self.rng.random(k)
        all_keys = np.concatenate([self.sample_keys, keys])
        all_rows = np.concatenate([self.sample, features.astype(np.float32)])
        keep = np.argsort(all_keys, kind="stable")[: self.max_rows]
        self.sample_keys, self.sample = all_keys[keep], all_rows[keep]

        if label is not None:
            has = label >= 0
            if has.any():
                conf = probs[has].max(axis=1).astype(np.float64)
                hit = (prediction[has] == label[has]).astype(np.float64)
                self.labelled += int(has.sum())
                self.correct += int(hit.sum())
                ck = self.rng.random(conf.size)
                all_ck = np.concatenate([self.cal_keys, ck])
                keep = np.argsort(all_ck, kind="stable")[:_MAX_CALIBRATION_ROWS]
                self.cal_keys = all_ck[keep]
                self.cal_conf = np.concatenate([self.cal_conf, conf])[keep]
                self.cal_hit = np.concatenate([self.cal_hit, hit])[keep]

    def finish(self, *, model_version: str, source: str, projection: str, projection_dims: int, seed: int) -> Reference:
        if self.n < 2 or self.mean is None or self.sample is None or self.class_counts is None:
            raise ValueError(f"model_version {model_version!r}: a reference needs at least 2 rows, got {self.n}")
        proj = fit_projection(self.sample, kind=projection, dims=projection_dims, seed=seed)
        sigma = median_bandwidth(proj.apply(self.sample), seed=seed)
        calibrator = fit_calibrator(self.cal_conf, self.cal_hit) if self.labelled >= 2 else None
        return Reference(
            model_version=model_version,
            created_at=time.time(),
            source=source,
            rows_seen=self.n,
            feature_mean=self.mean,
            feature_var=self.m2 / (self.n - 1),
            sample=self.sample,
            class_counts=self.class_counts,
            projection=proj,
            bandwidth=float(sigma),
            accuracy=(self.correct / self.labelled) if self.labelled else None,
            calibrator=calibrator,
            labelled_rows=self.labelled,
        )


class ReferenceBuilder:
    """Feed validated batches (any number of model_versions), then :meth:`finish`."""

    def __init__(
        self,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        projection: str = MmdConfig.projection,
        projection_dims: int = MmdConfig.projection_dims,
        seed: int = 0,
        source: str = "",
    ):
        if max_rows < 2:
            raise ValueError(f"max_rows must be >= 2, got {max_rows}")
        self.max_rows = max_rows
        self.projection = projection
        self.projection_dims = projection_dims
        self.seed = seed
        self.source = source
        self._by_version: dict[str, _Accumulator] = {}

    def add(self, batch: InferenceBatch) -> None:
        for version in np.unique(batch.model_version):
            rows = batch.model_version == version
            acc = self._by_version.get(str(version))
            if acc is None:
                rng = np.random.default_rng([self.seed, len(self._by_version)])
                acc = self._by_version[str(version)] = _Accumulator(self.max_rows, rng)
            acc.add(
                batch.features[rows],
                batch.probs[rows],
                batch.prediction[rows],
                None if batch.label is None else batch.label[rows],
            )

    def add_arrays(
        self, *, model_version: str, features: np.ndarray, probs: np.ndarray, labels: np.ndarray | None
    ) -> None:
        if features.ndim != 2 or probs.ndim != 2 or features.shape[0] != probs.shape[0]:
            raise ValueError(f"features [n, D] and probs [n, C] must have the same n, got {features.shape}, {probs.shape}")
        if labels is not None and labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {labels.shape}")
        n = features.shape[0]
        self.add(
            InferenceBatch(
                source=self.source,
                first_row=0,
                request_id=np.array([str(i) for i in range(n)], dtype=object),
                timestamp=np.zeros(n),
                model_version=np.full(n, model_version, dtype=object),
                features=np.ascontiguousarray(features, dtype=np.float32),
                probs=np.ascontiguousarray(probs, dtype=np.float32),
                prediction=np.asarray(probs).argmax(axis=1).astype(np.int64),
                input_uri=None,
                label=None if labels is None else np.asarray(labels, dtype=np.int64),
            )
        )

    def versions(self) -> list[str]:
        return sorted(self._by_version)

    def finish(self) -> dict[str, Reference]:
        return {
            version: acc.finish(
                model_version=version,
                source=self.source,
                projection=self.projection,
                projection_dims=self.projection_dims,
                seed=self.seed,
            )
            for version, acc in sorted(self._by_version.items())
        }


def build_reference(
    *,
    model_version: str,
    features: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray | None,
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
    source: str = "",
    projection: str = MmdConfig.projection,
    projection_dims: int = MmdConfig.projection_dims,
) -> Reference:
    """A reference from in-memory arrays (the retrain job uses this after a promotion)."""
    builder = ReferenceBuilder(
        max_rows=max_rows, projection=projection, projection_dims=projection_dims, seed=seed, source=source
    )
    builder.add_arrays(model_version=model_version, features=features, probs=probs, labels=labels)
    return builder.finish()[model_version]


def version_dirname(model_version: str) -> str:
    """A file-system-safe directory name for a model_version (the real name lives in the JSON)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_version)
    if safe != model_version or safe in {".", ".."}:
        safe = f"{safe}-{hashlib.sha256(model_version.encode()).hexdigest()[:8]}"
    return safe


def _arrays(ref: Reference) -> dict[str, np.ndarray]:
    arrays = {
        "feature_mean": ref.feature_mean,
        "feature_var": ref.feature_var,
        "sample": ref.sample,
        "class_counts": ref.class_counts,
    }
    arrays.update({f"projection.{k}": v for k, v in ref.projection.to_arrays().items()})
    if ref.calibrator is not None:
        arrays["calibrator.x"] = ref.calibrator.x
        arrays["calibrator.y"] = ref.calibrator.y
    return arrays


def save_reference(ref: Reference, reference_dir: Path) -> Path:
    """Write atomically to ``reference_dir/<model_version>/``; returns that directory."""
    target = Path(reference_dir) / version_dirname(ref.model_version)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **_arrays(ref))
    data = buf.getvalue()
    (tmp / "arrays.npz").write_bytes(data)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_version": ref.model_version,
        "created_at": ref.created_at,
        "source": ref.source,
        "rows_seen": ref.rows_seen,
        "bandwidth": ref.bandwidth,
        "accuracy": ref.accuracy,
        "labelled_rows": ref.labelled_rows,
        "feature_dim": ref.feature_dim,
        "n_classes": ref.n_classes,
        "sample_rows": int(ref.sample.shape[0]),
        "reference_id": hashlib.sha256(data).hexdigest()[:16],
    }
    (tmp / "reference.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, target)
    return target


def load_reference(path: Path) -> Reference:
    """Load one reference directory; errors name the file and what to do."""
    path = Path(path)
    meta_file = path / "reference.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise ReferenceMissingError(f"{meta_file}: not found; build it with `driftd reference build`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ReferenceMissingError(f"{meta_file}: unreadable ({exc}); rebuild with `driftd reference build`") from None
    fmt = meta.get("format_version")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise ReferenceMissingError(
            f"{meta_file}: format_version {fmt!r} is newer than this driftd understands ({FORMAT_VERSION}); upgrade driftd"
        )
    try:
        with np.load(path / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ReferenceMissingError(f"{path / 'arrays.npz'}: unreadable ({exc}); rebuild the reference") from None
    calibrator = None
    if "calibrator.x" in arrays:
        calibrator = Calibrator(x=arrays["calibrator.x"], y=arrays["calibrator.y"])
    projection = Projection.from_arrays({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("projection.")})
    return Reference(
        model_version=meta["model_version"],
        created_at=float(meta["created_at"]),
        source=meta.get("source", ""),
        rows_seen=int(meta["rows_seen"]),
        feature_mean=arrays["feature_mean"],
        feature_var=arrays["feature_var"],
        sample=arrays["sample"],
        class_counts=arrays["class_counts"],
        projection=projection,
        bandwidth=float(meta["bandwidth"]),
        accuracy=meta.get("accuracy"),
        calibrator=calibrator,
        labelled_rows=int(meta.get("labelled_rows", 0)),
        reference_id=str(meta.get("reference_id", "")),
    )


def load_references(reference_dir: Path) -> dict[str, Reference]:
    """Every reference under ``reference_dir``, keyed by model_version (may be empty)."""
    root = Path(reference_dir)
    if not root.is_dir():
        return {}
    refs: dict[str, Reference] = {}
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not (child / "reference.json").exists():
            continue
        ref = load_reference(child)
        refs[ref.model_version] = ref
    return refs
