"""The chunk backward's local gradients, fused per (chunk, head): the key side's factors, then the value side.

**Key-side factors** (:func:`key_factors`): from q, k, g, b in the token layout to the chunk-major fp32 factors
the pair backward and the key-side tail read: qs = scale·q̂, k̂ (q̂, k̂ l2-normalised when asked, with their
reciprocal norms), b⊙k̂, b and g as fp32, G (the within-chunk prefix sum of g raised to the decay floor),
Ē = exp(G)⊙b⊙k̂ and K_tail = exp(G_C − G)⊙k̂ (both exponents ≤ 0), in one pass instead of a dozen torch ops.

**Value side** (:func:`local_v_side`): given a chunk's entering state S0 and the gradient dS_C reaching its final state (kernels/chunk_bwd.py's two
per-sequence passes), every chunk is an independent function (q, k, v, g, b, w; S0) → (O, S_C). In the symbols of
../shared/GDN2.md, with A = (I + T)^-1, Ē, K_tail and A_qk formed by the caller, this launch computes, walking the
V axis in tiles of BV with the K axis whole:

    Z = W⊙V,  U = A Z,  Y = A Ē,  R = U − Y S0
    dR = A_qkᵀ dO + K_tail dS_C
    dA_qk = mask(dO Rᵀ)              dQ_γ = dO S0ᵀ          dK_tail = R dS_Cᵀ
    dY = −dR S0ᵀ                      dZ = Aᵀ dR  →  dv = W⊙dZ,  dw = V⊙dZ
    dA = dR Zᵀ + dY Ēᵀ                dĒ = Aᵀ dY             dT = −strictly_lower(Aᵀ dA Aᵀ)
    d_last = γ_C ⊙ Σ_v (dS_C ⊙ S0)    (γ_C's gradient through Diag(γ_C) S0)

Sums over V accumulate in fp32 registers across the V tiles, so each output element has one writer (no atomics,
deterministic). dv and dw go straight to the [B, T, H, V] token layout; the C×C and C×K results go to chunk-major
fp32 buffers for the key side (kernels/pairwise.py's pair backward, then chunk_bwd's key-side tail).

Rows: the caller passes ``rows`` [N, C], the flat token row (b·T + t) of each chunk row, or −1 for a padding row,
built from sanitised offsets (dense: every row below T; packed: the chunk index). Every token load and store is
masked by ``rows >= 0``; a chunk whose first row is padding (a packed index's phantom slot) reads no S0 or dS_C and
writes zeros, so whatever those per-chunk slots hold never reaches a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gdn2_tune.kernels.buffers import output_buffer
from gdn2_tune.kernels.config import padded_dim
from gdn2_tune.kernels.state import UPCAST_DOTS_WHEN_INTERPRETED

# The value side's kernels (local_v_side's ``tile``): V tiles with K whole, K tiles with V whole, or two launches
# ("split": programs per V tile then per chunk; "kv" and "kv16": per V tile then per K tile, "kv16" with the
# products that read S0 and dS_C in the states' dtype).
VALUE_TILES = ("v", "k", "split", "stack", "kv", "kv16")
# Software pipelining of the split launches' tile loops. Each loop step loads two fp32 [BK, BV] state tiles (and
# the rows kernel two [C, BK] factor tiles): 2 stages double-buffer them in shared memory, ~2·(2·BK·BV + ...)·4 B,
# 64 KiB at BK = BV = 64, leaving room for the dot operands' layout conversions at 16 warps.
SPLIT_STAGES = 2
# Pipelining of the stacked kernel's K walks: compiled for sm90 (triton 3.6) at C = 32, K = V = 128, bf16, 8 warps,
# 2 stages spill least (168 / 176 B per thread at BK 16 / 32, 98 KiB of shared memory; 1 stage 448 / 416 B, 3
# stages 304 / 312 B; the "v" kernel at BV 64: 1072 B, 140 KiB).
STACK_STAGES = 2


@triton.jit
def _local_v_kernel(
    a, aqk, e_bar, k_tail, G, hc, dhc,
    v, w, do, rows,
    dv, dw, d_aqk, d_t, d_e, d_qg, d_kt, d_last,
    H, K, V,
    C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_nh = i_n.to(tl.int64) * H + i_h
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    p_cc = i_nh * C * C + o_c[:, None] * C + o_c[None, :]
    p_ck = i_nh * C * K + o_c[:, None] * K + o_k[None, :]
    m_ck = m_k[None, :]

    b_rows = tl.load(rows + i_n.to(tl.int64) * C + o_c)
    m_c = b_rows >= 0
    # A chunk's first row is a token unless the chunk is a packed index's phantom slot, whose per-chunk slots (A,
    # S0, dS_C) no launch wrote: read none of them there.
    live = tl.load(rows + i_n.to(tl.int64) * C) >= 0
    m_live = o_k < tl.where(live, K, 0)
    tok = (tl.maximum(b_rows, 0) * H + i_h) * V  # int64 rows: no 32-bit overflow at large B·T·H·V

    b_a = tl.load(a + p_cc, mask=(o_c < tl.where(live, C, 0))[:, None], other=0.0)
    # A_qk in the token layout [B, T, H, C] (the intra stage's output): row r of the chunk at its token's row.
    b_aqk = tl.load(aqk + (tl.maximum(b_rows, 0) * H + i_h)[:, None] * C + o_c[None, :], mask=m_c[:, None],
                    other=0.0).to(tl.float32)
    b_e = tl.load(e_bar + p_ck, mask=m_ck, other=0.0)
    b_kt = tl.load(k_tail + p_ck, mask=m_ck, other=0.0)
    b_y = tl.dot(b_a, b_e, input_precision=PRECISION)

    b_daqk = tl.zeros([C, C], tl.float32)
    b_drz = tl.zeros([C, C], tl.float32)
    b_dy = tl.zeros([C, KP], tl.float32)
    b_dqg = tl.zeros([C, KP], tl.float32)
    b_dkt = tl.zeros([C, KP], tl.float32)
    b_dss = tl.zeros([KP], tl.float32)
    p_s = i_nh * K * V + o_k[:, None] * V
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_s = m_live[:, None] & m_v[None, :]
        b_s0 = tl.load(hc + p_s + o_v[None, :], mask=m_s, other=0.0).to(tl.float32)
        b_ds = tl.load(dhc + p_s + o_v[None, :], mask=m_s, other=0.0).to(tl.float32)
        m_cv = m_c[:, None] & m_v[None, :]
        p_t = tok[:, None] + o_v[None, :]
        b_v = tl.load(v + p_t, mask=m_cv, other=0.0).to(tl.float32)
        b_w = tl.load(w + p_t, mask=m_cv, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_t, mask=m_cv, other=0.0).to(tl.float32)
        b_z = b_w * b_v
        b_r = tl.dot(b_a, b_z, input_precision=PRECISION) - tl.dot(b_y, b_s0, input_precision=PRECISION)
        b_dr = tl.dot(tl.trans(b_aqk), b_do, input_precision=PRECISION)
        b_dr += tl.dot(b_kt, b_ds, input_precision=PRECISION)
        b_daqk += tl.dot(b_do, tl.trans(b_r), input_precision=PRECISION)
        b_drz += tl.dot(b_dr, tl.trans(b_z), input_precision=PRECISION)
        b_dy -= tl.dot(b_dr, tl.trans(b_s0), input_precision=PRECISION)
        b_dqg += tl.dot(b_do, tl.trans(b_s0), input_precision=PRECISION)
        b_dkt += tl.dot(b_r, tl.trans(b_ds), input_precision=PRECISION)
        b_dss += tl.sum(b_ds * b_s0, 1)
        b_dz = tl.dot(tl.trans(b_a), b_dr, input_precision=PRECISION)
        tl.store(dv + p_t, (b_dz * b_w).to(dv.dtype.element_ty), mask=m_cv)
        tl.store(dw + p_t, (b_dz * b_v).to(dw.dtype.element_ty), mask=m_cv)

    b_da = b_drz + tl.dot(b_dy, tl.trans(b_e), input_precision=PRECISION)
    b_at = tl.trans(b_a)
    b_dt = tl.dot(b_at, tl.dot(b_da, b_at, input_precision=PRECISION), input_precision=PRECISION)
    tl.store(d_t + p_cc, tl.where(o_c[:, None] > o_c[None, :], -b_dt, 0.0))
    tl.store(d_aqk + p_cc, tl.where(o_c[:, None] >= o_c[None, :], b_daqk, 0.0))
    tl.store(d_e + p_ck, tl.dot(b_at, b_dy, input_precision=PRECISION), mask=m_ck)
    tl.store(d_qg + p_ck, b_dqg, mask=m_ck)
    tl.store(d_kt + p_ck, b_dkt, mask=m_ck)
    b_glast = tl.load(G + i_nh * C * K + (C - 1) * K + o_k, mask=m_k, other=0.0)
    tl.store(d_last + i_nh * K + o_k, tl.exp(b_glast) * b_dss, mask=m_k)


@triton.jit
def _local_stacked_kernel(
    a, aqk, e_bar, k_tail, G, hc, dhc,
    v, w, do, rows,
    dv, dw, d_aqk, d_t, d_e, d_qg, d_kt, d_last,
    H, K, V,
    C: tl.constexpr, VP: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """The same results as :func:`_local_v_kernel`, K in tiles of BK with V whole, every product a dot of 2C rows.

    Y never forms: with X = Z − Ē S0, R = A X, dA = dR Xᵀ and dĒ = −dZ S0ᵀ (dZ = Aᵀ dR), so no dY. Pairs of C-row
    products stack into one 2C-row dot (row r < C the chunk's row r, row r ≥ C its row r − C) through block
    matrices: at C = 32 each dot has the 64 rows that Hopper's warpgroup MMA takes with operands in shared memory,
    where a 32-row dot takes mma.sync with every operand in registers (the "v" and "k" kernels' spills).

        P = [Ē; K_tail] S0,  P' = [Ē; K_tail] dS_C      (a first walk over K; the top of P, the bottom of P')
        IN = [Z; dO],  MID = [X; dR] = [Z − P; P'] + diag(0, A_qkᵀ) IN,  OUT = [R; dZ] = diag(A, Aᵀ) MID
        [·, ·; dA, ·] = MID MIDᵀ,  [·, ·; dA_qk, ·] = IN OUTᵀ
        [dQ_γ; dĒ] = [dO; −dZ] S0ᵀ,  [dK_tail; ·] = OUT dS_Cᵀ   (a second walk over K, each tile stored at once)

    No accumulator crosses the second walk; S0 and dS_C are read twice (the second time mostly from L2). The
    unused blocks cost tensor-core time, which the kernel has to spare (it is bound by reading the state)."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_nh = i_n.to(tl.int64) * H + i_h
    # 64-bit scalar bases, 32-bit tile offsets: half the registers of 64-bit pointer tiles.
    a += i_nh * C * C
    d_aqk += i_nh * C * C
    d_t += i_nh * C * C
    e_bar += i_nh * C * K
    k_tail += i_nh * C * K
    G += i_nh * C * K
    d_e += i_nh * C * K
    d_qg += i_nh * C * K
    d_kt += i_nh * C * K
    d_last += i_nh * K
    hc += i_nh * K * V
    dhc += i_nh * K * V
    o_r = tl.arange(0, 2 * C)
    top = o_r < C
    o_c = o_r % C
    o_v = tl.arange(0, VP)
    m_v = o_v < V
    b_rows = tl.load(rows + i_n.to(tl.int64) * C + o_c)
    m_c = b_rows >= 0
    live = tl.load(rows + i_n.to(tl.int64) * C) >= 0  # a packed index's phantom slot reads no per-chunk slot
    m_vl = o_v < tl.where(live, V, 0)
    tok = (tl.maximum(b_rows, 0) * H + i_h) * V  # int64 rows: no 32-bit overflow at large B·T·H·V
    m_cv = m_c[:, None] & m_v[None, :]
    m_top = m_cv & top[:, None]
    m_bot = m_cv & (~top)[:, None]
    p_t = tok[:, None] + o_v[None, :]

    b_p = tl.zeros([2 * C, VP], tl.float32)
    b_pd = tl.zeros([2 * C, VP], tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_s = m_k[:, None] & m_vl[None, :]
        b_q = tl.load(tl.where(top[:, None], e_bar, k_tail) + o_c[:, None] * K + o_k[None, :], mask=m_k[None, :],
                      other=0.0)
        b_p += tl.dot(b_q, tl.load(hc + o_k[:, None] * V + o_v[None, :], mask=m_s, other=0.0).to(tl.float32),
                      input_precision=PRECISION)
        b_pd += tl.dot(b_q, tl.load(dhc + o_k[:, None] * V + o_v[None, :], mask=m_s, other=0.0).to(tl.float32),
                       input_precision=PRECISION)

    # diag(A, Aᵀ) and diag(0, A_qkᵀ), [2C, 2C].
    b_ab = tl.load(a + tl.where(top[:, None], o_c[:, None] * C + o_c[None, :], o_c[None, :] * C + o_c[:, None]),
                   mask=(top[:, None] == top[None, :]) & (o_r < tl.where(live, 2 * C, 0))[:, None],
                   other=0.0)
    b_dq = tl.load(aqk + (tl.maximum(b_rows, 0) * H + i_h)[None, :] * C + o_c[:, None],
                   mask=(~top)[:, None] & (~top)[None, :] & m_c[None, :], other=0.0).to(tl.float32)
    b_in = (tl.load(tl.where(top[:, None], v, do) + p_t, mask=m_cv, other=0.0).to(tl.float32)
            * tl.load(w + p_t, mask=m_top, other=1.0).to(tl.float32))
    b_mid = tl.where(top[:, None], b_in - b_p, b_pd) + tl.dot(b_dq, b_in, input_precision=PRECISION)
    b_out = tl.dot(b_ab, b_mid, input_precision=PRECISION)
    tl.store(dv + p_t, (b_out * tl.load(w + p_t, mask=m_bot, other=0.0).to(tl.float32)).to(dv.dtype.element_ty),
             mask=m_bot)
    tl.store(dw + p_t, (b_out * tl.load(v + p_t, mask=m_bot, other=0.0).to(tl.float32)).to(dw.dtype.element_ty),
             mask=m_bot)
    # The bottom-left blocks (chunk row r − C, column s); that of diag(A, Aᵀ) G diag(Aᵀ, A) is Aᵀ dA Aᵀ.
    low = (~top)[:, None] & top[None, :]
    p_cc = o_c[:, None] * C + o_c[None, :]
    b_g = tl.dot(b_in, tl.trans(b_out), input_precision=PRECISION)
    tl.store(d_aqk + p_cc, tl.where(o_c[:, None] >= o_c[None, :], b_g, 0.0), mask=low)
    b_g = tl.dot(b_mid, tl.trans(b_mid), input_precision=PRECISION)
    b_g = tl.dot(tl.dot(b_ab, b_g, input_precision=PRECISION), tl.trans(b_ab), input_precision=PRECISION)
    tl.store(d_t + p_cc, tl.where(o_c[:, None] > o_c[None, :], -b_g, 0.0), mask=low)

    b_lhs = tl.where(top[:, None], tl.load(do + p_t, mask=m_top, other=0.0).to(tl.float32), -b_out)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_s = m_k[:, None] & m_vl[None, :]
        b_s0 = tl.load(hc + o_k[:, None] * V + o_v[None, :], mask=m_s, other=0.0).to(tl.float32)
        b_ds = tl.load(dhc + o_k[:, None] * V + o_v[None, :], mask=m_s, other=0.0).to(tl.float32)
        p_ck = o_c[:, None] * K + o_k[None, :]
        tl.store(tl.where(top[:, None], d_qg, d_e) + p_ck, tl.dot(b_lhs, tl.trans(b_s0), input_precision=PRECISION),
                 mask=m_k[None, :])
        tl.store(d_kt + p_ck, tl.dot(b_out, tl.trans(b_ds), input_precision=PRECISION),
                 mask=top[:, None] & m_k[None, :])
        b_glast = tl.load(G + (C - 1) * K + o_k, mask=m_k, other=0.0)
        tl.store(d_last + o_k, tl.exp(b_glast) * tl.sum(b_ds * b_s0, 1), mask=m_k)


@triton.jit
def _local_vk_kernel(
    a, aqk, e_bar, k_tail, G, hc, dhc,
    v, w, do, rows,
    dv, dw, d_aqk, d_t, d_e, d_qg, d_kt, d_last,
    H, K, V,
    C: tl.constexpr, VP: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """The same results as :func:`_local_v_kernel`, walking K in tiles of BK with V whole: a first pass over K
    finishes R and dR ([C, V]), a second forms the C×K results one K tile at a time and stores each at once, so
    no [C, K] accumulator lives across the loop (the V-tiled kernel holds five). S0 and dS_C are read twice."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_nh = i_n.to(tl.int64) * H + i_h
    o_c = tl.arange(0, C)
    o_v = tl.arange(0, VP)
    m_v = o_v < V
    p_cc = i_nh * C * C + o_c[:, None] * C + o_c[None, :]

    b_rows = tl.load(rows + i_n.to(tl.int64) * C + o_c)
    m_c = b_rows >= 0
    live = tl.load(rows + i_n.to(tl.int64) * C) >= 0  # a packed index's phantom slot reads no per-chunk slot
    m_vl = o_v < tl.where(live, V, 0)
    tok = (tl.maximum(b_rows, 0) * H + i_h) * V
    m_cv = m_c[:, None] & m_v[None, :]
    p_t = tok[:, None] + o_v[None, :]

    b_a = tl.load(a + p_cc, mask=(o_c < tl.where(live, C, 0))[:, None], other=0.0)
    b_aqk = tl.load(aqk + (tl.maximum(b_rows, 0) * H + i_h)[:, None] * C + o_c[None, :], mask=m_c[:, None],
                    other=0.0).to(tl.float32)
    b_z = (tl.load(w + p_t, mask=m_cv, other=0.0).to(tl.float32)
           * tl.load(v + p_t, mask=m_cv, other=0.0).to(tl.float32))
    b_do = tl.load(do + p_t, mask=m_cv, other=0.0).to(tl.float32)
    b_r = tl.dot(b_a, b_z, input_precision=PRECISION)
    b_dr = tl.dot(tl.trans(b_aqk), b_do, input_precision=PRECISION)
    p_s = i_nh * K * V + o_v[None, :]
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_ck = i_nh * C * K + o_c[:, None] * K + o_k[None, :]
        m_s = m_k[:, None] & m_vl[None, :]
        b_e = tl.load(e_bar + p_ck, mask=m_k[None, :], other=0.0)
        b_kt = tl.load(k_tail + p_ck, mask=m_k[None, :], other=0.0)
        b_s0 = tl.load(hc + p_s + o_k[:, None] * V, mask=m_s, other=0.0).to(tl.float32)
        b_ds = tl.load(dhc + p_s + o_k[:, None] * V, mask=m_s, other=0.0).to(tl.float32)
        b_r -= tl.dot(tl.dot(b_a, b_e, input_precision=PRECISION), b_s0, input_precision=PRECISION)
        b_dr += tl.dot(b_kt, b_ds, input_precision=PRECISION)

    b_da = tl.dot(b_dr, tl.trans(b_z), input_precision=PRECISION)
    b_at = tl.trans(b_a)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_ck = i_nh * C * K + o_c[:, None] * K + o_k[None, :]
        m_s = m_k[:, None] & m_vl[None, :]
        b_e = tl.load(e_bar + p_ck, mask=m_k[None, :], other=0.0)
        b_s0 = tl.load(hc + p_s + o_k[:, None] * V, mask=m_s, other=0.0).to(tl.float32)
        b_ds = tl.load(dhc + p_s + o_k[:, None] * V, mask=m_s, other=0.0).to(tl.float32)
        b_dy = -tl.dot(b_dr, tl.trans(b_s0), input_precision=PRECISION)
        tl.store(d_qg + p_ck, tl.dot(b_do, tl.trans(b_s0), input_precision=PRECISION), mask=m_k[None, :])
        tl.store(d_kt + p_ck, tl.dot(b_r, tl.trans(b_ds), input_precision=PRECISION), mask=m_k[None, :])
        tl.store(d_e + p_ck, tl.dot(b_at, b_dy, input_precision=PRECISION), mask=m_k[None, :])
        b_da += tl.dot(b_dy, tl.trans(b_e), input_precision=PRECISION)
        b_glast = tl.load(G + i_nh * C * K + (C - 1) * K + o_k, mask=m_k, other=0.0)
        tl.store(d_last + i_nh * K + o_k, tl.exp(b_glast) * tl.sum(b_ds * b_s0, 1), mask=m_k)

    tl.store(d_aqk + p_cc, tl.where(o_c[:, None] >= o_c[None, :],
                                    tl.dot(b_do, tl.trans(b_r), input_precision=PRECISION), 0.0))
    b_dt = tl.dot(b_at, tl.dot(b_da, b_at, input_precision=PRECISION), input_precision=PRECISION)
    tl.store(d_t + p_cc, tl.where(o_c[:, None] > o_c[None, :], -b_dt, 0.0))
    b_dz = tl.dot(b_at, b_dr, input_precision=PRECISION)
    # v and w again rather than kept live through both loops (they are in cache).
    tl.store(dv + p_t, (b_dz * tl.load(w + p_t, mask=m_cv, other=0.0).to(tl.float32)).to(dv.dtype.element_ty),
             mask=m_cv)
    tl.store(dw + p_t, (b_dz * tl.load(v + p_t, mask=m_cv, other=0.0).to(tl.float32)).to(dw.dtype.element_ty),
             mask=m_cv)


@triton.jit
def _local_rows_kernel(
    a, aqk, e_bar, k_tail, hc, dhc,
    v, w, do, rows,
    dv, dw, r_buf, dr_buf,
    H, K, V,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """The split value side's first launch, one program per (chunk, head, V tile): the V columns that need all of K,
    R = A Z − Y S0 and dR = A_qkᵀ dO + K_tail dS_C, summed over K in tiles of BK (Y = A Ē re-formed per tile,
    C·C·BK, rather than kept: no [C, K] tile is live), then dZ = Aᵀ dR → dv, dw, and R, dR to chunk-major fp32
    scratch for :func:`_local_cols_kernel`. Live: A, A_qk [C, C], R, dR [C, BV] and one K tile's operands."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_nh = i_n.to(tl.int64) * H + i_h
    # 64-bit scalar bases, 32-bit tile offsets: half the registers of 64-bit pointer tiles.
    a += i_nh * C * C
    e_bar += i_nh * C * K
    k_tail += i_nh * C * K
    hc += i_nh * K * V
    dhc += i_nh * K * V
    r_buf += i_nh * C * V
    dr_buf += i_nh * C * V
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_rows = tl.load(rows + i_n.to(tl.int64) * C + o_c)
    m_c = b_rows >= 0
    live = tl.load(rows + i_n.to(tl.int64) * C) >= 0  # a packed index's phantom slot reads no per-chunk slot
    m_vl = o_v < tl.where(live, V, 0)
    tok = (tl.maximum(b_rows, 0) * H + i_h) * V
    m_cv = m_c[:, None] & m_v[None, :]
    p_t = tok[:, None] + o_v[None, :]

    b_a = tl.load(a + o_c[:, None] * C + o_c[None, :], mask=(o_c < tl.where(live, C, 0))[:, None], other=0.0)
    b_r = tl.zeros([C, BV], tl.float32)
    b_dr = tl.zeros([C, BV], tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_ck = o_c[:, None] * K + o_k[None, :]
        p_s = o_k[:, None] * V + o_v[None, :]
        m_s = m_k[:, None] & m_vl[None, :]
        b_e = tl.load(e_bar + p_ck, mask=m_k[None, :], other=0.0)
        b_kt = tl.load(k_tail + p_ck, mask=m_k[None, :], other=0.0)
        b_s0 = tl.load(hc + p_s, mask=m_s, other=0.0).to(tl.float32)
        b_ds = tl.load(dhc + p_s, mask=m_s, other=0.0).to(tl.float32)
        b_y = tl.dot(b_a, b_e, input_precision=PRECISION)
        b_r -= tl.dot(b_y, b_s0, input_precision=PRECISION)
        b_dr += tl.dot(b_kt, b_ds, input_precision=PRECISION)
    b_v = tl.load(v + p_t, mask=m_cv, other=0.0).to(tl.float32)
    b_w = tl.load(w + p_t, mask=m_cv, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_t, mask=m_cv, other=0.0).to(tl.float32)
    b_aqk = tl.load(aqk + (tl.maximum(b_rows, 0) * H + i_h)[:, None] * C + o_c[None, :], mask=m_c[:, None],
                    other=0.0).to(tl.float32)
    b_r += tl.dot(b_a, b_w * b_v, input_precision=PRECISION)
    b_dr += tl.dot(tl.trans(b_aqk), b_do, input_precision=PRECISION)
    b_dz = tl.dot(tl.trans(b_a), b_dr, input_precision=PRECISION)
    tl.store(dv + p_t, (b_dz * b_w).to(dv.dtype.element_ty), mask=m_cv)
    tl.store(dw + p_t, (b_dz * b_v).to(dw.dtype.element_ty), mask=m_cv)
    p_cv = o_c[:, None] * V + o_v[None, :]
    tl.store(r_buf + p_cv, b_r, mask=m_v[None, :])
    tl.store(dr_buf + p_cv, b_dr, mask=m_v[None, :])


@triton.jit
def _local_cols_kernel(
    a, e_bar, G, hc, dhc,
    v, w, do, rows, r_buf, dr_buf,
    d_aqk, d_t, d_e, d_qg, d_kt, d_last,
    H, K, V,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """The split value side's second launch, one program per (chunk, head): every sum over V, from the first
    launch's R and dR. A V walk forms the C×C sums dA_qk = mask(dO Rᵀ) and dR Zᵀ; then per K tile of BK, a V walk
    in tiles of BV forms dQ_γ = dO S0ᵀ, dK_tail = R dS_Cᵀ, dY = −dR S0ᵀ and Σ_v dS_C⊙S0 ([C, BK] accumulators),
    which are stored with dĒ = Aᵀ dY before the next tile, dY Ēᵀ adding into dA. Last, dT = −Aᵀ dA Aᵀ."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_nh = i_n.to(tl.int64) * H + i_h
    a += i_nh * C * C
    d_aqk += i_nh * C * C
    d_t += i_nh * C * C
    e_bar += i_nh * C * K
    G += i_nh * C * K
    d_e += i_nh * C * K
    d_qg += i_nh * C * K
    d_kt += i_nh * C * K
    d_last += i_nh * K
    hc += i_nh * K * V
    dhc += i_nh * K * V
    r_buf += i_nh * C * V
    dr_buf += i_nh * C * V
    o_c = tl.arange(0, C)
    p_cc = o_c[:, None] * C + o_c[None, :]
    b_rows = tl.load(rows + i_n.to(tl.int64) * C + o_c)
    m_c = b_rows >= 0
    live = tl.load(rows + i_n.to(tl.int64) * C) >= 0  # a packed index's phantom slot reads no per-chunk slot
    tok = (tl.maximum(b_rows, 0) * H + i_h) * V

    b_a = tl.load(a + p_cc, mask=(o_c < tl.where(live, C, 0))[:, None], other=0.0)
    b_daqk = tl.zeros([C, C], tl.float32)
    b_da = tl.zeros([C, C], tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_cv = m_c[:, None] & m_v[None, :]
        p_t = tok[:, None] + o_v[None, :]
        p_cv = o_c[:, None] * V + o_v[None, :]
        b_r = tl.load(r_buf + p_cv, mask=m_v[None, :], other=0.0)
        b_dr = tl.load(dr_buf + p_cv, mask=m_v[None, :], other=0.0)
        b_do = tl.load(do + p_t, mask=m_cv, other=0.0).to(tl.float32)
        b_z = tl.load(w + p_t, mask=m_cv, other=0.0).to(tl.float32) * tl.load(v + p_t, mask=m_cv,
                                                                               other=0.0).to(tl.float32)
        b_daqk += tl.dot(b_do, tl.trans(b_r), input_precision=PRECISION)
        b_da += tl.dot(b_dr, tl.trans(b_z), input_precision=PRECISION)
    tl.store(d_aqk + p_cc, tl.where(o_c[:, None] >= o_c[None, :], b_daqk, 0.0))

    b_at = tl.trans(b_a)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_kl = o_k < tl.where(live, K, 0)
        b_dqg = tl.zeros([C, BK], tl.float32)
        b_dkt = tl.zeros([C, BK], tl.float32)
        b_dy = tl.zeros([C, BK], tl.float32)
        b_dss = tl.zeros([BK], tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_s = m_kl[:, None] & m_v[None, :]
            p_s = o_k[:, None] * V + o_v[None, :]
            p_cv = o_c[:, None] * V + o_v[None, :]
            b_s0 = tl.load(hc + p_s, mask=m_s, other=0.0).to(tl.float32)
            b_ds = tl.load(dhc + p_s, mask=m_s, other=0.0).to(tl.float32)
            b_r = tl.load(r_buf + p_cv, mask=m_v[None, :], other=0.0)
            b_dr = tl.load(dr_buf + p_cv, mask=m_v[None, :], other=0.0)
            b_do = tl.load(do + tok[:, None] + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                           other=0.0).to(tl.float32)
            b_dqg += tl.dot(b_do, tl.trans(b_s0), input_precision=PRECISION)
            b_dkt += tl.dot(b_r, tl.trans(b_ds), input_precision=PRECISION)
            b_dy -= tl.dot(b_dr, tl.trans(b_s0), input_precision=PRECISION)
            b_dss += tl.sum(b_ds * b_s0, 1)
        p_ck = o_c[:, None] * K + o_k[None, :]
        b_e = tl.load(e_bar + p_ck, mask=m_k[None, :], other=0.0)
        b_da += tl.dot(b_dy, tl.trans(b_e), input_precision=PRECISION)
        tl.store(d_e + p_ck, tl.dot(b_at, b_dy, input_precision=PRECISION), mask=m_k[None, :])
        tl.store(d_qg + p_ck, b_dqg, mask=m_k[None, :])
        tl.store(d_kt + p_ck, b_dkt, mask=m_k[None, :])
        b_glast = tl.load(G + (C - 1) * K + o_k, mask=m_k, other=0.0)
        tl.store(d_last + o_k, tl.exp(b_glast) * b_dss, mask=m_k)
    b_dt = tl.dot(b_at, tl.dot(b_da, b_at, input_precision=PRECISION), input_precision=PRECISION)
    tl.store(d_t + p_cc, tl.where(o_c[:, None] > o_c[None, :], -b_dt, 0.0))


@triton.jit
def _state_dot(x, s, acc, PRECISION: tl.constexpr, IN_STATE_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x s for a tile s of S0 or dS_C as stored: in the state's dtype (x rounded to it: bf16 states give a
    bf16 tensor-core dot, half the operand bytes of a TF32 one) or in fp32 (s widened: a PRECISION dot). UPCAST
    (the interpreter, see kernels/state.py): the rounded operands multiplied in fp32, the same exact products."""
    if IN_STATE_DTYPE and UPCAST:
        acc = tl.dot(x.to(s.dtype).to(tl.float32), s.to(tl.float32), acc, input_precision="ieee")
    elif IN_STATE_DTYPE:
        acc = tl.dot(x.to(s.dtype), s, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(x.to(tl.float32), s.to(tl.float32), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _local_kv_rows_kernel(
    a, aqk, e_bar, k_tail, hc, dhc,
    v, w, do, rows,
    dv, dw, r_buf, dz_buf, cc_buf,
    H, K, V,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, STATE_DOTS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """value_tile="kv", first launch, one program per (chunk, V tile, head): the V columns that need all of K. As in
    the stacked kernel, Y never forms: a K walk in tiles of BK sums P = Ē S0 and P' = K_tail dS_C ([C, BV]), then

        X = Z − P,  R = A X,  dR = A_qkᵀ dO + P',  dZ = Aᵀ dR  →  dv = W⊙dZ, dw = V⊙dZ

    R and dZ go to chunk-major scratch for :func:`_local_kv_cols_kernel`, and so do this V tile's parts of the two
    C×C sums over V, dA = dR Xᵀ (= dR Zᵀ + dY Ēᵀ with dY = −dR S0ᵀ) and dO Rᵀ (dA_qk before its mask). The V tiles
    of a chunk are neighbouring programs, so the tiles after the first read Ē and K_tail from L2."""
    NV = tl.cdiv(V, BV)
    i_nv, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_v = i_nv // NV, i_nv % NV
    i_nh = i_n.to(tl.int64) * H + i_h
    # 64-bit scalar bases, 32-bit tile offsets: half the registers of 64-bit pointer tiles.
    a += i_nh * C * C
    e_bar += i_nh * C * K
    k_tail += i_nh * C * K
    hc += i_nh * K * V
    dhc += i_nh * K * V
    r_buf += i_nh * C * V
    dz_buf += i_nh * C * V
    cc_buf += (i_nh * NV + i_v) * 2 * C * C
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_rows = tl.load(rows + i_n.to(tl.int64) * C + o_c)
    m_c = b_rows >= 0
    live = tl.load(rows + i_n.to(tl.int64) * C) >= 0  # a packed index's phantom slot reads no per-chunk slot
    m_vl = o_v < tl.where(live, V, 0)
    tok = (tl.maximum(b_rows, 0) * H + i_h) * V  # int64 rows: no 32-bit overflow at large B·T·H·V
    m_cv = m_c[:, None] & m_v[None, :]
    p_t = tok[:, None] + o_v[None, :]

    b_p = tl.zeros([C, BV], tl.float32)
    b_pd = tl.zeros([C, BV], tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_ck = o_c[:, None] * K + o_k[None, :]
        p_s = o_k[:, None] * V + o_v[None, :]
        m_s = m_k[:, None] & m_vl[None, :]
        b_s0 = tl.load(hc + p_s, mask=m_s, other=0.0)
        b_ds = tl.load(dhc + p_s, mask=m_s, other=0.0)
        b_p = _state_dot(tl.load(e_bar + p_ck, mask=m_k[None, :], other=0.0), b_s0, b_p, PRECISION, STATE_DOTS,
                         UPCAST)
        b_pd = _state_dot(tl.load(k_tail + p_ck, mask=m_k[None, :], other=0.0), b_ds, b_pd, PRECISION,
                          STATE_DOTS, UPCAST)

    p_cc = o_c[:, None] * C + o_c[None, :]
    m_a = o_c < tl.where(live, C, 0)
    b_a = tl.load(a + p_cc, mask=m_a[:, None], other=0.0)
    # Aᵀ and A_qkᵀ loaded transposed (from cache) rather than tl.trans'd, and each [C, BV] tile stored or used up
    # as soon as it can be, v and w loaded again for dv and dw: compiled for sm90 (triton 3.6, C = 32, K = V = 256,
    # bf16 states, 4 warps) 152 / 168 registers at BK 32 / 64 (BV 64), where tl.trans and tiles kept live took
    # 255: three programs per SM instead of two.
    b_at = tl.load(a + o_c[None, :] * C + o_c[:, None], mask=m_a[None, :], other=0.0)
    b_aqkt = tl.load(aqk + (tl.maximum(b_rows, 0) * H + i_h)[None, :] * C + o_c[:, None], mask=m_c[None, :],
                     other=0.0).to(tl.float32)
    b_do = tl.load(do + p_t, mask=m_cv, other=0.0).to(tl.float32)
    b_dr = tl.dot(b_aqkt, b_do, input_precision=PRECISION) + b_pd
    b_x = (tl.load(w + p_t, mask=m_cv, other=0.0).to(tl.float32)
           * tl.load(v + p_t, mask=m_cv, other=0.0).to(tl.float32) - b_p)
    tl.store(cc_buf + p_cc, tl.dot(b_dr, tl.trans(b_x), input_precision=PRECISION))
    b_r = tl.dot(b_a, b_x, input_precision=PRECISION)
    tl.store(cc_buf + C * C + p_cc, tl.dot(b_do, tl.trans(b_r), input_precision=PRECISION))
    p_cv = o_c[:, None] * V + o_v[None, :]
    tl.store(r_buf + p_cv, b_r.to(r_buf.dtype.element_ty), mask=m_v[None, :])
    b_dz = tl.dot(b_at, b_dr, input_precision=PRECISION)
    tl.store(dz_buf + p_cv, b_dz.to(dz_buf.dtype.element_ty), mask=m_v[None, :])
    tl.store(dv + p_t, (b_dz * tl.load(w + p_t, mask=m_cv, other=0.0).to(tl.float32)).to(dv.dtype.element_ty),
             mask=m_cv)
    tl.store(dw + p_t, (b_dz * tl.load(v + p_t, mask=m_cv, other=0.0).to(tl.float32)).to(dw.dtype.element_ty),
             mask=m_cv)


@triton.jit
def _local_kv_cols_kernel(
    a, G, hc, dhc, do, rows, r_buf, dz_buf, cc_buf,
    d_aqk, d_t, d_e, d_qg, d_kt, d_last,
    H, K, V,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, STATE_DOTS: tl.constexpr,
    DO_DOTS: tl.constexpr, UPCAST: tl.constexpr,
):
    """value_tile="kv", second launch, one program per (chunk, K tile, head): a V walk in tiles of BV forms the
    [C, BK] sums over V

        dQ_γ = dO S0ᵀ,  dK_tail = R dS_Cᵀ,  dĒ = −dZ S0ᵀ (= Aᵀ dY),  Σ_v dS_C⊙S0

    from the first launch's R and dZ (no accumulator is shared between K tiles, so K is a grid axis). The K tile 0
    program also sums the first launch's C×C parts over the V tiles: dA_qk = mask(dO Rᵀ), dT = −Aᵀ dA Aᵀ.
    DO_DOTS: dO S0ᵀ in the state's dtype (exact when dO has it)."""
    NK = tl.cdiv(K, BK)
    i_nk, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_k = i_nk // NK, i_nk % NK
    i_nh = i_n.to(tl.int64) * H + i_h
    G += i_nh * C * K
    d_e += i_nh * C * K
    d_qg += i_nh * C * K
    d_kt += i_nh * C * K
    d_last += i_nh * K
    hc += i_nh * K * V
    dhc += i_nh * K * V
    r_buf += i_nh * C * V
    dz_buf += i_nh * C * V
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_rows = tl.load(rows + i_n.to(tl.int64) * C + o_c)
    m_c = b_rows >= 0
    live = tl.load(rows + i_n.to(tl.int64) * C) >= 0  # a packed index's phantom slot reads no per-chunk slot
    m_kl = o_k < tl.where(live, K, 0)
    tok = (tl.maximum(b_rows, 0) * H + i_h) * V

    b_dqg = tl.zeros([C, BK], tl.float32)
    b_dkt = tl.zeros([C, BK], tl.float32)
    b_de = tl.zeros([C, BK], tl.float32)
    b_dss = tl.zeros([BK], tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_s = o_k[:, None] * V + o_v[None, :]
        m_s = m_kl[:, None] & m_v[None, :]
        p_cv = o_c[:, None] * V + o_v[None, :]
        b_s0 = tl.load(hc + p_s, mask=m_s, other=0.0)
        b_ds = tl.load(dhc + p_s, mask=m_s, other=0.0)
        b_do = tl.load(do + tok[:, None] + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        b_r = tl.load(r_buf + p_cv, mask=m_v[None, :], other=0.0)
        b_dz = tl.load(dz_buf + p_cv, mask=m_v[None, :], other=0.0)
        b_dqg = _state_dot(b_do, tl.trans(b_s0), b_dqg, PRECISION, DO_DOTS, UPCAST)
        b_dkt = _state_dot(b_r, tl.trans(b_ds), b_dkt, PRECISION, STATE_DOTS, UPCAST)
        b_de = _state_dot(b_dz, tl.trans(b_s0), b_de, PRECISION, STATE_DOTS, UPCAST)
        b_dss += tl.sum(b_ds.to(tl.float32) * b_s0.to(tl.float32), 1)
    p_ck = o_c[:, None] * K + o_k[None, :]
    tl.store(d_qg + p_ck, b_dqg, mask=m_k[None, :])
    tl.store(d_kt + p_ck, b_dkt, mask=m_k[None, :])
    tl.store(d_e + p_ck, -b_de, mask=m_k[None, :])
    b_glast = tl.load(G + (C - 1) * K + o_k, mask=m_k, other=0.0)
    tl.store(d_last + o_k, tl.exp(b_glast) * b_dss, mask=m_k)

    if i_k == 0:
        p_cc = o_c[:, None] * C + o_c[None, :]
        b_a = tl.load(a + i_nh * C * C + p_cc, mask=(o_c < tl.where(live, C, 0))[:, None], other=0.0)
        b_da = tl.zeros([C, C], tl.float32)
        b_daqk = tl.zeros([C, C], tl.float32)
        NV = tl.cdiv(V, BV)
        for i_v in range(NV):
            p_part = cc_buf + (i_nh * NV + i_v) * 2 * C * C + p_cc
            b_da += tl.load(p_part)
            b_daqk += tl.load(p_part + C * C)
        tl.store(d_aqk + i_nh * C * C + p_cc, tl.where(o_c[:, None] >= o_c[None, :], b_daqk, 0.0))
        b_at = tl.trans(b_a)
        b_dt = tl.dot(b_at, tl.dot(b_da, b_at, input_precision=PRECISION), input_precision=PRECISION)
        tl.store(d_t + i_nh * C * C + p_cc, tl.where(o_c[:, None] > o_c[None, :], -b_dt, 0.0))


@triton.jit
def _key_factors_kernel(
    q, k, g, b, rows,
    qs, qn, kn, bk, bf, gf, G, e_bar, k_tail, rq, rk,
    scale, H, K,
    C: tl.constexpr, KP: tl.constexpr, G_MIN: tl.constexpr, EPS: tl.constexpr, USE_L2NORM: tl.constexpr,
    ALL_FACTORS: tl.constexpr,
):
    """ALL_FACTORS=False stores only what the value side and the fused key tail (kernels/chunk_bwd.py) read back:
    G, Ē, K_tail, and under the l2 norm q̂, k̂ and the reciprocal norms (the tail re-forms the others from q, k, b)."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_nh = i_n.to(tl.int64) * H + i_h
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    b_rows = tl.load(rows + i_n.to(tl.int64) * C + o_c)
    m_ck = (b_rows >= 0)[:, None] & m_k[None, :]
    p_t = ((tl.maximum(b_rows, 0) * H + i_h) * K)[:, None] + o_k[None, :]
    p_ck = i_nh * C * K + o_c[:, None] * K + o_k[None, :]
    b_q = tl.load(q + p_t, mask=m_ck, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_t, mask=m_ck, other=0.0).to(tl.float32)
    b_g = tl.load(g + p_t, mask=m_ck, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_t, mask=m_ck, other=0.0).to(tl.float32)
    if USE_L2NORM:
        b_rq = 1.0 / tl.sqrt(tl.sum(b_q * b_q, 1) + EPS)
        b_rk = 1.0 / tl.sqrt(tl.sum(b_k * b_k, 1) + EPS)
        b_q = b_q * b_rq[:, None]
        b_k = b_k * b_rk[:, None]
        tl.store(rq + i_nh * C + o_c, b_rq)
        tl.store(rk + i_nh * C + o_c, b_rk)
        tl.store(qn + p_ck, b_q, mask=m_k[None, :])
    b_G = tl.cumsum(tl.maximum(b_g, G_MIN), 0)
    b_last = tl.sum(tl.where((o_c == C - 1)[:, None], b_G, 0.0), 0)
    b_bk = b_b * b_k
    if ALL_FACTORS:
        tl.store(qs + p_ck, b_q * scale, mask=m_k[None, :])
        tl.store(bk + p_ck, b_bk, mask=m_k[None, :])
        tl.store(bf + p_ck, b_b, mask=m_k[None, :])
        tl.store(gf + p_ck, b_g, mask=m_k[None, :])
    if ALL_FACTORS or USE_L2NORM:
        tl.store(kn + p_ck, b_k, mask=m_k[None, :])
    tl.store(G + p_ck, b_G, mask=m_k[None, :])
    tl.store(e_bar + p_ck, tl.exp(b_G) * b_bk, mask=m_k[None, :])
    tl.store(k_tail + p_ck, tl.exp(tl.minimum(b_last[None, :] - b_G, 0.0)) * b_k, mask=m_k[None, :])


# The key factors' program holds several fp32 [C, K] tiles at once (q, k, g, b, G, b⊙k, ...). Read off the sm_90
# compile (triton 3.6): at C = 32 on 4 warps, K = 128 (32 elements of a tile per thread) takes 255 registers and no
# spills; K = 256 (64 per thread) spills 656 bytes per thread, and 8 warps hold it without spills (16: 128
# registers). So the warps grow with the tile, to at most this many elements of one tile per thread.
FACTOR_TILE_PER_THREAD = 32


def factor_warps(C: int, K: int) -> int:
    """Warps of the key factors' program at chunk length C and head dim K: 4 up to [32, 128], then doubling with
    the tile, at most 16."""
    per_warp = FACTOR_TILE_PER_THREAD * 32
    return min(16, max(4, triton.next_power_of_2(C * padded_dim(K) // per_warp)))


@dataclass(frozen=True)
class KeyFactors:
    """The chunk-major fp32 [n, H, C, K] factors of one group of chunks (see the module docstring); ``qn``,
    ``r_q`` and ``r_k`` ([n, H, C, 1]) only under the l2 norm. With ``all_factors=False`` (:func:`key_factors`)
    ``qs``, ``bk``, ``b`` and ``g`` are None, and so is ``kn`` without the l2 norm."""

    qs: torch.Tensor | None
    kn: torch.Tensor | None
    bk: torch.Tensor | None
    b: torch.Tensor | None
    g: torch.Tensor | None
    G: torch.Tensor
    e_bar: torch.Tensor
    k_tail: torch.Tensor
    qn: torch.Tensor | None
    r_q: torch.Tensor | None
    r_k: torch.Tensor | None


def key_factors(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, *,
    scale: float, l2norm: bool, g_floor: float, eps: float, num_warps: int = 0, all_factors: bool = True,
) -> KeyFactors:
    """:class:`KeyFactors` of the chunks whose token rows are ``rows`` (int64 [n, C], −1 for padding: such rows
    read as zeros, as the chunk layout's padding rows do) from contiguous [B, T, H, K] q, k, g, b.
    ``all_factors=False`` writes only G, Ē, K_tail (and q̂, k̂, the norms under the l2 norm): 3 of the 8 fp32 tiles,
    for the fused key tail (kernels/chunk_bwd.py), which re-forms the others from the token layout. ``num_warps``
    0 takes :func:`factor_warps`."""
    n, C = rows.shape
    H, K = k.shape[-2:]
    num_warps = num_warps or factor_warps(C, K)
    for name, x in (("q", q), ("k", k), ("g", g), ("b", b)):
        if x.shape != k.shape or not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {tuple(k.shape)} tensor, received {tuple(x.shape)}")
    if rows.dtype != torch.int64 or rows.dim() != 2:
        raise ValueError(f"rows: expected int64 [n, C], received {tuple(rows.shape)} {rows.dtype}")
    # qs, kn, bk, b, g, G, Ē, K_tail; the first five only where they are read back.
    kept = [all_factors, all_factors or l2norm] + [all_factors] * 3 + [True] * 3
    out = [output_buffer((n, H, C, K), torch.float32, k.device) if keep else None for keep in kept]
    qn = output_buffer((n, H, C, K), torch.float32, k.device) if l2norm else None
    r_q, r_k = ((output_buffer((n, H, C, 1), torch.float32, k.device) for _ in range(2)) if l2norm
                else (None, None))
    if n * H:
        _key_factors_kernel[(n, H)](
            q, k, g, b, rows, out[0], qn, *out[1:], r_q, r_k, scale, H, K,
            C=C, KP=padded_dim(K), G_MIN=g_floor, EPS=eps, USE_L2NORM=l2norm, ALL_FACTORS=all_factors,
            num_warps=num_warps,
        )
    return KeyFactors(*out, qn, r_q, r_k)


def local_v_side(
    a: torch.Tensor, a_qk: torch.Tensor, e_bar: torch.Tensor, k_tail: torch.Tensor, G: torch.Tensor,
    hc: torch.Tensor, dhc: torch.Tensor, v: torch.Tensor, w: torch.Tensor, do: torch.Tensor, rows: torch.Tensor,
    *, dv: torch.Tensor | None = None, dw: torch.Tensor | None = None, tile: str = "k", BV: int = 64,
    BK: int = 32, num_warps: int, precision: str,
) -> tuple[torch.Tensor, ...]:
    """``(dv, dw, dA_qk, dT, dĒ, dQ_γ, dK_tail, d_last)`` of one call (see the module docstring).

    Chunk-major fp32 inputs: ``a`` [N, H, C, C]; ``e_bar``, ``k_tail``, ``G`` [N, H, C, K]; ``hc``, ``dhc``
    [N, H, K, V]. Token-layout ``v``, ``w``, ``do`` [B, T, H, V] (one dtype), ``a_qk`` [B, T, H, C] (the intra
    stage's output, any float dtype); ``rows`` int64 [N, C].
    dv and dw come back in v's dtype and layout, zero on tokens no chunk row names; given ``dv`` and ``dw`` (zeroed,
    v's shape and dtype), the launch writes its chunks' rows into them instead, so that groups of chunks can share
    one pair of buffers. ``tile`` picks the kernels: "v" (:func:`_local_v_kernel`, V in tiles of ``BV``, K whole),
    "k" (:func:`_local_vk_kernel`, K in tiles of ``BK``, V whole), "stack" (:func:`_local_stacked_kernel`, K in
    tiles of ``BK``, V whole, 2C-row block products) or "split" (:func:`_local_rows_kernel` then
    :func:`_local_cols_kernel`, [BK, BV] tiles of the state, R and dR through fp32 scratch), or "kv" / "kv16"
    (:func:`_local_kv_rows_kernel` per V tile then :func:`_local_kv_cols_kernel` per K tile, R and dZ through
    scratch; "kv16" forms the products that read S0 and dS_C in their dtype).
    """
    if tile not in VALUE_TILES:
        raise ValueError(f"tile: expected one of {list(VALUE_TILES)}, received {tile!r}")
    N, H, C, K = e_bar.shape
    V = v.shape[-1]
    if a_qk.shape[:-2] != v.shape[:-2] or a_qk.shape[-2:] != (H, C) or not a_qk.is_contiguous():
        raise ValueError(f"a_qk: expected a contiguous [B, T, {H}, {C}] tensor, received {tuple(a_qk.shape)}")
    for name, x, want in (("a", a, (N, H, C, C)), ("k_tail", k_tail, (N, H, C, K)),
                          ("G", G, (N, H, C, K)), ("hc", hc, (N, H, K, V)), ("dhc", dhc, (N, H, K, V))):
        ok = (torch.float32, torch.bfloat16) if name in ("hc", "dhc") else (torch.float32,)  # states: fp32 or bf16
        if tuple(x.shape) != want or x.dtype not in ok or not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {' or '.join(str(d) for d in ok)} tensor of shape "
                             f"{want}, received {tuple(x.shape)} {x.dtype}")
    for name, x in (("v", v), ("w", w), ("do", do)):
        if x.shape[-2:] != (H, V) or not x.is_contiguous() or x.dtype != v.dtype:
            raise ValueError(f"{name}: expected a contiguous [B, T, {H}, {V}] {v.dtype} tensor, received "
                             f"{tuple(x.shape)} {x.dtype}")
    if tuple(rows.shape) != (N, C) or rows.dtype != torch.int64:
        raise ValueError(f"rows: expected int64 [{N}, {C}], received {tuple(rows.shape)} {rows.dtype}")
    for name, x in (("dv", dv), ("dw", dw)):
        if x is not None and (x.shape != v.shape or x.dtype != v.dtype or not x.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous {tuple(v.shape)} {v.dtype} tensor, received "
                             f"{tuple(x.shape)} {x.dtype}")
    dv = torch.zeros_like(v) if dv is None else dv
    dw = torch.zeros_like(w) if dw is None else dw
    d_aqk, d_t = (output_buffer((N, H, C, C), torch.float32, v.device) for _ in range(2))
    d_e, d_qg, d_kt = (output_buffer((N, H, C, K), torch.float32, v.device) for _ in range(3))
    d_last = output_buffer((N, H, K), torch.float32, v.device)
    args = (a, a_qk, e_bar, k_tail, G, hc, dhc, v, w, do, rows, dv, dw, d_aqk, d_t, d_e, d_qg, d_kt, d_last, H, K, V)
    if N * H and tile == "v":
        _local_v_kernel[(N, H)](*args, C=C, KP=padded_dim(K), BV=BV, PRECISION=precision, num_warps=num_warps)
    elif N * H and tile == "stack":
        _local_stacked_kernel[(N, H)](*args, C=C, VP=padded_dim(V), BK=BK, PRECISION=precision,
                                      num_warps=num_warps, num_stages=STACK_STAGES)
    elif N * H and tile == "k":
        _local_vk_kernel[(N, H)](*args, C=C, VP=padded_dim(V), BK=BK, PRECISION=precision, num_warps=num_warps)
    elif N * H and tile in ("kv", "kv16"):
        # R and dZ go through chunk-major scratch (in the states' dtype under "kv16", whose dots round them to it),
        # each V tile's C×C parts through fp32 scratch, from the first launch to the second.
        state_dots = tile == "kv16"
        BK, BV = min(BK, padded_dim(K)), min(BV, padded_dim(V))
        nv, nk = triton.cdiv(V, BV), triton.cdiv(K, BK)
        scratch = hc.dtype if state_dots else torch.float32
        r_buf, dz_buf = (output_buffer((N, H, C, V), scratch, v.device) for _ in range(2))
        cc_buf = output_buffer((N, H, nv, 2, C, C), torch.float32, v.device)
        consts = {"C": C, "BK": BK, "BV": BV, "PRECISION": precision, "STATE_DOTS": state_dots,
                  "UPCAST": UPCAST_DOTS_WHEN_INTERPRETED, "num_warps": num_warps, "num_stages": SPLIT_STAGES}
        _local_kv_rows_kernel[(N * nv, H)](
            a, a_qk, e_bar, k_tail, hc, dhc, v, w, do, rows, dv, dw, r_buf, dz_buf, cc_buf, H, K, V, **consts,
        )
        _local_kv_cols_kernel[(N * nk, H)](
            a, G, hc, dhc, do, rows, r_buf, dz_buf, cc_buf, d_aqk, d_t, d_e, d_qg, d_kt, d_last, H, K, V, **consts,
            DO_DOTS=state_dots or do.dtype == hc.dtype,
        )
    elif N * H:
        # R and dR go through chunk-major fp32 scratch from the first launch to the second.
        r_buf, dr_buf = (output_buffer((N, H, C, V), torch.float32, v.device) for _ in range(2))
        BK, BV = min(BK, padded_dim(K)), min(BV, padded_dim(V))
        _local_rows_kernel[(N, H, triton.cdiv(V, BV))](
            a, a_qk, e_bar, k_tail, hc, dhc, v, w, do, rows, dv, dw, r_buf, dr_buf, H, K, V,
            C=C, BK=BK, BV=BV, PRECISION=precision, num_warps=num_warps, num_stages=SPLIT_STAGES,
        )
        _local_cols_kernel[(N, H)](
            a, e_bar, G, hc, dhc, v, w, do, rows, r_buf, dr_buf, d_aqk, d_t, d_e, d_qg, d_kt, d_last, H, K, V,
            C=C, BK=BK, BV=BV, PRECISION=precision, num_warps=num_warps, num_stages=SPLIT_STAGES,
        )
    return dv, dw, d_aqk, d_t, d_e, d_qg, d_kt, d_last
