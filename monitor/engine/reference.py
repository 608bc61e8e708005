"""Reference sets: what "normal" looks like for one model_version, built once, loaded by the engine.

A reference holds a capped uniform sample of backbone features (for the MMD tests), exact
per-dimension mean/variance over every row it saw (for activation shifts), the predicted-class
distribution, the projection and kernel bandwidth fixed at build time, and, from labelled rows,
every label-free accuracy estimator fitted (monitor/signals/estimate.py) with the confusion
matrix behind the class-prior estimate.

On disk: ``<reference_dir>/<model_version>/reference.json`` (metadata, format version) and
``arrays.npz`` (numpy arrays only; loaded with ``allow_pickle=False``). Format 2 added the
estimators (``estimate.*``); format 1 references (a CBPE calibrator only) still load, and use
CBPE until rebuilt.
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

from monitor.signals.config import MmdConfig
from monitor.errors import ReferenceMissingError
from monitor.ingest.records import InferenceBatch
from monitor.signals.estimate import Calibrator, EstimatorFit, LabelledRows, WindowEstimator, fit_estimators
from monitor.signals.kernels import median_bandwidth
from monitor.signals.predictions import normalised_entropy
from monitor.signals.projection import Projection, fit_projection
from monitor.signals.transport import top_k
from monitor.signals.typicality import fit_typicality

FORMAT_VERSION = 2
DEFAULT_MAX_ROWS = 2000
# Labelled rows kept (a uniform sample) to fit the estimators on: enough for 0.1% precision on
# accuracy-like parameters, and bounded memory (~200 bytes a row) whatever the logs' size.
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
    estimators: EstimatorFit | None  # the label-free accuracy estimators, when there were labels
    labelled_rows: int
    reference_id: str = ""         # content hash, to tell references apart in state and status

    @property
    def calibrator(self) -> Calibrator | None:
        """CBPE's max-prob -> P(correct) map, when there were labels."""
        return None if self.estimators is None else self.estimators.calibrator

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
        self.sample_class = np.zeros(0, dtype=np.int64)  # the model's predicted class of each sample row
        self.cal_keys = np.zeros(0)
        self.cal: dict[str, np.ndarray] = {}             # labelled rows for the estimators (bottom-k)
        self.confusion: np.ndarray | None = None         # (predicted i, label j) over every labelled row
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
            self.confusion = np.zeros((probs.shape[1], probs.shape[1]), dtype=np.int64)
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
        self.sample_class = np.concatenate([self.sample_class, probs.argmax(axis=1).astype(np.int64)])[keep]

        if label is not None:
            has = label >= 0
            if has.any():
                self._add_labelled(probs[has], prediction[has], label[has])

    def _add_labelled(self, probs: np.ndarray, prediction: np.ndarray, label: np.ndarray) -> None:
        n_classes = self.class_counts.shape[0]
        if label.max() >= n_classes:
            row = int(np.argmax(label >= n_classes))
            raise ValueError(f"label {int(label[row])} is not a class of the {n_classes} probabilities")
        hit = (prediction == label).astype(np.float64)
        self.labelled += label.size
        self.correct += int(hit.sum())
        np.add.at(self.confusion, (np.clip(prediction, 0, n_classes - 1), label), 1)
        top_prob, top_class = top_k(probs, WindowEstimator.top_k(n_classes))
        rows = {
            "confidence": probs.max(axis=1).astype(np.float64),
            "entropy": normalised_entropy(probs),
            "correct": hit,
            "label": label.astype(np.int64),
            "top_prob": top_prob,
            "top_class": top_class,
        }
        all_keys = np.concatenate([self.cal_keys, self.rng.random(label.size)])
        keep = np.argsort(all_keys, kind="stable")[:_MAX_CALIBRATION_ROWS]
        self.cal_keys = all_keys[keep]
        self.cal = {k: (v if k not in self.cal else np.concatenate([self.cal[k], v]))[keep] for k, v in rows.items()}

    def finish(self, *, model_version: str, source: str, projection: str, projection_dims: int, seed: int) -> Reference:
        if self.n < 2 or self.mean is None or self.sample is None or self.class_counts is None:
            raise ValueError(f"model_version {model_version!r}: a reference needs at least 2 rows, got {self.n}")
        proj = fit_projection(self.sample, kind=projection, dims=projection_dims, seed=seed)
        sigma = median_bandwidth(proj.apply(self.sample), seed=seed)
        estimators = None
        if self.labelled >= 2 and self.confusion is not None:
            typicality = fit_typicality(self.sample, self.sample_class, n_classes=self.class_counts.size, seed=seed)
            estimators = fit_estimators(LabelledRows(**self.cal), confusion=self.confusion, typicality=typicality,
                                        seed=seed)
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
            estimators=estimators,
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
    if ref.estimators is not None:
        arrays.update({f"estimate.{k}": v for k, v in ref.estimators.to_arrays().items()})
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
        "estimators": [] if ref.estimators is None else list(ref.estimators.methods()),
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
    estimators = None
    accuracy = meta.get("accuracy")
    # Format 1 kept the CBPE calibrator at the top level; format 2 keeps every estimator under estimate.
    prefix = "estimate." if fmt >= 2 else ""
    if f"{prefix}calibrator.x" in arrays and accuracy is not None:
        fitted = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)} if prefix else {
            k: arrays[k] for k in ("calibrator.x", "calibrator.y")}
        try:
            estimators = EstimatorFit.from_arrays(fitted, accuracy=float(accuracy))
        except KeyError as exc:
            raise ReferenceMissingError(
                f"{path / 'arrays.npz'}: estimator array {prefix}{exc.args[0]} is missing; rebuild the reference"
            ) from None
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
        accuracy=accuracy,
        estimators=estimators,
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
