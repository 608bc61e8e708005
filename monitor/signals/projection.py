"""Linear projections that shrink backbone features before kernel tests (MMD, online MMD).

A projection is fitted once on the reference and stored inside it as plain arrays (npz, no
pickle), so every window is projected exactly as the reference was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PROJECTION_KINDS: tuple[str, ...] = ("pca", "random", "none")


def check_matrix(x: np.ndarray, name: str, *, min_rows: int = 1, dims: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (rows, dims) array, or raise ValueError.

    The message names ``name`` and, for non-finite values, the first offending row and column.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (rows, features), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected numeric values, got dtype {arr.dtype}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {arr.shape[0]}")
    if dims is not None and arr.shape[1] != dims:
        raise ValueError(f"{name}: expected {dims} feature columns (as the reference), got {arr.shape[1]}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # A NaN or inf anywhere makes the sum non-finite (a finite sum proves every value finite);
    # only then pay for the element-wise mask to name the first one. Huge finite values can
    # overflow the float32 sum: the mask then finds nothing and the array passes.
    if np.isfinite(arr.sum()):
        return arr
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{name}: non-finite value {arr[row, col]} at row {row}, column {col} "
            f"({int(bad.sum())} in all); drop or repair those rows before testing"
        )
    return arr


@dataclass(frozen=True, eq=False)
class Projection:
    """``apply(x) = (x - mean) @ matrix`` (float32), or the identity when ``kind == "none"``.

    ``kind`` is what was asked for; ``identity`` is true when no projection is applied (kind
    "none", or dims >= input dims, which ``note`` then explains).
    """

    kind: str
    input_dims: int
    mean: np.ndarray      # (input_dims,) float32; zeros for "random"; empty for identity
    matrix: np.ndarray    # (input_dims, output_dims) float32; empty for identity
    note: str = ""

    @property
    def identity(self) -> bool:
        return self.matrix.size == 0

    @property
    def output_dims(self) -> int:
        return self.input_dims if self.identity else int(self.matrix.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Project (rows, input_dims) -> (rows, output_dims) float32; raises ValueError on bad input."""
        arr = check_matrix(x, "features", dims=self.input_dims)
        if self.identity:
            return arr
        # x @ M - mean @ M: no centred copy of the batch (a full pass over it, and most of this
        # call's time); float32 keeps ~1e-7 x |x| / sd relative error, harmless for the tests.
        out = arr @ self.matrix
        if self.mean.any():
            out -= self.mean @ self.matrix
        return out.astype(np.float32, copy=False)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (strings as numpy unicode scalars) for ``np.savez``; no pickle needed."""
        return {
            "kind": np.array(self.kind),
            "input_dims": np.array(self.input_dims, dtype=np.int64),
            "mean": self.mean,
            "matrix": self.matrix,
            "note": np.array(self.note),
        }

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> Projection:
        """Inverse of :meth:`to_arrays`; raises ValueError naming a missing or inconsistent key."""
        missing = [k for k in ("kind", "input_dims", "mean", "matrix", "note") if k not in d]
        if missing:
            raise ValueError(f"projection arrays: missing key(s) {missing}; rebuild the reference")
        kind = str(np.asarray(d["kind"]).item())
        if kind not in PROJECTION_KINDS:
            raise ValueError(f"projection arrays: kind must be one of {PROJECTION_KINDS}, got {kind!r}")
        input_dims = int(np.asarray(d["input_dims"]).item())
        mean = np.asarray(d["mean"], dtype=np.float32)
        matrix = np.asarray(d["matrix"], dtype=np.float32)
        if matrix.size and (matrix.ndim != 2 or matrix.shape[0] != input_dims or mean.shape != (input_dims,)):
            raise ValueError(
                f"projection arrays: matrix {matrix.shape} / mean {mean.shape} do not match "
                f"input_dims {input_dims}; rebuild the reference"
            )
        return cls(kind=kind, input_dims=input_dims, mean=mean, matrix=matrix, note=str(np.asarray(d["note"]).item()))


def _identity(kind: str, input_dims: int, note: str) -> Projection:
    empty = np.zeros((0,), dtype=np.float32)
    return Projection(kind, input_dims, empty, np.zeros((0, 0), dtype=np.float32), note)


def fit_projection(x_ref: np.ndarray, kind: str, dims: int, seed: int) -> Projection:
    """Fit a projection of the reference features to ``dims`` dimensions.

    kind "pca": top principal axes (SVD of the centred reference); "random": Gaussian
    Johnson-Lindenstrauss matrix scaled by 1/sqrt(dims) (pairwise distances kept in expectation);
    "none": identity. ``dims >= input dims`` gives the identity with a note. Raises ValueError on
    a bad kind, dims < 1, bad x_ref, or PCA with fewer reference rows than dims.
    """
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"projection kind must be one of {PROJECTION_KINDS}, got {kind!r}")
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or dims < 1:
        raise ValueError(f"projection dims must be an integer >= 1, got {dims!r}")
    x = check_matrix(x_ref, "reference features", min_rows=2)
    d = x.shape[1]
    if kind == "none":
        return _identity(kind, d, "")
    if dims >= d:
        return _identity(kind, d, f"{kind} projection to {dims} dims skipped: features have only {d} dims")
    if kind == "random":
        rng = np.random.default_rng(seed)
        matrix = rng.standard_normal((d, dims)) / np.sqrt(dims)
        return Projection(kind, d, np.zeros(d, dtype=np.float32), matrix.astype(np.float32), "")
    if x.shape[0] < dims:
        raise ValueError(
            f"pca projection to {dims} dims needs at least {dims} reference rows, got {x.shape[0]}: "
            "lower projection_dims or use a larger reference"
        )
    x64 = torch.from_numpy(x).to(torch.float64)
    mean = x64.mean(0)
    # Right singular vectors of the centred data are the principal axes, largest variance first.
    # torch's LAPACK (MKL) measured 3x faster here than numpy's for 2000 x 512.
    _, _, vt_t = torch.linalg.svd(x64 - mean, full_matrices=False)
    vt, mean = vt_t.numpy(), mean.numpy()
    # SVD signs are arbitrary; fix them so refits on the same data give the same projection.
    axes = vt[:dims]
    signs = np.sign(axes[np.arange(dims), np.abs(axes).argmax(axis=1)])
    matrix = (axes * signs[:, None]).T
    return Projection(kind, d, mean.astype(np.float32), np.ascontiguousarray(matrix, dtype=np.float32), "")
