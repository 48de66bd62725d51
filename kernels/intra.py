"""Intra-chunk stage: everything of a chunk that does not depend on the state entering it.

One program per (chunk, head), chunk length C, split into NB = C / BC sub-blocks of BC rows. In the symbols of
../shared/GDN2.md, with G the within-chunk cumulative sum of g:

    T    = strictly_lower(Ē K̄ᵀ),       T_rs    = Σ_c b_rc k_rc k_sc exp(G_rc − G_sc)        (s < r)
    A_qk = lower(scale Q_γ K̄ᵀ),        A_qk_rs = Σ_c scale q_rc k_sc exp(G_rc − G_sc)       (s ≤ r)
    A    = (I + T)^-1,   Y = A Ē,   U = A Z,   Q_γ = scale γ ⊙ Q,   K_tail = (γ_C / γ) ⊙ K,   γ_C

Numerics: exp(−G) is never formed. For row block I with reference ref_I = G at the row before it, a pair
(r in I, s before I) factors as [b k exp(G_r − ref_I)]_r · [k exp(ref_I − G_s)]_s, both exponents ≤ 0, so
every off-diagonal block is a tensor-core product. Inside a diagonal block the same factoring has a positive
exponent on the column side, bounded by the block's decay span; it is used when that span is below
SAFE_SPAN (no overflow, no underflow of the partner factor) and replaced by an exact per-pair loop of
exp(G_r − G_s), r ≥ s, when a K slice decays harder than that inside one sub-block.

The solve inverts the NB diagonal BC×BC blocks of (I + T) as (I − P)(I + P²)(I + P⁴)… in fp32, then assembles the
full inverse as (I + N)^-1 D = D − N(D − N(D − …)) (Horner, NB − 1 products) with D the block-diagonal inverse
and N = D L (L the block-strictly-lower part of T, so N is nilpotent of index NB).

Every tl.dot with fp32 operands runs at ``IntraConfig.precision`` (tf32, 3xTF32 or ieee), except the
diagonal-block inversion, which is always ieee. "tf32rn" runs them in tf32 after rounding A_qk's two factors and
Z to nearest TF32 (:func:`round_tf32`): those are the intra operands whose truncation by the tensor cores drives
the fp32 output error (benchmarks/analyze_fp32_precision.py).

A one-pass variant (all row blocks as [NB, BC, C] batched dots, every K slice loaded once) was tried on an
H100 (2026-11-26, benchmarks/exp_intra_rewrite.py): 1.85 against 1.56 ms at the anchor shape with C=32, from
255 registers and spills against 168; it won only at C=64, where both lose to C=32.

Writes Y, Q_γ, K_tail [B, T, H, K], U [B, T, H, V], A_qk [B, T, H, C] and γ_C [chunks, H, K];
the state stage (kernels/state.py) reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gdn2_tune.kernels.buffers import output_buffer
from gdn2_tune.kernels.config import IntraConfig
from gdn2_tune.kernels.varlen import chunk_coords

# exp(80) ≈ 5.5e34 and exp(-80) ≈ 1.8e-35 are both normal fp32 (and bf16) numbers with room for a sum of
# 128 products, so a diagonal block whose per-channel decay span is below this factors safely.
# Whether the kernels below run in Triton's CPU interpreter: triton.jit reads this when they are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

SAFE_SPAN = tl.constexpr(80.0)
L2NORM_EPS = tl.constexpr(1e-6)
# Log-decays below this are raised to it as they are loaded. exp(-110) ≈ 1.7e-48 is below half the smallest fp32
# subnormal (1.4e-45), so a step at the floor forgets its channel exactly as g = -inf does (decay 0), also through
# the GPU's approximate exp (ex2.approx of -158.7); any product of factors whose exponents add up to the floor
# underflows to 0 as well. Without it, -inf - (-inf) = NaN in G_r - G_s. The floor is far above fp32's range so
# that the within-chunk sums stay accurate: each floored step adds 110 to |G|, whose ulp (2^-24 |G|) bounds the
# error of the decays between the steps after it (1e-4 relative after ~15 resets in one chunk).
G_FLOOR = tl.constexpr(-110.0)
# How round_tf32 rounds: Triton's interpreter cannot run inline PTX, so under TRITON_INTERPRET=1 it takes the
# integer version, which gives the same bits on finite inputs (both checked on an H200 by
# benchmarks/analyze_fp32_precision.py --probe-gpu).
ROUND_WITH_BITS = tl.constexpr(INTERPRETED)
# Dot precisions that exist only here: the tl.dot input precision each runs, and whether its operands are first
# rounded to nearest TF32 (round_tf32). See dot_precision.
ROUNDED_PRECISIONS = {"tf32rn": "tf32"}


def dot_precision(precision: str) -> tuple[str, bool]:
    """A config's dot precision -> (tl.dot ``input_precision``, whether the kernels round the dots' chosen operands
    to nearest TF32 first). "tf32rn" is a plain TF32 dot on operands the kernel rounded (see round_tf32)."""
    if precision in ROUNDED_PRECISIONS:
        return ROUNDED_PRECISIONS[precision], True
    return precision, False


@triton.jit
def round_tf32(x):
    # fp32 -> the nearest TF32 value (10 mantissa bits, ties away from zero), kept in fp32. The tensor cores read
    # a raw fp32 operand of a tf32 dot by truncation (H200 probe, benchmarks/analyze_fp32_precision.py): every
    # operand shrinks by up to 2^-10 relative, coherently, and that bias is most of the fp32 forward's TF32
    # error. Rounded first, the operand reaches the tensor core exact (its low 13 bits are zero) and the error is
    # unbiased, 2^-11 relative at most; cvt.rna.tf32.f32 is what Triton's own 3xTF32 split uses.
    if ROUND_WITH_BITS:
        # Add half a TF32 ulp to the magnitude (the sign bit is apart), clear the 13 bits TF32 drops; a carry out
        # of the mantissa bumps the exponent, which is the right rounding.
        y = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    else:
        y = tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return y


@triton.jit
def _floored(b_g):
    # tl.where, not tl.maximum: a NaN stays NaN (maxnum would turn it into a reset on the GPU).
    return tl.where(b_g < G_FLOOR, G_FLOOR, b_g)


@triton.jit
def _intra_kernel(
    q, k, v, g, b, w,
    y, u, qg, kt, aqk, gam, scr,
    cu_seqlens, chunk_indices,
    scale,
    T, NT,
    H, K, V,
    C: tl.constexpr, BC: tl.constexpr, NB: tl.constexpr, LOG2_BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, ROUND: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_L2NORM: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_h, bos, T_seq, i_tc, i_chunk = chunk_coords(i_t, i_bh, cu_seqlens, chunk_indices, T, NT, H, IS_VARLEN)

    # 64-bit scalar bases per sequence and head, 32-bit tile offsets within it (T·H·max(K, V, C) < 2^31):
    # per-element 64-bit offsets cost a register pair each and made the kernel spill.
    tok0 = bos * H + i_h
    q += tok0 * K
    k += tok0 * K
    g += tok0 * K
    b += tok0 * K
    y += tok0 * K
    qg += tok0 * K
    kt += tok0 * K
    v += tok0 * V
    w += tok0 * V
    u += tok0 * V
    aqk += tok0 * C
    HK = H * K
    HV = H * V
    o_c = tl.arange(0, C)
    t_c = i_tc * C + o_c  # position of each row in its sequence
    m_c = t_c < T_seq
    o_nb = tl.arange(0, NB)
    o_bc = tl.arange(0, BC)

    # L2 norms of q and k rows when asked: one pass over K before anything uses them.
    r_q = tl.full([C], 1.0, tl.float32)
    r_k = tl.full([C], 1.0, tl.float32)
    if USE_L2NORM:
        s_q = tl.zeros([C], tl.float32)
        s_k = tl.zeros([C], tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_ck = m_c[:, None] & (o_k < K)[None, :]
            p_k = t_c[:, None] * HK + o_k[None, :]
            b_q = tl.load(q + p_k, mask=m_ck, other=0.0).to(tl.float32)
            b_k = tl.load(k + p_k, mask=m_ck, other=0.0).to(tl.float32)
            s_q += tl.sum(b_q * b_q, 1)
            s_k += tl.sum(b_k * b_k, 1)
        r_q = 1.0 / tl.sqrt(s_q + L2NORM_EPS)
        r_k = 1.0 / tl.sqrt(s_k + L2NORM_EPS)
    r_q = r_q * scale

    # T and A_qk one row block I at a time, as 2D [BC, C] tiles accumulated over K slices. A_qk rows go straight
    # to the output; T rows go to this program's fp32 scratch tile, read back whole by the solve.
    o_bc = tl.arange(0, BC)
    scr_base = scr + (i_chunk * H + i_h).to(tl.int64) * C * C
    for i_blk in tl.static_range(NB):
        n0 = i_blk * BC
        o_r = n0 + o_bc
        m_r = i_tc * C + o_r < T_seq
        t_r = i_tc * C + o_r
        sel_r = o_c[None, :] == o_r[:, None]  # picks the block's rows out of [C] vectors
        r_kr = tl.sum(tl.where(sel_r, r_k[None, :], 0.0), 1)
        r_qr = tl.sum(tl.where(sel_r, r_q[None, :], 0.0), 1)
        acc_t = tl.zeros([BC, C], tl.float32)
        acc_a = tl.zeros([BC, C], tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_ck = m_c[:, None] & m_k[None, :]
            p_k = t_c[:, None] * HK + o_k[None, :]
            m_rk = m_r[:, None] & m_k[None, :]
            p_rk = t_r[:, None] * HK + o_k[None, :]
            b_g = _floored(tl.load(g + p_k, mask=m_ck, other=0.0).to(tl.float32))
            b_G = tl.cumsum(b_g, 0)
            b_k = tl.load(k + p_k, mask=m_ck, other=0.0).to(tl.float32) * r_k[:, None]
            b_ref = tl.sum(tl.where((o_c < n0)[:, None], b_g, 0.0), 0)  # G at the row before the block
            b_gr = _floored(tl.load(g + p_rk, mask=m_rk, other=0.0).to(tl.float32))
            b_Gr = b_ref[None, :] + tl.cumsum(b_gr, 0)
            b_kr = tl.load(k + p_rk, mask=m_rk, other=0.0).to(tl.float32) * r_kr[:, None]
            b_kbr = tl.load(b + p_rk, mask=m_rk, other=0.0).to(tl.float32) * b_kr
            b_qr = tl.load(q + p_rk, mask=m_rk, other=0.0).to(tl.float32) * r_qr[:, None]
            span = tl.max(-tl.sum(b_gr, 0), 0)  # the block's strongest decay over one channel
            e_row = tl.exp(b_Gr - b_ref[None, :])  # ≤ 1
            # Columns the factored product covers: those before the block, and the block itself when safe.
            n_lim = n0 + tl.where(span < SAFE_SPAN, BC, 0)
            expo = b_ref[None, :] - b_G  # ≤ 0 before the block, ≤ span inside it
            expo = tl.where(o_c[:, None] < n0, tl.minimum(expo, 0.0), tl.where(o_c[:, None] < n_lim, expo, 0.0))
            b_cf = tl.trans(b_k * tl.exp(expo))  # [BK, C]
            b_qe = b_qr * e_row
            if ROUND:
                # A_qk's two factors (the column factor is T's too, where rounding it changes nothing measurable).
                b_cf = round_tf32(b_cf)
                b_qe = round_tf32(b_qe)
            keep = o_c[None, :] < n_lim
            acc_t += tl.where(keep, tl.dot(b_kbr * e_row, b_cf, input_precision=PRECISION), 0.0)
            acc_a += tl.where(keep, tl.dot(b_qe, b_cf, input_precision=PRECISION), 0.0)
            if span >= SAFE_SPAN:
                # Exact diagonal block: column j per step, exp(G_r − G_j) with r ≥ j only.
                for j in range(BC):
                    sel = (o_bc == j)[:, None]
                    b_Gj = tl.sum(tl.where(sel, b_Gr, 0.0), 0)
                    b_kj = tl.sum(tl.where(sel, b_kr, 0.0), 0)
                    b_e = tl.exp(tl.minimum(b_Gr - b_Gj[None, :], 0.0)) * b_kj[None, :]
                    at_col = o_c[None, :] == n0 + j
                    acc_t += tl.where(at_col, tl.sum(b_kbr * b_e, 1)[:, None], 0.0)
                    acc_a += tl.where(at_col, tl.sum(b_qr * b_e, 1)[:, None], 0.0)
        p_a = t_r[:, None] * (H * C) + o_c[None, :]
        b_a = tl.where(o_r[:, None] >= o_c[None, :], acc_a, 0.0)
        tl.store(aqk + p_a, b_a.to(aqk.dtype.element_ty), mask=m_r[:, None])
        tl.store(scr_base + o_r[:, None] * C + o_c[None, :], tl.where(o_r[:, None] > o_c[None, :], acc_t, 0.0))
    tl.debug_barrier()  # the solve reads rows other threads wrote
    b_t = tl.load(scr_base + o_c[:, None] * C + o_c[None, :])

    # Diagonal blocks of I + T, inverted together as a batch [NB, BC, BC]. Each block's strictly lower part P is
    # nilpotent, so (I + P)^-1 = (I − P)(I + P²)(I + P⁴)…: log2(BC) − 1 squarings and as many products, in fp32
    # on the CUDA cores ("ieee"). A row-by-row forward substitution needs BC − 1 dependent cross-thread
    # reductions instead, and measured 0.47 of 2.0 ms of this stage at the anchor shape (C=32, H100).
    b_p = tl.sum(tl.where((o_nb[:, None] == o_nb[None, :])[:, None, :, None],
                          tl.reshape(b_t, (NB, BC, NB, BC)), 0.0), 2)  # [NB, BC, BC]
    eye_bc = tl.broadcast_to((o_bc[:, None] == o_bc[None, :]).to(tl.float32)[None, :, :], (NB, BC, BC))
    b_ad = eye_bc - b_p
    for _ in tl.static_range(LOG2_BC - 1):
        b_p = tl.dot(b_p, b_p, input_precision="ieee")
        b_ad = tl.dot(b_ad, eye_bc + b_p, input_precision="ieee")

    same_blk = (o_nb[:, None] == o_nb[None, :])[:, None, :, None]
    b_d = tl.reshape(tl.where(same_blk, b_ad[:, :, None, :], 0.0), (C, C))
    b_A = b_d
    if NB > 1:
        # (I + T)^-1 = (I + N)^-1 D with N = D L nilpotent of index NB, evaluated by Horner's rule:
        # X ← D − N X, NB − 1 times (the block forward substitution, one block row deeper per step).
        b_l = tl.where((o_c[:, None] // BC) > (o_c[None, :] // BC), b_t, 0.0)
        b_n = tl.dot(b_d, b_l, input_precision=PRECISION)
        for _ in tl.static_range(NB - 1):
            b_A = b_d - tl.dot(b_n, b_A, input_precision=PRECISION)

    # A goes back to the scratch tile (over T, once every thread holds T): the products below read it from
    # there, so that a C×C fp32 tile does not stay live in registers through both loops.
    tl.debug_barrier()
    tl.store(scr_base + o_c[:, None] * C + o_c[None, :], b_A)
    tl.debug_barrier()

    # Y = A Ē, Q_γ, K_tail and γ_C, one K slice at a time.
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_ck = m_c[:, None] & m_k[None, :]
        p_k = t_c[:, None] * HK + o_k[None, :]
        b_g = _floored(tl.load(g + p_k, mask=m_ck, other=0.0).to(tl.float32))
        b_G = tl.cumsum(b_g, 0)
        b_last = tl.sum(b_g, 0)  # G at the chunk's last row (padding rows carry g = 0)
        b_k = tl.load(k + p_k, mask=m_ck, other=0.0).to(tl.float32) * r_k[:, None]
        b_b = tl.load(b + p_k, mask=m_ck, other=0.0).to(tl.float32)
        b_q = tl.load(q + p_k, mask=m_ck, other=0.0).to(tl.float32) * r_q[:, None]
        b_gamma = tl.exp(b_G)
        b_A = tl.load(scr_base + o_c[:, None] * C + o_c[None, :])
        b_y = tl.dot(b_A, b_gamma * b_b * b_k, input_precision=PRECISION)
        tl.store(y + p_k, b_y.to(y.dtype.element_ty), mask=m_ck)
        tl.store(qg + p_k, (b_gamma * b_q).to(qg.dtype.element_ty), mask=m_ck)
        b_kt = tl.exp(b_last[None, :] - b_G) * b_k
        tl.store(kt + p_k, b_kt.to(kt.dtype.element_ty), mask=m_ck)
        tl.store(gam + (i_chunk * H + i_h).to(tl.int64) * K + o_k, tl.exp(b_last), mask=m_k)

    # U = A Z, one V slice at a time.
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_cv = m_c[:, None] & (o_v < V)[None, :]
        p_v = t_c[:, None] * HV + o_v[None, :]
        b_z = tl.load(w + p_v, mask=m_cv, other=0.0).to(tl.float32) * tl.load(v + p_v, mask=m_cv, other=0.0).to(
            tl.float32
        )
        if ROUND:
            b_z = round_tf32(b_z)
        b_A = tl.load(scr_base + o_c[:, None] * C + o_c[None, :])
        b_u = tl.dot(b_A, b_z, input_precision=PRECISION)
        tl.store(u + p_v, b_u.to(u.dtype.element_ty), mask=m_cv)


@dataclass(frozen=True)
class IntraOutputs:
    """What the intra stage hands to the state stage (kernels/state.py) and the backward (kernels/chunk_bwd.py).

    ``y``, ``qg``, ``kt``: Y = A Ē, Q_γ, K_tail, [B, T, H, K]; ``u``: U = A Z, [B, T, H, V]; ``aqk``: A_qk,
    [B, T, H, C]; all in the stage's ``out_dtype``. ``gamma``: γ_C, fp32 [num_chunks, H, K] (its first dimension
    is the number of chunks the launches were sized for).
    """

    y: torch.Tensor
    u: torch.Tensor
    qg: torch.Tensor
    kt: torch.Tensor
    aqk: torch.Tensor
    gamma: torch.Tensor
    # A = (I + T)^-1, fp32 [num_chunks, H, C, C]: the launch's scratch tile, which holds each chunk's A once the
    # launch is done (the state stage does not read it; the backward does, instead of solving again).
    a: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        """``outputs["y"]``: the backward's transition shim. intra_fwd returned a dict with these keys, and
        kernels/chunk_bwd.py (edited elsewhere) still indexes it so; new code reads the attributes."""
        if name not in _INTRA_FIELDS:
            raise KeyError(f"IntraOutputs: expected one of {_INTRA_FIELDS}, received {name!r}")
        return getattr(self, name)

    @property
    def num_chunks(self) -> int:
        return self.gamma.shape[0]


_INTRA_FIELDS = ("y", "u", "qg", "kt", "aqk", "gamma")


def intra_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float,
    chunk: int,
    cfg: IntraConfig,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
    num_chunks: int,
    use_qk_l2norm: bool,
    out_dtype: torch.dtype,
    aqk_dtype: torch.dtype | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
) -> IntraOutputs:
    """Launch the intra stage. Inputs are contiguous ``[B, T, H, *]``; returns the state stage's inputs.

    ``num_chunks`` is the total number of chunks (over all sequences); outputs come from
    :func:`kernels.buffers.output_buffer` (NaN-filled under :func:`kernels.buffers.poisoned`). ``aqk_dtype``
    (default ``out_dtype``) is A_qk's: the backward keeps it in fp32 whatever the other outputs' dtype.
    ``dtypes``: per-output dtypes of ``y``, ``u``, ``qg``, ``kt`` where they differ from ``out_dtype`` (the
    backward's recompute_store subsets; the kernel stores each in its buffer's dtype).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    nb = chunk // cfg.BC
    own = dict(dtypes or {})
    if set(own) - {"y", "u", "qg", "kt"}:
        raise ValueError(f"dtypes: expected keys among ['kt', 'qg', 'u', 'y'], received {sorted(own)}")
    y = output_buffer(k.shape, own.get("y", out_dtype), k.device)
    qg = output_buffer(k.shape, own.get("qg", out_dtype), k.device)
    kt = output_buffer(k.shape, own.get("kt", out_dtype), k.device)
    u = output_buffer((B, T, H, V), own.get("u", out_dtype), k.device)
    aqk = output_buffer((B, T, H, chunk), out_dtype if aqk_dtype is None else aqk_dtype, k.device)
    gam = output_buffer((num_chunks, H, K), torch.float32, k.device)
    scr = torch.empty((num_chunks, H, chunk, chunk), dtype=torch.float32, device=k.device)  # T, per program
    varlen = cu_seqlens is not None
    nt = triton.cdiv(T, chunk)
    grid = (num_chunks, H) if varlen else (nt, B * H)
    precision, round_operands = dot_precision(cfg.precision)
    _intra_kernel[grid](
        q, k, v, g, b, w,
        y, u, qg, kt, aqk, gam, scr,
        cu_seqlens, chunk_indices,
        scale,
        T, nt,
        H=H, K=K, V=V,
        C=chunk, BC=cfg.BC, NB=nb, LOG2_BC=cfg.BC.bit_length() - 1,
        BK=cfg.BK, BV=cfg.BV,
        PRECISION=precision, ROUND=round_operands,
        IS_VARLEN=varlen, USE_L2NORM=use_qk_l2norm,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return IntraOutputs(y=y, u=u, qg=qg, kt=kt, aqk=aqk, gamma=gam, a=scr)
