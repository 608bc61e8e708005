"""Training data for one retrain: recent labelled production rows plus a class-balanced replay
buffer of the source data, split deterministically (hash of request_id) into train / validation /
gate slices.

Inputs come back from ``input_uri`` (relative to ``retrain.input_root``, ``file://`` or absolute
inside it; anything resolving outside is refused) through the model's own transform. When the
inputs were not retained, "features" mode trains the head alone on the logged pooled features.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from monitor.config import Config
from monitor.errors import DriftdError
from monitor.ingest.labels import labelled_rows
from monitor.ingest.records import JoinedLabel
from monitor.ingest.store import connect_readonly
from retrain.batches import Split, TrainingSet
from retrain.model import build_transform

VALIDATION_FRACTION = 0.15   # of the non-gate rows, for early stopping


class DataError(DriftdError):
    """Training inputs cannot be found or read, or an input_uri escapes input_root."""


class NotEnoughData(DriftdError):
    """Fewer labelled rows than ``retrain.min_labelled_rows`` (the job rejects, it does not fail)."""


@dataclass(frozen=True)
class RetrainData:
    training: TrainingSet
    production_gate: Split      # held-out production rows: the gate's "new data" slice
    reference_gate: Split       # held-out source rows: the gate's forgetting slice
    reference_all: Split        # every replay row (inputs for the new version's monitor reference)
    mode: str                   # "images" | "features"
    labelled_rows: int          # production rows used (train + val + gate)
    window: dict[str, Any]      # since / until / rows / model_versions, recorded in meta.json


def hash_fraction(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) for ``key``: the same row lands in the same slice on every run."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def resolve_input(uri: str, input_root: Path) -> Path:
    """The file an ``input_uri`` names, which must lie inside ``input_root``.

    Accepts a path relative to ``input_root``, an absolute path or a ``file://`` URI. Raises
    DataError for other schemes and for anything that resolves (symlinks included) outside.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise DataError(f"input_uri {uri!r}: scheme {parsed.scheme!r} is not supported; use paths under retrain.input_root")
    else:
        path = Path(uri)
    root = input_root.resolve()
    full = (path if path.is_absolute() else root / path).resolve()
    if not full.is_relative_to(root):
        raise DataError(f"input_uri {uri!r} resolves outside retrain.input_root ({root}); refused")
    return full


def _split_keys(keys: Sequence[str], fraction: float, salt: str) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (rest, held_out) with ``held_out`` ~ ``fraction`` of keys by hash."""
    held = np.array([hash_fraction(k, salt) < fraction for k in keys], dtype=bool)
    return ~held, held


def _load_images(uris: Sequence[str], input_root: Path, data_config: dict[str, Any]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    transform = build_transform(data_config)
    tensors = []
    for uri in uris:
        path = resolve_input(uri, input_root)
        try:
            with Image.open(path) as img:
                tensors.append(transform(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"input_uri {uri!r} ({path}): cannot read image: {exc}") from None
    c, h, w = data_config["input_size"]
    return torch.stack(tensors) if tensors else torch.zeros((0, c, h, w))


def _inputs_available(uris: Sequence[str | None], input_root: Path | None) -> bool:
    """True when every row has an input_uri that exists; an escaping uri is refused, not skipped."""
    if input_root is None or not uris or any(u is None for u in uris):
        return False
    return all(resolve_input(u, input_root).is_file() for u in uris)  # type: ignore[arg-type]


def _logged_features(rows: Sequence[JoinedLabel]) -> np.ndarray:
    """Pooled features of joined rows, re-read from their inference files by (source, row)."""
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_source[r.source].append(i)
    out: list[np.ndarray | None] = [None] * len(rows)
    for source, idx in by_source.items():
        try:
            column = pq.read_table(source, columns=["features"]).column("features")
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{source}: cannot re-read features for retraining: {exc}") from None
        take = column.take(pa.array([rows[i].row for i in idx])).to_pylist()
        for i, f in zip(idx, take):
            out[i] = np.asarray(f, dtype=np.float32)
    return np.stack(out) if out else np.zeros((0, 0), np.float32)  # type: ignore[arg-type]


def read_replay(replay_logs: str, *, max_rows: int, num_classes: int, seed: int,
                features_of: str | None = None) -> dict[str, np.ndarray]:
    """A class-balanced sample (<= max_rows) of labelled rows from the replay Parquet logs.

    Returns columns ``key`` (request_id or row position), ``label`` and, where present,
    ``input_uri`` and ``features``. ``features_of``: keep only rows logged by that model_version
    (logged features belong to the backbone that produced them). Raises DataError when the logs
    are unreadable, unlabelled, or hold no rows of ``features_of``.
    """
    try:
        dataset = pads.dataset(replay_logs, format="parquet")
        names = set(dataset.schema.names)
        if "label" not in names:
            raise DataError(f"{replay_logs}: replay logs need a 'label' column (labelled source data)")
        wanted = [c for c in ("request_id", "label", "input_uri", "features") if c in names]
        keep = pads.field("label").is_valid()
        if features_of is not None and "model_version" in names:
            keep = keep & (pads.field("model_version") == features_of)
        table = dataset.to_table(columns=wanted, filter=keep)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{replay_logs}: cannot read replay logs: {exc}") from None
    if features_of is not None and table.num_rows == 0:
        raise DataError(
            f"{replay_logs}: no labelled replay rows logged by model_version {features_of}; features mode needs "
            "replay features from the current backbone: set retrain.input_root (images mode) or add such rows"
        )
    labels = table.column("label").to_numpy().astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{replay_logs}: replay row {int(bad[0])} has label {int(labels[bad[0]])} outside [0, {num_classes})")
    rng = np.random.default_rng(seed)
    per_class = max(1, max_rows // num_classes)
    chosen = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                     for c in range(num_classes)]))
    keys = (table.column("request_id").to_numpy(zero_copy_only=False).astype(str) if "request_id" in names
            else np.array([f"replay-{i}" for i in range(len(labels))]))
    out = {"key": keys[chosen], "label": labels[chosen]}
    if "input_uri" in names:
        out["input_uri"] = table.column("input_uri").to_numpy(zero_copy_only=False)[chosen]
    if "features" in names:
        out["features"] = np.asarray(table.column("features").take(pa.array(chosen)).to_pylist(), dtype=np.float32)
    return out


def _three_way(x: torch.Tensor, y: torch.Tensor, keys: Sequence[str], gate_fraction: float, salt: str
               ) -> tuple[Split, Split, Split]:
    rest, gate = _split_keys(keys, gate_fraction, f"{salt}-gate")
    train, val = _split_keys(keys, VALIDATION_FRACTION, f"{salt}-val")
    split = Split(x, y)
    return (split.take(torch.from_numpy(rest & train)), split.take(torch.from_numpy(rest & val)),
            split.take(torch.from_numpy(gate)))


def load_training_data(config: Config, data_config: dict[str, Any], *, num_classes: int, now: float,
                       model_version: str | None = None) -> RetrainData:
    """Everything one retrain trains and gates on.

    ``model_version``: in features mode only rows logged by this version are usable (features
    belong to the backbone that produced them). Raises NotEnoughData below ``min_labelled_rows``,
    DataError for unreadable/escaping inputs or missing replay logs.
    """
    rc = config.retrain
    if rc.replay_logs is None:
        raise DataError("retrain.replay_logs is not set: without source data the gate cannot measure forgetting")
    since = now - rc.lookback_seconds
    conn = connect_readonly(config.monitor.state_dir)
    try:
        rows = labelled_rows(conn, since=since, limit=rc.max_rows)
    finally:
        conn.close()
    uris = [r.input_uri for r in rows]
    if rc.mode == "images" and rc.input_root is None:
        raise DataError("retrain.mode is 'images' but retrain.input_root is not set")
    images = rc.mode == "images" or (rc.mode == "auto" and _inputs_available(uris, rc.input_root))
    if not images and model_version is not None:
        rows = [r for r in rows if r.model_version == model_version]
    if len(rows) < rc.min_labelled_rows:
        raise NotEnoughData(
            f"{len(rows)} labelled rows in the last {rc.lookback_seconds / 86400:.3g} days"
            f"{'' if images else f' from model_version {model_version}'}, fewer than "
            f"retrain.min_labelled_rows ({rc.min_labelled_rows})"
        )
    bad = next((r for r in rows if not 0 <= r.label < num_classes), None)
    if bad is not None:
        raise DataError(f"labelled row {bad.request_id}: label {bad.label} outside the model's [0, {num_classes})")
    replay = read_replay(rc.replay_logs, max_rows=rc.max_rows, num_classes=num_classes, seed=rc.hyper.seed,
                         features_of=None if images else model_version)
    if images and rc.input_root is not None:
        if "input_uri" not in replay:
            raise DataError(f"{rc.replay_logs}: replay logs have no input_uri column; images mode needs the source inputs")
        missing = next((r for r in rows if r.input_uri is None), None)
        if missing is not None:
            raise DataError(f"labelled row {missing.request_id} has no input_uri; use retrain.mode 'features' or 'auto'")
        x_prod = _load_images([str(r.input_uri) for r in rows], rc.input_root, data_config)
        x_ref = _load_images([str(u) for u in replay["input_uri"]], rc.input_root, data_config)
    else:
        if "features" not in replay:
            raise DataError(f"{rc.replay_logs}: replay logs have no features column; features mode needs it")
        x_prod = torch.from_numpy(_logged_features(rows))
        x_ref = torch.from_numpy(replay["features"])
        if x_prod.shape[1] != x_ref.shape[1]:
            raise DataError(f"feature width differs: production {x_prod.shape[1]}, replay logs {x_ref.shape[1]}")
    y_prod = torch.tensor([r.label for r in rows], dtype=torch.int64)
    y_ref = torch.from_numpy(replay["label"])
    gate_fraction = rc.gate.gate_fraction
    train, val, prod_gate = _three_way(x_prod, y_prod, [r.request_id for r in rows], gate_fraction, "prod")
    replay_train, replay_val, ref_gate = _three_way(x_ref, y_ref, list(replay["key"]), gate_fraction, "replay")
    if min(len(train), len(prod_gate), len(replay_train), len(ref_gate)) == 0:
        raise DataError(
            f"too few rows to split (train {len(train)}, production gate {len(prod_gate)}, replay {len(replay_train)}, "
            f"reference gate {len(ref_gate)}); raise min_labelled_rows or add replay data"
        )
    window = {"since": since, "until": now, "rows": len(rows),
              "first_labeled_at": min(r.labeled_at for r in rows), "last_labeled_at": max(r.labeled_at for r in rows),
              "model_versions": sorted({r.model_version for r in rows}), "replay_rows": len(y_ref)}
    return RetrainData(
        training=TrainingSet(train, val, replay_train, replay_val, features_only=not images),
        production_gate=prod_gate, reference_gate=ref_gate, reference_all=Split(x_ref, y_ref),
        mode="images" if images else "features", labelled_rows=len(rows), window=window,
    )
