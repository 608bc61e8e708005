"""Sequential MMD drift detector (the algorithm of alibi-detect's ``MMDDriftOnline``), with
vectorised calibration and mini-batch updates.

The reference (N rows) is split once into a sub-reference (N - 2W + 1 rows) and an initial test
window (W rows). Each new row slides the W-row test window on; the statistic is the unbiased
MMD^2 between sub-reference and window (Gaussian kernel, sigma fixed). Thresholds for the steps
t = 1..W-1 after a (re)start come from bootstraps on the reference: each bootstrap takes an
"extended test window" of 2W - 1 reference rows in random order, whose W overlapping windows
mimic the first W steps; at step w the threshold is the 1 - 1/ERT quantile of the bootstrap
statistics among bootstraps that did not cross an earlier threshold. From step W on the last
threshold holds. An alarm (statistic > threshold) resets the detector: t = 0, the window is the
initial test window again.

``update`` takes b rows at once: one kernel block between the batch and the sub-reference, and
for stride 1 the kernel band |i - j| < W of the row sequence (window then batch), from which the
window's off-diagonal kernel sum S follows row by row (``_every_row``):

    S_p = S_{p-1} + 2 B_p - 2 A_p,

B_p the new row's kernel sum against the W - 1 rows that stay, A_p the leaving row's against the
same rows. That is ~2 W d work per row instead of the (W + s)^2 d of a full segment kernel. S is
kept as state and re-anchored from a direct sum every _ANCHOR_ROWS rows after a restart, so
float64 rounding cannot accumulate over long streams.

Calibration (the split and the bootstrap thresholds) is in ``monitor.signals.online_calibration``;
the band algebra of the stride-1 update in ``monitor.signals.online_band``. This module holds the
detector: its stream state, the row walk, status and the persisted state (STATE_VERSION).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from monitor.signals.kernels import BLOCK_ENTRIES, default_device, gaussian_kernel
from monitor.signals.online_band import (
    RestartTables,
    band_increments,
    column_sums,
    kernel_band,
    kernel_vs,
    leaving_sums,
    window_offdiag,
)
from monitor.signals.online_calibration import calibrate_online
from monitor.signals.projection import check_matrix
from monitor.signals.results import OnlineMmdStatus

# 2: the window's off-diagonal kernel sum ("window_offdiag") and "stride" are required keys.
STATE_VERSION = 2
# New rows per sub-reference kernel block in update(); bounds memory at ~sub-reference x chunk.
_UPDATE_CHUNK = 4096
# Strided segments (stride > 1): an alarm wastes the rest of a segment's tested-window kernels, so
# segments start at max(2W, _MIN_SEGMENT) rows and grow while no alarm occurs.
_MIN_SEGMENT = 64
_MAX_STRIDED_SEGMENT = 4096
# Stride 1: the off-diagonal sum S is recomputed directly (from the band already at hand) whenever
# the rows since the last restart reach a multiple of this, bounding accumulated rounding. The
# positions depend on the stream alone, not on batch sizes, so results do not depend on batching.
_ANCHOR_ROWS = 4096


@dataclass(frozen=True, eq=False)
class OnlineUpdate:
    """Per-row results of one :meth:`OnlineMmd.update` call."""

    statistics: np.ndarray   # (b,) float64 MMD^2 after each row
    thresholds: np.ndarray   # (b,) threshold in force at each row
    alarm_rows: list[int]    # batch positions of the rows that raised an alarm (each then reset)


class OnlineMmd:
    """Stateful sequential detector. Build with :meth:`calibrate` or :meth:`from_state_dict`."""

    def __init__(
        self,
        *,
        sigma: float,
        thresholds: np.ndarray,
        sub_reference: np.ndarray,
        sub_mean: float,
        init_window: np.ndarray,
        init_colsums: np.ndarray,
        stride: int = 1,
        device: torch.device | None = None,
    ) -> None:
        self.device = device or default_device()
        self.sigma = float(sigma)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.stride = int(stride)
        self.window_rows = int(np.asarray(init_window).shape[0])
        self._sub_np = np.ascontiguousarray(sub_reference, dtype=np.float32)
        self._sub = torch.from_numpy(self._sub_np).to(self.device)
        self._sub_sq = (self._sub * self._sub).sum(1)
        self.sub_mean = float(sub_mean)
        self._init_window = np.ascontiguousarray(init_window, dtype=np.float32)
        self._init_colsums = np.asarray(init_colsums, dtype=np.float64)
        self._init_t = torch.from_numpy(self._init_window).to(self.device)
        # A restart needs each initial row's kernel sum against the initial rows after it (its
        # share of A while it leaves) and the initial window's off-diagonal sum, both from one band
        # so the recurrence subtracts exactly what it starts from.
        init_band = kernel_band(self._init_t, self.window_rows, self.sigma)
        tail = torch.zeros_like(init_band)  # no rows after the window
        self._init_upper = leaving_sums(torch.cat([init_band, tail]), self.window_rows, self.window_rows).cpu().numpy()
        self._init_offdiag = 2.0 * float(self._init_upper.sum())
        # Mutable stream state: the current test window, its sub-reference column sums and its
        # off-diagonal kernel sum S.
        self._window = self._init_window.copy()
        self._colsums = self._init_colsums.copy()
        self._offdiag = self._init_offdiag
        self.t = 0                      # rows since the last (re)start
        self.alarms_total = 0
        self.rows_total = 0
        self._last_statistic = math.nan
        self._last_threshold = float(self.thresholds[0])
        self._alarm_pending = False      # an alarm since the last status() call
        self._last_run_length = -1       # t at the most recent alarm since the last status()
        self._segment_hint = 0           # work-size hint only: results do not depend on it

    @property
    def dims(self) -> int:
        return int(self._sub_np.shape[1])

    @classmethod
    def calibrate(
        cls,
        x_ref: np.ndarray,
        *,
        sigma: float,
        window_rows: int,
        ert_rows: float,
        bootstraps: int,
        seed: int,
        stride_rows: int = 1,
        device: torch.device | None = None,
    ) -> OnlineMmd:
        """Split the reference, calibrate thresholds by bootstrap.

        The statistic is tested every ``stride_rows`` rows (1 = every row, as alibi-detect's
        MMDDriftOnline), each test at a false-alarm rate of stride_rows / ert_rows, so the expected
        run between false alarms is ert_rows rows whatever the stride. A stride lets a large ERT
        be calibrated with ~ert_rows / stride_rows bootstraps instead of ~ert_rows.
        Needs more than 2 * window_rows reference rows, window_rows >= 2, 1 <= stride_rows <=
        window_rows, ert_rows > stride_rows and enough bootstraps; raises ValueError otherwise.
        """
        c = calibrate_online(
            x_ref, sigma=sigma, window_rows=window_rows, ert_rows=ert_rows, bootstraps=bootstraps, seed=seed,
            stride_rows=stride_rows, device=device,
        )
        return cls(
            sigma=c.sigma,
            thresholds=c.thresholds,
            sub_reference=c.sub_reference,
            sub_mean=c.sub_mean,
            init_window=c.init_window,
            init_colsums=c.init_colsums,
            stride=c.stride,
            device=c.device,
        )

    def update(self, y: np.ndarray) -> OnlineUpdate:
        """Feed b >= 1 rows in arrival order; statistics equal those of b single-row updates.

        After an alarm at row i the detector restarts (t = 0, initial test window) and goes on
        with row i + 1. Raises ValueError on bad rows (wrong dims, non-finite).
        """
        rows = check_matrix(y, "online MMD rows", min_rows=1, dims=self.dims)
        yt = torch.from_numpy(np.require(rows, requirements="W")).to(self.device)  # Arrow views are read-only
        # New rows per sub-reference kernel block: _UPDATE_CHUNK, fewer for a large sub-reference
        # so a block stays ~BLOCK_ENTRIES floats.
        part_rows = max(1, min(_UPDATE_CHUNK, BLOCK_ENTRIES // len(self._sub_np)))
        colsums = np.concatenate(
            [column_sums(gaussian_kernel(self._sub, part, self.sigma, sq_a=self._sub_sq)) for part in yt.split(part_rows)]
        )
        out = OnlineUpdate(statistics=np.empty(len(rows)), thresholds=np.empty(len(rows)), alarm_rows=[])
        if self.stride == 1:
            for first in range(0, len(rows), _UPDATE_CHUNK):
                last = min(first + _UPDATE_CHUNK, len(rows))
                self._every_row(rows[first:last], yt[first:last], colsums[first:last], first, out)
        else:
            self._strided(rows, colsums, out)
            # Only tested windows were computed; keep S right for a state that may switch stride.
            window = torch.from_numpy(self._window).to(self.device)
            self._offdiag = window_offdiag(kernel_band(window, self.window_rows, self.sigma), 0, self.window_rows)
        self.rows_total += len(rows)
        return out

    def _record(
        self, seg: np.ndarray, tested: np.ndarray, thr: np.ndarray, pos: int, out: OnlineUpdate
    ) -> tuple[int, bool]:
        """Store the statistics of consecutive rows from batch row ``pos`` up to the first alarm
        (which restarts the detector), advance t; returns (rows taken, alarmed). The caller moves
        the window on when no alarm occurred."""
        crossed = np.flatnonzero(tested & (seg > thr))
        taken = len(seg) if len(crossed) == 0 else int(crossed[0]) + 1
        out.statistics[pos:pos + taken] = seg[:taken]
        out.thresholds[pos:pos + taken] = thr[:taken]
        last_test = np.flatnonzero(tested[:taken])
        if len(last_test):
            self._last_statistic = float(seg[last_test[-1]])
            self._last_threshold = float(thr[last_test[-1]])
        if len(crossed):
            out.alarm_rows.append(pos + taken - 1)
            self._last_run_length = self.t + taken
            self._alarm_pending = True
            self.alarms_total += 1
            self.t = 0
            self._window, self._colsums = self._init_window.copy(), self._init_colsums.copy()
            self._offdiag = self._init_offdiag
        else:
            self.t += taken
        return taken, bool(len(crossed))

    def _thresholds_ahead(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(tested, threshold) for the next ``count`` rows if no alarm intervenes: each row reports
        the threshold of the test it counts toward; tests run every stride rows."""
        rows_in = self.t + 1 + np.arange(count)  # rows since the (re)start after each row
        step = -(-rows_in // self.stride)
        return rows_in % self.stride == 0, self.thresholds[np.minimum(step, len(self.thresholds) - 1)]

    def _every_row(self, rows: np.ndarray, yt: torch.Tensor, colsums: np.ndarray, first: int, out: OnlineUpdate) -> None:
        """Stride 1 over one chunk (batch rows ``first``...): S from the banded recurrence.

        u = current window (W rows) then the chunk's m rows; chunk row i is u[W + i] and, with no
        restart in between, the window after it is u[i + 1 : i + W + 1]. The band of u gives
        B (new row vs the W - 1 rows before it) and A (leaving row u[i] vs the W - 1 after it)
        for every row at once; a restart inside the chunk replaces the first W increments after it
        (RestartTables). Rows since a restart are processed up to the next alarm or
        anchor row, whichever comes first.
        """
        w, m = self.window_rows, len(rows)
        u = np.concatenate([self._window, rows])
        uc = np.concatenate([self._colsums, colsums])
        band = kernel_band(torch.from_numpy(u).to(self.device), w, self.sigma)
        d_offdiag = band_increments(band, w, m).cpu().numpy()
        d_cross = uc[w:] - uc[:m]
        scale_s, scale_c = 1.0 / (w * (w - 1)), 2.0 / (len(self._sub_np) * w)
        period = max(_ANCHOR_ROWS, w)  # >= W: an anchored window never holds initial rows
        restart: int | None = None     # chunk row where the current run restarted, if in this chunk
        tables: RestartTables | None = None
        pos = 0
        while pos < m:
            end = min(m, pos + period - self.t % period)
            ds, dc = d_offdiag[pos:end].copy(), d_cross[pos:end].copy()
            if restart == pos:
                head = min(w, end - pos)
                if tables is None:  # once per chunk, for all restarts to come
                    tables = RestartTables.build(band, kernel_vs(yt[pos:], self._init_t, self.sigma), pos)
                ds[:head] = tables.increments(pos, head) - 2.0 * self._init_upper[:head]
                dc[:head] = colsums[pos:pos + head] - self._init_colsums[:head]
                cross0 = float(self._init_colsums.sum())
            else:
                cross0 = float(uc[pos:pos + w].sum())
            offdiag = self._offdiag + np.cumsum(ds)
            seg = self.sub_mean + offdiag * scale_s - (cross0 + np.cumsum(dc)) * scale_c
            thr = self.thresholds[np.minimum(self.t + 1 + np.arange(len(seg)), len(self.thresholds) - 1)]
            tested = np.ones(len(seg), dtype=bool)
            taken, alarmed = self._record(seg, tested, thr, first + pos, out)
            pos += taken
            if alarmed:  # the next row starts from the initial window
                restart = pos
                continue
            self._offdiag = float(offdiag[taken - 1])
            if self.t % period == 0:
                self._offdiag = window_offdiag(band, pos, w)  # the window after chunk row pos - 1
        if restart is not None and m - restart < w:
            self._window = np.concatenate([self._init_window[m - restart:], rows[restart:]])
            self._colsums = np.concatenate([self._init_colsums[m - restart:], colsums[restart:]])
        else:
            self._window, self._colsums = u[m:].copy(), uc[m:].copy()

    def _strided(self, rows: np.ndarray, colsums: np.ndarray, out: OnlineUpdate) -> None:
        """stride > 1: segments of the last W - 1 window rows plus new rows; only the tested
        windows are computed (_segment_statistics)."""
        w = self.window_rows
        smallest = max(2 * w, _MIN_SEGMENT)
        segment = self._segment_hint or smallest
        pos = 0
        while pos < len(rows):
            end = min(pos + segment, len(rows))
            z = np.concatenate([self._window[1:], rows[pos:end]])
            zc = np.concatenate([self._colsums[1:], colsums[pos:end]])
            tested, thr = self._thresholds_ahead(end - pos)
            taken, alarmed = self._record(self._segment_statistics(z, zc, tested), tested, thr, pos, out)
            if alarmed:
                segment = smallest
            else:
                segment = min(2 * segment, max(_MAX_STRIDED_SEGMENT, smallest))
                self._window, self._colsums = z[-w:].copy(), zc[-w:].copy()
            pos += taken
        self._segment_hint = segment

    def _segment_statistics(self, z: np.ndarray, zc: np.ndarray, tested: np.ndarray) -> np.ndarray:
        """MMD^2 after each tested new row of a segment (stride > 1): z = the last W-1 window rows
        then the new rows, zc their sub-reference column sums. Only the tested rows' windows are
        computed (a batched W x W kernel each, ~W^2 d / stride work per row); the others are NaN."""
        w, sub_rows = self.window_rows, len(self._sub_np)
        out = np.full(len(tested), np.nan)
        starts = np.flatnonzero(tested)  # the window after new row j is z[j : j + W]
        if len(starts) == 0:
            return out
        idx = torch.from_numpy(starts[:, None] + np.arange(w)[None, :]).to(self.device)
        zt = torch.from_numpy(z).to(self.device)
        win = zt[idx]                                             # (T, W, d)
        sq = (win * win).sum(-1)                                  # (T, W)
        d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * win @ win.transpose(1, 2)).clamp_(min=0.0)
        within = torch.exp(d2 / (-2.0 * self.sigma**2)).sum((1, 2), dtype=torch.float64) - w  # off-diagonal
        cross = torch.from_numpy(zc).to(self.device)[idx].sum(1)
        stat = self.sub_mean + within / (w * (w - 1)) - 2.0 * cross / (sub_rows * w)
        out[starts] = stat.cpu().numpy()
        return out

    def status(self, since_last: bool = True) -> OnlineMmdStatus:
        """Latest statistic/threshold, and whether an alarm happened since the previous
        ``status(since_last=True)`` call (which this call then clears when since_last is true)."""
        result = OnlineMmdStatus(
            statistic=self._last_statistic,
            threshold=self._last_threshold,
            alarm=self._alarm_pending,
            alarms_total=self.alarms_total,
            rows_since_reset=self.t,
            run_length_rows=self._last_run_length if self._alarm_pending else None,
        )
        if since_last:
            self._alarm_pending, self._last_run_length = False, -1
        return result

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        """Everything needed to continue exactly where this detector is: arrays and scalars only."""
        return {
            "version": STATE_VERSION,
            "sigma": self.sigma,
            "thresholds": self.thresholds.copy(),
            "sub_reference": self._sub_np.copy(),
            "sub_mean": self.sub_mean,
            "init_window": self._init_window.copy(),
            "init_colsums": self._init_colsums.copy(),
            "stride": self.stride,
            "window": self._window.copy(),
            "window_colsums": self._colsums.copy(),
            "window_offdiag": self._offdiag,
            "t": self.t,
            "alarms_total": self.alarms_total,
            "rows_total": self.rows_total,
            "last_statistic": self._last_statistic,
            "last_threshold": self._last_threshold,
            "alarm_pending": int(self._alarm_pending),
            "last_run_length": self._last_run_length,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, np.ndarray | int | float], *, device: torch.device | None = None) -> OnlineMmd:
        """Inverse of :meth:`state_dict` (values may be 0-d arrays, as read back from an npz).

        Raises ValueError on a missing key, a state version other than STATE_VERSION or
        inconsistent shapes.
        """
        if "version" not in d:
            raise ValueError("online MMD state: missing key 'version'; recalibrate the detector")
        version = int(np.asarray(d["version"]).item())
        if version > STATE_VERSION:
            raise ValueError(
                f"online MMD state has version {version}, this driftd reads up to {STATE_VERSION}: "
                "it was written by a newer driftd; upgrade or recalibrate"
            )
        if version < STATE_VERSION:
            raise ValueError(
                f"online MMD state has version {version}, this driftd needs {STATE_VERSION} (it keeps the "
                "window's kernel sum): it was written by an older driftd; recalibrate the detector"
            )
        keys = (
            "sigma", "thresholds", "sub_reference", "sub_mean", "init_window", "init_colsums", "stride",
            "window", "window_colsums", "window_offdiag", "t", "alarms_total", "rows_total", "last_statistic",
            "last_threshold", "alarm_pending", "last_run_length",
        )
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"online MMD state: missing key(s) {missing}; recalibrate the detector")
        det = cls(
            sigma=float(np.asarray(d["sigma"]).item()),
            thresholds=np.asarray(d["thresholds"]),
            sub_reference=np.asarray(d["sub_reference"]),
            sub_mean=float(np.asarray(d["sub_mean"]).item()),
            init_window=np.asarray(d["init_window"]),
            init_colsums=np.asarray(d["init_colsums"]),
            stride=int(np.asarray(d["stride"]).item()),
            device=device,
        )
        window = np.asarray(d["window"], dtype=np.float32)
        colsums = np.asarray(d["window_colsums"], dtype=np.float64)
        if window.shape != det._init_window.shape or colsums.shape != (det.window_rows,):
            raise ValueError(
                f"online MMD state: window {window.shape} / colsums {colsums.shape} do not match "
                f"window_rows {det.window_rows}; recalibrate the detector"
            )
        det._window, det._colsums = window.copy(), colsums.copy()
        det._offdiag = float(np.asarray(d["window_offdiag"]).item())
        det.t = int(np.asarray(d["t"]).item())
        det.alarms_total = int(np.asarray(d["alarms_total"]).item())
        det.rows_total = int(np.asarray(d["rows_total"]).item())
        det._last_statistic = float(np.asarray(d["last_statistic"]).item())
        det._last_threshold = float(np.asarray(d["last_threshold"]).item())
        det._alarm_pending = bool(int(np.asarray(d["alarm_pending"]).item()))
        det._last_run_length = int(np.asarray(d["last_run_length"]).item())
        return det

