"""The Gaussian kernel k(x, y) = exp(-||x - y||^2 / (2 sigma^2)) and its bandwidth, shared by the
batch test (``monitor.signals.mmd``) and the online detector (``monitor.signals.online_mmd``).

Both detectors' sums must see the same kernel values bit for bit (the online recurrence subtracts
exactly what it added, and the large-reference paths reproduce the dense ones), so every way of
computing the kernel lives here: whole blocks (:func:`gaussian_kernel`), row sums without the
m x m matrix (:func:`kernel_row_sums`) and the online detector's (blocks, W, 2W) tiles
(:func:`block_tiles`), with the block-size constants that bound their memory.
"""

from __future__ import annotations

import numpy as np
import torch

from monitor.signals.projection import check_matrix

# Reference rows up to which K_rr is kept whole (64 MB of float32 at 4096): a plan draw's S x S
# sums are then one product with it (B m^2), much cheaper than kernels from the rows (B |S|^2 d).
DENSE_KERNEL_ROWS = 4096
# Kernel entries per block of a window's pooled block, summed in row chunks when larger (16M:
# 64 MB of float32; the benchmark sizes, up to 4000 x 2000, stay one product).
BLOCK_ENTRIES = 1 << 24
# Kernel entries per block of K_rr's row sums in a large reference's build (4 MB: measured
# fastest of 2^18..2^24, cache-sized blocks).
ROW_SUM_BLOCK_ENTRIES = 1 << 20


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gaussian_kernel(
    a: torch.Tensor,
    b: torch.Tensor,
    sigma: float,
    *,
    same: bool = False,
    sq_a: torch.Tensor | None = None,
    sq_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """k(a_i, b_j) = exp(-||a_i - b_j||^2 / (2 sigma^2)) as an (len(a), len(b)) float32 tensor.

    ``same=True`` (a is b) sets the diagonal to exactly 1, which the unbiased estimator relies on.
    ``sq_a``/``sq_b``: precomputed squared row norms (e.g. of a fixed reference), saving a pass.
    """
    if sq_a is None:
        sq_a = (a * a).sum(1)
    if sq_b is None:
        sq_b = sq_a if same else (b * b).sum(1)
    # The same arithmetic as the online detector's band tiles (block_tiles), so both give a
    # pair the same bits: its recurrence subtracts exactly what it added.
    d2 = torch.addmm(sq_a[:, None] + sq_b[None, :], a, b.T, alpha=-2.0)
    d2.clamp_(min=0.0).mul_(-0.5 / (sigma * sigma)).exp_()
    if same:
        d2.fill_diagonal_(1.0)
    return d2


def kernel_row_sums(
    x: torch.Tensor, sigma: float, *, sq: torch.Tensor | None = None, block_entries: int = ROW_SUM_BLOCK_ENTRIES
) -> torch.Tensor:
    """float64 row sums of the Gaussian kernel of ``x`` (m, d) with itself, unit diagonal, without
    the m x m matrix: row blocks of the upper triangle (each block's row sums go to its rows,
    its column sums right of the diagonal block to those columns), ~block_entries floats at a time
    in one reused buffer (fresh block-sized tensors cost more in page faults than the kernel
    arithmetic), and half the kernel evaluations of the full square."""
    m = int(x.shape[0])
    if sq is None:
        sq = (x * x).sum(1)
    g = 0.5 / (sigma * sigma)
    half = sq * g  # ||x||^2 / (2 sigma^2): the exponent is 2g a.b - half_a - half_b
    # Blocks are summed in float32 after subtracting c0, the kernel's mean over a few rows, so
    # the float32 partial sums stay small (raw float32 sums measured 2.5x the error of float64
    # ones; centred, they match them), and c0 is added back in float64.
    head = x[:512]
    c0 = float(np.float32(float(gaussian_kernel(head, head, sigma, same=True).mean(dtype=torch.float64))))
    out = torch.full((m,), float(m) * c0, dtype=torch.float64, device=x.device)
    step = max(1, block_entries // m)
    buffer = torch.empty(min(step, m) * m, dtype=x.dtype, device=x.device)
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        k = buffer[: (hi - lo) * (m - lo)].view(hi - lo, m - lo)
        torch.addmm(half[lo:hi, None], x[lo:hi], x[lo:].T, beta=-1.0, alpha=2.0 * g, out=k)
        k.sub_(half[None, lo:]).clamp_(max=0.0).exp_()
        k.fill_diagonal_(1.0)  # the block starts at column lo: its diagonal is (i, i)
        k.sub_(c0)
        out[lo:hi] += k.sum(1).to(torch.float64)
        if hi < m:
            out[hi:] += k[:, hi - lo:].sum(0).to(torch.float64)
    return out


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


def block_tiles(rows: torch.Tensor, cols: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian kernel (blocks, W, 2W) float32 between each block of W rows (blocks, W, d) and its
    2W columns (blocks, 2W, d). Every kernel value the every-row path uses comes from a product
    of this one shape, so a pair's value does not depend on where its block starts: the
    recurrence subtracts exactly the numbers it added earlier, in any batching."""
    sq_rows, sq_cols = (rows * rows).sum(-1), (cols * cols).sum(-1)
    d2 = torch.baddbmm(sq_rows[:, :, None] + sq_cols[:, None, :], rows, cols.transpose(1, 2), alpha=-2.0)
    return d2.clamp_(min=0.0).mul_(-0.5 / (sigma * sigma)).exp_()
