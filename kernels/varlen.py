"""Where a chunk program's rows are: the dense [B, T] layout and the packed (cu_seqlens) one.

Both per-chunk launches (the intra stage, and the state stage's split output) run one program per (chunk, head)
and start by locating their chunk; :func:`chunk_coords` is that shared prologue. For a packed batch the host
builds :func:`chunk_index` first: a (sequence, chunk-in-sequence) pair per global chunk.

The index is built without a host sync, so a packed call can be captured in a CUDA graph and never waits for the
GPU: its length is the bound ``T // C + N`` (Σ ceil(len_i / C) ≤ Σ floor(len_i / C) + N ≤ T // C + N) instead of
the exact count, and the pairs past the exact count point one chunk or more past the end of the last sequence.
Such a phantom program has every row masked: it reads nothing, writes no output row and only fills its own
slot of the per-chunk scratch (γ_C, the fp32 tile, a split state), which no one reads.

Checking the offsets' values does need them on the host. :func:`memo` keeps, per offsets tensor, what was
checked and built from it, so that only the first call with a tensor waits for the GPU: a model passes one
cu_seqlens tensor to every layer, and a host sync per call leaves the GPU idle while the CPU queues the call's
launches (on an H100, 2026-11-26: 2.67 ms per call at the suite's packed shape where the launches alone take
1.79 ms). flash-linear-attention caches its chunk indices per tensor the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import triton
import triton.language as tl

# Offsets tensors remembered at once (a training step uses one or two; an eval loop a few).
MEMO_TENSORS = 8
_memos: OrderedDict[int, tuple[torch.Tensor, int, dict[Any, Any]]] = OrderedDict()


def memo(cu_seqlens: torch.Tensor) -> dict[Any, Any]:
    """A dict private to this offsets tensor and its current contents: an in-place write bumps the tensor's
    version counter and starts a new one. Holds the tensor, so its id cannot be reused while remembered."""
    key = id(cu_seqlens)
    hit = _memos.get(key)
    if hit is not None and hit[0] is cu_seqlens and hit[1] == cu_seqlens._version:
        _memos.move_to_end(key)
        return hit[2]
    entry: dict[Any, Any] = {}
    _memos[key] = (cu_seqlens, cu_seqlens._version, entry)
    while len(_memos) > MEMO_TENSORS:
        _memos.popitem(last=False)
    return entry


def chunk_index(cu_seqlens: torch.Tensor, chunk: int, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For a packed batch of ``total_tokens`` tokens: ``(pairs, first, num_chunks)``.

    ``pairs`` is int32 [num_chunks, 2] (sequence, chunk in sequence) per global chunk, ``first`` int64 [N] each
    sequence's first global chunk, ``num_chunks`` the host-side bound ``total_tokens // chunk + N``.
    """
    n = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = triton.cdiv(lens, chunk)
    ends = torch.cumsum(counts, 0)
    first = ends - counts
    num_chunks = total_tokens // chunk + n
    g = torch.arange(num_chunks, device=cu_seqlens.device)
    # The sequence a global chunk falls in: the first whose chunks end after it (past the last: the last one).
    seq = torch.searchsorted(ends, g, right=True).clamp_(max=n - 1)
    pairs = torch.stack([seq, g - first[seq]], 1).to(torch.int32)
    return pairs, first, num_chunks


@triton.jit
def chunk_coords(i_t, i_bh, cu_seqlens, chunk_index, T, NT, H, IS_VARLEN: tl.constexpr):
    """``(i_h, bos, T_seq, i_tc, i_chunk)`` of the program for global chunk ``i_t`` and head (or batch·head)
    ``i_bh``: its head, the sequence's first token (int64), the sequence's length, the chunk's index within the
    sequence and its global index (that of the per-chunk buffers)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_index + i_t * 2).to(tl.int32)
        i_tc = tl.load(chunk_index + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T_seq = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        i_h = i_bh
        i_chunk = i_t
    else:
        i_b = i_bh // H
        i_h = i_bh % H
        bos = (i_b * T).to(tl.int64)
        T_seq = T
        i_tc = i_t
        i_chunk = i_b * NT + i_t
    return i_h, bos, T_seq, i_tc, i_chunk
