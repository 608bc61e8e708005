"""Batch two-sample test: unbiased MMD^2 of a window against the reference, Gaussian kernel
k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), with a permutation p-value.

Cost per window: one window x reference kernel block K_rw (m x n) and the window's own block
K_ww (n x n). Everything that depends on the reference alone (K_rr, its row sums, its total) is
computed once by :meth:`MmdReference.build`. A permutation never builds the pooled (m+n)^2
matrix: with W' the permuted window = S (reference rows moved in) u T (window rows staying),

    sum_{W'W'} K = sum_{SS} K_rr + sum_{TT} K_ww + 2 sum_{ST} K_rw

and the R'R' and R'W' sums follow from the pooled row sums and the pooled total. The three
block sums are quadratic forms of 0/1 indicator matrices, done for all permutations at once as
dense products (U @ K_rr) * U etc.; on CPU that measured faster than batched gathers of the
S x S blocks (see bench/README.md).

Kernels are float32; every sum is accumulated in float64. Kernel values are stored minus their
reference mean c (the unbiased MMD^2 is unchanged by a constant shift of k), which keeps the
float32 partial sums of the permutation products small and accurate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from monitor.signals.projection import check_matrix
from monitor.signals.results import MmdResult

# Permutations per batched product; bounds memory at ~chunk x (m + n) floats per product.
_PERMUTATION_CHUNK = 128


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gaussian_kernel(
    a: torch.Tensor, b: torch.Tensor, sigma: float, *, same: bool = False, sq_a: torch.Tensor | None = None
) -> torch.Tensor:
    """k(a_i, b_j) = exp(-||a_i - b_j||^2 / (2 sigma^2)) as an (len(a), len(b)) float32 tensor.

    ``same=True`` (a is b) sets the diagonal to exactly 1, which the unbiased estimator relies on.
    ``sq_a``: precomputed squared row norms of ``a`` (a fixed reference), saving a pass over it.
    """
    if sq_a is None:
        sq_a = (a * a).sum(1)
    sq_b = sq_a if same else (b * b).sum(1)
    d2 = torch.addmm(sq_a[:, None] + sq_b[None, :], a, b.T, alpha=-2.0)
    d2.clamp_(min=0.0).mul_(-0.5 / (sigma * sigma)).exp_()
    if same:
        d2.fill_diagonal_(1.0)
    return d2


def median_bandwidth(x_ref: np.ndarray, *, max_rows: int = 1000, seed: int = 0) -> float:
    """Median heuristic: sigma = median Euclidean distance between distinct reference rows.

    Use with k(x, y) = exp(-||x - y||^2 / (2 sigma^2)). At most ``max_rows`` rows (a seeded
    random subset) are used. Raises ValueError on bad input or when all rows coincide.
    """
    x = check_matrix(x_ref, "reference features", min_rows=2)
    if x.shape[0] > max_rows:
        rows = np.random.default_rng(seed).choice(x.shape[0], size=max_rows, replace=False)
        x = x[np.sort(rows)]
    t = torch.from_numpy(x.astype(np.float64))
    t = t - t.mean(0)
    dist = torch.cdist(t, t)
    iu = torch.triu_indices(len(t), len(t), offset=1)
    sigma = float(dist[iu[0], iu[1]].median())
    if not sigma > 0.0:
        raise ValueError("reference features: all sampled rows are identical, the kernel bandwidth is undefined")
    return sigma


@dataclass(frozen=True, eq=False)
class MmdReference:
    """The reference side of the test, precomputed once.

    ``x_ref`` (m, d) float32 and ``sigma`` are the persisted state (:meth:`to_arrays`); the rest
    (centred reference tensor, shifted K_rr, its float64 row sums and total) is rebuilt on load.
    """

    x_ref: np.ndarray
    sigma: float
    center: torch.Tensor      # (d,) reference mean, subtracted before kernels (less cancellation)
    x: torch.Tensor           # (m, d) centred reference on the compute device
    x_sq: torch.Tensor        # (m,) squared row norms of x
    offset: float             # c = mean of K_rr; stored kernels are k - c
    k_rr: torch.Tensor        # (m, m) float32, k - c
    rr_row_sums: torch.Tensor  # (m,) float64 row sums of k_rr
    rr_total: float           # float64 sum of k_rr

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def dims(self) -> int:
        return int(self.x.shape[1])

    @classmethod
    def build(cls, x_ref: np.ndarray, sigma: float, *, device: torch.device | None = None) -> MmdReference:
        """Precompute the reference kernel. Raises ValueError on bad x_ref (< 2 rows) or sigma <= 0."""
        x_np = check_matrix(x_ref, "reference features", min_rows=2)
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"kernel bandwidth sigma must be finite and > 0, got {sigma!r}")
        dev = device or default_device()
        t = torch.from_numpy(x_np).to(dev)
        center = t.to(torch.float64).mean(0).to(torch.float32)
        x = t - center
        k = gaussian_kernel(x, x, float(sigma), same=True)
        offset = float(k.sum(dtype=torch.float64)) / k.numel()
        k -= offset
        return cls(
            x_ref=x_np,
            sigma=float(sigma),
            center=center,
            x=x,
            x_sq=(x * x).sum(1),
            offset=offset,
            k_rr=k,
            rr_row_sums=k.sum(1, dtype=torch.float64),
            rr_total=float(k.sum(dtype=torch.float64)),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"x_ref": self.x_ref, "sigma": np.array(self.sigma, dtype=np.float64)}

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray], *, device: torch.device | None = None) -> MmdReference:
        """Inverse of :meth:`to_arrays` (recomputes K_rr). Raises ValueError on a missing key."""
        missing = [k for k in ("x_ref", "sigma") if k not in d]
        if missing:
            raise ValueError(f"mmd reference arrays: missing key(s) {missing}; rebuild the reference")
        return cls.build(np.asarray(d["x_ref"]), float(np.asarray(d["sigma"]).item()), device=device)


@dataclass(frozen=True)
class _WindowBlocks:
    """Kernel blocks and float64 sums of one window against the reference (all shifted by -c)."""

    k_rw: torch.Tensor        # (m, n)
    k_ww: torch.Tensor        # (n, n)
    pooled_row_sums: torch.Tensor  # (m + n,) float64: row sums of the pooled kernel
    pooled_total: float


def _window_blocks(ref: MmdReference, y: np.ndarray) -> _WindowBlocks:
    y_np = check_matrix(y, "window features", min_rows=2, dims=ref.dims)
    yt = torch.from_numpy(y_np).to(ref.x.device) - ref.center
    k_rw = gaussian_kernel(ref.x, yt, ref.sigma, sq_a=ref.x_sq).sub_(ref.offset)
    k_ww = gaussian_kernel(yt, yt, ref.sigma, same=True).sub_(ref.offset)
    rw_rows = k_rw.sum(1, dtype=torch.float64)
    rw_cols = k_rw.sum(0, dtype=torch.float64)
    ww_rows = k_ww.sum(1, dtype=torch.float64)
    pooled_row_sums = torch.cat([ref.rr_row_sums + rw_rows, rw_cols + ww_rows])
    pooled_total = ref.rr_total + 2.0 * float(rw_rows.sum()) + float(ww_rows.sum())
    return _WindowBlocks(k_rw, k_ww, pooled_row_sums, pooled_total)


def _mmd2_from_sums(
    ref: MmdReference, blocks: _WindowBlocks, window_row_sums: torch.Tensor, window_block: torch.Tensor
) -> torch.Tensor:
    """Unbiased MMD^2 for window groups W' given sum over W' of pooled row sums (A) and sum_{W'W'} k (Q)."""
    m, n = ref.rows, int(blocks.k_ww.shape[0])
    diag = 1.0 - ref.offset  # every shifted kernel diagonal entry
    a, q = window_row_sums, window_block
    ww = q - n * diag
    rw = a - q
    rr = blocks.pooled_total - 2.0 * a + q - m * diag
    return rr / (m * (m - 1)) + ww / (n * (n - 1)) - 2.0 * rw / (m * n)


def _permuted_mmd2(ref: MmdReference, blocks: _WindowBlocks, window_sets: torch.Tensor) -> torch.Tensor:
    """MMD^2 with the window replaced by each row of ``window_sets`` ((B, n) pooled indices:
    0..m-1 reference rows, m..m+n-1 window rows). Returns (B,) float64."""
    m = ref.rows
    out = []
    for chunk in torch.split(window_sets, _PERMUTATION_CHUNK):
        ind = torch.zeros((len(chunk), m + int(blocks.k_ww.shape[0])), dtype=torch.float32, device=ref.x.device)
        ind.scatter_(1, chunk, 1.0)
        u, v = ind[:, :m], ind[:, m:]
        ss = ((u @ ref.k_rr) * u).sum(1, dtype=torch.float64)
        tt = ((v @ blocks.k_ww) * v).sum(1, dtype=torch.float64)
        st = ((u @ blocks.k_rw) * v).sum(1, dtype=torch.float64)
        a = ind.to(torch.float64) @ blocks.pooled_row_sums
        out.append(_mmd2_from_sums(ref, blocks, a, ss + tt + 2.0 * st))
    return torch.cat(out)


def permuted_mmd2(ref: MmdReference, y: np.ndarray, window_sets: np.ndarray) -> np.ndarray:
    """Internal/testing: MMD^2 for explicit permuted window groups (see :func:`_permuted_mmd2`)."""
    blocks = _window_blocks(ref, y)
    sets = torch.as_tensor(np.asarray(window_sets, dtype=np.int64), device=ref.x.device)
    return _permuted_mmd2(ref, blocks, sets).cpu().numpy()


def mmd_test(
    ref: MmdReference, y: np.ndarray, *, permutations: int, generator: np.random.Generator
) -> MmdResult:
    """Unbiased MMD^2 of window ``y`` (n >= 2 rows, same dims as the reference) against ``ref``
    and its permutation p-value (1 + #{permuted >= observed}) / (1 + permutations), never 0.

    Each permutation is a uniformly random permutation of the pooled m + n rows drawn from
    ``generator``. Raises ValueError on bad ``y`` or permutations < 1.
    """
    if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)) or permutations < 1:
        raise ValueError(f"permutations must be an integer >= 1, got {permutations!r}")
    blocks = _window_blocks(ref, y)
    m, n = ref.rows, int(blocks.k_ww.shape[0])
    observed = float(
        _mmd2_from_sums(
            ref,
            blocks,
            blocks.pooled_row_sums[m:].sum(),
            blocks.k_ww.sum(dtype=torch.float64),
        )
    )
    # The window group of a uniform random permutation is a uniform n-subset of the pooled rows:
    # the n largest of m + n iid uniform keys (half the cost of drawing whole permutations).
    window_sets = generator.random((permutations, m + n)).argpartition(m, axis=1)[:, m:]
    stats = _permuted_mmd2(ref, blocks, torch.from_numpy(np.ascontiguousarray(window_sets)).to(ref.x.device))
    exceed = int((stats >= observed).sum())
    return MmdResult(
        mmd2=observed,
        p_value=(1 + exceed) / (1 + permutations),
        permutations=int(permutations),
        window_rows=n,
        reference_rows=m,
        bandwidth=ref.sigma,
    )
