"""Batch two-sample test: unbiased MMD^2 of a window against the reference, Gaussian kernel
k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), with a permutation p-value.

Cost per window: one pooled column block [K_rw; K_ww] ((m + n) x n) and one product of it with
the permutations' indicators. A permutation never builds the pooled (m+n)^2 matrix: with W' the
permuted window = S (reference rows moved in) u T (window rows staying),

    sum_{W'W'} K = sum_{SS} K_rr + sum_{TT} K_ww + 2 sum_{ST} K_rw

and the R'R' and R'W' sums follow from the pooled row sums and the pooled total. The SS term
(and S's share of K_rr's row sums) depends on the reference and the draw alone, so a
:class:`PermutationPlan` computes it once when drawn, and :class:`PermutationSchedule` reuses a
draw for a run of windows (a draw made before, and independently of, a window's rows keeps its
p-value exact). The TT and ST terms are one dense product [2u | v] @ [K_rw; K_ww] for all
permutations; on CPU that measured faster than gathering blocks (bench/README.md).

Kernels are float32; the sums behind the observed statistic are float64. Kernel values are
stored minus the mean c of K_rr (the unbiased MMD^2 is unchanged by a constant shift of k),
which keeps the float32 partial sums of the permutation products small and accurate.

Large references (``monitor.signals.mmd_reference``): K_rr is kept whole only up to
``dense_kernel_rows`` reference rows. Above,
the reference keeps its rows and K_rr's float64 row sums, summed over row blocks of the upper
triangle (time O(m^2 d), memory O(block + m d), never the m x m matrix); a plan then computes
each permutation's S x S kernel from the rows (|S| <= window rows), and a window's pooled block
is summed in row chunks. Memory is linear in n_ref: a 100k-row reference builds in ~800 MB
of process memory, torch included, where the dense K_rr alone would take 40 GB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.signals.kernels import gaussian_kernel
from monitor.signals.mmd_reference import MmdReference
from monitor.signals.projection import check_matrix
from monitor.signals.results import MmdResult

# MMD^2 differences below this are float noise: float32 kernels, statistics that are averages
# of kernel values in [0, 1] (measured: <= 3e-8 between the two float paths).
_TIE_TOLERANCE = 1e-7

# Permutations per K_rr product when a plan is drawn; bounds memory at ~chunk x (m + n) floats per product.
_PERMUTATION_CHUNK = 128


@dataclass(frozen=True, eq=False)
class PermutationPlan:
    """B random permutations of the pooled (m + n) rows, with their reference-only sums done.

    A permutation only matters through W', the n pooled rows it puts in the window group: S
    (reference rows moved in, indicator ``u``) and T (window rows kept, indicator ``v``). The
    SS block sum over K_rr and the sum of K_rr's row sums over S depend on the reference and the
    draw alone, so they are computed here, once per plan rather than once per window: that
    B x m^2 product costs about as much as a window's whole kernel block.
    """

    reference: MmdReference = field(repr=False)  # the reference whose K_rr sums are in ss / s_rows
    window_rows: int
    # (1 + B, m + n) float32: a row of ones (the block's column sums come out of the same
    # product), then [2u | v] per permutation, u the 0/1 indicator of S and v of T
    lhs: torch.Tensor
    v: torch.Tensor    # (B, n) float32 0/1 indicator of T
    ss: torch.Tensor  # (B,) float64: sum of shifted K_rr over S x S
    s_rows: torch.Tensor  # (B,) float64: sum over S of K_rr's row sums

    @property
    def permutations(self) -> int:
        return int(self.v.shape[0])

    @classmethod
    def draw(
        cls, ref: MmdReference, window_rows: int, permutations: int, generator: np.random.Generator
    ) -> PermutationPlan:
        """``permutations`` uniform permutations drawn from ``generator``.
        Raises ValueError for permutations < 1 or window_rows < 2."""
        if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)) or permutations < 1:
            raise ValueError(f"permutations must be an integer >= 1, got {permutations!r}")
        if window_rows < 2:
            raise ValueError(f"the test needs at least 2 rows in the window, got {window_rows}")
        m, n = ref.rows, int(window_rows)
        # The window group of a uniform permutation is a uniform n-subset of the pooled rows:
        # the n largest of m + n iid uniform keys (half the cost of drawing whole permutations).
        sets = generator.random((permutations, m + n)).argpartition(m, axis=1)[:, m:]
        return cls._build(ref, np.ascontiguousarray(sets))  # distinct and in range by construction

    @classmethod
    def from_window_sets(cls, ref: MmdReference, window_sets: np.ndarray) -> PermutationPlan:
        """A plan from explicit window groups: (B, n) pooled indices, 0..m-1 the reference rows,
        m..m+n-1 the window rows. Raises ValueError on a bad shape, an index out of range or
        repeated within a row."""
        arr = np.asarray(window_sets, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise ValueError(f"window_sets must be (permutations, window_rows >= 2), got shape {arr.shape}")
        m, n = ref.rows, int(arr.shape[1])
        if arr.min() < 0 or arr.max() >= m + n:
            raise ValueError(f"window_sets: indices must be in [0, {m + n}) (reference rows, then window rows)")
        ordered = np.sort(arr, axis=1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError("window_sets: a row repeats an index; each row must name distinct pooled rows")
        return cls._build(ref, arr)

    @classmethod
    def _build(cls, ref: MmdReference, arr: np.ndarray) -> PermutationPlan:
        m, n = ref.rows, int(arr.shape[1])
        sets = torch.from_numpy(arr).to(ref.x.device)
        lhs = torch.zeros((1 + int(sets.shape[0]), m + n), dtype=torch.float32, device=ref.x.device)
        lhs[0] = 1.0
        ind = lhs[1:]
        ind.scatter_(1, sets, 1.0)
        u = ind[:, :m]
        if ref.k_rr is not None:
            ss = torch.cat(
                [((c @ ref.k_rr) * c).sum(1, dtype=torch.float64) for c in torch.split(u, _PERMUTATION_CHUNK)]
            )
        else:
            ss = _ss_from_rows(ref, sets)
        # sum over S of K_rr's row sums: a gather (window indices add 0), not a B x m float64 product
        s_rows = torch.cat([ref.rr_row_sums, ref.rr_row_sums.new_zeros(n)])[sets].sum(1)
        ind[:, :m] *= 2.0
        return cls(reference=ref, window_rows=n, lhs=lhs, v=ind[:, m:].contiguous(), ss=ss, s_rows=s_rows)


def _ss_from_rows(ref: MmdReference, sets: torch.Tensor) -> torch.Tensor:
    """(B,) float64 sums of K_rr - c over each permutation's S x S block, from the reference rows
    (for a reference without a kept K_rr): |S|^2 d work per permutation, batched over
    permutations with S padded to the largest (padding masked out)."""
    m = ref.rows
    in_s = sets < m
    sizes = in_s.sum(1)
    width = max(1, int(sizes.max()))
    # Each permutation's S first (stable sort keeps order), padded with index 0 and masked.
    order = torch.argsort((~in_s).to(torch.int8), dim=1, stable=True)[:, :width]
    idx = torch.gather(sets, 1, order)
    mask = (torch.arange(width, device=sets.device)[None, :] < sizes[:, None]).to(torch.float32)
    idx = torch.where(mask > 0, idx, torch.zeros_like(idx))
    chunk = max(1, (1 << 22) // (width * width))  # ~16 MB of kernel per batch
    out = []
    for lo in range(0, len(idx), chunk):
        rows, sq, w = ref.x[idx[lo:lo + chunk]], ref.x_sq[idx[lo:lo + chunk]], mask[lo:lo + chunk]
        k = torch.baddbmm(sq[:, :, None] + sq[:, None, :], rows, rows.transpose(1, 2), alpha=-2.0)
        k.clamp_(min=0.0).mul_(-0.5 / (ref.sigma * ref.sigma)).exp_()
        k.diagonal(dim1=1, dim2=2).fill_(1.0)
        k.mul_(w[:, :, None] * w[:, None, :])
        out.append(k.sum((1, 2), dtype=torch.float64))
    return torch.cat(out) - ref.offset * sizes.to(torch.float64) ** 2


# Draws used in turn by consecutive windows: windows fewer than this apart never share one, so
# a rule over consecutive windows (policy `consecutive`, default 3) sees independent draws.
DRAWS_IN_ROTATION = 8
# Tags the plan generator's seed so it never coincides with another stream seeded by `seed`.
_PLAN_STREAM = 0x4D4D44


class PermutationSchedule:
    """The plan each window of one reference uses: ``DRAWS_IN_ROTATION`` draws used in turn by
    consecutive windows, each serving ``redraw_every`` windows before it is replaced.

    Window ``index`` uses slot index % R (R = DRAWS_IN_ROTATION) at epoch index // (R x
    redraw_every), drawn from a generator seeded by (seed, window rows, slot, epoch): it exists
    before the window's rows do and never depends on them, so each window's p-value is exactly
    valid (Hemerik & Goeman 2018: random permutations drawn independently of the data). Windows
    sharing a draw have correlated p-values (a draw has luck, as a reference sample has: with
    both fixed, the rate of p < 0.01 over null windows measured 0.0015-0.0275 across draws), so
    adjacent windows never share one, and every draw is replaced after ``redraw_every`` uses.
    The amortised cost per window is one draw / redraw_every. Deterministic, so a restart
    recomputes the same plans.
    """

    def __init__(self, ref: MmdReference, *, permutations: int, redraw_every: int, seed: int):
        if redraw_every < 1:
            raise ValueError(f"redraw_every must be >= 1, got {redraw_every}")
        self.ref = ref
        self.permutations = permutations
        self.redraw_every = redraw_every
        self.seed = seed
        self._plans: dict[int, tuple[tuple[int, int], PermutationPlan]] = {}  # slot -> (key, plan)

    def for_window(self, index: int, window_rows: int) -> PermutationPlan:
        slot = int(index) % DRAWS_IN_ROTATION
        key = (int(window_rows), int(index) // (DRAWS_IN_ROTATION * self.redraw_every))
        cached = self._plans.get(slot)
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None and cached[0][0] != key[0]:
            self._plans.clear()  # another window size: plans for the old one are dead weight
        generator = np.random.default_rng([_PLAN_STREAM, self.seed, key[0], slot, key[1]])
        plan = PermutationPlan.draw(self.ref, window_rows, self.permutations, generator)
        self._plans[slot] = (key, plan)
        return plan


@dataclass(frozen=True)
class _WindowSums:
    """What a window contributes, all kernels shifted by -c like K_rr: float64 sums for the
    observed statistic and the plan's product lhs @ [K_rw; K_ww] for the permuted ones."""

    rw_rows: torch.Tensor     # (m,) float64 row sums of K_rw - c
    rw_total: float           # sum of K_rw - c
    ww_total: float           # sum of K_ww - c
    product: torch.Tensor     # (1 + B, n) float32: column sums, then [2u | v] @ [K_rw; K_ww] per permutation

    @property
    def window_rows(self) -> int:
        return int(self.product.shape[1])


def _window_sums(ref: MmdReference, y: np.ndarray, plan: PermutationPlan) -> _WindowSums:
    y_np = check_matrix(y, "window features", min_rows=2, dims=ref.dims)
    if plan.reference is not ref:
        raise ValueError("permutation plan was drawn for another reference; draw it for this one")
    if plan.window_rows != y_np.shape[0]:
        raise ValueError(
            f"permutation plan is for {plan.window_rows} window rows, the window has {y_np.shape[0]}; "
            "draw the plan for this window"
        )
    yt = torch.from_numpy(y_np).to(ref.x.device) - ref.center
    m, n = ref.rows, int(yt.shape[0])
    step = max(1, ref.block_entries // n)
    if m + n <= step:
        # Both blocks from one product, so one product also serves both in the permutations;
        # shifted by -c like K_rr, which keeps its float32 sums small.
        rows, sq = ref.pooled_rows(yt)
        block = gaussian_kernel(rows, yt, ref.sigma, sq_a=sq, sq_b=sq[m:])
        block[m:].fill_diagonal_(1.0)
        block.sub_(ref.offset)
        sums = _row_sums_f64(block)  # float64: float32 row sums cost ~1e-6 relative on a null MMD^2
        product = plan.lhs @ block
    else:
        # A large reference: its rows in chunks of ~block_entries kernel entries, then the
        # window's own block, each folded into the product at once (never the whole block).
        # Partial products add up in float64: a float32 running sum measured 2.5e-5 relative
        # error on permuted statistics where one product has 1e-6.
        y_sq = (yt * yt).sum(1)
        sums = torch.empty(m + n, dtype=torch.float64, device=yt.device)
        total = torch.zeros((plan.lhs.shape[0], n), dtype=torch.float64, device=yt.device)
        for lo in range(0, m, step):
            hi = min(m, lo + step)
            k = gaussian_kernel(ref.x[lo:hi], yt, ref.sigma, sq_a=ref.x_sq[lo:hi], sq_b=y_sq).sub_(ref.offset)
            sums[lo:hi] = _row_sums_f64(k)
            total += plan.lhs[:, lo:hi] @ k
        k = gaussian_kernel(yt, yt, ref.sigma, same=True, sq_a=y_sq).sub_(ref.offset)
        sums[m:] = _row_sums_f64(k)
        total += plan.lhs[:, m:] @ k
        product = total.to(torch.float32)
    return _WindowSums(
        rw_rows=sums[:m], rw_total=float(sums[:m].sum()), ww_total=float(sums[m:].sum()), product=product
    )


def _row_sums_f64(t: torch.Tensor) -> torch.Tensor:
    """Row sums of a float32 matrix accumulated in float64. On CPU numpy's buffered cast runs
    ~2.5x faster than torch's float64 reduction."""
    if t.device.type != "cpu":
        return t.sum(1, dtype=torch.float64)
    return torch.from_numpy(np.add.reduce(t.numpy(), axis=1, dtype=np.float64))


def _mmd2_from_sums(
    ref: MmdReference, n: int, pooled_total: float, window_row_sums: torch.Tensor | float, window_block: torch.Tensor | float
) -> torch.Tensor | float:
    """Unbiased MMD^2 for window groups W' of n rows given A = sum over W' of the pooled row sums
    and Q = sum of the kernel over W' x W'."""
    m = ref.rows
    diag = 1.0 - ref.offset  # every shifted kernel diagonal entry
    a, q = window_row_sums, window_block
    ww = q - n * diag
    rw = a - q
    rr = pooled_total - 2.0 * a + q - m * diag
    return rr / (m * (m - 1)) + ww / (n * (n - 1)) - 2.0 * rw / (m * n)


def _permuted_mmd2(ref: MmdReference, sums: _WindowSums, plan: PermutationPlan) -> torch.Tensor:
    """(B,) float64 MMD^2 of each permutation in ``plan``. With u, v a permutation's indicators,
    [2u | v] @ [K_rw; K_ww] summed over v is 2 sum_ST K_rw + sum_TT K_ww: one product for all."""
    n = sums.window_rows
    pooled_total = ref.rr_total + 2.0 * sums.rw_total + sums.ww_total
    window_pooled_rows = sums.product[0]  # K_rw column + K_ww row sums
    st2_tt = (sums.product[1:] * plan.v).sum(1, dtype=torch.float64)
    # sum over W' of the pooled row sums: K_rr's part (planned) + 2u @ (K_rw rows / 2) + v @ window rows
    weights = torch.cat([(0.5 * sums.rw_rows).to(torch.float32), window_pooled_rows])
    a = plan.s_rows + (plan.lhs[1:] @ weights).to(torch.float64)
    return _mmd2_from_sums(ref, n, pooled_total, a, plan.ss + st2_tt)


def permuted_mmd2(ref: MmdReference, y: np.ndarray, window_sets: np.ndarray) -> np.ndarray:
    """Internal/testing: MMD^2 for explicit permuted window groups (see :meth:`PermutationPlan.from_window_sets`)."""
    plan = PermutationPlan.from_window_sets(ref, window_sets)
    return _permuted_mmd2(ref, _window_sums(ref, y, plan), plan).cpu().numpy()


def mmd_test(ref: MmdReference, y: np.ndarray, *, plan: PermutationPlan) -> MmdResult:
    """Unbiased MMD^2 of window ``y`` (n >= 2 rows, same dims as the reference) against ``ref``
    and its permutation p-value (1 + #{permuted >= observed}) / (1 + B), never 0, with the B
    permutations of ``plan`` (drawn for n = len(y) rows). Raises ValueError on bad ``y`` or a
    plan for another window size.
    """
    sums = _window_sums(ref, y, plan)
    n = sums.window_rows
    pooled_total = ref.rr_total + 2.0 * sums.rw_total + sums.ww_total
    observed = float(_mmd2_from_sums(ref, n, pooled_total, sums.rw_total + sums.ww_total, sums.ww_total))
    stats = _permuted_mmd2(ref, sums, plan)
    # A permutation that maps the window onto itself (likely only when both samples are tiny) ties the observed
    # statistic but is summed along another float path: differences below the float32 kernels'
    # resolution count as ties, and ties as exceedances (the conservative convention). The
    # tolerance also stays a thousandth of the permutation spread, so huge windows, whose
    # statistics spread over ~1e-6, keep their resolution.
    spread = float(stats.std()) if len(stats) > 1 else 0.0
    tolerance = min(_TIE_TOLERANCE, 1e-3 * spread) if spread > 0 else _TIE_TOLERANCE
    exceed = int((stats >= observed - tolerance).sum())
    return MmdResult(
        mmd2=observed,
        p_value=(1 + exceed) / (1 + plan.permutations),
        permutations=plan.permutations,
        window_rows=n,
        reference_rows=ref.rows,
        bandwidth=ref.sigma,
    )
