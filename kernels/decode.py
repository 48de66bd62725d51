"""Recurrent decode: ``fused_recurrent_gdn2``, the Gated Delta Rule-2 token by token over a state pool, in place.

For serving: one token per sequence per step, or a few (up to ~64) when verifying speculative drafts. One program
per (sequence, head, V tile of BV columns) holds its [K, BV] slice of the state in fp32 registers and walks the
sequence's tokens in order, per token, in the symbols of ../shared/GDN2.md:

    S̄_t = Diag(exp(g_t)) S_{t-1}
    r_t = S̄_tᵀ (b_t ⊙ k_t)                 (a reduction over K: every program holds all of K)
    S_t = S̄_t + k_t (w_t ⊙ v_t − r_t)ᵀ
    o_t = S_tᵀ (scale · q_t)

The state is read once and written once per call (per token for 2-D slot indices), which is all the traffic that
matters: at H=16, K=V=128 an fp32 state is 1 MiB per sequence each way, against 1.5 KiB of inputs per token.

A config may instead launch a persistent grid (``programs_per_sm`` programs per SM), each program looping over the
work items pid, pid + G, ... and fetching the next item's state tile ahead of this item's work, through registers
(``prefetch``) or through Triton's pipelined item loop (``item_stages``): see kernels/decode_config.py.

State storage and indexing (the arguments of flash-linear-attention's ``fused_recurrent_gdn2_fwd``):

- Without ``ssm_state_indices`` the state is ``initial_state[n]`` for sequence n.
- With 1-D indices ``initial_state`` is a pool of slots and sequence n starts from slot ``idx[n]``; in place, its
  state after its last token goes back to that slot.
- With 2-D indices ``[N, T]`` sequence n starts from slot ``idx[n, 0]`` (``idx[n, a − 1]`` with
  ``num_accepted_tokens[n] = a``) and, in place, its state after token t goes to slot ``idx[n, t]``.
- A negative index is a padding entry: a negative starting slot makes the whole sequence a padding row (no state
  read or written, its outputs and fresh final-state row are zero); a negative per-token slot only skips that store.
- An index past the pool (or an accepted count outside 1..idx.shape[1], or a packed sequence with more tokens than
  idx.shape[1]) is a caller bug that cannot be checked on the host without a sync: the kernel masks it, so it never
  reads or writes outside the pool, and marks the result with NaN (the sequence's outputs and fresh final-state row
  for a bad starting slot, the token's output for a bad per-token slot; such a token's state is not stored).
  :func:`check_state_indices` checks the values on the host where a sync is acceptable.
- Two sequences must not name the same slot for writing (or one write a slot another reads): their programs run
  concurrently, so the result would depend on timing.
- The pool may be fp32 (default) or bf16: a bf16 state is rounded once per store, and all arithmetic is fp32.

Packed batches (``cu_seqlens``) are read on the device, clamped to the token range, so bad offsets cannot cause
an out-of-bounds access either; they are not checked on the host (that would sync every step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from gdn2_tune.kernels.buffers import output_buffer
from gdn2_tune.kernels.checks import DTYPE_NAMES, check_tensor, check_token_inputs
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.decode_config import (
    STATE_DTYPES,
    DecodeConfig,
    DecodeShape,
    cdiv,
    decode_infeasibility,
    default_decode_config,
    padded,
    register_limit,
    served_by_tables,
    table_shape,
)

_INDEX_DTYPES = (torch.int32, torch.int64)
L2NORM_EPS = tl.constexpr(1e-6)  # as kernels/reference.py l2norm and the chunk op

# What picks a config when the caller gives none: the call's table shape (decode_config.table_shape) in, a config
# admissible at it out. The dispatcher's tables (gdn2_tune/ops.py); None: the built-in default.
DecodeChooser = Callable[[Shape], DecodeConfig]

# Where the state goes after the token loop (the `FINAL_AT` constexpr).
FINAL_NONE = 0
FINAL_AT_SEQUENCE = 1  # ht[n]: a fresh [N, H, K, V] buffer, or initial_state itself in place without indices
FINAL_AT_SLOT = 2  # ht[idx[n]]: the pool, in place, with 1-D indices

# The SMs a persistent grid is sized for where there are none (the interpreter): one, so that a test's few programs
# each loop over several items, the last ones ragged.
INTERPRETER_SMS = 1


@functools.lru_cache(maxsize=16)  # asked on every step of a persistent config; a device query costs microseconds
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(cfg: DecodeConfig, device: torch.device) -> int:
    """The persistent grid of ``cfg`` on ``device``: ``programs_per_sm`` programs on each SM."""
    return cfg.programs_per_sm * sm_count(device)


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _load_token(q, k, g, b, v, w, tok, o_k, m_k, o_v, m_v, K, V, BATCH: tl.constexpr):
    """One token-head's inputs in fp32: q, k, g, b over K and v, w over the program's V tile (masked lanes read 0).

    The K-wide vectors are loaded spread over the threads and then moved into the state tile's row layout through
    shared memory, a store that waits for the load and a barrier. ptxas hoists no global load above a barrier, so
    loaded one by one each waits for the one before: with L2 cold, one memory round trip per input after the
    state's. BATCH joins the four before any of them moves, so all their loads are issued before the first wait.
    """
    b_q = tl.load(q + tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_g = tl.load(g + tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_b = tl.load(b + tok * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_w = tl.load(w + tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    if BATCH:
        b_qk, b_gb = tl.split(tl.join(tl.join(b_q, b_k), tl.join(b_g, b_b)))
        b_q, b_k = tl.split(b_qk)
        b_g, b_b = tl.split(b_gb)
    return b_q, b_k, b_g, b_b, b_v, b_w


@triton.jit
def _item_coords(item, H, NV: tl.constexpr):
    """(i_v, i_n, i_h) of a work item. V tiles of one (sequence, head) are neighbours in item order: their state
    tiles are contiguous in memory."""
    i_v = item % NV
    i_nh = item // NV
    return i_v, i_nh // H, i_nh % H


@triton.jit
def _start_slot(indices, accepted, i_n, live, P, NI, stride_in, stride_it,
                HAS_INDICES: tl.constexpr, HAS_ACCEPTED: tl.constexpr):
    """Sequence i_n's starting slot, whether it is inside the pool (ok), and whether it is a padding entry (pad).

    ``live``: the work item exists. A persistent program looks up to two items past its last one ahead of time; an
    item that does not exist reads nothing and is neither ok nor padding.
    """
    if HAS_INDICES:
        if HAS_ACCEPTED:
            col = tl.load(accepted + i_n, mask=live, other=0).to(tl.int64) - 1
        else:
            col = i_n.to(tl.int64) * 0
        col_ok = live & (col >= 0) & (col < NI)
        slot = tl.load(indices + i_n.to(tl.int64) * stride_in + col * stride_it, mask=col_ok, other=0).to(tl.int64)
        pad = col_ok & (slot < 0)
        ok = col_ok & (slot >= 0) & (slot < P)
    else:
        slot = i_n.to(tl.int64)
        pad = i_n < 0  # never; a scalar of the same type as with indices
        ok = live & (i_n >= 0)
    return slot, ok, pad


@triton.jit
def _load_state(h0, slot, ok, stride_h0, i_h, i_v, K, V,
                KP: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STATIC_DIMS: tl.constexpr,
                STATE_EVICT: tl.constexpr, BRANCH: tl.constexpr = True):
    """The [KP, BV] fp32 state tile of (slot, head i_h, V tile i_v); zeros where ``ok`` is false (nothing read).

    BRANCH (with static dims): skip the load by a branch on ``ok`` rather than a row limit in the mask. A prefetch
    takes the mask: ptxas schedules no load of the code after a branch above it, so the next item's loads would
    wait behind whatever of this item's input arithmetic it put first (read off ptxas for sm_90: the decay's exp,
    which waits for g's load).
    """
    b_s = tl.zeros([KP, BV], tl.float32)
    if USE_INITIAL_STATE:
        o_k = tl.arange(0, KP)
        o_v = i_v * BV + tl.arange(0, BV)
        p_s = h0 + slot * stride_h0 + i_h * K * V + o_k[:, None] * V + o_v[None, :]
        if STATIC_DIMS and BRANCH:
            # A branch on the uniform `ok` rather than a row limit in the mask, which would stay a runtime
            # predicate per row.
            if ok:
                b_s = tl.load(p_s, mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0,
                              eviction_policy=STATE_EVICT).to(tl.float32)
        else:
            # Masks take the validity through a row limit (K, or 0 to mask every row): the Triton 3.9 interpreter
            # turns `block_mask & scalar_bool` into an int32 mask that tl.load rejects.
            b_s += tl.load(p_s, mask=(o_k < tl.where(ok, K, 0))[:, None] & (o_v < V)[None, :], other=0.0,
                           eviction_policy=STATE_EVICT).to(tl.float32)
    return b_s


@triton.jit
def _run_item(
    q, k, v, g, b, w, o, ht,
    cu_seqlens, indices,
    scale, b_s, i_v, i_n, i_h, slot, ok, pad,
    T, T_loop, P, NI, stride_ht, stride_in, stride_it,
    H, K, V,
    KP: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PER_TOKEN_SLOTS: tl.constexpr, FINAL_AT: tl.constexpr,
    USE_L2NORM: tl.constexpr, STATE_EVICT: tl.constexpr, ONE_PASS: tl.constexpr, STATIC_DIMS: tl.constexpr,
    NUM_STAGES: tl.constexpr, BATCH_INPUTS: tl.constexpr,
):
    """One work item from its loaded state tile ``b_s``: the sequence's tokens, their outputs, the state's stores."""
    if IS_VARLEN:
        # Clamped to [0, T] so that offsets the host never checked cannot point outside the inputs.
        bos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n).to(tl.int64), 0), T)
        eos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n + 1).to(tl.int64), bos), T)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    T_seq = (eos - bos).to(tl.int32)
    if NUM_STAGES > 1 and not IS_VARLEN:
        # The token loop stays a loop even for one token, so that its prologue issues the input loads (as
        # cp.async copies) ahead of everything that waits: without it, at T == 1 the num_stages of the loop would
        # change nothing.
        T_seq = T_loop.to(tl.int32)

    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_s = o_k[:, None] * V + o_v[None, :]  # within one head's [K, V] state
    m_s = m_k[:, None] & m_v[None, :]
    head = i_h * K * V
    zero_v = tl.zeros([BV], tl.float32)
    nan_v = tl.full([BV], float("nan"), tl.float32)  # marks results of an index outside the pool
    b_fill = tl.where(pad, zero_v, nan_v)

    # NUM_STAGES > 1 software-pipelines the input loads (cp.async into shared memory, issued ahead of their use): the
    # loop's prologue issues them all, and the shared copy is read straight into the layout the state tile
    # broadcasts them in. Without the loop's num_stages Triton pipelines no loop that has no dot.
    for i_t in tl.range(0, T_seq, num_stages=NUM_STAGES):
        tok = (bos + i_t) * H + i_h
        b_q, b_k, b_g, b_b, b_v, b_w = _load_token(q, k, g, b, v, w, tok, o_k, m_k, o_v, m_v, K, V, BATCH_INPUTS)
        if USE_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + L2NORM_EPS)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + L2NORM_EPS)
        b_s = b_s * tl.exp(b_g)[:, None]
        b_qs = b_q * scale
        if ONE_PASS:
            # o_t = S_tᵀ q = S̄_tᵀ q + (k_t · q) u_t: all three K reductions from S̄_t in one pass, so the output no
            # longer waits for the state update (the same algebra, rounded differently).
            b_r, b_sq, b_kq = tl.reduce(
                (b_s * (b_b * b_k)[:, None], b_s * b_qs[:, None], tl.broadcast_to((b_k * b_qs)[:, None], [KP, BV])),
                0, _add3,
            )
            b_u = b_w * b_v - b_r
            b_o = b_sq + b_kq * b_u
            b_s += b_k[:, None] * b_u[None, :]
        else:
            b_r = tl.sum(b_s * (b_b * b_k)[:, None], 0)
            b_s += b_k[:, None] * (b_w * b_v - b_r)[None, :]
            b_o = tl.sum(b_s * b_qs[:, None], 0)
        b_o = tl.where(ok, b_o, b_fill)
        if PER_TOKEN_SLOTS:
            t_ok = i_t < NI
            s_t = tl.load(indices + i_n.to(tl.int64) * stride_in + i_t * stride_it, mask=t_ok, other=0).to(tl.int64)
            t_pad = t_ok & (s_t < 0)
            t_ok = t_ok & (s_t >= 0) & (s_t < P)
            if STATIC_DIMS:
                if ok & t_ok:
                    tl.store(ht + s_t * stride_ht + head + p_s, b_s.to(ht.dtype.element_ty), mask=m_s,
                             eviction_policy=STATE_EVICT)
            else:
                tl.store(ht + s_t * stride_ht + head + p_s, b_s.to(ht.dtype.element_ty),
                         mask=(o_k < tl.where(ok & t_ok, K, 0))[:, None] & m_v[None, :], eviction_policy=STATE_EVICT)
            b_o = tl.where(t_ok | t_pad, b_o, nan_v)
        tl.store(o + tok * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

    if FINAL_AT == 1:
        b_f = tl.where(ok, b_s, b_fill[None, :])
        tl.store(ht + i_n.to(tl.int64) * stride_ht + head + p_s, b_f.to(ht.dtype.element_ty), mask=m_s,
                 eviction_policy=STATE_EVICT)
    elif FINAL_AT == 2:
        if STATIC_DIMS:
            if ok:
                tl.store(ht + slot * stride_ht + head + p_s, b_s.to(ht.dtype.element_ty), mask=m_s,
                         eviction_policy=STATE_EVICT)
        else:
            tl.store(ht + slot * stride_ht + head + p_s, b_s.to(ht.dtype.element_ty),
                     mask=(o_k < tl.where(ok, K, 0))[:, None] & m_v[None, :], eviction_policy=STATE_EVICT)


# T_loop: the same T as a loop bound Triton does not specialize (an int argument equal to 1 otherwise becomes a
# constant, and a one-trip loop is folded away before the pipeliner sees it).
@triton.jit(do_not_specialize=["T_loop"])
def _decode_kernel(
    q, k, v, g, b, w, o,
    h0, ht,
    cu_seqlens, indices, accepted,
    scale,
    T, T_loop, P, NI, N_ITEMS,
    stride_h0, stride_ht, stride_in, stride_it,
    H, K, V,
    KP: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, HAS_INDICES: tl.constexpr,
    HAS_ACCEPTED: tl.constexpr, PER_TOKEN_SLOTS: tl.constexpr, FINAL_AT: tl.constexpr,
    USE_L2NORM: tl.constexpr, STATE_EVICT: tl.constexpr, ONE_PASS: tl.constexpr,
    STATIC_DIMS: tl.constexpr, H_C: tl.constexpr, K_C: tl.constexpr, V_C: tl.constexpr,
    NUM_STAGES: tl.constexpr, BATCH_INPUTS: tl.constexpr, PERSISTENT: tl.constexpr, PREFETCH: tl.constexpr,
    ITEM_STAGES: tl.constexpr,
):
    if STATIC_DIMS:
        # The head count and head dims as compile-time constants: the rows of the state tile are a constant stride
        # apart, so each thread addresses all of its rows from one base register plus immediate offsets, and the
        # row and column masks fold away when K and V are multiples of the tile.
        H = H_C
        K = K_C
        V = V_C
    pid = tl.program_id(0)
    if PERSISTENT:
        # A grid of a few programs per SM, each looping over the work items pid, pid + G, pid + 2G, ...: the items
        # in flight at any moment are G neighbours in memory, and no program ends (and none starts) until the end.
        G = tl.num_programs(0)
        if PREFETCH:
            # Software pipelining across items: the next item's state load is issued before this item's inputs,
            # reductions and stores, so that each program always has a state tile on its way (two tiles of
            # registers), and its slot index two items ahead, so that the next load's address never waits.
            i_v, i_n, i_h = _item_coords(pid, H, NV)
            slot, ok, pad = _start_slot(indices, accepted, i_n, pid < N_ITEMS, P, NI, stride_in, stride_it,
                                        HAS_INDICES, HAS_ACCEPTED)
            b_s = _load_state(h0, slot, ok, stride_h0, i_h, i_v, K, V, KP, BV, USE_INITIAL_STATE, STATIC_DIMS,
                              STATE_EVICT)
            slot1, ok1, pad1 = _start_slot(indices, accepted, (pid + G) // NV // H, pid + G < N_ITEMS, P, NI,
                                           stride_in, stride_it, HAS_INDICES, HAS_ACCEPTED)
            for item in tl.range(pid, N_ITEMS, G):
                i_v1, _, i_h1 = _item_coords(item + G, H, NV)
                b_s1 = _load_state(h0, slot1, ok1, stride_h0, i_h1, i_v1, K, V, KP, BV, USE_INITIAL_STATE,
                                   STATIC_DIMS, STATE_EVICT, BRANCH=False)
                slot2, ok2, pad2 = _start_slot(indices, accepted, (item + 2 * G) // NV // H, item + 2 * G < N_ITEMS,
                                               P, NI, stride_in, stride_it, HAS_INDICES, HAS_ACCEPTED)
                i_v, i_n, i_h = _item_coords(item, H, NV)
                _run_item(q, k, v, g, b, w, o, ht, cu_seqlens, indices, scale, b_s, i_v, i_n, i_h, slot, ok, pad,
                          T, T_loop, P, NI, stride_ht, stride_in, stride_it, H, K, V, KP, BV, IS_VARLEN,
                          PER_TOKEN_SLOTS, FINAL_AT, USE_L2NORM, STATE_EVICT, ONE_PASS, STATIC_DIMS, NUM_STAGES,
                          BATCH_INPUTS)
                b_s = b_s1
                slot, ok, pad = slot1, ok1, pad1
                slot1, ok1, pad1 = slot2, ok2, pad2
        else:
            # ITEM_STAGES > 1: Triton's software pipelining of the item loop (the state tile copied by cp.async
            # into shared memory ITEM_STAGES - 1 items ahead, no registers held while in flight). Its loads must not
            # sit under a branch, so the state's is masked. Only an innermost loop is pipelined: at T = 1 the token
            # loop is folded away (T is specialized to 1); with several tokens the item loop stays a plain loop.
            for item in tl.range(pid, N_ITEMS, G, num_stages=ITEM_STAGES):
                i_v, i_n, i_h = _item_coords(item, H, NV)
                slot, ok, pad = _start_slot(indices, accepted, i_n, item < N_ITEMS, P, NI, stride_in, stride_it,
                                            HAS_INDICES, HAS_ACCEPTED)
                b_s = _load_state(h0, slot, ok, stride_h0, i_h, i_v, K, V, KP, BV, USE_INITIAL_STATE, STATIC_DIMS,
                                  STATE_EVICT, BRANCH=ITEM_STAGES == 1)
                _run_item(q, k, v, g, b, w, o, ht, cu_seqlens, indices, scale, b_s, i_v, i_n, i_h, slot, ok, pad,
                          T, T_loop, P, NI, stride_ht, stride_in, stride_it, H, K, V, KP, BV, IS_VARLEN,
                          PER_TOKEN_SLOTS, FINAL_AT, USE_L2NORM, STATE_EVICT, ONE_PASS, STATIC_DIMS, NUM_STAGES,
                          BATCH_INPUTS)
    else:
        # One program per work item.
        i_v, i_n, i_h = _item_coords(pid, H, NV)
        slot, ok, pad = _start_slot(indices, accepted, i_n, pid < N_ITEMS, P, NI, stride_in, stride_it,
                                    HAS_INDICES, HAS_ACCEPTED)
        b_s = _load_state(h0, slot, ok, stride_h0, i_h, i_v, K, V, KP, BV, USE_INITIAL_STATE, STATIC_DIMS,
                          STATE_EVICT)
        _run_item(q, k, v, g, b, w, o, ht, cu_seqlens, indices, scale, b_s, i_v, i_n, i_h, slot, ok, pad,
                  T, T_loop, P, NI, stride_ht, stride_in, stride_it, H, K, V, KP, BV, IS_VARLEN, PER_TOKEN_SLOTS,
                  FINAL_AT, USE_L2NORM, STATE_EVICT, ONE_PASS, STATIC_DIMS, NUM_STAGES, BATCH_INPUTS)


def decode_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    final_state: torch.Tensor | None,
    final_at: int,
    per_token_slots: bool,
    cu_seqlens: torch.Tensor | None,
    ssm_state_indices: torch.Tensor | None,
    num_accepted_tokens: torch.Tensor | None,
    use_qk_l2norm: bool,
    num_seqs: int,
    cfg: DecodeConfig,
) -> None:
    """The one launch, on checked contiguous inputs, writing ``out`` and the state in ``final_state``.

    Queues no allocation and reads nothing back to the host, so it can be captured in a CUDA graph.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    NV = cdiv(V, cfg.BV)
    if ssm_state_indices is None:
        stride_in, stride_it, ni = 0, 0, 1
    elif ssm_state_indices.dim() == 1:
        stride_in, stride_it, ni = ssm_state_indices.stride(0), 0, 1
    else:
        stride_in, stride_it = ssm_state_indices.stride()
        ni = ssm_state_indices.shape[1]
    pool = initial_state.shape[0] if initial_state is not None else num_seqs
    items = num_seqs * H * NV
    grid = (min(items, persistent_programs(cfg, q.device)) if cfg.programs_per_sm else items,)
    _decode_kernel[grid](
        q, k, v, g, b, w, out,
        initial_state, final_state,
        cu_seqlens, ssm_state_indices, num_accepted_tokens,
        scale,
        B * T if cu_seqlens is not None else T, T, pool, ni, items,
        initial_state.stride(0) if initial_state is not None else 0,
        final_state.stride(0) if final_state is not None else 0,
        stride_in, stride_it,
        H, K, V,
        KP=padded(K), BV=cfg.BV, NV=NV,
        IS_VARLEN=cu_seqlens is not None, USE_INITIAL_STATE=initial_state is not None,
        HAS_INDICES=ssm_state_indices is not None, HAS_ACCEPTED=num_accepted_tokens is not None,
        PER_TOKEN_SLOTS=per_token_slots, FINAL_AT=final_at, USE_L2NORM=use_qk_l2norm,
        STATE_EVICT="evict_first" if cfg.stream_state else "", ONE_PASS=cfg.one_pass,
        # 0 when the dims stay runtime arguments: one compiled kernel per config serves every head count and size.
        STATIC_DIMS=cfg.static_dims, H_C=H if cfg.static_dims else 0, K_C=K if cfg.static_dims else 0,
        V_C=V if cfg.static_dims else 0, NUM_STAGES=cfg.num_stages, BATCH_INPUTS=cfg.batch_inputs,
        PERSISTENT=cfg.programs_per_sm > 0, PREFETCH=cfg.prefetch, ITEM_STAGES=cfg.item_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": register_limit(cfg)} if register_limit(cfg) else {}),
    )


def _check_index(name: str, x: object, device: torch.device) -> torch.Tensor:
    x = check_tensor(name, x, device)
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, received {x.dtype}")
    return x


def _check_state_layout(name: str, s: torch.Tensor, H: int, K: int, V: int) -> None:
    # Slots may be strided (a view into a larger cache), but each slot's [H, K, V] must be dense.
    if s.stride()[1:] != (K * V, V, 1) and s.numel() > 0:
        raise ValueError(f"{name}: expected each slot [H, K, V] contiguous (strides {(K * V, V, 1)} after the "
                         f"first), received strides {s.stride()}; pass a .contiguous() state")


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    *,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    inplace_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    ssm_state_indices: torch.Tensor | None,
    num_accepted_tokens: torch.Tensor | None,
    out: torch.Tensor | None,
) -> int:
    """Raise ``TypeError``/``ValueError`` naming the argument for anything the kernel cannot take; return N.

    Looks only at shapes, dtypes, strides and devices: nothing here reads a device tensor's values.
    """
    B, T, H, K, V = check_token_inputs(q, k, v, g, b, w)
    dev = q.device

    for name, flag in (("output_final_state", output_final_state), ("inplace_final_state", inplace_final_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, received {type(flag).__name__}")

    if cu_seqlens is None:
        n = B
    else:
        _check_index("cu_seqlens", cu_seqlens, dev)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, received {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"cu_seqlens: expected B == 1 for a packed batch, received B={B}")
        n = cu_seqlens.numel() - 1

    if initial_state is not None:
        check_tensor("initial_state", initial_state, dev)
        if initial_state.dtype not in STATE_DTYPES.values():
            raise TypeError(f"initial_state: expected dtype torch.float32 (or torch.bfloat16 for a bf16 state), "
                            f"received {initial_state.dtype}")
        pooled = ssm_state_indices is not None
        expected = ("P", H, K, V) if pooled else (n, H, K, V)
        shape = tuple(initial_state.shape)
        if initial_state.dim() != 4 or shape[1:] != (H, K, V) or (not pooled and shape[0] != n):
            what = "a pool [P, H, K, V] indexed by ssm_state_indices" if pooled else "[N, H, K, V]"
            raise ValueError(f"initial_state: expected shape {expected} ({what}), received {shape}")
        _check_state_layout("initial_state", initial_state, H, K, V)
    if inplace_final_state and initial_state is None:
        raise ValueError("inplace_final_state: expected an initial_state to update in place, received None")

    if ssm_state_indices is not None:
        _check_index("ssm_state_indices", ssm_state_indices, dev)
        if initial_state is None:
            raise ValueError("ssm_state_indices: expected an initial_state (the state pool it indexes), received None")
        dims = ssm_state_indices.dim()
        if dims not in (1, 2) or ssm_state_indices.shape[0] != n:
            raise ValueError(f"ssm_state_indices: expected shape [{n}] (one slot per sequence) or [{n}, T] "
                             f"(one slot per token), received {tuple(ssm_state_indices.shape)}")
        if dims == 2:
            need = T if cu_seqlens is None else 1
            if ssm_state_indices.shape[1] < need:
                raise ValueError(f"ssm_state_indices: expected [{n}, T] with at least T={need} columns, "
                                 f"received {tuple(ssm_state_indices.shape)}")
    if num_accepted_tokens is not None:
        _check_index("num_accepted_tokens", num_accepted_tokens, dev)
        if ssm_state_indices is None or ssm_state_indices.dim() != 2:
            got = "None" if ssm_state_indices is None else f"{ssm_state_indices.dim()}-D"
            raise ValueError(f"num_accepted_tokens: expected 2-D ssm_state_indices [N, T] to pick slot "
                             f"[n, accepted - 1] from, received {got} ssm_state_indices")
        if tuple(num_accepted_tokens.shape) != (n,):
            raise ValueError(f"num_accepted_tokens: expected shape ({n},), received {tuple(num_accepted_tokens.shape)}")

    if out is not None:
        check_tensor("out", out, dev)
        if tuple(out.shape) != tuple(v.shape):
            raise ValueError(f"out: expected shape {tuple(v.shape)} (that of v), received {tuple(out.shape)}")
        if out.dtype != q.dtype:
            raise TypeError(f"out: expected dtype {q.dtype} (that of q), received {out.dtype}")
        if not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous tensor, received strides {out.stride()}")
    return n


def decode_shape_of(q: torch.Tensor, v: torch.Tensor, num_seqs: int, state_dtype: torch.dtype) -> DecodeShape:
    B, T, H, K = q.shape
    state = "bf16" if state_dtype == torch.bfloat16 else "fp32"
    return DecodeShape(num_seqs, T if B == num_seqs else max(1, B * T // num_seqs), H, K, v.shape[-1],
                       DTYPE_NAMES[q.dtype], state)


def fused_recurrent_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    inplace_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated Delta Rule-2 token by token, for decoding (forward only, no autograd).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H, K]`` natural-log decay (≤ 0), read in fp32;
            b: ``[B, T, H, K]`` erase gate; w: ``[B, T, H, V]`` write gate. T is small (1 to ~64): longer prompts
            belong to ``chunk_gdn2``. q, k, v, b, w share one dtype (bf16, fp16 or fp32).
        scale: multiplies q; defaults to ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``, or with ``ssm_state_indices`` a pool ``[P, H, K, V]``; fp32, or bf16
            to store the state in bf16 (arithmetic stays fp32). Slots may be strided; each slot must be dense.
        output_final_state: return the state after each sequence's last token, ``[N, H, K, V]`` in the state's
            dtype (a new tensor unless ``inplace_final_state``).
        inplace_final_state: write the state back into ``initial_state`` (at ``ssm_state_indices`` when given)
            and return ``initial_state`` as the final state.
        cu_seqlens: int32/int64 ``[N+1]`` offsets of a packed batch (B must be 1); read on the device only.
        ssm_state_indices: int32/int64 ``[N]`` (one slot per sequence) or ``[N, T]`` (the state after token t
            goes to slot ``[n, t]``); negative entries are padding. See the module docstring for what an index
            outside the pool does (no out-of-bounds access; NaN results).
        num_accepted_tokens: int32/int64 ``[N]`` (needs 2-D indices): sequence n starts from slot
            ``[n, accepted − 1]``.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head first.
        out: a contiguous ``[B, T, H, V]`` buffer in q's dtype for the output. With ``out`` and an in-place state
            the call allocates nothing and never syncs with the device (CUDA-graph capturable).
        config: an explicit :class:`DecodeConfig`; None takes :func:`default_decode_config` for the shape
            (``gdn2_tune.fused_recurrent_gdn2`` asks the tuned tables instead, see :func:`checked_decode`).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype (``out`` when given); the pool / initial_state
        when in place, a new ``[N, H, K, V]`` when ``output_final_state``, else None.
    """
    return checked_decode(
        q, k, v, g, b, w,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        inplace_final_state=inplace_final_state, cu_seqlens=cu_seqlens, ssm_state_indices=ssm_state_indices,
        num_accepted_tokens=num_accepted_tokens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, out=out,
        config=config, choose=None,
    )


def checked_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    inplace_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    ssm_state_indices: torch.Tensor | None,
    num_accepted_tokens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    out: torch.Tensor | None,
    config: DecodeConfig | None,
    choose: DecodeChooser | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What every public ``fused_recurrent_gdn2`` runs (see :func:`fused_recurrent_gdn2` for the arguments): check
    the arguments, take ``config`` (checked) or, when None, ``choose`` of the call's table shape
    (:func:`~kernels.decode_config.table_shape`; trusted: the dispatcher validates what it serves) where the
    tables hold its state dtype (:func:`~kernels.decode_config.served_by_tables`), else the built-in default, then
    launch."""
    n = _check_inputs(
        q, k, v, g, b, w,
        initial_state=initial_state, output_final_state=output_final_state, inplace_final_state=inplace_final_state,
        cu_seqlens=cu_seqlens, ssm_state_indices=ssm_state_indices, num_accepted_tokens=num_accepted_tokens, out=out,
    )
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, b, w)):
        raise NotImplementedError(
            "fused_recurrent_gdn2: inference only (no backward); call it under torch.no_grad() "
            "or with inputs that do not require grad"
        )
    state_dtype = initial_state.dtype if initial_state is not None else torch.float32
    shape = decode_shape_of(q, v, n, state_dtype)
    if config is None:
        served = choose is not None and served_by_tables(shape)  # a bf16 state has no entries of its own
        config = choose(table_shape(shape)) if served else default_decode_config(shape)
    else:
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"config: expected a kernels.DecodeConfig, received {type(config).__name__}")
        reason = decode_infeasibility(config, shape)
        if reason is not None:
            raise ValueError(f"config: {config.label()} is not supported at {shape.label()}: {reason}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, int | float):
        raise TypeError(f"scale: expected a float, received {type(scale).__name__}")
    # No-ops (no copy, no allocation) for the contiguous tensors a serving loop passes.
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    if num_accepted_tokens is not None:
        num_accepted_tokens = num_accepted_tokens.contiguous()
    if out is None:
        out = output_buffer(v.shape, q.dtype, q.device)

    per_token = False
    if inplace_final_state:
        final_state = initial_state
        if ssm_state_indices is None:
            final_at = FINAL_AT_SEQUENCE
        elif ssm_state_indices.dim() == 1:
            final_at = FINAL_AT_SLOT
        else:
            final_at, per_token = FINAL_NONE, True
    elif output_final_state:
        final_state = output_buffer((n, q.shape[2], q.shape[3], v.shape[3]), state_dtype, q.device)
        final_at = FINAL_AT_SEQUENCE
    else:
        final_state, final_at = None, FINAL_NONE

    decode_fwd(
        q, k, v, g, b, w, out,
        scale=float(scale), initial_state=initial_state, final_state=final_state, final_at=final_at,
        per_token_slots=per_token, cu_seqlens=cu_seqlens, ssm_state_indices=ssm_state_indices,
        num_accepted_tokens=num_accepted_tokens, use_qk_l2norm=use_qk_l2norm_in_kernel, num_seqs=n, cfg=config,
    )
    return out, final_state


def check_state_indices(ssm_state_indices: torch.Tensor, pool_size: int) -> None:
    """Raise ``ValueError`` when an index is ``>= pool_size`` (negative ones are padding and allowed).

    Reads the indices back to the host (a sync): for tests, debugging and the first step of a serving loop, not
    every step. The op itself never does this; it masks such indices on the device (see the module docstring).
    """
    _check_index("ssm_state_indices", ssm_state_indices, None)
    top = int(ssm_state_indices.max()) if ssm_state_indices.numel() else -1
    if top >= pool_size:
        where = (ssm_state_indices >= pool_size).nonzero()[0].tolist()
        raise ValueError(f"ssm_state_indices: expected values < {pool_size} (the pool's slots) or negative "
                         f"(padding), received {top} (first at position {where})")
