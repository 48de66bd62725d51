"""State stage: the sequential chunk-to-chunk pass, fused with the output.

One program per (sequence, head, V tile of BV columns); it walks the chunks of its sequence in order with the
state tile S ∈ R^{K×BV} in fp32 registers. Per chunk, from the intra stage's Y, U, Q_γ, K_tail, A_qk, γ_C
(kernels/intra.py), in the symbols of ../shared/GDN2.md:

    R   = U − Y S0                      ("new values")
    O   = Q_γ S0 + A_qk R               (Q_γ already carries the scale)
    S_C = Diag(γ_C) S0 + K_tailᵀ R

With fp32 operands the dots run at ``StateConfig.precision``: tf32, 3xTF32, or "tf32rn", tf32 after rounding Q_γ,
A_qk, K_tail and R to nearest TF32 (kernels/intra.round_tf32; S0 and Y are left as they are).

O is written once, straight to the output; the state never leaves the chip between chunks, and only the
final state is stored (when asked for). That is ``StateConfig.output = "fused"``. With ``"split"`` the pass
only carries the recurrence and stores each chunk's entering state S0 and R; a second, fully parallel launch
forms O. It moves more bytes (a [K, V] state per chunk, written and read) but takes two of the four dots and two
of the loads off the sequential critical path: the trade for batches of few, long sequences, where the pass
has only N·H·V/BV programs for the whole GPU.

``StateConfig.k_parts = 2`` holds S as two row tiles, [KA, BV] and [KB, BV] (kernels/config.state_row_parts), and
sums every K-wide product over them: Y S0 = Y_A S0_A + Y_B S0_B, likewise Q_γ S0, while K_tailᵀ R and the decay
update each part alone. A K that is not a power of two then pads to the parts' sum (96 = 64 + 32, 192 = 128 + 64)
instead of the next power of two, and at K = 256 the two 128-row tiles compile without spills where one 256-row
tile spills (triton 3.6, sm_90: BV 64 on 8 warps, 248 registers, against 72-568 bytes of stack in one part).

``StateConfig.segment_chunks = n > 0`` cuts each (dense) sequence into P segments of n chunks, for the few-head
long sequences where even the split pass has too few programs. The step above is affine in S0,
S_C = (Diag(γ_C) − K_tailᵀ Y) S0 + K_tailᵀ U, so a segment p maps its entering state to
S_{p+1} = M_p S_p + E_p. Three launches:

1. :func:`_segment_kernel`, every segment in parallel: the same recurrence on the [K, K + V] state [M | E]
   from [I | 0], with U = 0 on the M columns (no output);
2. :func:`_carry_kernel`, sequential over the P segments only: S_{p+1} = M_p S_p + E_p in fp32, storing every
   S_p (S_0 the initial state, S_P the final one);
3. :func:`_state_kernel` on every segment in parallel from its S_p, as above.

Launch 1 costs (K + V)/V of a pass without its two output dots, so the split roughly doubles the stage's FLOPs and
multiplies its programs by P.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gdn2_tune.kernels.buffers import output_buffer
from gdn2_tune.kernels.config import StateConfig, padded_dim, state_row_parts
from gdn2_tune.kernels.intra import IntraOutputs, dot_precision, round_tf32
from gdn2_tune.kernels.varlen import chunk_coords, sequence_bounds

# Triton's CPU interpreter multiplies bf16 operands of tl.dot as raw bits (seen with triton 3.9: errors of 1e10),
# so under TRITON_INTERPRET=1 the state dots round their operands to the input dtype and then multiply in fp32.
# The product of two bf16/fp16 numbers is exact in fp32, so this is the same arithmetic as the tensor cores do.
UPCAST_DOTS_WHEN_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The carry between segments multiplies fp32 states by fp32 transitions up to P times in a row: 3xTF32 keeps
# that near fp32 (one tf32 product is 2^-11 relative, compounding over the segments), for 3 tensor-core passes of
# a [K, K] × [K, V] product per segment, small next to the segments' own work.
CARRY_PRECISION = tl.constexpr("tf32x3")
# Row block of the carry's [K, K] products: a [64, 64] fp32 tile of M is 16 KiB.
CARRY_BLOCK = 64


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # One return: Triton compiles the statements after an `if ...: return` even when the condition is constexpr.
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif PRECISION == "input":
        c = tl.dot(a, b)
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _state_kernel(
    y, u, qg, kt, aqk, gam,
    o, h0, ht, hc, r, hs,
    cu_seqlens, chunk_offsets,
    T, NT, NC, SEG,
    H, K, V, KP: tl.constexpr, KB: tl.constexpr,
    C: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    SPLIT: tl.constexpr, USE_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr,
    UPCAST: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos, T_seq = sequence_bounds(cu_seqlens, i_n, T)
        c0 = tl.minimum(tl.maximum(tl.load(chunk_offsets + i_n).to(tl.int64), 0), NC)
        # Never past the per-chunk buffers (NC chunks), even with offsets the index was not built from.
        n_chunks = tl.minimum(tl.cdiv(T_seq, C), (NC - c0).to(tl.int32))
    else:
        bos = (i_n * T).to(tl.int64)
        T_seq = T
        n_chunks = NT
        c0 = (i_n * NT).to(tl.int64)

    # 64-bit scalar bases, 32-bit tile offsets (see kernels/intra.py).
    tok0 = bos * H + i_h
    y += tok0 * K
    qg += tok0 * K
    kt += tok0 * K
    u += tok0 * V
    o += tok0 * V
    if SPLIT:
        r += tok0 * V
    aqk += tok0 * C
    HK = H * K
    HV = H * V
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    dt = y.dtype.element_ty

    p_s = ((i_n * H + i_h).to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    p_h = o_k[:, None] * V + o_v[None, :]  # within one chunk's [K, V] entering state (split output)
    b_s = tl.zeros([KP, BV], tl.float32)
    if USE_INITIAL_STATE:
        b_s += tl.load(h0 + p_s, mask=m_s, other=0.0).to(tl.float32)
    if KB > 0:
        # The state's second row part (StateConfig.k_parts = 2): rows KP .. KP + KB of S, as a tile of its own,
        # so that a K that is not a power of two is not padded to the next one. Every K-wide dot is summed over
        # the two parts; the sequence split never runs with them (kernels/config.state_parts_fit).
        o_k2 = KP + tl.arange(0, KB)
        m_k2 = o_k2 < K
        p_s2 = ((i_n * H + i_h).to(tl.int64) * K + o_k2[:, None]) * V + o_v[None, :]
        m_s2 = m_k2[:, None] & m_v[None, :]
        p_h2 = o_k2[:, None] * V + o_v[None, :]
        b_s2 = tl.zeros([KB, BV], tl.float32)
        if USE_INITIAL_STATE:
            b_s2 += tl.load(h0 + p_s2, mask=m_s2, other=0.0).to(tl.float32)
    t_lo = 0
    t_hi = n_chunks
    if USE_SEGMENTS:
        # Segment i_p of the sequence split, from the entering state the carry launch stored (dense batches only).
        i_p = tl.program_id(2)
        t_lo = i_p * SEG
        t_hi = tl.minimum(t_lo + SEG, n_chunks)
        # hs is [P + 1, N·H, K, V]; a dense batch has N = NC / NT sequences.
        b_s += tl.load(hs + i_p.to(tl.int64) * (NC // NT) * H * K * V + p_s, mask=m_s, other=0.0)

    for i_t in range(t_lo, t_hi):
        t_c = i_t * C + o_c
        m_c = t_c < T_seq
        m_ck = m_c[:, None] & m_k[None, :]
        m_cv = m_c[:, None] & m_v[None, :]
        p_k = t_c[:, None] * HK + o_k[None, :]
        p_v = t_c[:, None] * HV + o_v[None, :]
        b_y = tl.load(y + p_k, mask=m_ck, other=0.0)
        b_u = tl.load(u + p_v, mask=m_cv, other=0.0).to(tl.float32)
        if not SPLIT:
            b_q = tl.load(qg + p_k, mask=m_ck, other=0.0)
            b_a = tl.load(aqk + t_c[:, None] * (H * C) + o_c[None, :], mask=m_c[:, None], other=0.0)
        b_kt = tl.load(kt + p_k, mask=m_ck, other=0.0)
        b_gc = tl.load(gam + ((c0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        if PRECISION == "input":
            b_sd = b_s.to(dt)
        else:
            b_sd = b_s
            b_y = b_y.to(tl.float32)
            b_kt = b_kt.to(tl.float32)
            if not SPLIT:
                b_q = b_q.to(tl.float32)
                b_a = b_a.to(tl.float32)
        if ROUND:
            # Q_γ, A_qk, K_tail and R to nearest TF32 (kernels/intra.round_tf32); Y and the state S0 stay as they
            # are: Y S0's truncation moves the output by < 1% (benchmarks/analyze_fp32_precision.py), and S0 is
            # the largest tile, on the recurrence's path.
            b_kt = round_tf32(b_kt)
            if not SPLIT:
                b_q = round_tf32(b_q)
                b_a = round_tf32(b_a)
        b_ys = _mma(b_y, b_sd, UPCAST, PRECISION)
        if KB > 0:
            m_ck2 = m_c[:, None] & m_k2[None, :]
            p_k2 = t_c[:, None] * HK + o_k2[None, :]
            b_y2 = tl.load(y + p_k2, mask=m_ck2, other=0.0)
            b_kt2 = tl.load(kt + p_k2, mask=m_ck2, other=0.0)
            b_gc2 = tl.load(gam + ((c0 + i_t) * H + i_h) * K + o_k2, mask=m_k2, other=0.0)
            if not SPLIT:
                b_q2 = tl.load(qg + p_k2, mask=m_ck2, other=0.0)
            if PRECISION == "input":
                b_sd2 = b_s2.to(dt)
            else:
                b_sd2 = b_s2
                b_y2 = b_y2.to(tl.float32)
                b_kt2 = b_kt2.to(tl.float32)
                if not SPLIT:
                    b_q2 = b_q2.to(tl.float32)
            if ROUND:
                b_kt2 = round_tf32(b_kt2)
                if not SPLIT:
                    b_q2 = round_tf32(b_q2)
            b_ys += _mma(b_y2, b_sd2, UPCAST, PRECISION)
        b_r = b_u - b_ys
        b_rd = b_r.to(b_y.dtype)
        if ROUND:
            b_rd = round_tf32(b_rd)  # stored so by the split pass: the output launch reads it rounded
        if SPLIT:
            # The chunk's entering state and R, exactly as the fused product below would have used them.
            tl.store(hc + ((c0 + i_t) * H + i_h) * K * V + p_h, b_sd.to(hc.dtype.element_ty), mask=m_s)
            if KB > 0:
                tl.store(hc + ((c0 + i_t) * H + i_h) * K * V + p_h2, b_sd2.to(hc.dtype.element_ty), mask=m_s2)
            tl.store(r + p_v, b_rd.to(r.dtype.element_ty), mask=m_cv)
        else:
            b_o = _mma(b_q, b_sd, UPCAST, PRECISION) + _mma(b_a, b_rd, UPCAST, PRECISION)
            if KB > 0:
                b_o += _mma(b_q2, b_sd2, UPCAST, PRECISION)
            tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_cv)
        b_s = b_s * b_gc[:, None] + _mma(tl.trans(b_kt), b_rd, UPCAST, PRECISION)
        if KB > 0:
            b_s2 = b_s2 * b_gc2[:, None] + _mma(tl.trans(b_kt2), b_rd, UPCAST, PRECISION)

    if STORE_FINAL_STATE:
        tl.store(ht + p_s, b_s, mask=m_s)
        if KB > 0:
            tl.store(ht + p_s2, b_s2, mask=m_s2)


@triton.jit
def _segment_kernel(
    y, u, kt, gam, mx, ex,
    T, NT, SEG, NH,
    H, K, V, KP: tl.constexpr,
    C: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr,
):
    """Launch 1 of the sequence split: segment i_p's [M | E] for one BV-column tile of [K + V] columns, from
    [I | 0], by the pass's own step with U = 0 on the M columns. Dense batches: sequence i_n is rows i_n·T…"""
    i_c, i_nh, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    tok0 = (i_n * T).to(tl.int64) * H + i_h
    y += tok0 * K
    kt += tok0 * K
    u += tok0 * V
    HK = H * K
    HV = H * V
    c0 = (i_n * NT).to(tl.int64)
    n_m = tl.cdiv(K, BV)
    # Per column: whether the tile is one of M's K columns, else one of E's V columns (a vector: masks built from
    # a scalar condition do not broadcast in the interpreter).
    is_m = (tl.zeros([BV], tl.int32) + i_c) < n_m
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_j = tl.where(is_m, i_c, i_c - n_m) * BV + tl.arange(0, BV)
    m_j = o_j < tl.where(is_m, K, V)
    m_u = m_j & (~is_m)  # U feeds E only
    dt = y.dtype.element_ty
    b_s = tl.where(is_m[None, :] & (o_k[:, None] == o_j[None, :]), 1.0, 0.0).to(tl.float32)

    t_lo = i_p * SEG
    for i_t in range(t_lo, tl.minimum(t_lo + SEG, NT)):
        t_c = i_t * C + o_c
        m_c = t_c < T
        m_ck = m_c[:, None] & m_k[None, :]
        p_k = t_c[:, None] * HK + o_k[None, :]
        b_y = tl.load(y + p_k, mask=m_ck, other=0.0)
        b_u = tl.load(u + t_c[:, None] * HV + o_j[None, :], mask=m_c[:, None] & m_u[None, :], other=0.0)
        b_kt = tl.load(kt + p_k, mask=m_ck, other=0.0)
        b_gc = tl.load(gam + ((c0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        if PRECISION == "input":
            b_sd = b_s.to(dt)
        else:
            b_sd = b_s
            b_y = b_y.to(tl.float32)
            b_kt = b_kt.to(tl.float32)
        if ROUND:
            b_kt = round_tf32(b_kt)  # as the pass rounds K_tailᵀ R's operands: M and E carry its arithmetic
        b_r = b_u.to(tl.float32) - _mma(b_y, b_sd, UPCAST, PRECISION)
        b_rd = b_r.to(b_y.dtype)
        if ROUND:
            b_rd = round_tf32(b_rd)
        b_s = b_s * b_gc[:, None] + _mma(tl.trans(b_kt), b_rd, UPCAST, PRECISION)

    m_s = m_k[:, None] & m_j[None, :]
    base = i_p.to(tl.int64) * NH + i_nh
    tl.store(mx + base * K * K + o_k[:, None] * K + o_j[None, :], b_s, mask=m_s & is_m[None, :])
    tl.store(ex + base * K * V + o_k[:, None] * V + o_j[None, :], b_s, mask=m_s & (~is_m)[None, :])


@triton.jit
def _carry_kernel(
    mx, ex, h0, hs,
    NP, NH,
    K, V,
    BR: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    """Launch 2 of the sequence split: S_{p+1} = M_p S_p + E_p over the P segments of one (sequence, head) and
    BV columns, into hs [P + 1, N·H, K, V] (hs[0] the initial state, hs[P] the final one). S_p goes through
    hs (this program's own stores, read back after a barrier) so that a [K, K] product runs in [BR, BR] blocks."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    o_r = tl.arange(0, BR)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    for i_r in range(tl.cdiv(K, BR)):
        rows = i_r * BR + o_r
        m_rv = (rows < K)[:, None] & m_v[None, :]
        p_rv = (i_nh.to(tl.int64) * K + rows[:, None]) * V + o_v[None, :]
        b_h = tl.zeros([BR, BV], tl.float32)
        if USE_INITIAL_STATE:
            b_h = tl.load(h0 + p_rv, mask=m_rv, other=0.0)
        tl.store(hs + p_rv, b_h, mask=m_rv)
    for i_p in range(NP):
        tl.debug_barrier()  # S_p's rows were stored by other threads of this program
        base = (i_nh + i_p * NH).to(tl.int64)
        for i_r in range(tl.cdiv(K, BR)):
            rows = i_r * BR + o_r
            m_r = rows < K
            m_rv = m_r[:, None] & m_v[None, :]
            b_h = tl.load(ex + (base * K + rows[:, None]) * V + o_v[None, :], mask=m_rv, other=0.0)
            for i_k in range(tl.cdiv(K, BR)):
                cols = i_k * BR + o_r
                m_kc = cols < K
                b_m = tl.load(mx + (base * K + rows[:, None]) * K + cols[None, :],
                              mask=m_r[:, None] & m_kc[None, :], other=0.0)
                b_sp = tl.load(hs + (base * K + cols[:, None]) * V + o_v[None, :],
                               mask=m_kc[:, None] & m_v[None, :], other=0.0)
                b_h += tl.dot(b_m, b_sp, input_precision=CARRY_PRECISION)
            tl.store(hs + ((base + NH) * K + rows[:, None]) * V + o_v[None, :], b_h, mask=m_rv)


@triton.jit
def _output_kernel(
    qg, aqk, r, hc, o,
    cu_seqlens, chunk_indices,
    T, NT,
    H, K, V, KP: tl.constexpr,
    C: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr,
):
    """Split output: O = Q_γ S0 + A_qk R for one (V tile, chunk, head), from the states the pass stored."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, bos, T_seq, i_tc, i_chunk = chunk_coords(i_t, i_bh, cu_seqlens, chunk_indices, T, NT, H, IS_VARLEN)
    tok0 = bos * H + i_h
    qg += tok0 * K
    r += tok0 * V
    o += tok0 * V
    aqk += tok0 * C
    o_c = tl.arange(0, C)
    t_c = i_tc * C + o_c
    m_c = t_c < T_seq
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_cv = m_c[:, None] & m_v[None, :]
    p_v = t_c[:, None] * (H * V) + o_v[None, :]
    b_q = tl.load(qg + t_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
    b_a = tl.load(aqk + t_c[:, None] * (H * C) + o_c[None, :], mask=m_c[:, None], other=0.0)
    b_h = tl.load(hc + (i_chunk * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)
    b_r = tl.load(r + p_v, mask=m_cv, other=0.0)
    if PRECISION != "input":
        b_q = b_q.to(tl.float32)
        b_a = b_a.to(tl.float32)
    if ROUND:
        # As the fused pass rounds them; R arrives rounded already (the pass stores it so).
        b_q = round_tf32(b_q)
        b_a = round_tf32(b_a)
    b_o = _mma(b_q, b_h, UPCAST, PRECISION) + _mma(b_a, b_r, UPCAST, PRECISION)
    tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_cv)


def state_fwd(
    inter: IntraOutputs,
    *,
    out_dtype: torch.dtype,
    v_shape: torch.Size,
    chunk: int,
    cfg: StateConfig,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
    num_seqs: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the state stage on the intra stage's outputs; returns ``(o, final_state or None)``.

    ``cfg.output == "split"`` makes it two launches: the pass stores each chunk's entering state and R instead of
    forming O, and :func:`_output_kernel` forms O with one program per (V tile, chunk, head).
    ``cfg.segment_chunks > 0`` (dense batches) adds the sequence split's two launches before the pass, which then
    walks every segment in parallel (see the module docstring).
    """
    y = inter.y
    _, T, H, K = y.shape
    V = v_shape[-1]
    o = output_buffer(v_shape, out_dtype, y.device)
    ht = output_buffer((num_seqs, H, K, V), torch.float32, y.device) if output_final_state else None
    varlen = cu_seqlens is not None
    nt = triton.cdiv(T, chunk)
    n_v = triton.cdiv(V, cfg.BV)
    split = cfg.output == "split"
    precision, round_operands = dot_precision(cfg.precision)
    hc = r = None
    if split:
        num_chunks = inter.num_chunks
        # Operand dtype of the dots: the input dtype, or fp32 when the dots take fp32 operands.
        dot_dtype = y.dtype if cfg.precision == "input" else torch.float32
        hc = output_buffer((num_chunks, H, K, V), dot_dtype, y.device)
        r = output_buffer(v_shape, dot_dtype, y.device)
    seg = cfg.segment_chunks
    ka, kb = state_row_parts(K, cfg.k_parts)
    if kb and (seg or K <= ka):
        raise ValueError(f"state.k_parts={cfg.k_parts}: takes K > {ka} and no sequence split, received K={K}, "
                         f"segment_chunks={seg}; use k_parts=1")
    hs = None
    n_seg = 1
    if seg:
        if varlen:
            raise ValueError("state.segment_chunks: the sequence split takes dense batches; set it to 0 with cu_seqlens")
        hs, n_seg = _segment_states(inter, v_shape, chunk, cfg, initial_state, num_seqs)
        if output_final_state:
            ht = hs[n_seg].view(num_seqs, H, K, V)
    _state_kernel[(n_v, num_seqs * H, n_seg)](
        y, inter.u, inter.qg, inter.kt, inter.aqk, inter.gamma,
        o, initial_state, ht, hc, r, hs,
        cu_seqlens, chunk_offsets,
        T, nt, inter.num_chunks, max(seg, 1),
        H=H, K=K, V=V, KP=ka, KB=kb,
        C=chunk, BV=cfg.BV,
        IS_VARLEN=varlen, USE_INITIAL_STATE=initial_state is not None and not seg,
        STORE_FINAL_STATE=output_final_state and not seg,
        SPLIT=split, USE_SEGMENTS=bool(seg), PRECISION=precision, ROUND=round_operands,
        UPCAST=UPCAST_DOTS_WHEN_INTERPRETED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        B = y.shape[0]
        grid = (n_v, inter.num_chunks, H) if varlen else (n_v, nt, B * H)
        _output_kernel[grid](
            inter.qg, inter.aqk, r, hc, o,
            cu_seqlens, chunk_indices,
            T, nt,
            H=H, K=K, V=V, KP=padded_dim(K),
            C=chunk, BV=cfg.BV,
            IS_VARLEN=varlen, PRECISION=precision, ROUND=round_operands, UPCAST=UPCAST_DOTS_WHEN_INTERPRETED,
            num_warps=cfg.num_warps, num_stages=1,
        )
    return o, ht


def _segment_states(
    inter: IntraOutputs,
    v_shape: torch.Size,
    chunk: int,
    cfg: StateConfig,
    initial_state: torch.Tensor | None,
    num_seqs: int,
) -> tuple[torch.Tensor, int]:
    """Launches 1 and 2 of the sequence split: every segment's entering state, fp32 [P + 1, N·H, K, V] (the last
    slot is the final state), and P."""
    y = inter.y
    _, T, H, K = y.shape
    V = v_shape[-1]
    nt = triton.cdiv(T, chunk)
    seg = cfg.segment_chunks
    n_seg = triton.cdiv(nt, seg)
    nh = num_seqs * H
    mx = output_buffer((n_seg, nh, K, K), torch.float32, y.device)
    ex = output_buffer((n_seg, nh, K, V), torch.float32, y.device)
    hs = output_buffer((n_seg + 1, nh, K, V), torch.float32, y.device)
    precision, round_operands = dot_precision(cfg.precision)
    _segment_kernel[(triton.cdiv(K, cfg.BV) + triton.cdiv(V, cfg.BV), nh, n_seg)](
        y, inter.u, inter.kt, inter.gamma, mx, ex,
        T, nt, seg, nh,
        H=H, K=K, V=V, KP=padded_dim(K),
        C=chunk, BV=cfg.BV,
        PRECISION=precision, ROUND=round_operands, UPCAST=UPCAST_DOTS_WHEN_INTERPRETED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _carry_kernel[(triton.cdiv(V, cfg.BV), nh)](
        mx, ex, initial_state, hs,
        n_seg, nh,
        K, V,
        BR=min(CARRY_BLOCK, padded_dim(K)), BV=cfg.BV,
        USE_INITIAL_STATE=initial_state is not None,
        num_warps=4, num_stages=1,
    )
    return hs, n_seg
