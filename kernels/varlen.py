"""Where a chunk program's rows are: the dense [B, T] layout and the packed (cu_seqlens) one.

Both per-chunk launches (the intra stage, and the state stage's split output) run one program per (chunk, head)
and start by locating their chunk; :func:`chunk_coords` is that shared prologue. For a packed batch
:func:`packed_index` first builds, on the device and on every call, the sanitised offsets and a
(sequence, chunk-in-sequence) pair per global chunk.

Memory safety does not depend on what ``cu_seqlens`` holds, nor on how it was written (an in-place write without
a version bump, a write through ``.numpy()``, a ``torch.from_numpy`` buffer a data loader refills):

- nothing is cached between calls, so no index can be stale;
- the kernels read the sanitised copy :func:`sanitize_offsets` makes: clamped to [0, T], made non-decreasing
  (a running maximum), with the first forced to 0 and the last to T. Valid offsets pass unchanged; invalid ones
  give the result of the sanitised offsets (the documented safe result), never an access outside a buffer;
- :func:`chunk_coords` and the state pass clamp every sequence to [0, T] again and bound every per-chunk index by
  the per-chunk buffers, so a launcher called directly with raw offsets stays inside its buffers too.

The index is built without a host sync, so a packed call can be captured in a CUDA graph and never waits for the
GPU: its length is the bound ``T // C + N`` (Σ ceil(len_i / C) ≤ Σ floor(len_i / C) + N ≤ T // C + N) instead of
the exact count, and the pairs past the exact count point one chunk or more past the end of the last sequence.
Such a phantom program has every row masked: it reads nothing, writes no output row and only fills its own
slot of the per-chunk scratch (γ_C, the fp32 tile, a split state), which no one reads. Building it is one
single-program launch per call (:func:`packed_index`); as ~15 torch ops it cost 0.025 ms of graph replay and
0.17 ms of host time per call on an H200 (benchmarks/bench_varlen.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class PackedIndex:
    """What the launches of one packed call read besides the tensors.

    ``offsets``: int64 [N+1], the sanitised copy of cu_seqlens the kernels read; ``pairs``: int32
    [num_chunks, 2], (sequence, chunk in sequence) per global chunk; ``first``: int64 [N], each sequence's first
    global chunk; ``num_chunks``: the host-side bound ``T // C + N``.
    """

    offsets: torch.Tensor
    pairs: torch.Tensor
    first: torch.Tensor
    num_chunks: int


def sanitize_offsets(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int64 offsets that are always a partition of [0, total_tokens]: ``c'_0 = 0``, ``c'_N = T`` and
    ``c'_i = min(T, max(0, c_0, ..., c_i))`` in between. Equal to ``cu_seqlens`` when that is valid.

    A fresh tensor (never a view of the caller's), on the device, without a host sync.
    """
    n = cu_seqlens.numel() - 1
    # clamp returns a new tensor even when the dtype already is int64: the caller's tensor is never written.
    offs = cu_seqlens.to(torch.int64).clamp(0, total_tokens)
    offs = torch.cummax(offs, 0).values
    # fill_ with a Python number, not `offs[0] = 0`: item assignment copies from a CPU tensor, which a CUDA graph
    # capture refuses.
    offs[:1].fill_(0)
    offs[n:].fill_(total_tokens)
    return offs


# Lanes of the index kernel's one program: sequences (or chunks) per step of its loops. One value for every N so
# that the kernel compiles once; a step costs next to nothing at any N.
INDEX_BLOCK = 1024


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _packed_index_kernel(cu_seqlens, offsets, first, pairs, N, T, NC, N_SEARCH, C: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the sanitised offsets and each sequence's first chunk (a running max and a running sum over
    blocks of sequences), then the (sequence, chunk) pair of every global chunk by a binary search over ``first``.
    The same arithmetic as :func:`sanitize_offsets` and :func:`packed_index_torch`, in one launch instead of ~15."""
    o_b = tl.arange(0, BLOCK)
    run_max = tl.zeros([], tl.int64)  # max of the clamped offsets so far (offsets are clamped to >= 0)
    total = tl.zeros([], tl.int64)  # chunks of the sequences so far
    for start in range(0, N + 1, BLOCK):
        i = start + o_b
        x = tl.load(cu_seqlens + i, mask=i <= N, other=0).to(tl.int64)
        x = tl.minimum(tl.maximum(x, 0), T)
        r = tl.maximum(tl.associative_scan(x, 0, _max_combine), run_max)
        o_i = tl.where(i == 0, 0, tl.where(i == N, T, r))
        tl.store(offsets + i, o_i, mask=i <= N)
        # The next offset from the same running max: no shifted read of what this loop just stored.
        x1 = tl.load(cu_seqlens + i + 1, mask=i < N, other=0).to(tl.int64)
        x1 = tl.minimum(tl.maximum(x1, 0), T)
        o_next = tl.where(i + 1 == N, T, tl.maximum(r, x1))
        counts = tl.where(i < N, (o_next - o_i + C - 1) // C, 0)
        ends = total + tl.cumsum(counts, 0)
        tl.store(first + i, ends - counts, mask=i < N)
        run_max = tl.max(r, 0)
        total += tl.sum(counts, 0)
    tl.debug_barrier()  # the search reads `first`, which other threads of this program stored
    for start in range(0, NC, BLOCK):
        g = start + o_b
        # seq = #{n : ends_n <= g}, capped at N - 1; ends_n = first_{n+1} for n < N - 1 and ends_{N-1} = total.
        # Binary search for #{m in [1, N - 1] : first_m <= g} (first is non-decreasing) in lo..hi.
        lo = tl.zeros([BLOCK], tl.int64)
        hi = tl.zeros([BLOCK], tl.int64) + (N - 1)
        for _ in range(N_SEARCH):
            active = lo < hi
            mid = (lo + hi + 1) // 2
            f_mid = tl.load(first + mid, mask=active & (mid >= 1), other=0)
            ok = active & (f_mid <= g)
            lo = tl.where(ok, mid, lo)
            hi = tl.where(active & ~ok, mid - 1, hi)
        seq = tl.minimum(lo + (total <= g).to(tl.int64), N - 1)
        i_tc = g - tl.load(first + seq, mask=g < NC, other=0)
        tl.store(pairs + g * 2, seq.to(tl.int32), mask=g < NC)
        tl.store(pairs + g * 2 + 1, i_tc.to(tl.int32), mask=g < NC)


def packed_index(cu_seqlens: torch.Tensor, chunk: int, total_tokens: int) -> PackedIndex:
    """The sanitised offsets and the chunk index of a packed batch of ``total_tokens`` tokens (see the module
    docstring): one single-program launch, rebuilt on every call, no host sync."""
    n = cu_seqlens.numel() - 1
    num_chunks = total_tokens // chunk + n
    device = cu_seqlens.device
    offs = torch.empty(n + 1, dtype=torch.int64, device=device)
    first = torch.empty(n, dtype=torch.int64, device=device)
    pairs = torch.empty((num_chunks, 2), dtype=torch.int32, device=device)
    _packed_index_kernel[(1,)](
        cu_seqlens, offs, first, pairs, n, total_tokens, num_chunks, n.bit_length() + 1,
        C=chunk, BLOCK=INDEX_BLOCK,
    )
    return PackedIndex(offs, pairs, first, num_chunks)


def packed_index_torch(cu_seqlens: torch.Tensor, chunk: int, total_tokens: int) -> PackedIndex:
    """:func:`packed_index` as ~15 torch ops: the specification the kernel is tested against."""
    n = cu_seqlens.numel() - 1
    offs = sanitize_offsets(cu_seqlens, total_tokens)
    counts = (offs[1:] - offs[:-1] + (chunk - 1)) // chunk
    ends = torch.cumsum(counts, 0)
    first = ends - counts
    num_chunks = total_tokens // chunk + n
    g = torch.arange(num_chunks, device=cu_seqlens.device)
    # The sequence a global chunk falls in: the first whose chunks end after it (past the last: the last one).
    seq = torch.searchsorted(ends, g, right=True).clamp_(max=n - 1)
    pairs = torch.stack([seq, g - first[seq]], 1).to(torch.int32)
    return PackedIndex(offs, pairs, first, num_chunks)


def chunk_index(cu_seqlens: torch.Tensor, chunk: int, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(pairs, first, num_chunks)`` of :func:`packed_index`, for callers that pass their own (valid) offsets
    to the launchers; the kernels stay inside their buffers whatever those offsets hold."""
    index = packed_index(cu_seqlens, chunk, total_tokens)
    return index.pairs, index.first, index.num_chunks


@triton.jit
def sequence_bounds(cu_seqlens, i_n, T):
    """``(bos, T_seq)`` of sequence ``i_n``, clamped to [0, T] with ``T_seq ≥ 0`` whatever the offsets hold:
    every row ``bos + t`` with ``0 ≤ t < T_seq`` lies in the buffers."""
    bos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n).to(tl.int64), 0), T)
    eos = tl.minimum(tl.maximum(tl.load(cu_seqlens + i_n + 1).to(tl.int64), bos), T)
    return bos, (eos - bos).to(tl.int32)


@triton.jit
def chunk_coords(i_t, i_bh, cu_seqlens, chunk_index, T, NT, H, IS_VARLEN: tl.constexpr):
    """``(i_h, bos, T_seq, i_tc, i_chunk)`` of the program for global chunk ``i_t`` and head (or batch·head)
    ``i_bh``: its head, the sequence's first token (int64), the sequence's length, the chunk's index within the
    sequence and its global index (that of the per-chunk buffers)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_index + i_t * 2).to(tl.int32)
        i_tc = tl.load(chunk_index + i_t * 2 + 1).to(tl.int32)
        bos, T_seq = sequence_bounds(cu_seqlens, i_n, T)
        # A negative chunk number would address rows before the sequence: map it past the end (all masked).
        i_tc = tl.where(i_tc < 0, T_seq, i_tc)
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
