"""Shared pieces for the retrain tests: a real digits source model, shifted production data,
and a complete on-disk world (images, Parquet logs, SQLite labelled rows, registry, config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import timm
import torch
import yaml

from monitor.ingest.config import IngestConfig
from monitor.ingest.labels import LabelJoiner
from monitor.ingest.records import InferenceBatch, LabelBatch
from monitor.ingest.store import WATERMARK, StateStore
from monitor.ingest.writer import LabelWriter, LogWriter
from retrain.batches import Split, TrainingSet
from retrain.config import GateConfig, HyperConfig
from retrain.digits import corrupt, load_digits_images, train_digits_model, write_images
from retrain.model import images_to_tensor, predict
from retrain.model_import import import_safetensors
from retrain.registry import Registry

SIZE = 16
SHIFT = ("contrast", 0.6)   # a real input-level shift that the source model fails on
NOW = 1_800_000_000.0
# The digits worlds hold ~150-210 held-out replay rows; a forgetting test at the default margin
# (0.01) needs 268 distinct rows even for an unchanged model, so the test worlds judge at 0.05.
TEST_GATE = {"max_forgetting": 0.05}
TEST_GATE_CONFIG = GateConfig(**TEST_GATE)
FAST_HYPER = HyperConfig(epochs_head=6, epochs_finetune=5, batch_size=32, lr_backbone=2e-3, patience=2)


@dataclass(frozen=True)
class Digits:
    """Disjoint index sets into the digits: ``source`` trains the source model, ``replay`` and
    ``production`` are the retrain's old and new data."""

    images: np.ndarray
    labels: np.ndarray
    source: np.ndarray
    replay: np.ndarray
    production: np.ndarray


def digits(n_source: int = 500, n_replay: int = 700, n_production: int = 597) -> Digits:
    images, labels = load_digits_images(SIZE)
    order = np.random.default_rng(0).permutation(len(images))
    a, b = n_source, n_source + n_replay
    return Digits(images, labels, order[:a], order[a:b], order[b : b + n_production])


def source_checkpoint(cache_dir: Path, d: Digits, epochs: int = 10) -> Path:
    """A test_resnet trained on clean digits, saved once per session (training costs seconds)."""
    path = cache_dir / f"digits-source-{epochs}.safetensors"
    if not path.exists():
        import safetensors.torch

        torch.set_num_threads(1)
        model, _ = train_digits_model(d.images[d.source], d.labels[d.source], epochs=epochs, seed=0)
        safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def load_source(checkpoint: Path) -> torch.nn.Module:
    import safetensors.torch

    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict(safetensors.torch.load_file(str(checkpoint)))
    return model.eval()


def tensors(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    from retrain.model import resolve_data_config

    return images_to_tensor(images, resolve_data_config(model, SIZE))


def in_memory_data(model: torch.nn.Module, d: Digits) -> tuple[TrainingSet, Split, Split]:
    """(training set, production gate slice, reference gate slice) built straight from tensors."""
    shifted = tensors(model, corrupt(d.images[d.production], *SHIFT, seed=1))
    clean = tensors(model, d.images[d.replay])
    yp, yr = torch.as_tensor(d.labels[d.production]), torch.as_tensor(d.labels[d.replay])
    np_, nr = len(yp), len(yr)
    p = [int(np_ * 0.55), int(np_ * 0.7)]
    r = [int(nr * 0.55), int(nr * 0.7)]
    training = TrainingSet(Split(shifted[: p[0]], yp[: p[0]]), Split(shifted[p[0] : p[1]], yp[p[0] : p[1]]),
                           Split(clean[: r[0]], yr[: r[0]]), Split(clean[r[0] : r[1]], yr[r[0] : r[1]]))
    return training, Split(shifted[p[1] :], yp[p[1] :]), Split(clean[r[1] :], yr[r[1] :])


@dataclass(frozen=True)
class World:
    root: Path
    config_path: Path
    registry: Registry


def _batch_from_file(path: Path) -> InferenceBatch:
    """The rows of a file LogWriter wrote, in file order (as the tailer would hand them over)."""
    t = pq.read_table(path)
    probs = np.asarray(t.column("probs").to_pylist(), dtype=np.float32)
    return InferenceBatch(
        source=str(path), first_row=0,
        request_id=np.asarray(t.column("request_id").to_pylist(), dtype=object),
        timestamp=np.asarray([x.timestamp() for x in t.column("timestamp").to_pylist()], dtype=np.float64),
        model_version=np.asarray(t.column("model_version").to_pylist(), dtype=object),
        features=np.asarray(t.column("features").to_pylist(), dtype=np.float32), probs=probs,
        prediction=probs.argmax(1).astype(np.int64),
        input_uri=np.asarray(t.column("input_uri").to_pylist(), dtype=object), label=None,
    )


def build_world(root: Path, checkpoint: Path, d: Digits, *, retrain: dict | None = None,
                n_production: int | None = None, rows: np.ndarray | None = None, timestamps: np.ndarray | None = None,
                clean_rows: int = 0, labeled_at: float = NOW - 60.0, join: bool = True) -> World:
    """Images on disk, replay + production Parquet logs, labelled rows in the SQLite state,
    v1 = the source model in the registry, and a config file pointing at all of it.

    ``rows``: the image (index into ``d.images``) of every production row, in log order (default
    ``d.production[:n_production]``); a repeated index is the same input logged again, as its own
    file with identical bytes. ``timestamps``: their prediction times (default 0.1 s apart, an hour
    before NOW). ``clean_rows``: the first rows are served without the shift (the breach onset is
    at row ``clean_rows``). ``labeled_at``: when the producer says the labels were given.
    ``join=False``: write the labels as a label Parquet file for a daemon to join, instead of
    joining them into the state store here."""
    registry = Registry(root / "registry", clock=lambda: NOW)
    import_safetensors(registry, "test_resnet", 10, checkpoint, input_size=SIZE)
    model, _ = registry.load_model()
    prod_idx = d.production[:n_production] if rows is None else np.asarray(rows)
    repeats = len(set(prod_idx.tolist())) < len(prod_idx)
    replay_ids = [f"src-{i}" for i in d.replay]
    prod_ids = [f"prod-{k}-{i}" if repeats else f"prod-{i}" for k, i in enumerate(prod_idx)]
    served = corrupt(d.images[prod_idx], *SHIFT, seed=1)
    served[:clean_rows] = d.images[prod_idx[:clean_rows]]
    times = NOW - 3600 + np.arange(len(prod_ids)) * 0.1 if timestamps is None else np.asarray(timestamps, float)
    replay_uris = [f"source/{n}" for n in write_images(root / "inputs" / "source", d.images[d.replay], replay_ids)]
    prod_uris = [f"production/{n}" for n in write_images(root / "inputs" / "production", served, prod_ids)]

    def log(location: Path, ids: list[str], images: np.ndarray, uris: list[str], labels: np.ndarray | None,
            stamps: np.ndarray) -> None:
        feats, probs = predict(model, tensors(model, images))
        with LogWriter(location, roll_rows=100_000, clock=lambda: NOW) as writer:
            writer.write_batch(ids, stamps, "v1", feats, probs=probs,
                               input_uri=uris, label=None if labels is None else labels.tolist())

    log(root / "replay", replay_ids, d.images[d.replay], replay_uris, d.labels[d.replay],
        NOW - 3600 + np.arange(len(replay_ids)) * 0.1)
    log(root / "inference", prod_ids, served, prod_uris, None, times)
    if not join:
        with LabelWriter(root / "labels", roll_rows=100_000, clock=lambda: NOW) as writer:
            writer.write_batch(prod_ids, d.labels[prod_idx].tolist(), times + 60.0)
        return _world_config(root, registry, retrain)
    store = StateStore.open(root / "state")
    joiner = LabelJoiner(store, IngestConfig())
    for path in sorted((root / "inference").glob("*.parquet")):
        batch = _batch_from_file(path)
        joiner.add_predictions(batch, float(batch.timestamp.max()))
    joiner.add_labels(LabelBatch(source="labels.parquet", request_id=np.asarray(prod_ids, dtype=object),
                                 label=d.labels[prod_idx].astype(np.int64),
                                 labeled_at=np.full(len(prod_ids), labeled_at)), float(times.max()))
    store.set_mark(WATERMARK, float(times.max()))  # as the engine keeps it
    store.commit()
    store.close()
    return _world_config(root, registry, retrain)


def _world_config(root: Path, registry: Registry, retrain: dict | None) -> World:
    hyper = {k: v for k, v in dataclasses.asdict(FAST_HYPER).items() if v is not None}
    retrain = dict(retrain or {})
    gate = {**TEST_GATE, **retrain.pop("gate", {})}
    config = {
        "model": "digits",
        "logs": {"inference": "inference", "labels": "labels"},
        "state_dir": "state",
        "reference_dir": "reference",
        "retrain": {"registry_dir": "registry", "input_root": "inputs", "replay_logs": "replay",
                    "min_labelled_rows": 100, "hyper": hyper, "gate": gate, **retrain},
    }
    config_path = root / "driftd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return World(root, config_path, registry)
