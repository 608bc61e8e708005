"""Does a row look like the reference rows the model gave the same class? (class-conditional kNN)

The score of a row is the cosine similarity to its k-th nearest reference row among those with
the same predicted class (deep nearest neighbours, Sun et al., ICML 2022), computed on unit
feature vectors after a fixed Gaussian random projection to 64 dimensions (measured on the
bench's MobileNetV2 features: as separating as the full 1280; a PCA of the reference to 64 or
fewer dimensions was not, because corruptions move features out of the reference's principal
subspace). A row is typical when its score reaches the 5% quantile of the reference rows' own
leave-one-out scores, so about 95% of undrifted rows are typical whatever the prior.

The COTT estimator uses the share of typical rows to tell a label shift (rows still look like
their class) from a covariate shift that makes the model predict a class (they do not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIMS = 64
NEIGHBOURS = 5
QUANTILE = 0.05
_CHUNK = 1024  # query rows per similarity block: 1024 x bank rows of one class in float32


@dataclass(frozen=True, eq=False)
class TypicalityBank:
    projection: np.ndarray   # float32[D, DIMS], fixed Gaussian
    bank: np.ndarray         # float32[m, DIMS], unit rows (projected reference sample)
    bank_class: np.ndarray   # int64[m], the model's predicted class of each bank row
    threshold: float         # similarity below which a row is atypical
    class_rate: np.ndarray   # float64[C]: share of reference rows predicted c that are typical
    neighbours: int = NEIGHBOURS

    def _embed(self, features: np.ndarray) -> np.ndarray:
        return _embed(features, self.projection)

    def scores(self, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """Similarity of each row to its k-th nearest bank row of its predicted class (-1: none)."""
        z = self._embed(features)
        out = np.full(z.shape[0], -1.0, dtype=np.float32)
        for c in np.unique(predicted):
            rows = np.nonzero(predicted == c)[0]
            bank = self.bank[self.bank_class == c]
            if bank.shape[0] == 0:
                continue  # the reference never predicted this class: nothing looks like it
            k = min(self.neighbours, bank.shape[0])
            for lo in range(0, rows.size, _CHUNK):
                part = rows[lo:lo + _CHUNK]
                sims = z[part] @ bank.T
                out[part] = np.partition(sims, bank.shape[0] - k, axis=1)[:, bank.shape[0] - k]
        return out

    def typical(self, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        return self.scores(features, predicted) >= self.threshold

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"projection": self.projection, "bank": self.bank, "bank_class": self.bank_class,
                "threshold": np.float64(self.threshold), "class_rate": self.class_rate,
                "neighbours": np.int64(self.neighbours)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TypicalityBank":
        return cls(projection=arrays["projection"], bank=arrays["bank"], bank_class=arrays["bank_class"],
                   threshold=float(arrays["threshold"]), class_rate=arrays["class_rate"],
                   neighbours=int(arrays["neighbours"]))


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _embed(features: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """unit(unit(x) @ P), computed as unit(x @ P): scaling a row before the projection only
    scales its image, which the second normalisation removes (one pass over x fewer)."""
    return _unit(np.asarray(features, dtype=np.float32) @ projection)


def fit_typicality(
    sample: np.ndarray, predicted: np.ndarray, *, n_classes: int, seed: int, dims: int = DIMS,
    neighbours: int = NEIGHBOURS, quantile: float = QUANTILE,
) -> TypicalityBank | None:
    """A bank from the reference sample; None when no class has two rows to calibrate with.

    Besides the threshold it keeps each class's typical rate (rows are not equally typical in
    every class), shrunk toward 1 - quantile by 5 pseudo-rows so a class with few bank rows
    does not swing it."""
    x = np.asarray(sample, dtype=np.float32)
    pred = np.asarray(predicted, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x7E1])
    projection = (rng.standard_normal((x.shape[1], dims)) / np.sqrt(dims)).astype(np.float32)
    bank = _embed(x, projection)
    loo: list[np.ndarray] = []
    loo_class: list[np.ndarray] = []
    for c in np.unique(pred):
        members = bank[pred == c]
        m = members.shape[0]
        if m < 2:
            continue
        k = min(neighbours, m - 1)
        for lo in range(0, m, _CHUNK):
            sims = members[lo:lo + _CHUNK] @ members.T
            sims[np.arange(sims.shape[0]), lo + np.arange(sims.shape[0])] = -np.inf  # leave the row out
            loo.append(np.partition(sims, m - k, axis=1)[:, m - k])
            loo_class.append(np.full(sims.shape[0], c))
    if not loo:
        return None
    scores, classes = np.concatenate(loo), np.concatenate(loo_class)
    threshold = float(np.quantile(scores, quantile))
    typical = np.bincount(classes, weights=(scores >= threshold).astype(np.float64), minlength=n_classes)
    rows = np.bincount(classes, minlength=n_classes)
    prior_rows = 5.0
    class_rate = (typical + prior_rows * (1.0 - quantile)) / (rows + prior_rows)
    return TypicalityBank(projection=projection, bank=bank, bank_class=pred, threshold=threshold,
                          class_rate=class_rate, neighbours=neighbours)
