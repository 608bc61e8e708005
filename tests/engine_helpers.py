"""Synthetic but realistic logs for engine/CLI tests: a small linear "model" over Gaussian features.

Features of class c are drawn around a class centre; the model's probabilities are a softmax
over distances to the centres, so shifting the features moves entropy, confidence, MMD and,
with a large enough shift, accuracy — as a real backbone shift would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

D = 16
C = 4


@dataclass
class Rows:
    request_id: np.ndarray
    timestamp: np.ndarray      # epoch seconds
    model_version: np.ndarray
    features: np.ndarray
    probs: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.request_id)

    def slice(self, lo: int, hi: int) -> "Rows":
        return Rows(*(getattr(self, f)[lo:hi] for f in self.__dataclass_fields__))


def centres(seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=1.2, size=(C, D))


def make_rows(
    n: int,
    *,
    seed: int,
    shift: float = 0.0,
    version: str = "v1",
    start: float = 1_790_000_000.0,
    step: float = 1.0,
    prefix: str = "r",
    noise: float = 1.0,
) -> Rows:
    """``shift`` moves half the dimensions (drift the model mostly shrugs off); ``noise`` > 1
    blurs the classes together (a harmful shift: accuracy and confidence fall)."""
    rng = np.random.default_rng(seed)
    mu = centres()
    label = rng.integers(0, C, size=n)
    features = mu[label] + noise * rng.normal(size=(n, D))
    features[:, : D // 2] += shift
    logits = -0.5 * ((features[:, None, :] - mu[None]) ** 2).sum(-1)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return Rows(
        request_id=np.array([f"{prefix}{seed}-{i}" for i in range(n)], dtype=object),
        timestamp=start + step * np.arange(n),
        model_version=np.full(n, version, dtype=object),
        features=features.astype(np.float32),
        probs=probs.astype(np.float32),
        label=label.astype(np.int64),
    )


def _fixed_list(values: np.ndarray) -> pa.Array:
    flat = pa.array(values.reshape(-1).astype(np.float32), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def inference_table(rows: Rows, *, with_label: bool = False) -> pa.Table:
    cols = {
        "request_id": pa.array(rows.request_id.tolist(), type=pa.string()),
        "timestamp": pa.array((rows.timestamp * 1000).astype("int64"), type=pa.timestamp("ms", tz="UTC")),
        "model_version": pa.array(rows.model_version.tolist(), type=pa.string()),
        "features": _fixed_list(rows.features),
        "probs": _fixed_list(rows.probs),
        "prediction": pa.array(rows.probs.argmax(1).astype(np.int64)),
        "input_uri": pa.array([f"img/{r}.png" for r in rows.request_id], type=pa.string()),
    }
    if with_label:
        cols["label"] = pa.array(rows.label)
    return pa.table(cols)


def write_inference(directory: Path, rows: Rows, *, per_file: int, name: str = "part", with_label: bool = False,
                    row_group_size: int | None = None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, lo in enumerate(range(0, len(rows), per_file)):
        path = directory / f"{name}-{k:05d}.parquet"
        pq.write_table(inference_table(rows.slice(lo, lo + per_file), with_label=with_label), path,
                       row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_labels(directory: Path, rows: Rows, *, delay: float = 60.0, name: str = "labels") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.parquet"
    table = pa.table(
        {
            "request_id": pa.array(rows.request_id.tolist(), type=pa.string()),
            "label": pa.array(rows.label),
            "labeled_at": pa.array(((rows.timestamp + delay) * 1000).astype("int64"), type=pa.timestamp("ms", tz="UTC")),
        }
    )
    pq.write_table(table, path)
    return path


def build_reference(tmp: Path, *, n: int = 3000, seed: int = 1, version: str = "v1", projection: str = "pca",
                    dims: int = 8) -> Path:
    """Validation logs with labels -> a reference directory, through the real builder."""
    from monitor.engine.reference import build_reference as build, save_reference

    rows = make_rows(n, seed=seed, version=version, prefix="val")
    ref = build(model_version=version, features=rows.features, probs=rows.probs, labels=rows.label,
                projection=projection, projection_dims=dims, source="validation")
    out = tmp / "reference"
    save_reference(ref, out)
    return out


def config_doc(tmp: Path, ref_dir: Path, **overrides) -> dict:
    # driftd refuses to start on a log directory that does not exist (a typo would read as empty)
    for name in ("logs", "labels"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    doc = {
        "model": "test-model",
        "logs": {"inference": str(tmp / "logs"), "labels": str(tmp / "labels")},
        "state_dir": str(tmp / "state"),
        "reference_dir": str(ref_dir),
        "ingest": {"settle_seconds": 0.0},
        "window": {"rows": 200, "seconds": 10_000.0, "min_rows": 20},
        "signals": {
            "mmd": {"permutations": 100, "max_window_rows": 200, "max_reference_rows": 500, "projection_dims": 8},
            "online_mmd": {"window_rows": 20, "stride_rows": 5, "ert_rows": 1000.0, "bootstraps": 600, "max_reference_rows": 300},
            "accuracy": {"last_n": 500, "last_seconds": 3600.0},
        },
    }
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return doc
