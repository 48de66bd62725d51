"""The value side of the chunk backward's local gradients: one fused launch per (chunk, head).

Given a chunk's entering state S0 and the gradient dS_C reaching its final state (kernels/chunk_bwd.py's two
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

import torch
import triton
import triton.language as tl

from gdn2_tune.kernels.buffers import output_buffer


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
        b_s0 = tl.load(hc + p_s + o_v[None, :], mask=m_s, other=0.0)
        b_ds = tl.load(dhc + p_s + o_v[None, :], mask=m_s, other=0.0)
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


def local_v_side(
    a: torch.Tensor, a_qk: torch.Tensor, e_bar: torch.Tensor, k_tail: torch.Tensor, G: torch.Tensor,
    hc: torch.Tensor, dhc: torch.Tensor, v: torch.Tensor, w: torch.Tensor, do: torch.Tensor, rows: torch.Tensor,
    *, dv: torch.Tensor | None = None, dw: torch.Tensor | None = None, BV: int, num_warps: int, precision: str,
) -> tuple[torch.Tensor, ...]:
    """``(dv, dw, dA_qk, dT, dĒ, dQ_γ, dK_tail, d_last)`` of one call (see the module docstring).

    Chunk-major fp32 inputs: ``a`` [N, H, C, C]; ``e_bar``, ``k_tail``, ``G`` [N, H, C, K]; ``hc``, ``dhc``
    [N, H, K, V]. Token-layout ``v``, ``w``, ``do`` [B, T, H, V] (one dtype), ``a_qk`` [B, T, H, C] (the intra
    stage's output, any float dtype); ``rows`` int64 [N, C].
    dv and dw come back in v's dtype and layout, zero on tokens no chunk row names; given ``dv`` and ``dw`` (zeroed,
    v's shape and dtype), the launch writes its chunks' rows into them instead, so that groups of chunks can share
    one pair of buffers.
    """
    N, H, C, K = e_bar.shape
    V = v.shape[-1]
    if a_qk.shape[:-2] != v.shape[:-2] or a_qk.shape[-2:] != (H, C) or not a_qk.is_contiguous():
        raise ValueError(f"a_qk: expected a contiguous [B, T, {H}, {C}] tensor, received {tuple(a_qk.shape)}")
    for name, x, want in (("a", a, (N, H, C, C)), ("k_tail", k_tail, (N, H, C, K)),
                          ("G", G, (N, H, C, K)), ("hc", hc, (N, H, K, V)), ("dhc", dhc, (N, H, K, V))):
        if tuple(x.shape) != want or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous fp32 tensor of shape {want}, received "
                             f"{tuple(x.shape)} {x.dtype}")
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
    if N * H:
        _local_v_kernel[(N, H)](
            a, a_qk, e_bar, k_tail, G, hc, dhc, v, w, do, rows,
            dv, dw, d_aqk, d_t, d_e, d_qg, d_kt, d_last,
            H, K, V, C=C, KP=max(16, triton.next_power_of_2(K)), BV=BV, PRECISION=precision,
            num_warps=num_warps,
        )
    return dv, dw, d_aqk, d_t, d_e, d_qg, d_kt, d_last
