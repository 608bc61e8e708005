"""The kernel band behind the online detector's stride-1 update: the window's off-diagonal kernel
sum S follows row by row from the band |i - j| < W of the row sequence (window then batch),

    S_p = S_{p-1} + 2 B_p - 2 A_p,

B_p the new row's kernel sum against the W - 1 rows that stay, A_p the leaving row's against the
same rows: ~2 W d work per row instead of the (W + s)^2 d of a full segment kernel.

Kept apart from the detector (``monitor.signals.online_mmd``, which holds the stream state and
walks the rows) because this is pure tensor algebra: band tiles, sums read off the band, and the
tables that replace the first W increments after a restart. Every kernel value comes from
``monitor.signals.kernels.block_tiles``, so the recurrence subtracts exactly what it added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from monitor.signals.kernels import block_tiles


def column_sums(k: torch.Tensor) -> np.ndarray:
    """float64 column sums of a float32 matrix. On CPU numpy's (row after row into a float64
    accumulator) took ~1.2 ms for 1801 x 1000 where torch's sum(0, dtype=float64) took 4-11 ms."""
    if k.device.type == "cpu":
        return k.numpy().sum(0, dtype=np.float64)
    return k.sum(0, dtype=torch.float64).cpu().numpy()


def kernel_band(u: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """band[j, k - 1] = k(u_j, u_{j-k}) for k = 1..W-1: the kernel of each row of ``u`` (L, d)
    against the W - 1 rows before it, as an (R, W - 1) float32 contiguous tensor, R >= L.

    Entries with j - k < 0 and rows j >= L are undefined; callers never read them. Rows go in
    blocks of W, each against the block before (zeros before the first) and itself: ~2 W d per row.
    """
    length, dims = u.shape
    blocks = -(-length // window)
    padded = torch.empty(((blocks + 1) * window, dims), dtype=u.dtype, device=u.device)
    padded[:window] = 0.0
    padded[window:window + length] = u
    padded[window + length:] = 0.0
    # Block c's columns are blocks c-1 and c: overlapping views of the padded rows, no copy.
    cols = padded.as_strided((blocks, 2 * window, dims), (window * dims, dims, 1))
    k = block_tiles(padded[window:].view(blocks, window, dims), cols, sigma)
    # Row i of a block sits at column W + i of its tile; its k-th predecessor at W + i - k.
    at = torch.arange(window, device=u.device)
    column = (window + at[:, None] - at[None, 1:]).expand(blocks, window, window - 1)
    return k.gather(2, column).reshape(blocks * window, window - 1)


def kernel_vs(rows: torch.Tensor, fixed: torch.Tensor, sigma: float) -> torch.Tensor:
    """k(rows_n, fixed_j) as (len(rows), W) float32, ``fixed`` (W, d): ``fixed`` against each
    block of 2W rows, the band's product shape (see block_tiles), transposed."""
    window, dims = fixed.shape
    blocks = -(-len(rows) // (2 * window))
    padded = torch.empty((blocks * 2 * window, dims), dtype=rows.dtype, device=rows.device)
    padded[:len(rows)] = rows
    padded[len(rows):] = 0.0
    k = block_tiles(fixed.expand(blocks, window, dims), padded.view(blocks, 2 * window, dims), sigma)
    return k.transpose(1, 2).reshape(blocks * 2 * window, window)[:len(rows)]


def leaving_sums(band: torch.Tensor, window: int, rows: int) -> torch.Tensor:
    """float64 (rows,): A_i = sum_k band[i + k, k - 1], row i's kernel sum against the W - 1 rows
    after it (needs band rows up to rows + W - 2)."""
    return band.as_strided((rows, window - 1), (window - 1, window), window - 1).sum(1, dtype=torch.float64)


def band_increments(band: torch.Tensor, window: int, rows: int) -> torch.Tensor:
    """float64 (rows,): 2 (B_i - A_i), the change of the window's off-diagonal kernel sum as row
    W + i of the banded sequence enters and row i leaves (both against rows i+1..i+W-1)."""
    entering = band[window:window + rows].sum(1, dtype=torch.float64)
    return 2.0 * (entering - leaving_sums(band, window, rows))


def window_offdiag(band: torch.Tensor, start: int, window: int) -> float:
    """Off-diagonal kernel sum of the window u[start : start + W] read off its sequence's band:
    row start + 1 + o meets its o + 1 predecessors inside the window."""
    return 2.0 * float(torch.tril(band[start + 1:start + window], 0).sum(dtype=torch.float64))


@dataclass(frozen=True)
class RestartTables:
    """float64 running sums over one chunk that give, in O(W) numpy work per restart, the S
    increments of the first h <= W rows after a restart at chunk row p (u = window then chunk):
    new row n meets initial rows n+1.. and its n predecessors since the restart; the leaving
    initial row n meets initial rows n+1.. (not included here) and the new rows before n."""

    first: int              # chunk row of vs[0]
    since: np.ndarray       # (m, W-1): [i, n-1] = sum of k(chunk row i, its n predecessors)
    after: np.ndarray       # (r, W): [r, n] = sum_{j > n} k(chunk row first + r, initial row j)
    before: np.ndarray      # (r + 1, W): [r, j] = sum_{r' < r} k(chunk row first + r', initial row j)

    @classmethod
    def build(cls, band: torch.Tensor, vs: torch.Tensor, first: int) -> RestartTables:
        """``band`` of u (see kernel_band), ``vs`` (r, W) kernel of chunk rows first.. against
        the initial window."""
        w = vs.shape[1]
        since = band[w:w + first + len(vs)].cumsum(1, dtype=torch.float64)
        suffix = vs.flip(1).cumsum(1, dtype=torch.float64).flip(1)
        after = torch.nn.functional.pad(suffix[:, 1:], (0, 1))
        before = torch.nn.functional.pad(vs.cumsum(0, dtype=torch.float64), (0, 0, 1, 0))
        return cls(first, since.cpu().numpy(), after.cpu().numpy(), before.cpu().numpy())

    def increments(self, start: int, head: int) -> np.ndarray:
        """2 (B_n - A_n) for n < head, less the initial rows' own share of A (the caller's)."""
        n, r = np.arange(head), start - self.first
        since = np.where(n > 0, self.since[start + n, np.maximum(n - 1, 0)], 0.0)
        leaving = self.before[r + n, n] - self.before[r, n]
        return 2.0 * (since + self.after[r + n, n] - leaving)
