"""Training data for one retrain: recent labelled production rows plus a class-balanced replay
buffer of the source data, split into train / validation / gate slices by time and by input
content (retrain.split), so that no input the candidate trained on is ever used to judge it.

"Recent" is event time: ``retrain.lookback_seconds`` back from the stream's newest prediction
timestamp, selected on the prediction timestamp (never the wall clock, never the producer's
``labeled_at``), so a replay of months-old logs retrains like live traffic. Given the breach
onset, only rows predicted after it train and judge; below ``min_labelled_rows`` of those, the
job trains the head only and says so.

Inputs come back from ``input_uri`` (relative to ``retrain.input_root``, ``file://`` or absolute
inside it; anything resolving outside is refused) through the model's own transform. When the
inputs were not retained, "features" mode trains the head alone on the logged pooled features.
"""

from __future__ import annotations

import datetime
import io
import re
import urllib.parse
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from monitor.errors import DriftdError
from monitor.ingest.labels import labelled_rows_by_prediction_time, prediction_watermark
from monitor.ingest.records import JoinedLabel
from monitor.ingest.store import connect_readonly
from retrain.batches import Split, TrainingSet
from retrain.config import JobSettings
from retrain.model import build_transform
from retrain.result import DataSummary
from retrain.split import bytes_content, features_content, split_rows

VALIDATION_FRACTION = 0.15   # of the non-gate rows, for early stopping


class DataError(DriftdError):
    """Training inputs cannot be found or read, or an input_uri escapes input_root."""


class NotEnoughData(DriftdError):
    """Fewer labelled rows than ``retrain.min_labelled_rows`` (the job rejects, it does not fail)."""


@dataclass(frozen=True)
class RetrainData:
    training: TrainingSet
    production_gate: Split      # newest production rows, one per input, none trained on: the gate's "new data"
    reference_gate: Split       # held-out source rows, one per input: the gate's forgetting slice
    monitor_rows: Split         # one row per distinct production input, held-out ones first (newest first)
    monitor_heldout: int        # how many of monitor_rows were never trained on
    mode: str                   # "images" | "features"
    labelled_rows: int          # production rows selected (after the onset, when one was given)
    summary: DataSummary        # rows, slices, onset, event-time window: recorded in the result and meta.json

    @property
    def window(self) -> dict[str, Any]:
        """The registry's ``data_window`` for the candidate."""
        return asdict(self.summary)

    @property
    def head_only_reason(self) -> str | None:
        return self.summary.head_only_reason


def stream_clock(conn: Any) -> float | None:
    """The stream's own clock: the engine's persisted watermark, the newest prediction timestamp
    accepted (None before any row; see monitor.ingest.labels.prediction_watermark)."""
    return prediction_watermark(conn)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


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


def _load_images(uris: Sequence[str], input_root: Path, data_config: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """The inputs through the model's transform, and a content key (hash of the file's bytes) each."""
    from PIL import Image, UnidentifiedImageError

    transform = build_transform(data_config)
    tensors, content = [], []
    for uri in uris:
        path = resolve_input(uri, input_root)
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                tensors.append(transform(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"input_uri {uri!r} ({path}): cannot read image: {exc}") from None
        content.append(bytes_content(data))
    c, h, w = data_config["input_size"]
    return (torch.stack(tensors) if tensors else torch.zeros((0, c, h, w))), content


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


def row_groups(uris: Sequence[str | None], keys: Sequence[str], pattern: str, where: str) -> list[str]:
    """The group of each row: the first capture group of ``pattern`` (retrain.group_pattern)
    searched in its input_uri. Raises DataError naming the first row it does not match: a row
    without a group could share an object with a gate row unseen."""
    compiled = re.compile(pattern)
    out = []
    for uri, key in zip(uris, keys):
        found = compiled.search(uri) if uri is not None else None
        if found is None or found.group(1) is None:
            raise DataError(f"{where} row {key}: input_uri {uri!r} does not match retrain.group_pattern {pattern!r}; "
                            "every row needs a group when the pattern is set (fix the pattern or the row's input_uri)")
        out.append(found.group(1))
    return out


def _select(rows: list[JoinedLabel], onset: float | None, *, min_rows: int, window: str
            ) -> tuple[list[JoinedLabel], int, str | None]:
    """(rows to use, rows before the onset, head-only reason). Raises NotEnoughData."""
    if onset is None:
        if len(rows) < min_rows:
            raise NotEnoughData(f"{len(rows)} labelled rows {window}, fewer than retrain.min_labelled_rows ({min_rows})")
        return rows, 0, None
    after = [r for r in rows if r.timestamp >= onset]
    before = len(rows) - len(after)
    if not after:
        raise NotEnoughData(f"0 labelled rows predicted after the breach onset {_iso(onset)} ({before} before it, "
                            f"{window}): nothing of the shifted regime to train or judge on yet")
    head_only = None if len(after) >= min_rows else (
        f"only {len(after)} labelled rows after the breach onset {_iso(onset)}, fewer than "
        f"retrain.min_labelled_rows ({min_rows}): training the head only")
    return after, before, head_only


def load_training_data(config: JobSettings, data_config: dict[str, Any], *, num_classes: int,
                       model_version: str | None = None, onset: float | None = None) -> RetrainData:
    """Everything one retrain trains and gates on.

    ``model_version``: in features mode only rows logged by this version are usable (features
    belong to the backbone that produced them). ``onset``: event time the breach began; only rows
    predicted at or after it are used. Raises NotEnoughData (the job rejects) below
    ``min_labelled_rows`` (without an onset), with no row after the onset, or when no row is left
    to train on; DataError for unreadable/escaping inputs or missing replay logs.
    """
    rc = config.retrain
    if rc.replay_logs is None:
        raise DataError("retrain.replay_logs is not set: without source data the gate cannot measure forgetting")
    if rc.mode == "images" and rc.input_root is None:
        raise DataError("retrain.mode is 'images' but retrain.input_root is not set")
    conn = connect_readonly(config.monitor.state_dir)
    try:
        until = stream_clock(conn)
        rows = ([] if until is None else
                labelled_rows_by_prediction_time(conn, since=until - rc.lookback_seconds, until=until, limit=rc.max_rows))
    finally:
        conn.close()
    since = (until or 0.0) - rc.lookback_seconds
    uris = [r.input_uri for r in rows]
    images = rc.mode == "images" or (rc.mode == "auto" and _inputs_available(uris, rc.input_root))
    if not images and model_version is not None:
        rows = [r for r in rows if r.model_version == model_version]
    window = ("(no prediction in the state store yet)" if until is None else
              f"predicted in the {rc.lookback_seconds / 86400:.3g} days of event time up to {_iso(until)}"
              f"{'' if images else f' by model_version {model_version}'}")
    rows, before, head_only = _select(rows, onset, min_rows=rc.min_labelled_rows, window=window)
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
        x_prod, prod_content = _load_images([str(r.input_uri) for r in rows], rc.input_root, data_config)
        x_ref, ref_content = _load_images([str(u) for u in replay["input_uri"]], rc.input_root, data_config)
    else:
        if "features" not in replay:
            raise DataError(f"{rc.replay_logs}: replay logs have no features column; features mode needs it")
        x_prod = torch.from_numpy(_logged_features(rows))
        x_ref = torch.from_numpy(replay["features"])
        if x_prod.shape[1] != x_ref.shape[1]:
            raise DataError(f"feature width differs: production {x_prod.shape[1]}, replay logs {x_ref.shape[1]}")
        # one grouping over both sides: a replay row can repeat a production input
        content = features_content(np.concatenate([x_prod.numpy(), x_ref.numpy()]))
        prod_content, ref_content = content[: len(x_prod)], content[len(x_prod):]
    y_prod = torch.tensor([r.label for r in rows], dtype=torch.int64)
    y_ref = torch.from_numpy(replay["label"])
    groups = replay_groups = None
    if rc.group_pattern is not None:
        if "input_uri" not in replay:
            raise DataError(f"{rc.replay_logs}: replay logs have no input_uri column; retrain.group_pattern reads it")
        groups = row_groups([r.input_uri for r in rows], [r.request_id for r in rows], rc.group_pattern, "labelled")
        replay_groups = row_groups(list(replay["input_uri"]), list(replay["key"]), rc.group_pattern,
                                   f"{rc.replay_logs}: replay")
    idx = split_rows(times=np.array([r.timestamp for r in rows]), keys=[r.request_id for r in rows],
                     content=prod_content, replay_content=ref_content, gate_fraction=rc.gate.gate_fraction,
                     validation_fraction=VALIDATION_FRACTION, groups=groups, replay_groups=replay_groups)
    prod, ref = Split(x_prod, y_prod), Split(x_ref, y_ref)

    def take(split: Split, index: np.ndarray) -> Split:
        return split.take(torch.from_numpy(index))

    def gate_slice(split: Split, index: np.ndarray, keys: list[str] | None) -> Split:
        # the gate's slices carry their groups: the paired tests count a group's rows as dependent
        part = take(split, index)
        return part if keys is None else Split(part.x, part.y, np.asarray(keys, dtype=object)[index])

    train, replay_train = take(prod, idx.train), take(ref, idx.replay_train)
    if len(train) == 0 or len(replay_train) == 0:
        raise NotEnoughData(
            f"no rows left to train on: {len(train)} production rows (of {len(rows)}; {idx.production_copies_dropped} "
            f"repeat an input{' or share a group' if groups is not None else ''} held out for the gate) and "
            f"{len(replay_train)} replay rows; wait for more labelled rows or add replay data"
            + (" (or make retrain.group_pattern finer)" if groups is not None else ""))
    used = len(idx.train) + len(idx.validation) + len(idx.gate)
    summary = DataSummary(
        since=since, until=until if until is not None else since, rows=len(rows),
        model_versions=sorted({r.model_version for r in rows}), mode="images" if images else "features",
        onset=onset, rows_before_onset=before, rows_after_onset=len(rows), rows_used_before_onset=0,
        rows_used_after_onset=used, train_rows=len(idx.train), validation_rows=len(idx.validation),
        production_gate_rows=len(idx.gate), replay_rows=len(y_ref), replay_train_rows=len(idx.replay_train),
        replay_validation_rows=len(idx.replay_validation), reference_gate_rows=len(idx.replay_gate),
        production_copies_dropped=idx.production_copies_dropped, replay_copies_dropped=idx.replay_copies_dropped,
        gate_copies_merged=idx.gate_copies_merged, head_only_reason=head_only, group_pattern=rc.group_pattern,
        production_gate_groups=None if groups is None else len({groups[i] for i in idx.gate.tolist()}),
        reference_gate_groups=None if replay_groups is None else len({replay_groups[i] for i in idx.replay_gate.tolist()}),
    )
    return RetrainData(
        training=TrainingSet(train, take(prod, idx.validation), replay_train, take(ref, idx.replay_validation),
                             features_only=not images),
        production_gate=gate_slice(prod, idx.gate, groups), reference_gate=gate_slice(ref, idx.replay_gate, replay_groups),
        monitor_rows=take(prod, idx.distinct), monitor_heldout=idx.distinct_heldout, mode=summary.mode,
        labelled_rows=len(rows), summary=summary,
    )
