"""The reference side of the batch MMD test (:class:`MmdReference`): the reference rows and
bandwidth, which are persisted, and what every window's test reuses, rebuilt on load: the centred
rows, K_rr shifted by its mean c, and K_rr's float64 row sums and total.

Kept apart from the test itself (``monitor.signals.mmd``: permutation plans, window sums,
p-value) because it is built once per reference and saved, where the test runs per window. Up to
``dense_kernel_rows`` rows K_rr is kept whole; above, only its row sums, summed in blocks
(``monitor.signals.kernels.kernel_row_sums``), so memory stays linear in the reference rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.signals.kernels import (
    BLOCK_ENTRIES,
    DENSE_KERNEL_ROWS,
    ROW_SUM_BLOCK_ENTRIES,
    default_device,
    gaussian_kernel,
    kernel_row_sums,
)
from monitor.signals.projection import check_matrix


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
    k_rr: torch.Tensor | None  # (m, m) float32, k - c; None above dense_kernel_rows (see module doc)
    rr_row_sums: torch.Tensor  # (m,) float64 row sums of K_rr - c
    rr_total: float           # float64 sum of K_rr - c
    block_entries: int = BLOCK_ENTRIES  # kernel entries per block of a window's chunked sums
    # Reused [reference; window] rows and squared norms, so a window's pooled kernel block is
    # one product without copying the reference each time (see pooled_rows). Not thread-safe:
    # one monitor owns a reference.
    _scratch: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def dims(self) -> int:
        return int(self.x.shape[1])

    @classmethod
    def build(
        cls,
        x_ref: np.ndarray,
        sigma: float,
        *,
        device: torch.device | None = None,
        dense_kernel_rows: int = DENSE_KERNEL_ROWS,
        block_entries: int = BLOCK_ENTRIES,
    ) -> MmdReference:
        """Precompute the reference side: K_rr whole for at most ``dense_kernel_rows`` rows, else
        only its row sums, in blocks of ``block_entries`` kernel entries (memory linear in the
        rows). Raises ValueError on bad x_ref (< 2 rows) or sigma <= 0."""
        x_np = check_matrix(x_ref, "reference features", min_rows=2)
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"kernel bandwidth sigma must be finite and > 0, got {sigma!r}")
        if block_entries < 1:
            raise ValueError(f"block_entries must be >= 1, got {block_entries}")
        dev = device or default_device()
        t = torch.from_numpy(x_np).to(dev)
        center = t.to(torch.float64).mean(0).to(torch.float32)
        x = t - center
        x_sq = (x * x).sum(1)
        m = int(x.shape[0])
        if m <= dense_kernel_rows:
            k = gaussian_kernel(x, x, float(sigma), same=True, sq_a=x_sq)
            # Rounded to float32 so the float32 K_rr shift and the float64 corrections of the window
            # sums subtract the same number (a mismatch of one ulp costs ~1e-4 relative on MMD^2).
            offset = float(np.float32(float(k.sum(dtype=torch.float64)) / k.numel()))
            k -= offset
            row_sums = k.sum(1, dtype=torch.float64)
            total = float(k.sum(dtype=torch.float64))
        else:
            raw = kernel_row_sums(x, float(sigma), sq=x_sq, block_entries=min(block_entries, ROW_SUM_BLOCK_ENTRIES))
            offset = float(np.float32(float(raw.sum()) / (m * m)))
            row_sums = raw - m * offset
            total = float(row_sums.sum())
            k = None
        return cls(
            x_ref=x_np,
            sigma=float(sigma),
            center=center,
            x=x,
            x_sq=x_sq,
            offset=offset,
            k_rr=k,
            rr_row_sums=row_sums,
            rr_total=total,
            block_entries=int(block_entries),
        )

    def pooled_rows(self, yt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([x; yt], squared row norms) for a centred window ``yt`` (n, d), as views of a
        buffer kept for the next window (grown when a larger window comes)."""
        m, n = self.rows, int(yt.shape[0])
        rows, sq = self._scratch.get("rows"), self._scratch.get("sq")
        if rows is None or sq is None or rows.shape[0] < m + n:
            rows = torch.empty((m + n, self.dims), dtype=torch.float32, device=self.x.device)
            sq = torch.empty(m + n, dtype=torch.float32, device=self.x.device)
            rows[:m], sq[:m] = self.x, self.x_sq
            self._scratch.update(rows=rows, sq=sq)
        rows[m:m + n] = yt
        torch.sum(yt * yt, 1, out=sq[m:m + n])
        return rows[:m + n], sq[:m + n]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"x_ref": self.x_ref, "sigma": np.array(self.sigma, dtype=np.float64)}

    @classmethod
    def from_arrays(
        cls, d: dict[str, np.ndarray], *, device: torch.device | None = None, dense_kernel_rows: int = DENSE_KERNEL_ROWS
    ) -> MmdReference:
        """Inverse of :meth:`to_arrays` (recomputes K_rr or its row sums). Raises ValueError on a missing key."""
        missing = [k for k in ("x_ref", "sigma") if k not in d]
        if missing:
            raise ValueError(f"mmd reference arrays: missing key(s) {missing}; rebuild the reference")
        return cls.build(
            np.asarray(d["x_ref"]), float(np.asarray(d["sigma"]).item()), device=device,
            dense_kernel_rows=dense_kernel_rows,
        )
