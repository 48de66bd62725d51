"""Decay-weighted pair products of one chunk, and their backward: the parts of the chunk backward that must never
form exp(−G).

For a chunk of C rows with within-chunk cumulative log-decay G ∈ R^{C×K} (non-increasing down each column), row
factors X ∈ R^{C×K} and column factors Y ∈ R^{C×K}, the forward product is

    M_rs = Σ_c X_rc Y_sc exp(G_rc − G_sc)       for s < r (STRICT) or s ≤ r, else 0

which gives T (X = b⊙k, strict) and A_qk (X = scale·q, inclusive) of ../shared/GDN2.md with Y = k. Given upstream
C×C matrices dM (zero outside the triangle), the backward products are

    DX_rc = Σ_s dM_rs Y_sc exp(G_rc − G_sc)        DY_sc = Σ_r dM_rs X_rc exp(G_rc − G_sc)

and the decay's gradient follows elementwise from them: dG_r += X_r ⊙ DX_r, dG_s −= Y_s ⊙ DY_s.

Every exponential has a non-positive exponent. The chunk is cut into NB = C / BC sub-blocks; for rows r in block I and
columns s before it, with the reference ref_I = G at the row before I, exp(G_r − G_s) = exp(G_r − ref_I)·exp(ref_I
− G_s), both factors ≤ 1, so those pairs are tensor-core products. Pairs inside a diagonal block are formed one by
one as a [BC, BC, BK] tensor of exp(min(G_r − G_s, 0)). A factor that underflows to 0 belongs to a pair whose true
weight is smaller still. For DY the reference of column block J is G at J's last row, and rows after J factor the
same way.

One program per (chunk, head) for the forward (it accumulates over K slices), one per (K slice, chunk, head) for the
backward (K slices are independent there). Inputs are fp32 [N, H, C, K] (chunk-major: kernels/chunk_bwd.py lays the
chunks out); outputs fp32. No atomics: every output element has one writer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2_tune.kernels.buffers import output_buffer

PAIR_PRECISIONS = ("tf32", "tf32x3", "ieee")
# How the pair backward forms its products: "elementwise" (:func:`_pairs_bwd_kernel`, diagonal blocks as a
# [BC, BC, BK] pair tensor on the CUDA cores) or "dot" (:func:`_pairs_bwd_dot_kernel`, tensor-core products).
PAIR_METHODS = ("elementwise", "dot")


@triton.jit
def _pairs_fwd_kernel(
    x1, x2, y, G, m1, m2,
    K,
    C: tl.constexpr, BC: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr,
    STRICT1: tl.constexpr, STRICT2: tl.constexpr, PRECISION: tl.constexpr,
):
    """M1 = pairs(X1, Y), M2 = pairs(X2, Y) for one (chunk, head): both share the column factors."""
    i_nh = tl.program_id(0)
    base = i_nh.to(tl.int64) * C * K
    x1 += base
    x2 += base
    y += base
    G += base
    m1 += i_nh.to(tl.int64) * C * C
    m2 += i_nh.to(tl.int64) * C * C
    o_c = tl.arange(0, C)
    o_bc = tl.arange(0, BC)
    for i_blk in tl.static_range(NB):
        n0 = i_blk * BC
        o_r = n0 + o_bc
        acc1 = tl.zeros([BC, C], tl.float32)
        acc2 = tl.zeros([BC, C], tl.float32)
        dia1 = tl.zeros([BC, BC], tl.float32)
        dia2 = tl.zeros([BC, BC], tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = (o_k < K)[None, :]
            b_G = tl.load(G + o_c[:, None] * K + o_k[None, :], mask=m_k, other=0.0)
            b_y = tl.load(y + o_c[:, None] * K + o_k[None, :], mask=m_k, other=0.0)
            b_Gr = tl.load(G + o_r[:, None] * K + o_k[None, :], mask=m_k, other=0.0)
            b_x1 = tl.load(x1 + o_r[:, None] * K + o_k[None, :], mask=m_k, other=0.0)
            b_x2 = tl.load(x2 + o_r[:, None] * K + o_k[None, :], mask=m_k, other=0.0)
            b_yr = tl.load(y + o_r[:, None] * K + o_k[None, :], mask=m_k, other=0.0)
            if n0 > 0:
                b_ref = tl.load(G + (n0 - 1) * K + o_k, mask=o_k < K, other=0.0)
                e_row = tl.exp(tl.minimum(b_Gr - b_ref[None, :], 0.0))
                # Columns before the block only; the clamp keeps the masked-out rows finite.
                e_col = tl.where((o_c < n0)[:, None], tl.exp(tl.minimum(b_ref[None, :] - b_G, 0.0)), 0.0)
                b_yc = tl.trans(b_y * e_col)
                acc1 += tl.dot(b_x1 * e_row, b_yc, input_precision=PRECISION)
                acc2 += tl.dot(b_x2 * e_row, b_yc, input_precision=PRECISION)
            # Diagonal block, pair by pair.
            e = tl.exp(tl.minimum(b_Gr[:, None, :] - b_Gr[None, :, :], 0.0)) * b_yr[None, :, :]
            dia1 += tl.sum(b_x1[:, None, :] * e, 2)
            dia2 += tl.sum(b_x2[:, None, :] * e, 2)
        # Two stores with disjoint masks (no element is written twice, so no ordering between threads matters).
        p_m = o_r[:, None] * C + o_c[None, :]
        off = (o_c < n0)[None, :] | (o_c >= n0 + BC)[None, :]
        tl.store(m1 + p_m, tl.where((o_c < n0)[None, :], acc1, 0.0), mask=off)
        tl.store(m2 + p_m, tl.where((o_c < n0)[None, :], acc2, 0.0), mask=off)
        p_d = o_r[:, None] * C + o_r[None, :]
        if STRICT1:
            keep1 = o_bc[:, None] > o_bc[None, :]
        else:
            keep1 = o_bc[:, None] >= o_bc[None, :]
        if STRICT2:
            keep2 = o_bc[:, None] > o_bc[None, :]
        else:
            keep2 = o_bc[:, None] >= o_bc[None, :]
        tl.store(m1 + p_d, tl.where(keep1, dia1, 0.0))
        tl.store(m2 + p_d, tl.where(keep2, dia2, 0.0))


@triton.jit
def _pairs_bwd_kernel(
    dm1, dm2, x1, x2, y, G,
    dx1, dx2, dy,
    K,
    C: tl.constexpr, BC: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DX1 = dM1 ⋆ Y, DX2 = dM2 ⋆ Y, DY = dM1ᵀ ⋆ X1 + dM2ᵀ ⋆ X2 (⋆: the decay-weighted product) on one K slice."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    base = i_nh.to(tl.int64) * C * K
    x1 += base
    x2 += base
    y += base
    G += base
    dx1 += base
    dx2 += base
    dy += base
    dm1 += i_nh.to(tl.int64) * C * C
    dm2 += i_nh.to(tl.int64) * C * C
    o_c = tl.arange(0, C)
    o_bc = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = (o_k < K)[None, :]
    p_all = o_c[:, None] * K + o_k[None, :]
    b_G = tl.load(G + p_all, mask=m_k, other=0.0)
    b_y = tl.load(y + p_all, mask=m_k, other=0.0)
    b_x1 = tl.load(x1 + p_all, mask=m_k, other=0.0)
    b_x2 = tl.load(x2 + p_all, mask=m_k, other=0.0)
    for i_blk in tl.static_range(NB):
        n0 = i_blk * BC
        o_r = n0 + o_bc
        p_r = o_r[:, None] * K + o_k[None, :]
        b_Gr = tl.load(G + p_r, mask=m_k, other=0.0)
        b_yr = tl.load(y + p_r, mask=m_k, other=0.0)
        b_x1r = tl.load(x1 + p_r, mask=m_k, other=0.0)
        b_x2r = tl.load(x2 + p_r, mask=m_k, other=0.0)
        # Diagonal block: both products pair by pair, e[r, s, c] = exp(G_rc − G_sc) for r ≥ s (dM is 0 elsewhere).
        p_d = o_r[:, None] * C + o_r[None, :]
        b_d1 = tl.load(dm1 + p_d)
        b_d2 = tl.load(dm2 + p_d)
        e = tl.exp(tl.minimum(b_Gr[:, None, :] - b_Gr[None, :, :], 0.0))
        b_dx1 = tl.sum(b_d1[:, :, None] * (e * b_yr[None, :, :]), 1)
        b_dx2 = tl.sum(b_d2[:, :, None] * (e * b_yr[None, :, :]), 1)
        b_dy = tl.sum((b_d1[:, :, None] * b_x1r[:, None, :] + b_d2[:, :, None] * b_x2r[:, None, :]) * e, 0)
        if n0 > 0:
            # Rows of block I against the columns before it, through ref = G at the row before I.
            b_ref = tl.load(G + (n0 - 1) * K + o_k, mask=o_k < K, other=0.0)
            e_row = tl.exp(tl.minimum(b_Gr - b_ref[None, :], 0.0))
            e_col = tl.where((o_c < n0)[:, None], tl.exp(tl.minimum(b_ref[None, :] - b_G, 0.0)), 0.0)
            b_yc = b_y * e_col
            p_rows = o_r[:, None] * C + o_c[None, :]
            b_m1 = tl.load(dm1 + p_rows)
            b_m2 = tl.load(dm2 + p_rows)
            b_dx1 += e_row * tl.dot(b_m1, b_yc, input_precision=PRECISION)
            b_dx2 += e_row * tl.dot(b_m2, b_yc, input_precision=PRECISION)
        if n0 + BC < C:
            # Columns of block I against the rows after it, through ref = G at I's last row.
            b_ref = tl.load(G + (n0 + BC - 1) * K + o_k, mask=o_k < K, other=0.0)
            after = (o_c >= n0 + BC)[:, None]
            e_rows = tl.where(after, tl.exp(tl.minimum(b_G - b_ref[None, :], 0.0)), 0.0)
            p_cols = o_c[:, None] * C + o_r[None, :]  # dM[:, block I], [C, BC]
            b_c1 = tl.load(dm1 + p_cols)
            b_c2 = tl.load(dm2 + p_cols)
            acc = tl.dot(tl.trans(b_c1), b_x1 * e_rows, input_precision=PRECISION)
            acc += tl.dot(tl.trans(b_c2), b_x2 * e_rows, input_precision=PRECISION)
            b_dy += tl.exp(tl.minimum(b_ref[None, :] - b_Gr, 0.0)) * acc
        tl.store(dx1 + p_r, b_dx1, mask=m_k)
        tl.store(dx2 + p_r, b_dx2, mask=m_k)
        tl.store(dy + p_r, b_dy, mask=m_k)


# Decay span below which a diagonal block's pairs are tensor-core products (the "dot" pair backward). A factored
# diagonal pair is exp(G_r − ref)·exp(ref − G_s) with ref the G before the block: the second factor reaches exp(span).
# The dots sum C such products before the first factor scales them back, so exp(40) ≈ 2.4e17 leaves fp32 room for
# |dM·Y| up to ~4e19 (C = 32), and exp(−40) ≈ 4e-18 is a normal number. Normal decay spans a sub-block of 16 steps by
# a few units; a block that decays harder in some channel of the K slice takes the exact per-column loop instead.
PAIR_SAFE_SPAN = tl.constexpr(40.0)


@triton.jit
def _pairs_bwd_dot_kernel(
    dm1, dm2, x1, x2, y, G,
    dx1, dx2, dy,
    K,
    C: tl.constexpr, BC: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """:func:`_pairs_bwd_kernel`'s results with every product on the tensor cores (while the block's decay span over
    the K slice is below PAIR_SAFE_SPAN). Row block I (rows n0..n1−1) takes, with ref = G at row n0 − 1 (0 for the
    first block) and end = G at row n1 − 1:

        DX_I = exp(G_I − ref) ⊙ (dM[I, :n1] (Y ⊙ exp(ref − G))[:n1])        first factor ≤ 1
        DY_I = exp(end − G_I) ⊙ (dM[n0:, I]ᵀ (X ⊙ exp(G − end))[n0:])      first factor ≤ 1

    The second factors are ≤ 1 outside block I and at most exp(span) inside it, so no exponent is positive beyond one
    sub-block's decay. A block whose span reaches PAIR_SAFE_SPAN in some channel of the slice leaves its own pairs
    out of the dots and forms them exactly, column by column, as exp(min(G_r − G_s, 0))."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    base = i_nh.to(tl.int64) * C * K
    x1 += base
    x2 += base
    y += base
    G += base
    dx1 += base
    dx2 += base
    dy += base
    dm1 += i_nh.to(tl.int64) * C * C
    dm2 += i_nh.to(tl.int64) * C * C
    o_c = tl.arange(0, C)
    o_bc = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_all = o_c[:, None] * K + o_k[None, :]
    # A runtime loop over the row blocks, each reading the [C, BK] tiles it needs again (from cache): no tile of the
    # whole chunk stays live across blocks, which kept registers within budget at C = 64 and 128.
    for i_blk in range(NB):
        n0 = i_blk * BC
        n1 = n0 + BC
        o_r = n0 + o_bc
        p_r = o_r[:, None] * K + o_k[None, :]
        b_Gr = tl.load(G + p_r, mask=m_k[None, :], other=0.0)
        # G before the block: the previous row's, 0 before the chunk.
        b_ref = tl.where(n0 > 0, tl.load(G + tl.maximum(n0 - 1, 0) * K + o_k, mask=m_k, other=0.0), 0.0)
        b_end = tl.load(G + (n1 - 1) * K + o_k, mask=m_k, other=0.0)
        span = tl.max(b_ref - b_end, 0)  # the block's strongest decay over one channel of the slice
        safe = span < PAIR_SAFE_SPAN

        # DX of rows I: columns s < n_lim through ref (the clamp only keeps rows the masks drop finite).
        m_s = (o_c < n0 + tl.where(safe, BC, 0))[:, None] & m_k[None, :]
        b_G = tl.load(G + p_all, mask=m_s, other=0.0)
        b_yc = tl.load(y + p_all, mask=m_s, other=0.0) * tl.exp(tl.minimum(b_ref[None, :] - b_G, PAIR_SAFE_SPAN))
        p_rows = o_r[:, None] * C + o_c[None, :]  # dM[I, :], [BC, C]
        e_row = tl.exp(tl.minimum(b_Gr - b_ref[None, :], 0.0))
        b_dx1 = e_row * tl.dot(tl.load(dm1 + p_rows), b_yc, input_precision=PRECISION)
        b_dx2 = e_row * tl.dot(tl.load(dm2 + p_rows), b_yc, input_precision=PRECISION)
        if span >= PAIR_SAFE_SPAN:
            # Exact diagonal block, column j per step: exp(G_r − G_j) for r ≥ j (dM is 0 above its diagonal).
            for j in range(BC):
                b_Gj = tl.load(G + (n0 + j) * K + o_k, mask=m_k, other=0.0)
                b_ej = tl.exp(tl.minimum(b_Gr - b_Gj[None, :], 0.0)) * tl.load(y + (n0 + j) * K + o_k, mask=m_k,
                                                                                other=0.0)[None, :]
                b_dx1 += tl.load(dm1 + o_r * C + n0 + j)[:, None] * b_ej
                b_dx2 += tl.load(dm2 + o_r * C + n0 + j)[:, None] * b_ej
        tl.store(dx1 + p_r, b_dx1, mask=m_k[None, :])
        tl.store(dx2 + p_r, b_dx2, mask=m_k[None, :])

        # DY of columns I: rows r >= r_lim through end.
        m_t = (o_c >= n1 - tl.where(safe, BC, 0))[:, None] & m_k[None, :]
        b_G = tl.load(G + p_all, mask=m_t, other=0.0)
        b_row = tl.exp(tl.minimum(b_G - b_end[None, :], PAIR_SAFE_SPAN))
        p_cols = o_c[:, None] * C + o_r[None, :]  # dM[:, I], [C, BC]
        acc = tl.dot(tl.trans(tl.load(dm1 + p_cols)), tl.load(x1 + p_all, mask=m_t, other=0.0) * b_row,
                     input_precision=PRECISION)
        acc += tl.dot(tl.trans(tl.load(dm2 + p_cols)), tl.load(x2 + p_all, mask=m_t, other=0.0) * b_row,
                      input_precision=PRECISION)
        b_dy = tl.exp(tl.minimum(b_end[None, :] - b_Gr, 0.0)) * acc
        if span >= PAIR_SAFE_SPAN:
            b_x1r = tl.load(x1 + p_r, mask=m_k[None, :], other=0.0)
            b_x2r = tl.load(x2 + p_r, mask=m_k[None, :], other=0.0)
            for j in range(BC):
                b_Gj = tl.load(G + (n0 + j) * K + o_k, mask=m_k, other=0.0)
                b_e = tl.exp(tl.minimum(b_Gr - b_Gj[None, :], 0.0))
                b_d1 = tl.load(dm1 + o_r * C + n0 + j)
                b_d2 = tl.load(dm2 + o_r * C + n0 + j)
                b_dyj = tl.sum((b_d1[:, None] * b_x1r + b_d2[:, None] * b_x2r) * b_e, 0)
                b_dy += tl.where((o_bc == j)[:, None], b_dyj[None, :], 0.0)
        tl.store(dy + p_r, b_dy, mask=m_k[None, :])


def _check_factors(named: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    """The kernels address every operand as a dense [N, H, C, K] (or [N, H, C, C]) block from one program id, with
    no mask on N, H or C: each must be exactly that, contiguous, fp32. Shapes only, no sync."""
    for name, x in named.items():
        want = shape if not name.startswith("dm") else (*shape[:3], shape[2])
        if tuple(x.shape) != want or not x.is_contiguous() or x.dtype != torch.float32:
            raise ValueError(f"{name}: expected a contiguous fp32 tensor of shape {want}, received "
                             f"{tuple(x.shape)} {x.dtype}{'' if x.is_contiguous() else ' (not contiguous)'}")


def pairs_fwd(
    x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, G: torch.Tensor, *, strict1: bool, strict2: bool,
    BC: int, BK: int, num_warps: int, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M1, M2)`` [N, H, C, C] from contiguous fp32 [N, H, C, K] factors."""
    N, H, C, K = y.shape
    _check_factors({"x1": x1, "x2": x2, "y": y, "G": G}, (N, H, C, K))
    m1 = output_buffer((N, H, C, C), torch.float32, y.device)
    m2 = output_buffer((N, H, C, C), torch.float32, y.device)
    if N * H:
        _pairs_fwd_kernel[(N * H,)](
            x1, x2, y, G, m1, m2, K,
            C=C, BC=BC, NB=C // BC, BK=BK, STRICT1=strict1, STRICT2=strict2, PRECISION=precision,
            num_warps=num_warps,
        )
    return m1, m2


def pairs_bwd(
    dm1: torch.Tensor, dm2: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, G: torch.Tensor,
    *, BC: int, BK: int, num_warps: int, precision: str, method: str = "elementwise",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(DX1, DX2, DY)`` [N, H, C, K] (see the module docstring); ``method`` one of :data:`PAIR_METHODS`."""
    if method not in PAIR_METHODS:
        raise ValueError(f"method: expected one of {list(PAIR_METHODS)}, received {method!r}")
    N, H, C, K = y.shape
    _check_factors({"dm1": dm1, "dm2": dm2, "x1": x1, "x2": x2, "y": y, "G": G}, (N, H, C, K))
    dx1, dx2, dy = (output_buffer((N, H, C, K), torch.float32, y.device) for _ in range(3))
    kernel = _pairs_bwd_dot_kernel if method == "dot" else _pairs_bwd_kernel
    if N * H:
        kernel[(triton.cdiv(K, BK), N * H)](
            dm1, dm2, x1, x2, y, G, dx1, dx2, dy, K,
            C=C, BC=BC, NB=C // BC, BK=BK, PRECISION=precision, num_warps=num_warps,
        )
    return dx1, dx2, dy
