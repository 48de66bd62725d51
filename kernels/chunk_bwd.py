"""Backward of ``chunk_gdn2``: recompute, a reverse chunk-to-chunk pass for the state gradient, local gradients.

Only the inputs (and the initial state, and a packed batch's index) are saved by the forward; the backward, for
one call:

1. **Recompute.** The forward's intra launcher (kernels/intra.py) at the forward's chunk length, for Y, U, Q_γ,
   K_tail, A_qk, γ_C and A = (I + T)^-1 (the launch's scratch), writing fp32 (3xTF32 dots) wherever the reverse
   pass can stage fp32 operands (else the input dtype, as the forward keeps them; A_qk and A are fp32 always);
   then :func:`_entering_states_kernel`, the forward's state recurrence storing every chunk's entering state S0 in
   fp32 [chunks, H, K, V]. (It is a copy of the split-output state pass of kernels/state.py without the O/R
   stores, in this file so that a signature change there cannot break it.)
2. **Reverse state pass** (:func:`_state_bwd_kernel`): one program per (sequence, head, V tile), walking the
   chunks of its sequence backwards with the state gradient dS ∈ R^{K×BV} in fp32 registers. In the symbols of
   ../shared/GDN2.md, per chunk, with dS = dS_C on entry:

       store dS_C;   dR = A_qkᵀ dO + K_tail dS_C;   dS0 = Q_γᵀ dO + Diag(γ_C) dS_C − Yᵀ dR

   dS0 of a sequence's first chunk is dh0. It is the forward state pass reversed: the same kind of tiles and
   constraints, one program per state tile, no atomics.

   Both passes can split each (dense) sequence into segments walked in parallel (``BwdConfig.segment_chunks``,
   the default for few state rows along long sequences, as the forward's state pass does): each segment's affine
   map S ↦ M S + E comes from kernels/state.py's transition launch, an fp32 carry over the segments gives every
   segment's entering state, and the reverse pass, whose chunk step is the adjoint (Mᵀ per chunk), carries
   dS ↦ Mᵀ dS + F the other way with the same M (:class:`Segments`). S0 and dS_C are stored in fp32, or in bf16
   for 16-bit inputs (``state_dtype``), the passes carrying fp32 either way.

   ``BwdConfig.k_parts = 2`` holds S and dS in both passes as two row tiles, [KA, BV] and [KB, BV]
   (kernels/config.state_row_parts), as the forward's state pass can: Y S0 and K_tail dS_C sum over the parts, the
   decay, K_tailᵀ R, Q_γᵀ dO and Yᵀ dR update each part alone. K = 96 or 192 then pads to the parts' sum, not the
   next power of two, and at K = 256 the [256, BV] tile stops spilling (sm_90, triton 3.6, fp32 operands, one stage:
   the entering states / reverse pass spill 1184 / 1328 bytes per thread at BV 64 on 4 warps in one part, 0 / 80 on
   8 warps in two, 0 / 0 at BV 32 on 8 warps in two; benchmarks/compile_bwd_parts.py). The segment transitions and
   the carry (kernels/state.py) hold one tile either way. The reverse pass may take a tile of its own: V tile,
   warps, row parts and stages (``BwdConfig.reverse_BV``, ``reverse_warps``, ``reverse_k_parts``,
   ``reverse_stages``; 0: the entering states').
3. **Local gradients.** Given S0 and dS_C every chunk is an independent function (q, k, v, g, b, w; S0) → (O, S_C),
   differentiated with upstream (dO, dS_C), chunks in groups of bounded memory (:func:`_local_grads`):
   - the value side, every sum over V (R, dR, dA_qk, dQ_γ, dK_tail, dY, dA, dT, dĒ, and dv, dw written straight
     into the token layout), in one fused launch per (chunk, head) (kernels/bwd_local.py) that reads the
     recomputed A and A_qk; ``value_side="torch"`` instead re-forms T and A_qk with the pair kernels, solves for
     A (torch.linalg.solve_triangular) and writes the products as batched torch matmuls (fp32);
   - the backward of the decay-weighted pair products in Triton (kernels/pairwise.py): every decay factor is
     exp(G_r − G_s) with r ≥ s, so neither exp(−G) nor k/γ exists and dg stays finite under g = −10 per step;
   - the key-side elementwise tail (dq, dk, db, dg with its reverse cumulative sum inside the chunk, the decay
     floor) in one Triton launch (:func:`_key_side_kernel`), then the l2 norm's backward in torch;
     ``key_side="fused"`` runs the pair backward and that tail as one launch (:func:`_key_tail_kernel`), which
     re-forms the pair factors from q, k, b in the token layout instead of reading them back as fp32.
   ``BwdConfig(local="autograd")`` instead runs torch autograd through :func:`_local_chunk` (pairs as a masked
   [C, C, K] tensor): simple, memory-hungry, and the cross-check of the others.

**Packed batches** are memory-safe as the forward is (kernels/varlen.py). The forward builds the sanitised offsets
and the chunk index on the device (:func:`packed_index`, no host sync) and saves them, not the caller's
``cu_seqlens``: the backward differentiates the partition the forward ran on, however that tensor is rewritten in
between (in place, with or without a version bump). The two per-sequence passes bound each sequence to [0, T] and
each per-chunk slot to the per-chunk buffers, as the forward's state pass does (:func:`_sequence_chunks`), and the
gathers of step 3 are bounded by the sanitised offsets and T: launched with raw offsets, or with an index built
from other offsets, no launch of the backward reads or writes outside its buffers.

What is still torch in step 3 (the chunk-major copies of q, k, g, b, the prefix sums and exponentials of the
key side's factors, the l2 norm's backward) is the next thing to fuse. Every step is deterministic: Triton programs own their outputs, and the torch ops used (matmul,
cumsum, sum, triangular solve, gather, index_put onto distinct rows) have no atomics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from gdn2_tune.kernels.buffers import output_buffer
from gdn2_tune.kernels.bwd_local import VALUE_TILES, KeyFactors, key_factors, local_v_side
from gdn2_tune.kernels.config import (
    INTRA_PRECISIONS,
    MAX_REGISTERS_PER_THREAD,
    MIN_DOT_DIM,
    SEGMENT_CHUNKS,
    SHARED_MEMORY_LIMIT_BYTES,
    STATE_K_PARTS,
    THREADS_PER_WARP,
    FwdConfig,
    Param,
    Shape,
    default_config,
    sequence_split_regime,
    state_row_parts,
)
from gdn2_tune.kernels.intra import G_FLOOR as _G_FLOOR
from gdn2_tune.kernels.intra import L2NORM_EPS as _L2NORM_EPS
from gdn2_tune.kernels.intra import IntraOutputs, intra_fwd
from gdn2_tune.kernels.pairwise import PAIR_METHODS, PAIR_PRECISIONS, PAIR_SAFE_SPAN, pairs_bwd, pairs_fwd
from gdn2_tune.kernels.spec import DeviceLimits

# The sequence split reuses the forward's per-segment transitions and fp32 carry as they are (launches 1 and 2 of
# kernels/state.py): the backward's passes run the same recurrence and its adjoint (see Segments).
from gdn2_tune.kernels.state import CARRY_BLOCK, UPCAST_DOTS_WHEN_INTERPRETED, _carry_kernel, _segment_kernel
from gdn2_tune.kernels.varlen import PackedIndex, packed_index, sequence_bounds

G_FLOOR = float(getattr(_G_FLOOR, "value", _G_FLOOR))
G_FLOOR_C = tl.constexpr(G_FLOOR)
L2NORM_EPS = float(getattr(_L2NORM_EPS, "value", _L2NORM_EPS))
# K slice of the key-side kernel: ~15 live [C, BK] fp32 tiles, 7.5K values at C = 32 (60 per thread at 4 warps).
KEY_SIDE_BK = 16
BWD_STATE_PRECISIONS = ("tf32", "tf32x3", "ieee")
STATE_DTYPES = ("fp32", "bf16")
_STATE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Segment length of the default sequence split of the backward's passes (where the forward's rule splits its own):
# 1x32768x16 at chunk 32 gives 8 segments, so 16 heads x 8 segments x V tiles fill the GPU as the anchor does.
BWD_SEGMENT_CHUNKS = 128
LOCAL_DTYPES = ("fp32", "fp64")
LOCAL_METHODS = ("pairs", "autograd")
# The key side after the value side: "triton" (the pair backward, then _key_side_kernel, on stored fp32 factors),
# "torch" (the same equations as torch ops; torch value side only) or "fused" (_key_tail_kernel: one launch).
KEY_SIDES = ("triton", "torch", "fused")
# The fused key tail's launch. Compiled for sm90 with triton 3.6 at the anchor (C = 32, pair_BK 32, 4 warps,
# tf32x3), ptxas took 255 registers (2 programs per SM) at 2 or 3 stages and 242 at 1, no spills; capped at 168
# (3 programs per SM) it spills nothing at BK 32 (88 B at BK 16), capped at 128 it spills 160 B. One stage: its row
# block loop has NB = C / BC = 2 steps, nothing to pipeline.
KEY_TAIL_STAGES = 1
KEY_TAIL_MAX_REGISTERS = 168  # Triton's maxnreg; 0: ptxas's choice
# The recomputed tensors each BwdConfig.recompute_store keeps in the input dtype (the others fp32 where the passes
# can stage it). The entering states read Y, U, K_tail (and the split's transitions Y, U, K_tail), the reverse pass
# Q_γ, K_tail, Y: dh0 comes out of the reverse pass, so U's rounding never reaches it ("u" leaves dh0 as "fp32"
# computes it), Q_γ's only through the reverse pass, Y's and K_tail's through both. "input": all four.
RECOMPUTE_STORE_TENSORS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "input": ("y", "u", "qg", "kt"),
    "u": ("u",),
    "uqg": ("u", "qg"),
    "uy": ("u", "y"),
    "ukt": ("u", "kt"),
    "uykt": ("u", "y", "kt"),
}
RECOMPUTE_STORES = tuple(RECOMPUTE_STORE_TENSORS)
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class BwdConfig:
    """Tunables of the backward. The chunk length is not one of them: the backward follows the forward's, since
    it recomputes with the forward's stages and their per-chunk buffers."""

    # Reverse-pass and pair-kernel defaults: the best of a 10-point sweep at the anchor shape on an H200
    # (2026-11-30, benchmarks/sweep_bwd.py): backward 41.6 ms at BV32-s2-tf32x3 / pair BK32-w4, 35.4 with BV64-s3
    # and tf32, 38.6 with pair BK16-w2.
    BV: int = 64  # V tile of the reverse state pass; more tiles = more parallel programs
    num_warps: int = 4
    num_stages: int = 3
    # Input precision of the reverse pass's fp32 dots. default_bwd_config picks tf32 for 16-bit inputs (its
    # operands carry more mantissa than the bf16 intermediates the forward keeps) and 3xTF32 for fp32 inputs.
    precision: str = "tf32x3"
    # Elements of the largest per-group tensor of the local-gradient step (chunks are processed in groups): about
    # 30 such fp32 temporaries live at once with local="pairs", so 2^24 bounds that step near 2 GB; under
    # local="autograd" it counts the [chunks, H, C, C, K] pair tensor, of which autograd keeps a few.
    group_elements: int = 1 << 24
    local_dtype: str = "fp32"  # arithmetic of the local-gradient step
    # "pairs": the decay-weighted pair products and their backward in Triton (kernels/pairwise.py), the rest as
    # batched torch matmuls with the equations written out; "autograd": torch autograd through the whole chunk,
    # pairs as a [C, C, K] tensor (simple, memory-hungry: the cross-check of the first).
    local: str = "pairs"
    pair_BC: int = 16  # sub-block of the pair products (diagonal blocks are formed pair by pair)
    # K slice and warps of the pair products. With pair="dot" on an H200 (2026-11-30, anchor, same run,
    # benchmarks/exp_bwd_variants.py) BK 32 on 4 warps took forward + backward from 18.65 to 15.26 ms.
    pair_BK: int = 32
    pair_warps: int = 4
    pair_precision: str = "tf32x3"  # tl.dot input precision of the pair products' off-diagonal blocks
    # How the pair backward forms the diagonal blocks' pairs (kernels/pairwise.py): "elementwise", a [BC, BC, BK]
    # tensor of exp(G_r − G_s) on the CUDA cores, or "dot", factored through a reference row before each sub-block
    # (exponents bounded by one sub-block's span) so that every product is a tensor-core dot: the default, 3.4 ms
    # off forward + backward at the anchor (the 15.26 ms above), where the elementwise pair backward took 4.56.
    pair: str = "dot"
    # The elementwise key-side tail (dq, dk, db, dg from the products' gradients): one Triton launch, or the same
    # equations as torch ops (about 25 launches over [chunks, H, C, K]). On an H200 (2026-11-30, anchor shape,
    # benchmarks/exp_bwd_variants.py) the Triton launch took forward + backward from 35.1 to 31.2 ms, its gradients
    # within 7e-6 (relative) of the torch ops'.
    key_side: str = "triton"
    # key_side="fused" (kernels/chunk_bwd.py's _key_tail_kernel): the pair backward and the tail in one launch that
    # re-forms b⊙k̂, scale·q̂, k̂ from q, k, b in the token layout, so the key factors store 3 fp32 [C, K] tiles per
    # chunk instead of 8 and DX_T, DX_A, DY never leave registers: ~4.5 GB fewer bytes at the anchor (see
    # kernels/bwd_spec.py), timed by benchmarks/exp_key_tail.py.
    # The value side (everything that sums over V: R, dR, dA_qk, dQ_γ, dK_tail, dY, dA, dT, dĒ, dv, dw): one
    # fused Triton launch per (chunk, head) (kernels/bwd_local.py), or batched torch matmuls ("torch").
    value_side: str = "triton"
    # The fused launch's tiling: "v" walks V in tiles of value_BV with K whole, "k" walks K in tiles of value_BK
    # with V whole (fewer live registers, S0 and dS_C read twice). On an H200 (2026-11-30, anchor, "v" tiling)
    # forward + backward took 24.8 ms at value_BV 64, 103 ms at 32 (register spills), 81 at 32 with 4 warps.
    # value_tile "k" took 24.8 ms (2026-11-30, same run as the 22.05 of "v"), pair_BK 32 with 4 warps 24.6.
    value_tile: str = "v"
    value_BV: int = 64
    value_BK: int = 32
    value_warps: int = 8
    # tl.dot precision of the recompute (the forward's intra launch, kernels/intra.py): its A, Y, U, A_qk feed every
    # gradient.
    recompute_precision: str = "tf32x3"
    # Storage of the recomputed Y, U, Q_γ, K_tail that the two per-sequence passes read: "fp32" where the reverse
    # pass can stage fp32 operands, or "input" (the input dtype, as the forward keeps them): at the anchor, bf16
    # halves ~4 GB of writes and re-reads over the recompute and both passes (A and A_qk stay fp32 either way).
    # On an H200 (session 8) "input" took forward + backward 12.64 → 11.08 ms at the anchor, but dh0's error rose
    # from 4.9e-4 to 1.60e-3 (bf16, g down to −10), above the baseline's 1.5e-3: an explicit option, refused for
    # tuning (kernels/bwd_spec.py SEARCH_RULES). The subsets ("u", "uqg", "uy", "ukt", "uykt") store only the named
    # tensors in the input dtype (RECOMPUTE_STORE_TENSORS): "u" leaves dh0 untouched (the reverse pass never reads
    # U), benchmarks/exp_bwd_store.py measures the others.
    recompute_store: str = "fp32"
    # Chunks per segment of the sequence split of the two per-sequence passes (dense batches): 0 walks each
    # sequence in one program per (head, V tile); n > 0 cuts it into segments of n chunks walked in parallel, from
    # entering states found by a short fp32 carry over the segments (kernels/state.py's split for the forward, its
    # transitions shared by both passes: see :func:`segment_transitions`).
    segment_chunks: int = 0
    # Storage of S0 and dS_C between the passes and the local step: "fp32", or "bf16" for 16-bit inputs (half the
    # bytes of the two largest tensors of the backward, [chunks, H, K, V] each; the passes still carry fp32).
    state_dtype: str = "fp32"
    # Row parts of the two per-sequence passes' [K, BV] tiles (S in the entering states, dS in the reverse pass), as
    # the forward's StateConfig.k_parts: 1 holds one [KP, BV] tile, KP = K padded to a power of two; 2 holds two,
    # [KA, BV] and [KB, BV] (kernels/config.state_row_parts), every K-wide product summed over them. The segment
    # transitions and the carry (kernels/state.py) keep one tile either way.
    k_parts: int = 1
    # The reverse pass's own tile: V tile, warps, row parts and pipelining depth, 0 for the entering states' (BV,
    # num_warps, k_parts, num_stages; fit_bwd writes them out, as do tables). The two passes hold the same [K, BV]
    # state but read different operands (Y, U, K_tail against Q_γ, K_tail, Y, dO, A_qk) and do two dots per chunk
    # against four, so their best tiles differ: on an H200 (session 9, anchor, benchmarks/exp_bwd_parts.py) the
    # entering states took 0.66 ms at k_parts 2 on 4 warps and the reverse 1.46 at one part on 8 warps, where either
    # shared tile lost ~0.45 ms.
    # Their shared-memory budgets differ too (the reverse pass stages three [C, K] operands, the entering states
    # two), so each pass fits its own stages. The precision and the sequence split stay shared (the split's
    # transitions and carries run at the entering states' tile).
    reverse_BV: int = 0
    reverse_warps: int = 0
    reverse_k_parts: int = 0
    reverse_stages: int = 0

    def reverse_pass(self) -> BwdConfig:
        """The config the reverse pass launches with: its own tile where set, the entering states' elsewhere."""
        return dataclasses.replace(self, BV=self.reverse_BV or self.BV, num_warps=self.reverse_warps or self.num_warps,
                                   k_parts=self.reverse_k_parts or self.k_parts,
                                   num_stages=self.reverse_stages or self.num_stages, reverse_BV=0, reverse_warps=0,
                                   reverse_k_parts=0, reverse_stages=0)

    def resolved(self) -> BwdConfig:
        """The same launches with the reverse pass's tile written out (no field 0): what the space and tables hold."""
        rev = self.reverse_pass()
        return dataclasses.replace(self, reverse_BV=rev.BV, reverse_warps=rev.num_warps, reverse_k_parts=rev.k_parts,
                                   reverse_stages=rev.num_stages)

    def label(self) -> str:
        tile = {"v": f"{self.value_BV}", "k": f"{self.value_BK}", "stack": f"{self.value_BK}"}.get(
            self.value_tile, f"BK{self.value_BK}BV{self.value_BV}")
        value = f"-val{self.value_tile}{tile}w{self.value_warps}" if self.value_side == "triton" else "-valtorch"
        pair = f"-pair{'dot' if self.pair == 'dot' else ''}BK{self.pair_BK}w{self.pair_warps}-{self.pair_precision}"
        seg = f"-seg{self.segment_chunks}" if self.segment_chunks else ""
        seg += f"-k{self.k_parts}" if self.k_parts > 1 else ""
        rev = self.reverse_pass()
        if (rev.BV, rev.num_warps, rev.k_parts, rev.num_stages) != (self.BV, self.num_warps, self.k_parts,
                                                                    self.num_stages):
            seg += f"-revBV{rev.BV}w{rev.num_warps}k{rev.k_parts}s{rev.num_stages}"
        store = "" if self.state_dtype == "fp32" else f"-st{self.state_dtype}"
        store += "" if self.recompute_store == "fp32" else f"-rs{self.recompute_store}"
        store += "" if self.key_side == "triton" else f"-key{self.key_side}"
        return (f"bwd:BV{self.BV}-w{self.num_warps}-s{self.num_stages}-{self.precision}{seg}{store}"
                f"-g{self.group_elements}-{self.local_dtype}{pair}{value}-rc{self.recompute_precision}")

    def to_dict(self) -> dict[str, Any]:
        """Every field; one of BWD_LATER_FIELDS at the value older entries ran is left out, so that tables written
        before it existed round-trip unchanged (from_dict fills it back in)."""
        out = dataclasses.asdict(self)
        for name, legacy in BWD_LATER_FIELDS.items():
            if out[name] == legacy:
                del out[name]
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BwdConfig:
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a dict, received {type(data).__name__}")
        # A table written before a field existed ran that field's default, which BWD_LATER_FIELDS names.
        data = {**{k: v for k, v in BWD_LATER_FIELDS.items() if k not in data}, **data}
        expected = {f.name for f in dataclasses.fields(BwdConfig)}
        if set(data) != expected:
            raise ValueError(f"config: expected keys {sorted(expected)}, received {sorted(data)}")
        return BwdConfig(**data)

    def flat(self) -> dict[str, Any]:
        """The tunables under the space's names (:data:`BWD_SPACE`), e.g. ``{"state.BV": 64, ...}``, the reverse
        pass's tile written out (:meth:`resolved`)."""
        cfg = self.resolved()
        return {name: getattr(cfg, field) for name, field in BWD_FIELDS.items()}

    @staticmethod
    def from_flat(params: dict[str, Any]) -> BwdConfig:
        """The built-in config with the space's tunables set from ``params`` (every name of the space, no other; a
        later field's name may be missing from trials recorded before it existed)."""
        params = {**{n: v for n, v in BWD_LATER_FLAT.items() if n not in params}, **params}
        if params.keys() != BWD_FIELDS.keys():
            raise ValueError(f"config: expected keys {sorted(BWD_FIELDS)}, received {sorted(params)}")
        return BwdConfig(**{field: params[name] for name, field in BWD_FIELDS.items()})  # the rest at the built-in


DEFAULT_BWD_CONFIG = BwdConfig()
# Fields added after bwd tables were written, at the value those entries ran (see BwdConfig.to_dict), and the same
# under the space's names for recorded trials.
BWD_LATER_FIELDS: dict[str, Any] = {"k_parts": 1, "reverse_BV": 0, "reverse_warps": 0, "reverse_k_parts": 0,
                                    "reverse_stages": 0}
BWD_LATER_FLAT: dict[str, Any] = {"state.k_parts": 1}
# The passes' shared memory is counted as the per-chunk operands times the stages, times this margin. Against the
# compiled footprints (sm_90, triton 3.6, C = 32, K = 128 and 256, every store, V tiles 64 and 128, 1-3 stages, both
# passes: 120 compiles by benchmarks/compile_bwd_smem.py, tests/data/bwd_pass_shared_memory.json) the count is 0.96
# to 1.6 times low, most where the total is small: of the configs over the 227 KiB limit the closest was counted at
# 1.135 times below it (the reverse pass, K = V = 256, BV 128, two stages, U and K_tail in bf16: 241664 bytes
# compiled, 204800 counted). 1.1 let it through (session 10's tune compiled it: OutOfResources); 1.25 refuses every
# over-limit config measured.
PASS_SHARED_MEMORY_MARGIN = 1.25

# What the tuner searches (op "bwd", kernels/bwd_spec.py): first the store of the recomputed operands, which couples
# the groups after it (both passes' shared-memory budgets read its dtypes); then one group per launch that reads the
# values, so that no constraint reads two groups (the tuner lists each group's feasible values on its own,
# tuner/space.py): the recompute's precision ("recompute."), the entering states and what both passes share
# ("state.": tile, stages, precision, sequence split, the stored states), the reverse pass's own tile ("reverse."),
# the pair backward's tile ("pair.") and the rest of the local gradients ("local.": the pair method, the key side,
# the fused value side). Fields left out are not tunables: local="autograd" is the cross-check, group_elements
# bounds memory, pair_BC is the exact-diagonal sub-block.
BWD_SPACE: tuple[Param, ...] = (
    Param("recompute_store", RECOMPUTE_STORES, "storage of the recomputed Y, U, Q_γ, K_tail the passes read"),
    Param("recompute.precision", INTRA_PRECISIONS, "tl.dot precision of the recomputed intra stage"),
    Param("state.BV", (16, 32, 64, 128), "V tile of the entering states"),
    Param("state.num_warps", (2, 4, 8), "warps of an entering-states program"),
    Param("state.num_stages", (1, 2, 3), "software pipelining depth of the entering states' chunk loop"),
    Param("state.precision", BWD_STATE_PRECISIONS, "dot precision of the passes and the fused value side"),
    Param("state.segment_chunks", SEGMENT_CHUNKS,
          "0: one program per (sequence, head, V tile) along the sequence; n: segments of n chunks in parallel"),
    Param("state.state_dtype", STATE_DTYPES, "storage of S0 and dS_C for the local step (bf16: 16-bit inputs)"),
    Param("state.k_parts", STATE_K_PARTS, "the entering states' [K, BV] tile as one padded tile or two row parts"),
    Param("reverse.BV", (16, 32, 64, 128), "V tile of the reverse pass"),
    Param("reverse.num_warps", (2, 4, 8), "warps of a reverse-pass program"),
    Param("reverse.k_parts", STATE_K_PARTS, "the reverse pass's [K, BV] tile as one padded tile or two row parts"),
    Param("reverse.num_stages", (1, 2, 3), "software pipelining depth of the reverse pass's chunk loop"),
    Param("pair.BK", (16, 32, 64), "K slice of the pair backward"),
    Param("pair.num_warps", (2, 4, 8), "warps of a pair-backward program"),
    Param("pair.precision", PAIR_PRECISIONS, "dot precision of the pair products' off-diagonal blocks"),
    Param("local.pair", PAIR_METHODS, "pair backward: diagonal blocks pair by pair, or every product a dot"),
    Param("local.value_side", ("triton", "torch"), "the value side fused in one launch, or batched torch matmuls"),
    Param("local.key_side", ("triton", "fused"),
          "pair backward and key-side tail: two launches on stored fp32 factors, or one re-forming them"),
    Param("local.value_tile", VALUE_TILES, "the fused value side walks V (K whole), K (V whole), or splits in two"),
    Param("local.value_BV", (32, 64, 128), "V tile of the fused value side (value_tile='v' or 'split')"),
    Param("local.value_BK", (16, 32, 64), "K tile of the fused value side (value_tile='k' or 'split')"),
    Param("local.value_warps", (4, 8, 16), "warps of a fused value-side program"),
)
# The BwdConfig field of each space name: the name without its group ("state.BV" -> "BV"), except where the group
# names a launch with fields of its own.
_OWN_FIELDS = {"recompute.precision": "recompute_precision", "reverse.BV": "reverse_BV",
               "reverse.num_warps": "reverse_warps", "reverse.k_parts": "reverse_k_parts",
               "reverse.num_stages": "reverse_stages", "pair.BK": "pair_BK", "pair.num_warps": "pair_warps",
               "pair.precision": "pair_precision"}
BWD_FIELDS: dict[str, str] = {p.name: _OWN_FIELDS.get(p.name, p.name.rsplit(".", 1)[-1]) for p in BWD_SPACE}


# The two per-sequence passes' tiles for 16-bit inputs, each pass alone on an H200 (session 9, bf16, bf16 states,
# fp32 recomputed operands, benchmarks/exp_bwd_parts.py), ms as entering states / reverse:
# - K = V = 128, 8x4096x16: BV 64 w4 one part 0.93 / 1.65, two parts 0.66 / 1.79, BV 64 w8 one part 0.87 / 1.46;
#   1x32768x16 (split in segments of 128): one part w4 2.46 / 2.97, two parts 2.22 / 3.62, one part w8 2.42 / 2.96.
#   So the entering states in two parts on 4 warps, the reverse in one part on 8.
# - K = V = 256, 16x2048x8 (one stage: fit_bwd): BV 64 w4 one part 2.99 / 4.65, two parts BV 64 w8 2.04 / 3.04,
#   two parts BV 128 w8 2.03 / 2.73, one part BV 64 w8 1.91 / 3.58. The entering states at BV 64 (sm_90, triton
#   3.6: no spills, where BV 128 spills 680 B per thread), the reverse at BV 128 in two parts on 8 warps.
# fp32 inputs (3xTF32 dots, fp32 states) were not measured and keep one shared tile.
# Session 10 (each pass its own stages, the "uykt" store; benchmarks/results/bwd-parts-stages-h200-2026-11-30-s10.jsonl
# and bench_bwd the same day), K = V = 256, forward + backward: entering states 2 stages / reverse 1 took 12.60 ms
# (the passes 1.13 / 1.91), both at 1 13.08 (states 1.61), 3 / 2 (the most that fit: 74 / 176 KB of shared memory,
# so one reverse-pass block per SM where one stage's 98 KB leaves room for two) 12.97.
PASS_TILES: dict[str, int] = {"k_parts": 2, "reverse_k_parts": 1, "reverse_warps": 8}
PASS_TILES_WIDE: dict[str, int] = {"k_parts": 2, "num_warps": 8, "BV": 64, "num_stages": 2, "reverse_BV": 128,
                                   "reverse_stages": 1}


def default_bwd_config(shape: Shape) -> BwdConfig:
    """The built-in backward config for ``shape`` (fitted at the call, against the forward's chunk length).

    16-bit inputs take TF32 dots in the reverse pass and the recompute: on an H200 (2026-11-30, anchor shape,
    benchmarks/exp_bwd_variants.py) a TF32 recompute took forward + backward from 22.05 to 20.28 ms, and every
    gradient's error against float64 (bf16, strong decay) moved by at most 1e-5 absolute (dg 6.9e-4 → 7.0e-4, the
    others 1.8e-3 to 2.4e-3, one bf16 rounding). fp32 inputs keep 3xTF32 throughout.

    bf16 inputs store S0 and dS_C in bf16 (``state_dtype``): on an H200 (2026-11-30, session 7,
    benchmarks/results/bwd-state-h200-2026-11-30-s7.jsonl) forward + backward took 15.05 → 12.61 ms at the anchor
    (the local step 9.19 → 6.99), 18.83 → 16.37 at 1x32768x16 (split in segments of 128) and 30.93 → 26.79 at
    16x2048x8, K = V = 256; against float64 (2x2048x4, K = V = 128, g down to −10 per step) every gradient's error
    stayed within 3e-4 of the fp32 states' (dg 7.0e-4 → 9.7e-4, the largest move; dq 1.82e-3, db 2.45e-3) and below
    the baseline's on the same inputs. fp16 inputs keep fp32 states: their gradients round at 2^-12, and a bf16
    state's 2^-9 would be the largest error of the backward."""
    cfg = DEFAULT_BWD_CONFIG
    if shape.dtype != "fp32":
        cfg = dataclasses.replace(cfg, precision="tf32", recompute_precision="tf32")
    if shape.dtype == "bf16":
        # The value side too: at the anchor "kv" (SPLIT_FALLBACK's tiles) took 2.36 ms against 3.94 for "v" (V tiles of
        # 64 on 8 warps, ~1 KB of spills per thread), forward + backward 11.01 against 12.74 (H200, session 8, same
        # run); against float64 (2x2048x4, g down to −10) every gradient within 4e-6 of v's. Measured with bf16 states
        # only: fp16 and fp32 inputs keep "v" where it fits.
        cfg = dataclasses.replace(cfg, state_dtype="bf16", **SPLIT_FALLBACK)
        # U, Y and K_tail stored in bf16 for the passes, Q_γ in fp32: on an H200 (session 9,
        # benchmarks/exp_bwd_store.py, 2x2048x4, K = V = 128, g down to −10) dh0's error against float64 stayed at the
        # fp32 store's 4.86e-4 (Q_γ in bf16 gave 1.60e-3, over the baseline's 1.5e-3), the other gradients within
        # 3e-5 of it; the bytes of the recompute and both passes fall by a quarter at the anchor (kernels/bwd_spec.py).
        cfg = dataclasses.replace(cfg, recompute_store="uykt")
    if shape.dtype != "fp32":
        cfg = dataclasses.replace(cfg, **(PASS_TILES_WIDE if shape.K > 128 else PASS_TILES))
    # The forward's rule for its own state pass (kernels/config.py): few state rows along long sequences leave
    # most of the GPU idle in a per-sequence pass, and the backward has two of them.
    if sequence_split_regime(shape):
        cfg = dataclasses.replace(cfg, segment_chunks=BWD_SEGMENT_CHUNKS)
    return cfg


def _padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def bwd_infeasibility(cfg: BwdConfig, shape: Shape, chunk: int, operand_bytes: int,
                      shared_memory: int = SHARED_MEMORY_LIMIT_BYTES) -> str | None:
    """Why the backward cannot run ``cfg`` at ``shape`` (None when it can): each field one of its legal values, and
    each per-sequence pass's tile within its budgets (:func:`_pass_infeasibility`) with recomputed operands of
    ``operand_bytes`` (:func:`pass_operand_bytes`); ``shared_memory``: what one block may use on the GPU (sm90's by
    default)."""
    if cfg.precision not in BWD_STATE_PRECISIONS:
        return f"precision={cfg.precision!r} is not one of {list(BWD_STATE_PRECISIONS)}"
    if cfg.local_dtype not in LOCAL_DTYPES:
        return f"local_dtype={cfg.local_dtype!r} is not one of {list(LOCAL_DTYPES)}"
    if cfg.local not in LOCAL_METHODS:
        return f"local={cfg.local!r} is not one of {list(LOCAL_METHODS)}"
    if cfg.local == "pairs" and cfg.local_dtype != "fp32":
        return "local='pairs' computes in fp32 (the Triton pair kernels take fp32 factors)"
    if cfg.key_side not in KEY_SIDES:
        return f"key_side={cfg.key_side!r} is not one of {list(KEY_SIDES)}"
    if cfg.value_side not in ("triton", "torch"):
        return f"value_side={cfg.value_side!r} is not one of ['triton', 'torch']"
    if cfg.value_side == "triton" and cfg.key_side == "torch":
        return "value_side='triton' hands its results to the Triton key side: key_side must be 'triton' or 'fused'"
    if cfg.value_side == "torch" and cfg.key_side == "fused":
        return "key_side='fused' reads the token layout beside the fused value side: value_side must be 'triton'"
    if cfg.value_tile not in VALUE_TILES:
        return f"value_tile={cfg.value_tile!r} is not one of {list(VALUE_TILES)}"
    for name in ("value_BV", "value_BK"):
        x = getattr(cfg, name)
        if x < 16 or x & (x - 1):
            return f"{name}={x} must be a power of two >= 16"
    if cfg.value_warps not in (1, 2, 4, 8, 16):
        return f"value_warps={cfg.value_warps} is not one of [1, 2, 4, 8, 16]"
    if cfg.recompute_store not in RECOMPUTE_STORES:
        return f"recompute_store={cfg.recompute_store!r} is not one of {list(RECOMPUTE_STORES)}"
    if cfg.recompute_precision not in INTRA_PRECISIONS:
        return f"recompute_precision={cfg.recompute_precision!r} is not one of {list(INTRA_PRECISIONS)}"
    if cfg.state_dtype not in STATE_DTYPES:
        return f"state_dtype={cfg.state_dtype!r} is not one of {list(STATE_DTYPES)}"
    if cfg.state_dtype != "fp32" and shape.dtype == "fp32":
        return f"state_dtype={cfg.state_dtype!r} would round an fp32 backward's states: 16-bit inputs only"
    reason = segment_infeasibility(cfg.segment_chunks, shape, chunk)
    if reason is not None:
        return reason
    if cfg.pair_precision not in PAIR_PRECISIONS:
        return f"pair_precision={cfg.pair_precision!r} is not one of {list(PAIR_PRECISIONS)}"
    if cfg.pair not in PAIR_METHODS:
        return f"pair={cfg.pair!r} is not one of {list(PAIR_METHODS)}"
    if cfg.pair_BC < 16 or chunk % cfg.pair_BC or cfg.pair_BK < 16 or cfg.pair_BK & (cfg.pair_BK - 1):
        return f"pair_BC={cfg.pair_BC} must divide chunk={chunk} (>= 16); pair_BK={cfg.pair_BK} a power of two >= 16"
    for name, value, legal in (("reverse_BV", cfg.reverse_BV, (0, 16, 32, 64, 128, 256)),
                               ("reverse_warps", cfg.reverse_warps, (0, 1, 2, 4, 8, 16)),
                               ("reverse_k_parts", cfg.reverse_k_parts, (0, *STATE_K_PARTS)),
                               ("reverse_stages", cfg.reverse_stages, (0, 1, 2, 3, 4))):
        if value not in legal:
            return f"{name}={value!r} is not one of {list(legal)} (0: the entering states' value)"
    reason = _pass_infeasibility("entering states", cfg, shape, chunk, operand_bytes, shared_memory)
    if reason is None:
        reason = _pass_infeasibility("reverse pass", cfg.reverse_pass(), shape, chunk, operand_bytes, shared_memory)
    return reason


def _pass_infeasibility(which: str, cfg: BwdConfig, shape: Shape, chunk: int, operand_bytes: int,
                        shared_memory: int) -> str | None:
    """Why one per-sequence pass cannot run its tile (``cfg``'s BV, num_warps, k_parts, num_stages; None when it
    can). Per chunk the reverse pass stages Q_γ, K_tail, Y [C, K], dO [C, BV] and A_qk [C, C], the entering states Y,
    K_tail [C, K] and U [C, BV]: each recomputed operand at ``operand_bytes``, or the input dtype's where
    ``cfg.recompute_store`` stores it so, dO at ``operand_bytes`` (see PASS_SHARED_MEMORY_MARGIN)."""
    reason = state_parts_infeasibility(cfg.k_parts, shape.K)
    if reason is not None:
        return f"{which}: {reason}"
    # The passes' [K, BV] tiles: K padded to a power of two in one part, to the parts' sum in two.
    kp, vp = sum(state_row_parts(shape.K, cfg.k_parts)), _padded(shape.V)
    if cfg.BV < 16 or cfg.BV > vp or cfg.BV & (cfg.BV - 1):
        return f"{which}: BV={cfg.BV} must be a power of two in [16, {vp}]"
    narrow = RECOMPUTE_STORE_TENSORS.get(cfg.recompute_store, ())
    size = {name: min(operand_bytes, shape.torch_dtype.itemsize) if name in narrow else operand_bytes
            for name in ("y", "u", "qg", "kt")}
    if which == "reverse pass":  # A_qk is recomputed in fp32 whatever the other operands' dtype
        per_stage = (chunk * kp * (size["qg"] + size["kt"] + size["y"]) + chunk * cfg.BV * operand_bytes
                     + 4 * chunk * chunk)
    else:
        per_stage = chunk * kp * (size["y"] + size["kt"]) + chunk * cfg.BV * size["u"]
    need = int(PASS_SHARED_MEMORY_MARGIN * max(1, cfg.num_stages) * per_stage)
    if need > shared_memory:
        return f"{which} needs ~{need // 1024} KiB of shared memory"
    live = kp * cfg.BV + 2 * chunk * cfg.BV  # S or dS, and two [C, BV] tiles (R or dR, U or dO)
    if live / (cfg.num_warps * THREADS_PER_WARP) > MAX_REGISTERS_PER_THREAD:
        return f"{which} holds more fp32 values per thread than the register file allows"
    return None


def state_parts_infeasibility(parts: int, K: int) -> str | None:
    """Why the passes cannot hold their [K, BV] tiles in ``parts`` row parts (None when they can): two parts need a
    K beyond one MMA tile (MIN_DOT_DIM rows; below it the second part would be all padding)."""
    if parts not in STATE_K_PARTS:
        return f"k_parts={parts!r} is not one of {list(STATE_K_PARTS)}"
    if parts > 1 and K <= MIN_DOT_DIM:
        return f"k_parts={parts} needs K > {MIN_DOT_DIM} (one MMA tile per part), received K={K}; use k_parts=1"
    return None


def segment_infeasibility(n: int, shape: Shape, chunk: int) -> str | None:
    """Why the passes cannot split each sequence into segments of ``n`` chunks (None when they can, or n = 0): as
    for the forward's split (kernels/config.py), dense batches only (a packed batch's segments would follow its
    offsets) and at least two segments (one is the plain pass plus launches of overhead)."""
    if not n:
        return None
    if n < 0:
        return f"segment_chunks={n} must be 0 (no split) or a positive chunk count"
    if shape.num_seqs is not None:
        return f"segment_chunks={n}: the sequence split takes dense batches only, not packed (cu_seqlens) ones"
    chunks = -(-shape.T // chunk)
    if n >= chunks:
        return f"segment_chunks={n} leaves one segment: the sequence has {chunks} chunks of {chunk}"
    return None


# The fused value side keeps [C, K] and [K, BV] (or [C, V] and [BK, V]) fp32 tiles and their dot operands on chip.
# On an H200 (2026-11-30) both tilings ran at C = 32, K = V = 128 and failed to launch at C = 32, K = V = 256 (Triton
# asked for 236 and 272 KiB of shared memory, 227 KiB available): allow it up to the measured footprint.
VALUE_SIDE_MAX_FOOTPRINT = 32 * (128 + 128)
# value_tile="split" holds no tile that grows with K or V, so it fits whatever K and V: its shared memory follows
# C·(C + BK + BV) + BK·BV. Compiled for sm90 with triton 3.6 (the lead's toolchain; compiling needs no GPU), 2 stages,
# 8 warps: at C = 32 the rows / cols launches asked for 36 / 32 KiB at BK 32, BV 64 and 96 / 96 KiB at BK 64, BV 128;
# at C = 64, 160 / 160 KiB at BK = BV = 64 and 224 / 256 KiB at BK 64, BV 128 (over sm90's 227 KiB): allow up to
# the C = 64, BK = BV = 64 footprint. value_tile="kv" / "kv16" (the same tiles, K a grid axis of the second launch)
# asked for less under the same rule: at C = 32, K = V = 256, bf16 states, 4 warps, 20 / 28 KiB at BK 32, BV 64 and
# 32 / 36 at BK = BV = 64; at C = 64, K = V = 128, fp32 states, 8 warps, 128 / 104 KiB at BK = BV = 64.
VALUE_SPLIT_MAX_FOOTPRINT = 64 * (64 + 64 + 64) + 64 * 64
# value_tile="stack" holds [2C, V] fp32 tiles (V whole, K walked) and [2C, 2C] block matrices; K does not enter.
# Compiled for sm90 with triton 3.6, 8 warps, 2 stages, its shared memory follows 2C·(V + C) at about 9.3 B each:
# at C = 32, 98 KiB at V = 128 and 160 KiB at V = 256 (BK 16 or 32; 192 KiB at BK 64, 384 at BK 128); at C = 64,
# V = 128, 224 KiB (BK 32 or 64). bf16 states change none of it (they are widened to fp32 before the dots). Allow up
# to the C = 64, V = 128 footprint, BK <= 64. At C = 32, K = V = 256 it spills ~2.7 KB per thread (8 warps; 7 KB at
# 16), where the split tiling spills nothing at BK 32, BV 64: the fallback stays split until timed.
VALUE_STACK_MAX_FOOTPRINT = 2 * 64 * (128 + 64)
VALUE_STACK_MAX_BK = 64


def value_side_fits(shape: Shape, chunk: int, shared_memory: int = SHARED_MEMORY_LIMIT_BYTES,
                    tile: str = "v", BK: int = 32, BV: int = 64) -> bool:
    """Whether the fused value side (kernels/bwd_local.py) with ``tile`` (and, for "split", "kv" and "kv16",
    tiles ``BK``, ``BV``; for "stack", ``BK``) fits on chip at ``shape`` and ``chunk``, on a GPU whose blocks may
    use ``shared_memory`` bytes (the measured footprint scales with it; sm90's by default)."""
    if tile in ("split", "kv", "kv16"):
        footprint = chunk * (chunk + BK + BV) + BK * BV
        return footprint * SHARED_MEMORY_LIMIT_BYTES <= VALUE_SPLIT_MAX_FOOTPRINT * shared_memory
    if tile == "stack":
        footprint = 2 * chunk * (_padded(shape.V) + chunk)
        return BK <= VALUE_STACK_MAX_BK and (footprint * SHARED_MEMORY_LIMIT_BYTES
                                             <= VALUE_STACK_MAX_FOOTPRINT * shared_memory)
    footprint = chunk * (_padded(shape.K) + _padded(shape.V))
    return footprint * SHARED_MEMORY_LIMIT_BYTES <= VALUE_SIDE_MAX_FOOTPRINT * shared_memory


def pass_operand_bytes(shape: Shape, chunk: int, shared_memory: int = SHARED_MEMORY_LIMIT_BYTES) -> int:
    """The bytes per element of the recomputed operands the passes' budgets are checked at: 4 (fp32) when the
    reverse pass can stage fp32 operands at the forward's chunk length at its smallest footprint (a V tile of 16,
    one stage, its K rows in as few padded rows as they fit), else the input dtype's (which fits wherever the
    forward does). Read from the shape alone: the width of the operands ``recompute_store`` does not narrow
    (:func:`_pass_infeasibility` counts the narrowed ones at the input dtype's)."""
    parts = 2 if state_parts_infeasibility(2, shape.K) is None else 1
    smallest = dataclasses.replace(DEFAULT_BWD_CONFIG, num_stages=1, BV=16, k_parts=parts)
    if _pass_infeasibility("reverse pass", smallest, shape, chunk, 4, shared_memory) is None:
        return 4
    return shape.torch_dtype.itemsize


def recompute_dtype(cfg: BwdConfig, shape: Shape, chunk: int,
                    shared_memory: int = SHARED_MEMORY_LIMIT_BYTES) -> torch.dtype:
    """The dtype of the recomputed intermediates: fp32 where the passes' budgets are checked at fp32
    (:func:`pass_operand_bytes`), else the input dtype; the input dtype too under ``recompute_store="input"``."""
    if cfg.recompute_store == "input" or pass_operand_bytes(shape, chunk, shared_memory) < 4:
        return shape.torch_dtype
    return torch.float32


def recompute_dtypes(cfg: BwdConfig, shape: Shape, chunk: int,
                     shared_memory: int = SHARED_MEMORY_LIMIT_BYTES) -> dict[str, torch.dtype]:
    """The dtype of each recomputed tensor the passes read (``y``, ``u``, ``qg``, ``kt``): the input dtype for those
    ``cfg.recompute_store`` names (RECOMPUTE_STORE_TENSORS), :func:`recompute_dtype` for the others (none wider
    than the passes' budgets are checked at)."""
    wide = recompute_dtype(cfg, shape, chunk, shared_memory)
    narrow = RECOMPUTE_STORE_TENSORS.get(cfg.recompute_store, ())
    return {name: shape.torch_dtype if name in narrow else wide for name in ("y", "u", "qg", "kt")}


def _fit(cfg: BwdConfig, shape: Shape, chunk: int) -> tuple[BwdConfig, dict[str, torch.dtype]]:
    """The backward config fitted at the forward's chunk length, and the dtypes of the recomputed intermediates."""
    return fit_bwd(cfg, shape, chunk, pass_operand_bytes(shape, chunk)), recompute_dtypes(cfg, shape, chunk)


# The value side where the "v" tiling does not fit (K = V = 256 asks for over 227 KiB of shared memory): two
# launches with no tile growing with K or V, the second with K a grid axis ("kv"). On an H200 (2026-11-30, session 8,
# benchmarks/results/bwd-kv-h200-2026-11-30-s8.jsonl, bf16 states) at 16x2048x8x256x256 the value side took 3.20 ms
# with these tiles against 11.80 for "split" (BK 32, BV 64, 8 warps: one program per SM at 242 registers) and 5.12
# at BK 32; forward + backward 17.88 against 26.58 ms, every gradient within 1.2e-3 of split's.
SPLIT_FALLBACK = {"value_tile": "kv", "value_BK": 64, "value_BV": 64, "value_warps": 4}


def fit_bwd(cfg: BwdConfig, shape: Shape, chunk: int, operand_bytes: int,
            shared_memory: int = SHARED_MEMORY_LIMIT_BYTES) -> BwdConfig:
    """The nearest admissible backward config: where the fused value side does not fit, its split tiling
    (SPLIT_FALLBACK), else the torch value side; no sequence split where it cannot run (a packed batch, one
    segment), one row part where two cannot run (K <= MIN_DOT_DIM), fp32 states for fp32 inputs; BV clipped to V,
    then, in each pass whose tile does not fit, fewer stages, then a narrower V tile. The reverse pass's tile comes
    back written out (:meth:`BwdConfig.resolved`)."""
    cfg = cfg.resolved()
    cfg = dataclasses.replace(cfg, BV=min(cfg.BV, _padded(shape.V)),
                              reverse_BV=min(cfg.reverse_BV, _padded(shape.V)))
    if cfg.segment_chunks and segment_infeasibility(cfg.segment_chunks, shape, chunk) is not None:
        cfg = dataclasses.replace(cfg, segment_chunks=0)
    if cfg.k_parts > 1 and state_parts_infeasibility(cfg.k_parts, shape.K) is not None:
        cfg = dataclasses.replace(cfg, k_parts=1)
    if cfg.reverse_k_parts > 1 and state_parts_infeasibility(cfg.reverse_k_parts, shape.K) is not None:
        cfg = dataclasses.replace(cfg, reverse_k_parts=1)
    if shape.dtype == "fp32":
        cfg = dataclasses.replace(cfg, state_dtype="fp32")
    if cfg.value_side == "triton" and not value_side_fits(shape, chunk, shared_memory, cfg.value_tile,
                                                              cfg.value_BK, cfg.value_BV):
        split = dataclasses.replace(cfg, **SPLIT_FALLBACK)
        fits = value_side_fits(shape, chunk, shared_memory, split.value_tile, split.value_BK, split.value_BV)
        cfg = split if fits else dataclasses.replace(cfg, value_side="torch")
    while (reason := bwd_infeasibility(cfg, shape, chunk, operand_bytes, shared_memory)) is not None:
        narrower = cfg
        for which, stages, tile in (("entering states", "num_stages", "BV"),
                                    ("reverse pass", "reverse_stages", "reverse_BV")):
            own = narrower if which == "entering states" else narrower.reverse_pass()
            if _pass_infeasibility(which, own, shape, chunk, operand_bytes, shared_memory) is None:
                continue
            if getattr(narrower, stages) > 1:
                narrower = dataclasses.replace(narrower, **{stages: getattr(narrower, stages) - 1})
            elif getattr(narrower, tile) > 16:
                narrower = dataclasses.replace(narrower, **{tile: getattr(narrower, tile) // 2})
        if narrower == cfg:
            raise ValueError(f"{cfg.label()}: {reason}")
        cfg = narrower
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Constraints of the tuned op (kernels/bwd_spec.py), in the generic ``(cfg, shape, device)`` form. The backward
# follows the forward's chunk length, which these take from the forward's built-in config at the shape (see
# forward_chunk); a config is admissible when chunk_gdn2_bwd runs it as it is, without fitting it.


@functools.lru_cache(maxsize=256)
def forward_chunk(shape: Shape, device: DeviceLimits) -> int:
    """The chunk length the backward is tuned and checked at: the forward's built-in config's at ``shape`` (kept:
    every constraint check asks, and fitting the forward's config takes a millisecond)."""
    return default_config(shape, device).chunk


def bwd_legal_values(cfg: BwdConfig, shape: Shape, device: DeviceLimits) -> str | None:
    """Each tunable one of its space's values, of its type (True would pass for 1 and reach Triton as a bool);
    every other field at its built-in value (tables serve tunables only). A reverse-pass field at 0 reads as the
    entering states' value it stands for."""
    if not isinstance(cfg, BwdConfig):
        return f"config: expected a BwdConfig, received {type(cfg).__name__}"
    for p in BWD_SPACE:
        value = getattr(cfg.resolved(), BWD_FIELDS[p.name])
        if type(value) is not type(p.values[0]) or value not in p.values:
            return f"{p.name}={value!r} is not one of {list(p.values)}"
    tuned = set(BWD_FIELDS.values())
    for f in dataclasses.fields(BwdConfig):
        if f.name not in tuned and getattr(cfg, f.name) != getattr(DEFAULT_BWD_CONFIG, f.name):
            return (f"{f.name}={getattr(cfg, f.name)!r} is not a tunable: the tuned op runs "
                    f"{f.name}={getattr(DEFAULT_BWD_CONFIG, f.name)!r}")
    return None


def bwd_fits_forward_chunk(cfg: BwdConfig, shape: Shape, device: DeviceLimits) -> str | None:
    """The reverse pass's tiles and budgets, and the fused value side's on-chip footprint, at the forward's chunk
    length with the operands it recomputes (fp32 where they fit) on ``device``."""
    chunk = forward_chunk(shape, device)
    smem = device.shared_memory_per_block
    if cfg.value_side == "triton" and not value_side_fits(shape, chunk, smem, cfg.value_tile, cfg.value_BK,
                                                             cfg.value_BV):
        return (f"the fused value side does not fit on chip at chunk={chunk}, K={shape.K}, V={shape.V} on "
                f"{device.family}: value_side='torch'")
    return bwd_infeasibility(cfg, shape, chunk, pass_operand_bytes(shape, chunk, smem), smem)


def bwd_tiles_that_act(cfg: BwdConfig, shape: Shape, device: DeviceLimits) -> str | None:
    """One point per distinct launch: the fused value side's tiling parameters only where they act (at their
    built-in values otherwise), so that no two points of the space time the same kernels."""
    default = DEFAULT_BWD_CONFIG
    idle = ("value_tile", "value_BV", "value_BK", "value_warps", "key_side") if cfg.value_side == "torch" else (
        {"v": ("value_BK",), "k": ("value_BV",), "stack": ("value_BV",)}.get(cfg.value_tile, ()))
    if cfg.key_side == "fused":  # its pair backward is the dot one whatever ``pair`` says
        idle = (*idle, "pair")
    if shape.dtype == "fp32":  # the input dtype is fp32 already
        idle = (*idle, "recompute_store")
    for name in idle:
        if getattr(cfg, name) != getattr(default, name):
            return f"{name} has no effect here (value_side={cfg.value_side!r}, value_tile={cfg.value_tile!r})"
    return None


BWD_CONSTRAINTS: tuple[Callable[[BwdConfig, Shape, DeviceLimits], str | None], ...] = (
    bwd_legal_values,
    bwd_tiles_that_act,
    bwd_fits_forward_chunk,
)


@triton.jit
def _sequence_chunks(cu_seqlens, chunk_offsets, i_n, T, NC, C: tl.constexpr):
    """``(bos, T_seq, c0, n_chunks)`` of sequence ``i_n`` for the two per-sequence passes, as the forward's state
    pass bounds them (kernels/state.py): rows clamped to [0, T] (:func:`sequence_bounds`), the first per-chunk
    slot to [0, NC], and the chunk count to the slots left, so that whatever the offsets and the index hold,
    every row read lies in the [T] token buffers and every slot read or written in the [NC] per-chunk ones."""
    bos, T_seq = sequence_bounds(cu_seqlens, i_n, T)
    c0 = tl.minimum(tl.maximum(tl.load(chunk_offsets + i_n).to(tl.int64), 0), NC)
    n_chunks = tl.minimum(tl.cdiv(T_seq, C), (NC - c0).to(tl.int32))
    return bos, T_seq, c0, n_chunks


@triton.jit
def _state_bwd_kernel(
    qg, kt, y, aqk, gam, do,
    dht, dhc, dh0,
    cu_seqlens, chunk_offsets,
    T, NT, NC, SEG, NP, NH,
    H, K, V, KP: tl.constexpr, KB: tl.constexpr,
    C: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_FINAL_GRAD: tl.constexpr, STORE_INITIAL_GRAD: tl.constexpr,
    USE_SEGMENTS: tl.constexpr, STORE_CHUNKS: tl.constexpr, PRECISION: tl.constexpr,
):
    """The reverse pass over one sequence, or with USE_SEGMENTS over segment i_p = program_id(2) of NP (chunks
    i_p·SEG …, dense batches): then ``dht`` and ``dh0`` are [NP + 1, NH, K, V] and [NP, NH, K, V] in reverse segment
    order, the gradient entering segment i_p from slot NP − 1 − i_p of ``dht`` and the one leaving it to slot
    NP − 1 − i_p of ``dh0`` (see :func:`state_bwd`). STORE_CHUNKS=False runs the recurrence without storing dS_C."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos, T_seq, c0, n_chunks = _sequence_chunks(cu_seqlens, chunk_offsets, i_n, T, NC, C)
    else:
        bos = (i_n * T).to(tl.int64)
        T_seq = T
        n_chunks = NT
        c0 = (i_n * NT).to(tl.int64)

    # 64-bit scalar bases, 32-bit tile offsets (as in kernels/intra.py).
    tok0 = bos * H + i_h
    qg += tok0 * K
    kt += tok0 * K
    y += tok0 * K
    do += tok0 * V
    aqk += tok0 * C
    HK = H * K
    HV = H * V
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    s0 = (i_n * H + i_h).to(tl.int64) * K * V  # this (sequence, head)'s [K, V] in dht / dh0
    m_s = m_k[:, None] & m_v[None, :]
    p_h = o_k[:, None] * V + o_v[None, :]

    t_hi = n_chunks
    n_walk = n_chunks
    if USE_SEGMENTS:
        i_p = tl.program_id(2)
        t_hi = tl.minimum((i_p + 1) * SEG, n_chunks)
        n_walk = t_hi - i_p * SEG
        s0 += (NP - 1 - i_p).to(tl.int64) * NH * K * V

    b_ds = tl.zeros([KP, BV], tl.float32)
    if USE_FINAL_GRAD:
        b_ds += tl.load(dht + s0 + p_h, mask=m_s, other=0.0)
    if KB > 0:
        # dS's second row part (BwdConfig.k_parts = 2): rows KP .. KP + KB of dS as a tile of its own. Every
        # K-wide product sums over the parts (K_tail dS = K_tail,A dS_A + K_tail,B dS_B); the decay and the
        # Q_γᵀ dO − Yᵀ dR update act on each part alone.
        o_k2 = KP + tl.arange(0, KB)
        m_k2 = o_k2 < K
        m_s2 = m_k2[:, None] & m_v[None, :]
        p_h2 = o_k2[:, None] * V + o_v[None, :]
        b_ds2 = tl.zeros([KB, BV], tl.float32)
        if USE_FINAL_GRAD:
            b_ds2 += tl.load(dht + s0 + p_h2, mask=m_s2, other=0.0)
    for i_r in range(n_walk):
        i_t = t_hi - 1 - i_r
        t_c = i_t * C + o_c
        m_c = t_c < T_seq
        m_ck = m_c[:, None] & m_k[None, :]
        p_k = t_c[:, None] * HK + o_k[None, :]
        if STORE_CHUNKS:
            # The gradient reaching this chunk's final state, for the local-gradient step.
            tl.store(dhc + ((c0 + i_t) * H + i_h) * K * V + p_h, b_ds.to(dhc.dtype.element_ty), mask=m_s)
            if KB > 0:
                tl.store(dhc + ((c0 + i_t) * H + i_h) * K * V + p_h2, b_ds2.to(dhc.dtype.element_ty), mask=m_s2)
        b_do = tl.load(do + t_c[:, None] * HV + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        b_do = b_do.to(tl.float32)
        b_a = tl.load(aqk + t_c[:, None] * (H * C) + o_c[None, :], mask=m_c[:, None], other=0.0).to(tl.float32)
        b_q = tl.load(qg + p_k, mask=m_ck, other=0.0).to(tl.float32)
        b_kt = tl.load(kt + p_k, mask=m_ck, other=0.0).to(tl.float32)
        b_y = tl.load(y + p_k, mask=m_ck, other=0.0).to(tl.float32)
        b_gc = tl.load(gam + ((c0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_dr = tl.dot(tl.trans(b_a), b_do, input_precision=PRECISION)
        b_dr += tl.dot(b_kt, b_ds, input_precision=PRECISION)
        if KB > 0:
            m_ck2 = m_c[:, None] & m_k2[None, :]
            p_k2 = t_c[:, None] * HK + o_k2[None, :]
            b_kt2 = tl.load(kt + p_k2, mask=m_ck2, other=0.0).to(tl.float32)
            b_dr += tl.dot(b_kt2, b_ds2, input_precision=PRECISION)
        b_ds = b_ds * b_gc[:, None] + tl.dot(tl.trans(b_q), b_do, input_precision=PRECISION)
        b_ds -= tl.dot(tl.trans(b_y), b_dr, input_precision=PRECISION)
        if KB > 0:
            # After dR is whole: it takes both parts of the dS leaving the chunk.
            b_q2 = tl.load(qg + p_k2, mask=m_ck2, other=0.0).to(tl.float32)
            b_y2 = tl.load(y + p_k2, mask=m_ck2, other=0.0).to(tl.float32)
            b_gc2 = tl.load(gam + ((c0 + i_t) * H + i_h) * K + o_k2, mask=m_k2, other=0.0)
            b_ds2 = b_ds2 * b_gc2[:, None] + tl.dot(tl.trans(b_q2), b_do, input_precision=PRECISION)
            b_ds2 -= tl.dot(tl.trans(b_y2), b_dr, input_precision=PRECISION)
    if STORE_INITIAL_GRAD:
        tl.store(dh0 + s0 + p_h, b_ds, mask=m_s)
        if KB > 0:
            tl.store(dh0 + s0 + p_h2, b_ds2, mask=m_s2)


@dataclass(frozen=True)
class ChunkLayout:
    """Where each row of the [num_chunks, C] chunk layout sits in the [B, T] token layout.

    Dense batches pad T up to NT·C; packed ones gather through ``index`` ([num_chunks, C], token of each row, or T
    for a padding row: a zero row appended to the token axis), with the forward's chunk index (phantoms included).
    """

    B: int
    T: int
    NT: int
    C: int
    num_chunks: int
    index: torch.Tensor | None  # packed only
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None
    live: torch.Tensor | None  # packed only: [num_chunks] bool, False for the phantom chunks past the last sequence
    offsets: torch.Tensor | None  # packed only: the sanitised offsets the kernels read

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] → [num_chunks, C, H, D] with zero padding rows."""
        if self.index is None:
            pad = self.NT * self.C - self.T
            if pad:
                x = torch.cat([x, x.new_zeros(self.B, pad, *x.shape[2:])], 1)
            return x.reshape(self.B * self.NT, self.C, *x.shape[2:])
        flat = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])], 0)
        return flat[self.index]

    def from_chunks(self, xc: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_chunks` (padding rows dropped)."""
        if self.index is None:
            return xc.reshape(self.B, self.NT * self.C, *xc.shape[2:])[:, : self.T]
        out = xc.new_empty(self.T + 1, *xc.shape[2:])
        # Every real token is the row of exactly one chunk; only padding rows share the dummy row T.
        out[self.index.reshape(-1)] = xc.reshape(-1, *xc.shape[2:])
        return out[: self.T].unsqueeze(0)

    def token_rows(self, device: torch.device) -> torch.Tensor:
        """[num_chunks, C] int64: the flat token row (b·T + t) of each chunk row, −1 for a padding row."""
        if self.index is None:
            t = torch.arange(self.NT * self.C, device=device).view(self.NT, self.C)
            flat = torch.arange(self.B, device=device).view(-1, 1, 1) * self.T + t
            return torch.where(t < self.T, flat, -1).reshape(self.num_chunks, self.C)
        return torch.where(self.index < self.T, self.index, -1).to(torch.int64)

    def per_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the per-chunk buffers' phantom slots (the launchers never write them)."""
        if self.live is None:
            return x
        return torch.where(self.live.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))


def chunk_layout(B: int, T: int, chunk: int, index: PackedIndex | None, device: torch.device) -> ChunkLayout:
    """The layout of one call: dense without ``index``, else packed along ``index`` (a :func:`packed_index` of the
    call's offsets, whose ``offsets`` are the sanitised ones the kernels read). Device ops only, no host sync.

    Every gathered row is bounded by the sanitised offsets and by T again, so no torch gather or scatter of the
    local-gradient step can leave the [T + 1] token layout even for an index built from other offsets."""
    if index is None:
        nt = triton.cdiv(T, chunk)
        return ChunkLayout(B, T, nt, chunk, B * nt, None, None, None, None, None)
    offs = index.offsets
    n = offs.numel() - 1
    seq = index.pairs[:, 0].long().clamp(0, n - 1)
    bos = offs[seq].clamp(0, T)
    eos = offs[seq + 1].clamp(max=T)
    start = bos + index.pairs[:, 1].long() * chunk
    rows = start[:, None] + torch.arange(chunk, device=device)[None, :]
    rows = torch.where((rows >= bos[:, None]) & (rows < eos[:, None]), rows, torch.full_like(rows, T))
    live = (start >= bos) & (start < eos)
    return ChunkLayout(1, T, triton.cdiv(T, chunk), chunk, index.num_chunks, rows, index.pairs, index.first, live,
                       offs)


def _local_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    s0: torch.Tensor, *, scale: float, l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk per leading index: ([n, H, C, *] inputs, S0 [n, H, K, V]) → (O [n, H, C, V], S_C [n, H, K, V]).

    The chunkwise forward of ../shared/GDN2.md with every decay factor formed as exp(G_r − G_s), r ≥ s.
    """
    if l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * scale
    C = q.shape[-2]
    # The forward's floor on g (kernels/intra.py: a step at it forgets its channel, as g = −inf does); below it the
    # gradient is 0, as it is for the reference at g = −inf.
    G = torch.cumsum(torch.clamp(g, min=G_FLOOR), -2)  # padding rows carry g = 0, so G[..., -1, :] is the last real row's
    gamma = torch.exp(G)
    g_last = G[..., -1:, :]
    e_bar = gamma * b * k
    q_gam = gamma * q
    k_tail = torch.exp(g_last - G) * k
    # Pairwise decay per channel: exp(G_r − G_s) where r ≥ s, and exactly 0 (never exp of a positive) elsewhere.
    diff = G[..., :, None, :] - G[..., None, :, :]  # [n, H, C(r), C(s), K]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp(torch.where(causal[:, :, None], diff, torch.full((), float("-inf"), dtype=diff.dtype,
                                                                       device=diff.device)))
    pk = decay * k[..., None, :, :]  # k_s exp(G_r − G_s)
    t = torch.einsum("nhrc,nhrsc->nhrs", b * k, pk).tril(-1)
    a_qk = torch.einsum("nhrc,nhrsc->nhrs", q, pk)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    K = k.shape[-1]
    yu = torch.linalg.solve_triangular(eye + t, torch.cat([e_bar, w * v], -1), upper=False, unitriangular=True)
    y, u = yu[..., :K], yu[..., K:]
    r = u - y @ s0
    o = q_gam @ s0 + a_qk @ r
    s_c = gamma[..., -1, :, None] * s0 + k_tail.transpose(-1, -2) @ r
    return o, s_c


@triton.jit
def _key_side_kernel(
    qs, kn, b, g, G, dx_t, dx_a, dy, d_e, d_qg, d_kt, d_last,
    dq, dk, db, dg, rows,
    scale,
    H, K,
    C: tl.constexpr, BK: tl.constexpr, TOKENS: tl.constexpr,
):
    """The key-side tail of the local gradients for one (K slice, chunk, head), [C, BK] tiles: the products'
    elementwise chain rule (Ē = γ⊙b⊙k, Q_γ = γ⊙scale·q, K_tail = (γ_C/γ)⊙k, exponents ≤ 0), dG and its reverse
    cumulative sum down the chunk, and the decay floor. K columns are independent here, so the tile stays small;
    the l2 norm's backward (a sum over all of K) is left to the caller. Inputs and outputs fp32 [N, H, C, K]:
    ``qs`` = scale·q and ``kn`` = k after the l2 norm; ``dq`` receives the gradient of the normalised q. With TOKENS
    the four gradients go straight to the [B, T, H, K] token layout in their buffers' dtypes instead, at ``rows``
    (int64 [N, C], the flat token row of each chunk row, −1 for padding: not stored)."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    base = i_nh.to(tl.int64) * C * K
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p = base + o_c[:, None] * K + o_k[None, :]
    m = m_k[None, :]
    b_qs = tl.load(qs + p, mask=m, other=0.0)
    b_kn = tl.load(kn + p, mask=m, other=0.0)
    b_b = tl.load(b + p, mask=m, other=0.0)
    b_G = tl.load(G + p, mask=m, other=0.0)
    b_last = tl.load(G + base + (C - 1) * K + o_k, mask=m_k, other=0.0)
    b_gam = tl.exp(b_G)
    b_tail = tl.exp(tl.minimum(b_last[None, :] - b_G, 0.0))
    b_bk = b_b * b_kn
    b_dxt = tl.load(dx_t + p, mask=m, other=0.0)
    b_dxa = tl.load(dx_a + p, mask=m, other=0.0)
    b_dy = tl.load(dy + p, mask=m, other=0.0)
    b_de = tl.load(d_e + p, mask=m, other=0.0)
    b_dqg = tl.load(d_qg + p, mask=m, other=0.0)
    b_dkt = tl.load(d_kt + p, mask=m, other=0.0)
    d_bk = b_dxt + b_de * b_gam
    d_kn = b_dy + b_dkt * b_tail + b_b * d_bk
    d_G = (b_bk * b_dxt + b_qs * b_dxa - b_kn * b_dy + b_de * b_gam * b_bk + b_dqg * b_gam * b_qs
           - b_dkt * b_tail * b_kn)
    # G_C (the last row) also carries γ_C S0's term (d_last, from the caller) and K_tail's numerator.
    b_dl = tl.load(d_last + i_nh.to(tl.int64) * K + o_k, mask=m_k, other=0.0) + tl.sum(b_dkt * b_tail * b_kn, 0)
    d_G += tl.where((o_c == C - 1)[:, None], b_dl[None, :], 0.0)
    d_g = tl.cumsum(d_G, 0, reverse=True)
    b_graw = tl.load(g + p, mask=m, other=0.0)
    d_g = tl.where(b_graw >= G_FLOOR_C, d_g, 0.0)
    if TOKENS:
        b_rows = tl.load(rows + (i_nh // H).to(tl.int64) * C + o_c)
        p = (tl.maximum(b_rows, 0) * H + i_nh % H)[:, None] * K + o_k[None, :]
        m = (b_rows >= 0)[:, None] & m_k[None, :]
    tl.store(dq + p, ((b_dxa + b_dqg * b_gam) * scale).to(dq.dtype.element_ty), mask=m)
    tl.store(dk + p, d_kn.to(dk.dtype.element_ty), mask=m)
    tl.store(db + p, (b_kn * d_bk).to(db.dtype.element_ty), mask=m)
    tl.store(dg + p, d_g.to(dg.dtype.element_ty), mask=m)


@triton.jit
def _key_rows(q, k, b, r_q, r_k, p_tok, m, o_r, i_nh, scale, C: tl.constexpr, USE_L2NORM: tl.constexpr):
    """(scale·q̂, k̂, b⊙k̂, b) of chunk rows ``o_r`` of chunk-head ``i_nh``, fp32, from the token layout at ``p_tok``
    (masked by ``m``): the products :func:`kernels.bwd_local.key_factors` stores, formed in the same order."""
    b_q = tl.load(q + p_tok, mask=m, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tok, mask=m, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_tok, mask=m, other=0.0).to(tl.float32)
    if USE_L2NORM:
        b_q = b_q * tl.load(r_q + i_nh * C + o_r)[:, None]
        b_k = b_k * tl.load(r_k + i_nh * C + o_r)[:, None]
    return b_q * scale, b_k, b_b * b_k, b_b


@triton.jit
def _key_tail_kernel(
    q, k, g, b, rows, r_q, r_k, G,
    dm1, dm2, d_e, d_qg, d_kt, d_last,
    dq, dk, db, dg,
    scale, H, K,
    C: tl.constexpr, BC: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, USE_L2NORM: tl.constexpr, TOKENS: tl.constexpr,
):
    """The pair backward (kernels/pairwise.py's ``_pairs_bwd_dot_kernel``) and the key-side tail
    (:func:`_key_side_kernel`) in one launch per (K slice, chunk, head), with dT = ``dm1``, dA_qk = ``dm2``:
    X1 = b⊙k̂, X2 = scale·q̂ and Y = k̂ are formed from q, k, b in the token layout at ``rows`` (int64 [N, C], −1 for
    padding) instead of being read back as chunk-major fp32, and DX1, DX2, DY stay in registers.

    Row blocks run last to first, so that dg's reverse cumulative sum down the chunk carries over the blocks: the
    carry starts at the last row's extra terms (γ_C's gradient ``d_last`` and K_tail's numerator, a sum over every
    row of the chunk, taken first). G is the key factors' (exponents as in the pair kernel, never positive beyond one
    sub-block's decay). Outputs as :func:`_key_side_kernel`'s: chunk-major fp32 [N, H, C, K], or with TOKENS the
    [B, T, H, K] token layout in the buffers' dtypes."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    base = i_nh * C * K
    G += base
    d_e += base
    d_qg += base
    d_kt += base
    dm1 += i_nh * C * C
    dm2 += i_nh * C * C
    o_c = tl.arange(0, C)
    o_bc = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_all = o_c[:, None] * K + o_k[None, :]
    b_rows = tl.load(rows + i_n * C + o_c)
    m_all = (b_rows >= 0)[:, None] & m_k[None, :]
    p_tok = ((tl.maximum(b_rows, 0) * H + i_h) * K)[:, None] + o_k[None, :]
    b_last = tl.load(G + (C - 1) * K + o_k, mask=m_k, other=0.0)

    # The last row's extra terms, which dg's reverse sum carries to every row: γ_C's, and K_tail's numerator.
    _, b_kn, _, _ = _key_rows(q, k, b, r_q, r_k, p_tok, m_all, o_c, i_nh, scale, C, USE_L2NORM)
    b_tail = tl.exp(tl.minimum(b_last[None, :] - tl.load(G + p_all, mask=m_k[None, :], other=0.0), 0.0))
    b_carry = tl.load(d_last + i_nh * K + o_k, mask=m_k, other=0.0)
    b_carry += tl.sum(tl.load(d_kt + p_all, mask=m_k[None, :], other=0.0) * b_tail * b_kn, 0)

    for i_rev in range(NB):
        n0 = (NB - 1 - i_rev) * BC
        n1 = n0 + BC
        o_r = n0 + o_bc
        p_r = o_r[:, None] * K + o_k[None, :]
        b_rr = tl.load(rows + i_n * C + o_r)
        m_r = (b_rr >= 0)[:, None] & m_k[None, :]
        p_tr = ((tl.maximum(b_rr, 0) * H + i_h) * K)[:, None] + o_k[None, :]
        b_Gr = tl.load(G + p_r, mask=m_k[None, :], other=0.0)
        b_ref = tl.where(n0 > 0, tl.load(G + tl.maximum(n0 - 1, 0) * K + o_k, mask=m_k, other=0.0), 0.0)
        b_end = tl.load(G + (n1 - 1) * K + o_k, mask=m_k, other=0.0)
        span = tl.max(b_ref - b_end, 0)
        safe = span < PAIR_SAFE_SPAN

        # DX of rows I (columns s < n1 through ref; the block's own pairs exactly where its decay is too steep).
        m_s = (o_c < n0 + tl.where(safe, BC, 0))[:, None] & m_all
        _, b_y, _, _ = _key_rows(q, k, b, r_q, r_k, p_tok, m_s, o_c, i_nh, scale, C, USE_L2NORM)
        b_yc = b_y * tl.exp(tl.minimum(b_ref[None, :] - tl.load(G + p_all, mask=m_s, other=0.0), PAIR_SAFE_SPAN))
        p_rows = o_r[:, None] * C + o_c[None, :]
        e_row = tl.exp(tl.minimum(b_Gr - b_ref[None, :], 0.0))
        b_dxt = e_row * tl.dot(tl.load(dm1 + p_rows), b_yc, input_precision=PRECISION)
        b_dxa = e_row * tl.dot(tl.load(dm2 + p_rows), b_yc, input_precision=PRECISION)
        b_qr, b_kr, b_bkr, b_br = _key_rows(q, k, b, r_q, r_k, p_tr, m_r, o_r, i_nh, scale, C, USE_L2NORM)
        if span >= PAIR_SAFE_SPAN:
            for j in range(BC):
                b_Gj = tl.load(G + (n0 + j) * K + o_k, mask=m_k, other=0.0)
                b_yj = tl.sum(tl.where((o_bc == j)[:, None], b_kr, 0.0), 0)
                b_ej = tl.exp(tl.minimum(b_Gr - b_Gj[None, :], 0.0)) * b_yj[None, :]
                b_dxt += tl.load(dm1 + o_r * C + n0 + j)[:, None] * b_ej
                b_dxa += tl.load(dm2 + o_r * C + n0 + j)[:, None] * b_ej

        # DY of columns I (rows r >= n0 through end).
        m_t = (o_c >= n1 - tl.where(safe, BC, 0))[:, None] & m_all
        b_qs, _, b_bk, _ = _key_rows(q, k, b, r_q, r_k, p_tok, m_t, o_c, i_nh, scale, C, USE_L2NORM)
        b_row = tl.exp(tl.minimum(tl.load(G + p_all, mask=m_t, other=0.0) - b_end[None, :], PAIR_SAFE_SPAN))
        p_cols = o_c[:, None] * C + o_r[None, :]
        acc = tl.dot(tl.trans(tl.load(dm1 + p_cols)), b_bk * b_row, input_precision=PRECISION)
        acc += tl.dot(tl.trans(tl.load(dm2 + p_cols)), b_qs * b_row, input_precision=PRECISION)
        b_dy = tl.exp(tl.minimum(b_end[None, :] - b_Gr, 0.0)) * acc
        if span >= PAIR_SAFE_SPAN:
            for j in range(BC):
                b_Gj = tl.load(G + (n0 + j) * K + o_k, mask=m_k, other=0.0)
                b_e = tl.exp(tl.minimum(b_Gr - b_Gj[None, :], 0.0))
                b_d1 = tl.load(dm1 + o_r * C + n0 + j)
                b_d2 = tl.load(dm2 + o_r * C + n0 + j)
                b_dyj = tl.sum((b_d1[:, None] * b_bkr + b_d2[:, None] * b_qr) * b_e, 0)
                b_dy += tl.where((o_bc == j)[:, None], b_dyj[None, :], 0.0)

        # The key-side tail of rows I (as _key_side_kernel), dg's reverse sum continued from the rows after I.
        b_gam = tl.exp(b_Gr)
        b_tr = tl.exp(tl.minimum(b_last[None, :] - b_Gr, 0.0))
        b_de = tl.load(d_e + p_r, mask=m_k[None, :], other=0.0)
        b_dqg = tl.load(d_qg + p_r, mask=m_k[None, :], other=0.0)
        b_dkt = tl.load(d_kt + p_r, mask=m_k[None, :], other=0.0)
        d_bk = b_dxt + b_de * b_gam
        d_kn = b_dy + b_dkt * b_tr + b_br * d_bk
        d_G = (b_bkr * b_dxt + b_qr * b_dxa - b_kr * b_dy + b_de * b_gam * b_bkr + b_dqg * b_gam * b_qr
               - b_dkt * b_tr * b_kr)
        d_g = tl.cumsum(d_G, 0, reverse=True) + b_carry[None, :]
        b_carry += tl.sum(d_G, 0)
        b_graw = tl.load(g + p_tr, mask=m_r, other=0.0).to(tl.float32)
        d_g = tl.where(b_graw >= G_FLOOR_C, d_g, 0.0)
        if TOKENS:
            p_o = p_tr
            m_o = m_r
        else:
            p_o = base + p_r
            m_o = m_k[None, :] & (o_bc >= 0)[:, None]
        tl.store(dq + p_o, ((b_dxa + b_dqg * b_gam) * scale).to(dq.dtype.element_ty), mask=m_o)
        tl.store(dk + p_o, d_kn.to(dk.dtype.element_ty), mask=m_o)
        tl.store(db + p_o, (b_kr * d_bk).to(db.dtype.element_ty), mask=m_o)
        tl.store(dg + p_o, d_g.to(dg.dtype.element_ty), mask=m_o)


@dataclass(frozen=True)
class ValueTokens:
    """What the fused value side reads and writes for one group of chunks: the recomputed A of the group's chunks
    (fp32 [n, H, C, C]) and the whole call's A_qk [B, T, H, C] (both from the intra stage, so the pair products
    and the solve are not run again); v, w, do [B, T, H, V] (contiguous, one dtype); the group's ``rows`` (int64
    [n, C], flat token row or −1); and the whole call's dv, dw buffers, which each group's launch fills on its own
    tokens."""

    a: torch.Tensor
    aqk: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor
    do: torch.Tensor
    rows: torch.Tensor
    dv: torch.Tensor
    dw: torch.Tensor


def _key_side(
    q: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, qs: torch.Tensor, b: torch.Tensor, g: torch.Tensor,
    G: torch.Tensor, r_q: torch.Tensor | None, r_k: torch.Tensor | None,
    d_t: torch.Tensor, d_aqk: torch.Tensor, d_e: torch.Tensor, d_qg: torch.Tensor, d_kt: torch.Tensor,
    d_last: torch.Tensor, d_v: torch.Tensor | None, d_w: torch.Tensor | None,
    *, scale: float, l2norm: bool, cfg: BwdConfig, pair: dict, bk: torch.Tensor | None = None,
    out: Sequence[torch.Tensor] | None = None, rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """From the products' gradients to (dq, dk, dv, dg, db, dw): the pair backward (kernels/pairwise.py), the
    Triton key-side tail (:func:`_key_side_kernel`), then the l2 norm's backward in torch. ``q`` gives the
    gradients' shape; ``bk`` is b⊙k̂ when the caller has it. ``out``: the (dq, dk, db, dg) buffers the tail writes,
    chunk-major fp32 [n, H, C, K] (each may be a slice of a whole call's buffer), or with ``rows`` (and no l2 norm)
    the whole call's [B, T, H, K] token-layout gradients, written at the chunk rows ``rows`` [n, C]."""
    if bk is None:
        bk = (b * kn).contiguous()
    dx_t, dx_a, dy_pairs = pairs_bwd(d_t.contiguous(), d_aqk.contiguous(), bk, qs, kn, G, **pair, method=cfg.pair)
    tokens = rows is not None
    assert not (tokens and (l2norm or out is None)), "token-layout outputs take the buffers and no l2 norm"
    if out is None:
        out = tuple(output_buffer(q.shape, torch.float32, q.device) for _ in range(4))
    d_qn, d_kn, d_b, d_g = out
    n, H, C, K = q.shape
    if n * H:
        _key_side_kernel[(triton.cdiv(K, KEY_SIDE_BK), n * H)](
            qs, kn, b.contiguous(), g.contiguous(), G, dx_t, dx_a, dy_pairs,
            d_e.contiguous(), d_qg.contiguous(), d_kt.contiguous(), d_last.contiguous(),
            d_qn, d_kn, d_b, d_g, rows,
            scale, H, K, C=C, BK=KEY_SIDE_BK, TOKENS=tokens,
        )
    if l2norm:
        d_q, d_k = _l2norm_bwd(d_qn, qn, r_q), _l2norm_bwd(d_kn, kn, r_k)
    else:
        d_q, d_k = d_qn, d_kn
    return d_q, d_k, d_v, d_g, d_b, d_w


def _l2norm_bwd(d_xn: torch.Tensor, xn: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The gradient of x from that of x̂ = r·x, r = (x·x + eps)^-1/2: r (dx̂ − x̂ (x̂·dx̂))."""
    return r * (d_xn - xn * (xn * d_xn).sum(-1, keepdim=True))


def key_tail(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, f: KeyFactors,
    d_t: torch.Tensor, d_aqk: torch.Tensor, d_e: torch.Tensor, d_qg: torch.Tensor, d_kt: torch.Tensor,
    d_last: torch.Tensor, out: Sequence[torch.Tensor], *, scale: float, l2norm: bool, tokens: bool,
    BC: int, BK: int, num_warps: int, precision: str,
) -> None:
    """The pair backward and the key-side tail in one launch (:func:`_key_tail_kernel`, ``key_side="fused"``) for
    the chunks whose token rows are ``rows`` (int64 [n, C]): from contiguous [B, T, H, K] q, k, g, b, the key
    factors ``f`` (G, and under the l2 norm the norms) and the value side's chunk-major fp32 gradients, into
    ``out`` = (dq, dk, db, dg): with ``tokens`` the call's [B, T, H, K] gradients (no l2 norm), else chunk-major
    fp32 [n, H, C, K] (of the l2-normalised q and k). Shapes only are checked (no sync)."""
    n, C = rows.shape
    H, K = k.shape[-2:]
    if C % BC or BC < 16 or BK < 16 or BK & (BK - 1):
        raise ValueError(f"BC={BC} must divide the chunk {C} (>= 16); BK={BK} a power of two >= 16")
    for name, x in (("q", q), ("k", k), ("g", g), ("b", b)):
        if x.shape != k.shape or not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {tuple(k.shape)} tensor, received {tuple(x.shape)}")
    assert not (tokens and l2norm), "the l2 norm's backward needs chunk-major outputs"
    chunked = (n, H, C, K)
    want = {"G": (f.G, chunked), "d_t": (d_t, (n, H, C, C)), "d_aqk": (d_aqk, (n, H, C, C)), "d_e": (d_e, chunked),
            "d_qg": (d_qg, chunked), "d_kt": (d_kt, chunked), "d_last": (d_last, (n, H, K))}
    if l2norm:
        want |= {"r_q": (f.r_q, (n, H, C, 1)), "r_k": (f.r_k, (n, H, C, 1))}
    for i, x in enumerate(out):
        want[f"out{i}"] = (x, k.shape if tokens else chunked)
    for name, (x, shape) in want.items():
        if x is None or tuple(x.shape) != tuple(shape) or not x.is_contiguous():
            got = None if x is None else tuple(x.shape)
            raise ValueError(f"{name}: expected a contiguous tensor of shape {tuple(shape)}, received {got}")
    if tuple(rows.shape) != (n, C) or rows.dtype != torch.int64:
        raise ValueError(f"rows: expected int64 [{n}, {C}], received {tuple(rows.shape)} {rows.dtype}")
    if n * H:
        _key_tail_kernel[(triton.cdiv(K, BK), n * H)](
            q, k, g, b, rows, f.r_q, f.r_k, f.G, d_t, d_aqk, d_e, d_qg, d_kt, d_last, *out,
            scale, H, K,
            C=C, BC=BC, NB=C // BC, BK=BK, PRECISION=precision, USE_L2NORM=l2norm, TOKENS=tokens,
            num_warps=num_warps, num_stages=KEY_TAIL_STAGES,
            **({"maxnreg": KEY_TAIL_MAX_REGISTERS} if KEY_TAIL_MAX_REGISTERS else {}),
        )


def _local_grads_fused(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, b: torch.Tensor, tokens: ValueTokens,
    s0: torch.Tensor, ds_c: torch.Tensor, *, scale: float, l2norm: bool, cfg: BwdConfig,
    out: Sequence[torch.Tensor], direct: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dg, db) of one group of chunks, every step a Triton launch (kernels/bwd_local.py's key factors and
    value side, the pair backward, the key-side tail) but the l2 norm's backward; dv and dw land in ``tokens``'
    buffers. q, k, g, b are the call's contiguous [B, T, H, K] inputs. ``out``: the (dq, dk, db, dg) buffers of the
    key-side tail (see :func:`_key_side`); ``direct``: they are the call's token-layout gradients (no l2 norm)."""
    fused = cfg.key_side == "fused"
    f = key_factors(q, k, g, b, tokens.rows, scale=scale, l2norm=l2norm, g_floor=G_FLOOR, eps=L2NORM_EPS,
                    all_factors=not fused)
    _, _, d_aqk, d_t, d_e, d_qg, d_kt, d_last = local_v_side(
        tokens.a, tokens.aqk, f.e_bar, f.k_tail, f.G, s0, ds_c,
        tokens.v, tokens.w, tokens.do, tokens.rows, dv=tokens.dv, dw=tokens.dw,
        tile=cfg.value_tile, BV=cfg.value_BV, BK=cfg.value_BK, num_warps=cfg.value_warps, precision=cfg.precision,
    )
    if fused:
        key_tail(q, k, g, b, tokens.rows, f, d_t, d_aqk, d_e, d_qg, d_kt, d_last, out, scale=scale, l2norm=l2norm,
                 tokens=direct, BC=cfg.pair_BC, BK=cfg.pair_BK, num_warps=cfg.pair_warps, precision=cfg.pair_precision)
        d_q, d_k, d_b, d_g = out
        if l2norm:
            d_q, d_k = _l2norm_bwd(d_q, f.qn, f.r_q), _l2norm_bwd(d_k, f.kn, f.r_k)
        return d_q, d_k, d_g, d_b
    pair = {"BC": cfg.pair_BC, "BK": cfg.pair_BK, "num_warps": cfg.pair_warps, "precision": cfg.pair_precision}
    d_q, d_k, _, d_g, d_b, _ = _key_side(
        f.kn, f.qn, f.kn, f.qs, f.b, f.g, f.G, f.r_q, f.r_k, d_t, d_aqk, d_e, d_qg, d_kt, d_last, None, None,
        scale=scale, l2norm=l2norm, cfg=cfg, pair=pair, bk=f.bk, out=out, rows=tokens.rows if direct else None,
    )
    return d_q, d_k, d_g, d_b


def _local_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    s0: torch.Tensor, d_o: torch.Tensor, ds_c: torch.Tensor, *, scale: float, l2norm: bool, cfg: BwdConfig,
) -> tuple[torch.Tensor, ...]:
    """The gradients of :func:`_local_chunk` written out (../shared/GDN2.md, "Backward"), fp32 [n, H, C, *]: the
    pair products T, A_qk and their backward in Triton (kernels/pairwise.py), the solve and the products as batched
    torch ops (``value_side="torch"``; :func:`_local_grads_fused` is the default)."""
    if l2norm:
        r_q = torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        r_k = torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        qn, kn = q * r_q, k * r_k
    else:
        qn, kn, r_q, r_k = q, k, None, None
    qs = (qn * scale).contiguous()
    kn = kn.contiguous()
    C = q.shape[-2]
    G = torch.cumsum(torch.clamp(g, min=G_FLOOR), -2).contiguous()
    gamma = torch.exp(G)
    g_last = G[..., -1:, :]
    tail = torch.exp(g_last - G)
    bk = (b * kn).contiguous()
    e_bar = gamma * bk
    k_tail = tail * kn
    pair = {"BC": cfg.pair_BC, "BK": cfg.pair_BK, "num_warps": cfg.pair_warps, "precision": cfg.pair_precision}
    t, a_qk = pairs_fwd(bk, qs, kn, G, strict1=True, strict2=False, **pair)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    a = torch.linalg.solve_triangular(eye + t, eye.expand_as(t), upper=False, unitriangular=True)
    q_gam = gamma * qs
    z = w * v
    y = a @ e_bar
    r = a @ z - y @ s0
    # Backward, in the order of the equations.
    d_aqk = torch.tril(d_o @ r.transpose(-1, -2))
    d_r = a_qk.transpose(-1, -2) @ d_o + k_tail @ ds_c
    d_y = -(d_r @ s0.transpose(-1, -2))
    d_kt = r @ ds_c.transpose(-1, -2)
    d_qg = d_o @ s0.transpose(-1, -2)
    a_t = a.transpose(-1, -2)
    d_a = d_r @ z.transpose(-1, -2) + d_y @ e_bar.transpose(-1, -2)
    d_z = a_t @ d_r
    d_e = a_t @ d_y
    d_t = -torch.tril(a_t @ d_a @ a_t, -1)
    if cfg.key_side == "triton":
        d_last = torch.exp(g_last[..., 0, :]) * (ds_c * s0).sum(-1)
        return _key_side(q, qn, kn, qs, b, g, G, r_q, r_k, d_t, d_aqk, d_e, d_qg, d_kt, d_last, d_z * w, d_z * v,
                         scale=scale, l2norm=l2norm, cfg=cfg, pair=pair)
    dx_t, dx_a, dy_pairs = pairs_bwd(d_t.contiguous(), d_aqk.contiguous(), bk, qs, kn, G, **pair, method=cfg.pair)
    d_bk = dx_t + d_e * gamma
    d_qs = dx_a + d_qg * gamma
    d_kn = dy_pairs + d_kt * tail + b * d_bk
    d_b = kn * d_bk
    # dG per row, then the reverse cumulative sum over the chunk. G_C (the last row) also carries γ_C's terms.
    d_G = bk * dx_t + qs * dx_a - kn * dy_pairs + d_e * e_bar + d_qg * q_gam - d_kt * k_tail
    d_last = (d_kt * k_tail).sum(-2) + torch.exp(g_last[..., 0, :]) * (ds_c * s0).sum(-1)
    d_G[..., -1, :] += d_last
    d_g = torch.flip(torch.cumsum(torch.flip(d_G, [-2]), -2), [-2])
    d_g = torch.where(g >= G_FLOOR, d_g, torch.zeros((), dtype=d_g.dtype, device=d_g.device))
    d_qn = d_qs * scale
    if l2norm:
        d_q = r_q * (d_qn - qn * (qn * d_qn).sum(-1, keepdim=True))
        d_k = r_k * (d_kn - kn * (kn * d_kn).sum(-1, keepdim=True))
    else:
        d_q, d_k = d_qn, d_kn
    return d_q, d_k, d_z * w, d_g, d_b, d_z * v


def _check_launch(
    inter: dict[str, torch.Tensor], chunk: int, num_seqs: int, V: int, cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None, per_token: dict[str, tuple[torch.Tensor, int]],
    per_seq: dict[str, torch.Tensor | None],
) -> None:
    """Shapes only (no values, no sync), for what the kernels address without a mask: the per-sequence loads read
    ``cu_seqlens[i_n + 1]`` and ``chunk_offsets[i_n]`` for every program's sequence ``i_n < num_seqs``, per-sequence
    states ``[N, H, K, V]``, per-token tensors ``[B, T, H, D]`` and γ_C ``[NC, H, K]`` (contiguous), and a dense
    batch's chunk slots ``i_n·NT + i_t`` of the per-chunk buffers."""
    B, T, H, K = inter["y"].shape
    for name, (x, d) in (per_token | {"gamma": (inter["gamma"], K)}).items():
        want = (inter["gamma"].shape[0], H, K) if name == "gamma" else (B, T, H, d)
        if tuple(x.shape) != want or not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of shape {want}, received {tuple(x.shape)}")
    for name, x in per_seq.items():
        if x is not None and (tuple(x.shape) != (num_seqs, H, K, V) or not x.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous [N={num_seqs}, {H}, {K}, {V}] tensor, "
                             f"received {tuple(x.shape)}")
    if cu_seqlens is None:
        if num_seqs != B or inter["gamma"].shape[0] != B * triton.cdiv(T, chunk):
            raise ValueError(f"num_seqs: expected B={B} for a dense batch of {B * triton.cdiv(T, chunk)} chunks, "
                             f"received {num_seqs} and {inter['gamma'].shape[0]} chunks")
        return
    if chunk_offsets is None or chunk_offsets.dim() != 1 or chunk_offsets.numel() < num_seqs:
        got = None if chunk_offsets is None else tuple(chunk_offsets.shape)
        raise ValueError(f"chunk_offsets: expected [N] with N={num_seqs}, received {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() != num_seqs + 1:
        raise ValueError(f"cu_seqlens: expected [N+1] with N={num_seqs}, received {tuple(cu_seqlens.shape)}")


def _state_launch(inter: dict[str, torch.Tensor], V: int, chunk: int, cfg: BwdConfig, num_seqs: int,
                  cu_seqlens: torch.Tensor | None, segments: Segments | None = None) -> tuple[tuple[int, ...], dict]:
    """Grid and common arguments of the two per-sequence passes, one program per (V tile, sequence and head[,
    segment]). NC, the bound of every per-chunk slot, is the length of the per-chunk buffers themselves (γ_C's
    rows), not anything derived from the offsets."""
    _, T, H, K = inter["y"].shape
    grid: tuple[int, ...] = (triton.cdiv(V, cfg.BV), num_seqs * H)
    if segments is not None:
        grid = (*grid, segments.count)
    reason = state_parts_infeasibility(cfg.k_parts, K)
    if reason is not None:
        raise ValueError(f"{reason} (BwdConfig.k_parts)")
    kp, kb = state_row_parts(K, cfg.k_parts)
    common = {
        "T": T, "NT": triton.cdiv(T, chunk), "NC": inter["gamma"].shape[0],
        "SEG": 1 if segments is None else segments.chunks, "NP": 1 if segments is None else segments.count,
        "NH": num_seqs * H, "H": H, "K": K, "V": V,
        "KP": kp, "KB": kb, "C": chunk, "BV": cfg.BV, "IS_VARLEN": cu_seqlens is not None,
        "USE_SEGMENTS": segments is not None,
        "PRECISION": cfg.precision, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
    }
    return grid, common


@dataclass(frozen=True)
class Segments:
    """The sequence split of the two passes (BwdConfig.segment_chunks, dense batches): ``count`` segments of
    ``chunks`` chunks per sequence (the last one ragged), and each segment's affine map of the forward recurrence,
    S ↦ M S + E: ``m`` fp32 [count, N·H, K, K], ``e`` fp32 [count, N·H, K, V] (kernels/state.py's launch 1).

    The reverse pass's step is the adjoint of the forward's, dS0 = (Diag(γ_C) − Yᵀ K_tail) dS_C + (Q_γᵀ − Yᵀ A_qkᵀ)
    dO, and Diag(γ_C) − Yᵀ K_tail is the transpose of the forward's M for the chunk: a segment maps the gradient
    leaving it to the one entering it as dS ↦ Mᵀ dS + F, with the same M. So one launch of M serves both passes;
    F is the reverse pass over the segment from dS = 0 (:func:`state_bwd`)."""

    chunks: int
    count: int
    m: torch.Tensor
    e: torch.Tensor


def segment_transitions(inter: dict[str, torch.Tensor], V: int, chunk: int, cfg: BwdConfig,
                        num_seqs: int) -> Segments | None:
    """Every segment's [M | E] of the forward recurrence in parallel (kernels/state.py's ``_segment_kernel``, at
    the backward's dot precision), or None without a split. Dense batches only."""
    seg = cfg.segment_chunks
    if not seg:
        return None
    y = inter["y"]
    _, T, H, K = y.shape
    nt = triton.cdiv(T, chunk)
    if inter["gamma"].shape[0] != num_seqs * nt:
        raise ValueError(f"segment_chunks={seg}: the sequence split takes dense batches ({num_seqs} sequences of "
                         f"{nt} chunks), received {inter['gamma'].shape[0]} chunks; set it to 0 with cu_seqlens")
    n_seg, nh = triton.cdiv(nt, seg), num_seqs * H
    m = output_buffer((n_seg, nh, K, K), torch.float32, y.device)
    e = output_buffer((n_seg, nh, K, V), torch.float32, y.device)
    if nh:
        _segment_kernel[(triton.cdiv(K, cfg.BV) + triton.cdiv(V, cfg.BV), nh, n_seg)](
            y, inter["u"], inter["kt"], inter["gamma"], m, e,
            T, nt, seg, nh,
            H=H, K=K, V=V, KP=_padded(K), C=chunk, BV=cfg.BV,
            PRECISION=cfg.precision, ROUND=False, UPCAST=UPCAST_DOTS_WHEN_INTERPRETED,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return Segments(seg, n_seg, m, e)


def _carry(m: torch.Tensor, e: torch.Tensor, first: torch.Tensor | None, BV: int) -> torch.Tensor:
    """X_{p+1} = m_p X_p + e_p from X_0 = ``first`` (or 0) over the P slots of ``m`` [P, NH, K, K] and ``e``
    [P, NH, K, V] in fp32 (kernels/state.py's ``_carry_kernel``): [P + 1, NH, K, V], every X_p."""
    n_seg, nh, K, V = e.shape
    xs = output_buffer((n_seg + 1, nh, K, V), torch.float32, e.device)
    if nh:
        _carry_kernel[(triton.cdiv(V, BV), nh)](
            m, e, first, xs,
            n_seg, nh,
            K, V,
            BR=min(CARRY_BLOCK, _padded(K)), BV=BV,
            USE_INITIAL_STATE=first is not None,
            num_warps=4, num_stages=1,
        )
    return xs


def entering_states(
    inter: dict[str, torch.Tensor],
    *,
    initial_state: torch.Tensor | None,
    chunk: int,
    cfg: BwdConfig,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    num_seqs: int,
    segments: Segments | None = None,
) -> torch.Tensor:
    """Each chunk's entering state S0, [num_chunks, H, K, V] in ``cfg.state_dtype``, from the intra stage's Y, U,
    K_tail, γ_C (:func:`_entering_states_kernel`). Slots of no chunk (the packed index's phantoms) are left
    unwritten. With ``cfg.segment_chunks`` the segments' entering states come from the carry over ``segments``
    (:func:`segment_transitions`, launched here when not given), then every segment runs at once."""
    y = inter["y"]
    _, _, H, K = y.shape
    V = inter["u"].shape[-1]
    tokens = {"y": (y, K), "u": (inter["u"], V), "kt": (inter["kt"], K)}
    _check_launch(inter, chunk, num_seqs, V, cu_seqlens, chunk_offsets, tokens, {"initial_state": initial_state})
    if segments is None:
        segments = segment_transitions(inter, V, chunk, cfg, num_seqs)
    grid, common = _state_launch(inter, V, chunk, cfg, num_seqs, cu_seqlens, segments)
    hc = output_buffer((inter["gamma"].shape[0], H, K, V), _STATE_TORCH_DTYPES[cfg.state_dtype], y.device)
    first = initial_state if segments is None else _carry(segments.m, segments.e, initial_state, cfg.BV)
    if num_seqs * H:
        _entering_states_kernel[grid](
            y, inter["u"], inter["kt"], inter["gamma"], first, hc, cu_seqlens, chunk_offsets,
            USE_INITIAL_STATE=initial_state is not None, **common,
        )
    return hc


def state_bwd(
    inter: dict[str, torch.Tensor],
    do: torch.Tensor,
    dht: torch.Tensor | None,
    *,
    initial_grad: bool,
    chunk: int,
    cfg: BwdConfig,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    num_seqs: int,
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reverse state pass (:func:`_state_bwd_kernel`): ``(dS_C [num_chunks, H, K, V] in cfg.state_dtype,
    dh0 fp32 [N, H, K, V] or None)`` from the intra stage's Q_γ, K_tail, Y, A_qk, γ_C, the contiguous output
    gradient ``do`` and the final state's fp32 ``dht`` (or None).

    With ``cfg.segment_chunks`` (``segments``: :func:`segment_transitions`, launched here when not given), three
    launches: every segment's F (the pass from dS = 0, nothing stored), an fp32 carry from the last segment to the
    first with the transposed transitions, D ↦ Mᵀ D + F (its last slot is dh0), then every segment's pass from the
    gradient leaving it. Slot q of the carry is the gradient leaving segment P − 1 − q, so F is stored and the
    transitions are handed over in that reversed order."""
    y = inter["y"]
    _, _, H, K = y.shape
    V = do.shape[-1]
    tokens = {"do": (do, V), "y": (y, K), "kt": (inter["kt"], K), "qg": (inter["qg"], K), "aqk": (inter["aqk"], chunk)}
    _check_launch(inter, chunk, num_seqs, V, cu_seqlens, chunk_offsets, tokens, {"dht": dht})
    if segments is None:
        segments = segment_transitions(inter, V, chunk, cfg, num_seqs)
    # Its own tile (BwdConfig.reverse_*); the split's transitions and carries keep the entering states'.
    grid, common = _state_launch(inter, V, chunk, cfg.reverse_pass(), num_seqs, cu_seqlens, segments)
    dhc = output_buffer((inter["gamma"].shape[0], H, K, V), _STATE_TORCH_DTYPES[cfg.state_dtype], y.device)
    args = (inter["qg"], inter["kt"], y, inter["aqk"], inter["gamma"], do)
    if segments is None:
        dh0 = output_buffer((num_seqs, H, K, V), torch.float32, y.device) if initial_grad else None
        if num_seqs * H:
            _state_bwd_kernel[grid](
                *args, dht, dhc, dh0, cu_seqlens, chunk_offsets,
                USE_FINAL_GRAD=dht is not None, STORE_INITIAL_GRAD=dh0 is not None, STORE_CHUNKS=True, **common,
            )
        return dhc, dh0
    nh = num_seqs * H
    f = output_buffer((segments.count, nh, K, V), torch.float32, y.device)
    if nh:
        _state_bwd_kernel[grid](
            *args, None, None, f, cu_seqlens, chunk_offsets,
            USE_FINAL_GRAD=False, STORE_INITIAL_GRAD=True, STORE_CHUNKS=False, **common,
        )
    m_t = segments.m.flip(0).transpose(-1, -2).contiguous()
    leaving = _carry(m_t, f, dht, cfg.BV)
    if nh:
        _state_bwd_kernel[grid](
            *args, leaving, dhc, None, cu_seqlens, chunk_offsets,
            USE_FINAL_GRAD=True, STORE_INITIAL_GRAD=False, STORE_CHUNKS=True, **common,
        )
    return dhc, leaving[segments.count].view(num_seqs, H, K, V) if initial_grad else None


@dataclass(frozen=True)
class BackwardLaunch:
    """The backward's four steps bound to contiguous inputs, the forward's config and the backward config fitted at
    its chunk length (:func:`backward_launch`): what ``chunk_gdn2_bwd`` runs, and what the tuner times stage by
    stage (kernels/bwd_spec.py). ``inter_dtypes``: the dtype of each recomputed intermediate the passes read
    (:func:`recompute_dtypes`)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    do: torch.Tensor
    dht: torch.Tensor | None
    scale: float
    initial_state: torch.Tensor | None
    use_qk_l2norm: bool
    config: FwdConfig
    bwd_config: BwdConfig
    inter_dtypes: dict[str, torch.dtype]
    layout: ChunkLayout
    num_seqs: int

    @property
    def _packed(self) -> dict[str, Any]:
        return {"cu_seqlens": self.layout.offsets, "chunk_offsets": self.layout.chunk_offsets,
                "num_seqs": self.num_seqs}

    def recompute(self) -> IntraOutputs:
        """1. The forward's per-chunk intermediates (its own intra launcher, at its chunk length), in fp32 when the
        reverse pass can stage fp32 operands (else in the input dtype, as the forward keeps them), the input dtype
        for those BwdConfig.recompute_store names."""
        layout = self.layout
        dtypes = self.inter_dtypes
        return intra_fwd(
            self.q, self.k, self.v, self.g, self.b, self.w,
            scale=self.scale, chunk=self.config.chunk,
            cfg=dataclasses.replace(self.config.intra, precision=self.bwd_config.recompute_precision),
            cu_seqlens=layout.offsets, chunk_indices=layout.chunk_indices, num_chunks=layout.num_chunks,
            use_qk_l2norm=self.use_qk_l2norm, out_dtype=dtypes["y"], aqk_dtype=torch.float32, dtypes=dtypes,
        )

    def segments(self, inter: IntraOutputs) -> Segments | None:
        """The sequence split's transitions, shared by both passes (None without a split)."""
        return segment_transitions(inter, self.v.shape[-1], self.config.chunk, self.bwd_config, self.num_seqs)

    def states(self, inter: IntraOutputs, segments: Segments | None = None) -> torch.Tensor:
        """Each chunk's entering state S0 (the forward's recurrence again); the split's transitions are launched
        here unless given."""
        return entering_states(inter, initial_state=self.initial_state, chunk=self.config.chunk,
                               cfg=self.bwd_config, segments=segments, **self._packed)

    def reverse(self, inter: IntraOutputs, segments: Segments | None = None) -> tuple[torch.Tensor,
                                                                                      torch.Tensor | None]:
        """2. The reverse state pass: dS_C per chunk and dh0 (the split's transitions launched here unless
        given)."""
        return state_bwd(inter, self.do, self.dht, initial_grad=self.initial_state is not None,
                         chunk=self.config.chunk, cfg=self.bwd_config, segments=segments, **self._packed)

    def local(self, a_all: torch.Tensor | None, aqk: torch.Tensor, hc: torch.Tensor, dhc: torch.Tensor,
              dh0: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """3. Local gradients, chunks in groups of bounded memory, from the recomputed A and A_qk (read by the
        fused value side), the entering states and the reverse pass's dS_C: (dq, dk, dv, dg, db, dw, dh0)."""
        q, k, v, g, b, w, do = self.q, self.k, self.v, self.g, self.b, self.w, self.do
        bcfg, layout, scale, l2norm = self.bwd_config, self.layout, self.scale, self.use_qk_l2norm
        _, _, H, K = q.shape
        V = v.shape[-1]
        C = self.config.chunk
        per_chunk = H * C * (C * _padded(K) if bcfg.local == "autograd" else max(C, K, V))
        step = max(1, bcfg.group_elements // per_chunk)
        if bcfg.local == "pairs" and bcfg.value_side == "triton":
            # Every launch reads the token layout through the chunk rows; dv and dw are written there directly, and
            # so are dq, dk, db, dg without the l2 norm (whose backward, a sum over K, is torch on chunk-major
            # tiles). Every token is the row of one chunk of one group, so each buffer is written whole: no zeroing.
            rows = layout.token_rows(q.device)
            dev = q.device
            d_v, d_w = output_buffer(v.shape, v.dtype, dev), output_buffer(w.shape, w.dtype, dev)
            direct = not l2norm
            if direct:
                key_grads = [output_buffer(x.shape, dt, dev)
                             for x, dt in ((q, q.dtype), (k, k.dtype), (b, b.dtype), (g, torch.float32))]
            else:
                key_grads = [output_buffer((layout.num_chunks, H, C, K), torch.float32, dev) for _ in range(4)]
            for c0 in range(0, layout.num_chunks, step):
                sl = slice(c0, min(c0 + step, layout.num_chunks))
                tokens = ValueTokens(a_all[sl], aqk, v, w, do, rows[sl], d_v, d_w)
                out = key_grads if direct else [x[sl] for x in key_grads]
                got = _local_grads_fused(q, k, g, b, tokens, hc[sl], dhc[sl], scale=scale, l2norm=l2norm, cfg=bcfg,
                                         out=out, direct=direct)
                if l2norm:  # the l2 norm's backward made new dq and dk
                    key_grads[0][sl], key_grads[1][sl] = got[0], got[1]
            if direct:
                dq, dk, db, dg = key_grads
            else:
                dq, dk, db, dg = (layout.from_chunks(x.transpose(1, 2)).to(dt)
                                  for x, dt in zip(key_grads, (q.dtype, k.dtype, b.dtype, torch.float32)))
            return dq, dk, d_v, dg, db, d_w, dh0
        ldt = torch.float64 if bcfg.local_dtype == "fp64" else torch.float32
        xs = [layout.to_chunks(x) for x in (q, k, v, g, b, w, do)]
        hc = layout.per_chunk(hc)
        dhc = layout.per_chunk(dhc)
        grads = [torch.empty(x.shape, dtype=torch.float32 if i == 3 else x.dtype, device=x.device)
                 for i, x in enumerate(xs[:6])]
        for c0 in range(0, layout.num_chunks, step):
            sl = slice(c0, min(c0 + step, layout.num_chunks))
            # [n, C, H, D] → [n, H, C, D] in the local arithmetic's dtype.
            ins = [x[sl].transpose(1, 2).to(ldt).requires_grad_(bcfg.local == "autograd") for x in xs[:6]]
            d_o = xs[6][sl].transpose(1, 2).to(ldt)
            s0 = hc[sl].to(ldt)
            if bcfg.local == "pairs":
                got = _local_grads(*ins, s0, d_o, dhc[sl].to(ldt), scale=scale, l2norm=l2norm, cfg=bcfg)
            else:
                with torch.enable_grad():
                    o, s_c = _local_chunk(*ins, s0, scale=scale, l2norm=l2norm)
                    got = torch.autograd.grad((o, s_c), ins, (d_o, dhc[sl].to(ldt)))
            for dst, src in zip(grads, got):
                dst[sl] = src.transpose(1, 2)
        dq, dk, dv, dg, db, dw = (layout.from_chunks(x) for x in grads)
        return dq, dk, dv, dg, db, dw, dh0

    def __call__(self) -> tuple[torch.Tensor | None, ...]:
        inter = self.recompute()
        segments = self.segments(inter)
        hc = self.states(inter, segments)
        dhc, dh0 = self.reverse(inter, segments)
        a_all, aqk = inter.a, inter.aqk  # the fused value side's A and A_qk
        del inter  # the other intermediates are not needed again
        return self.local(a_all, aqk, hc, dhc, dh0)


def backward_launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    do: torch.Tensor, dht: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    config: FwdConfig,
    bwd_config: BwdConfig,
    num_seqs: int,
    index: PackedIndex | None = None,
) -> BackwardLaunch:
    """The backward bound to its inputs (the arguments of :func:`chunk_gdn2_bwd`): ``bwd_config`` fitted at the
    forward's chunk length, the chunk layout built (a packed batch on ``index``, else on one built from
    ``cu_seqlens``: either way on sanitised offsets, never on the caller's tensor)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = config.chunk
    shape = Shape(B, T, H, K, V, _DTYPE_NAMES[q.dtype], num_seqs if cu_seqlens is not None else None)
    if cu_seqlens is not None and index is None:
        index = packed_index(cu_seqlens, C, T)
    layout = chunk_layout(B, T, C, index, q.device)
    bcfg, inter_dtypes = _fit(bwd_config, shape, C)
    return BackwardLaunch(q, k, v, g, b, w, do.contiguous(), dht, scale, initial_state, use_qk_l2norm_in_kernel,
                          config, bcfg, inter_dtypes, layout, num_seqs)


def chunk_gdn2_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    do: torch.Tensor, dht: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    config: FwdConfig,
    bwd_config: BwdConfig,
    num_seqs: int,
    index: PackedIndex | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dg, db, dw, dh0 or None) on contiguous inputs; dg in fp32, the rest in their dtypes.

    A packed batch runs on ``index`` when given (the forward's, :func:`packed_index` of its offsets), else on one
    built here from ``cu_seqlens``: either way on sanitised offsets, never on the caller's tensor."""
    return backward_launch(
        q, k, v, g, b, w, do, dht,
        scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, config=config, bwd_config=bwd_config, num_seqs=num_seqs,
        index=index,
    )()


@triton.jit
def _entering_states_kernel(
    y, u, kt, gam, h0, hc,
    cu_seqlens, chunk_offsets,
    T, NT, NC, SEG, NP, NH,
    H, K, V, KP: tl.constexpr, KB: tl.constexpr,
    C: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, USE_SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):
    """The forward's state recurrence (kernels/state.py) storing every chunk's entering state S0 in ``hc``'s dtype:
    R = U − Y S0, S_C = Diag(γ_C) S0 + K_tailᵀ R, carried in fp32. Nothing else is written (no O, no R). With
    USE_SEGMENTS, segment i_p = program_id(2) of a dense batch's sequence (chunks i_p·SEG …) from its entering state
    in ``h0`` [NP + 1, NH, K, V] (the carry's, kernels/state.py)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos, T_seq, c0, n_chunks = _sequence_chunks(cu_seqlens, chunk_offsets, i_n, T, NC, C)
    else:
        bos = (i_n * T).to(tl.int64)
        T_seq = T
        n_chunks = NT
        c0 = (i_n * NT).to(tl.int64)
    tok0 = bos * H + i_h
    y += tok0 * K
    kt += tok0 * K
    u += tok0 * V
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_h = o_k[:, None] * V + o_v[None, :]
    b_s = tl.zeros([KP, BV], tl.float32)
    t_lo = 0
    t_hi = n_chunks
    s0 = (i_n * H + i_h).to(tl.int64) * K * V  # this (sequence, head)'s [K, V] in h0
    if USE_SEGMENTS:
        i_p = tl.program_id(2)
        t_lo = i_p * SEG
        t_hi = tl.minimum(t_lo + SEG, n_chunks)
        s0 = (i_p.to(tl.int64) * NH + i_nh) * K * V
    if USE_SEGMENTS or USE_INITIAL_STATE:
        b_s += tl.load(h0 + s0 + p_h, mask=m_s, other=0.0)
    if KB > 0:
        # S's second row part (BwdConfig.k_parts = 2), rows KP .. KP + KB, as kernels/state.py holds it: Y S0 sums
        # over the parts, the decay and K_tailᵀ R update each part alone.
        o_k2 = KP + tl.arange(0, KB)
        m_k2 = o_k2 < K
        m_s2 = m_k2[:, None] & m_v[None, :]
        p_h2 = o_k2[:, None] * V + o_v[None, :]
        b_s2 = tl.zeros([KB, BV], tl.float32)
        if USE_SEGMENTS or USE_INITIAL_STATE:
            b_s2 += tl.load(h0 + s0 + p_h2, mask=m_s2, other=0.0)
    for i_t in range(t_lo, t_hi):
        t_c = i_t * C + o_c
        m_c = t_c < T_seq
        m_ck = m_c[:, None] & m_k[None, :]
        p_k = t_c[:, None] * (H * K) + o_k[None, :]
        tl.store(hc + ((c0 + i_t) * H + i_h) * K * V + p_h, b_s.to(hc.dtype.element_ty), mask=m_s)
        b_y = tl.load(y + p_k, mask=m_ck, other=0.0).to(tl.float32)
        b_kt = tl.load(kt + p_k, mask=m_ck, other=0.0).to(tl.float32)
        b_u = tl.load(u + t_c[:, None] * (H * V) + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        b_gc = tl.load(gam + ((c0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_r = b_u.to(tl.float32) - tl.dot(b_y, b_s, input_precision=PRECISION)
        if KB > 0:
            tl.store(hc + ((c0 + i_t) * H + i_h) * K * V + p_h2, b_s2.to(hc.dtype.element_ty), mask=m_s2)
            m_ck2 = m_c[:, None] & m_k2[None, :]
            p_k2 = t_c[:, None] * (H * K) + o_k2[None, :]
            b_y2 = tl.load(y + p_k2, mask=m_ck2, other=0.0).to(tl.float32)
            b_r -= tl.dot(b_y2, b_s2, input_precision=PRECISION)
            b_kt2 = tl.load(kt + p_k2, mask=m_ck2, other=0.0).to(tl.float32)
            b_gc2 = tl.load(gam + ((c0 + i_t) * H + i_h) * K + o_k2, mask=m_k2, other=0.0)
            b_s2 = b_s2 * b_gc2[:, None] + tl.dot(tl.trans(b_kt2), b_r, input_precision=PRECISION)
        b_s = b_s * b_gc[:, None] + tl.dot(tl.trans(b_kt), b_r, input_precision=PRECISION)


class _ChunkGDN2(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
        initial_state: torch.Tensor | None,
        scale: float, output_final_state: bool, cu_seqlens: torch.Tensor | None, use_qk_l2norm_in_kernel: bool,
        config: FwdConfig, bwd_config: BwdConfig, num_seqs: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from gdn2_tune.kernels.chunk import chunk_gdn2_fwd

        index = None
        if cu_seqlens is not None:
            # The backward must differentiate the offsets this forward ran on, whatever happens to the caller's
            # tensor in between (a data loader refilling it in place, with or without a version bump): snapshot
            # them here, sanitised, on the device (one single-program launch, no sync), and keep the caller's
            # tensor out of the saved state. The forward rebuilds the same index from the sanitised offsets
            # (sanitising is idempotent), so both passes see one partition of the tokens.
            index = packed_index(cu_seqlens, config.chunk, q.shape[1])
            cu_seqlens = index.offsets
        o, ht = chunk_gdn2_fwd(
            q, k, v, g, b, w,
            scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            config=config, num_seqs=num_seqs,
        )
        # The inputs, and for a packed batch its index (a few ints per sequence and per chunk): everything else is
        # recomputed (see the module docstring).
        packed = (index.offsets, index.pairs, index.first) if index is not None else (None, None, None)
        ctx.save_for_backward(q, k, v, g, b, w, initial_state, *packed)
        ctx.num_chunks = None if index is None else index.num_chunks
        ctx.opts = (scale, use_qk_l2norm_in_kernel, config, bwd_config, num_seqs)
        ctx.g_dtype = g.dtype
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor | None, dht: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the gradients themselves would need a graph
            raise RuntimeError(
                "chunk_gdn2: double backward is not implemented; differentiate once (create_graph=False), or "
                "run a second-order method through the float64 reference (kernels.reference)"
            )
        q, k, v, g, b, w, initial_state, offsets, pairs, first = ctx.saved_tensors
        scale, l2norm, config, bwd_config, num_seqs = ctx.opts
        index = None if offsets is None else PackedIndex(offsets, pairs, first, ctx.num_chunks)
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dg, db, dw, dh0 = chunk_gdn2_bwd(
            q, k, v, g, b, w, do, None if dht is None else dht.contiguous().float(),
            scale=scale, initial_state=initial_state, cu_seqlens=offsets, use_qk_l2norm_in_kernel=l2norm,
            config=config, bwd_config=bwd_config, num_seqs=num_seqs, index=index,
        )
        return (dq, dk, dv, dg.to(ctx.g_dtype), db, dw, dh0) + (None,) * 7


def chunk_gdn2_autograd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    config: FwdConfig,
    num_seqs: int,
    bwd_config: BwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_gdn2_fwd`` recorded for autograd (checked, contiguous inputs; the same forward path)."""
    if bwd_config is None:
        bwd_config = default_bwd_config(Shape(*q.shape, v.shape[-1], _DTYPE_NAMES[q.dtype]))
    return _ChunkGDN2.apply(
        q, k, v, g, b, w, initial_state,
        scale, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, config, bwd_config, num_seqs,
    )
