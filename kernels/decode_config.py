"""Launch configuration of the recurrent decode op (``fused_recurrent_gdn2``, kernels/decode.py) and its space.

The decode kernel runs one program per (sequence, head, V tile of BV columns), holding the [K, BV] state tile in
fp32 registers while it loops over the sequence's tokens. What can be tuned:

- ``BV``: the V tile. Smaller tiles mean more programs (the only parallelism at batch 1: N·H·V/BV programs) and
  shorter contiguous rows of the state (BV·4 bytes in fp32); larger ones fewer, longer transactions.
- ``num_warps``: threads sharing the tile; the K axis reductions (the gated read r and the output) cross them.
- ``num_stages``: software pipelining of the token loop's input loads (``tl.range(num_stages=...)``: Triton
  pipelines no dot-free loop without it). Even at T = 1 a depth of 2 changes the program: the loop's prologue
  issues the input loads as cp.async copies into shared memory, from which each thread reads the q, k, gate
  values of its own rows, instead of loading them spread over the threads and moving them into the state tile's
  layout through shared memory with barriers. Deeper than T + 1 only prefetches tokens that do not exist. (Before
  2026-11-30's session 7 a depth of 2 compiled at T = 1 to the very program of depth 1: Triton specializes an int
  argument equal to 1, and the one-trip loop was folded away before the pipeliner saw it. The kernel now keeps the
  loop at depth > 1; read off ptxas for sm_90, K=V=256, BV=32, 4 warps, static dims: 148 registers, 3.1 KB shared,
  every input copy issued together with the state's loads, as the baseline's kernel does.)
- ``batch_inputs``: issue the six input loads of a token before any of them is moved into the state tile's row
  layout. Otherwise each K-wide input's move (a shared-memory store that waits for its load, then a barrier) comes
  before the next input's load, since ptxas hoists no global load above a barrier: the inputs arrive one memory
  round trip after another, behind the state's (read off ptxas for sm_90: q, then k, then g and b, then v and w).
  With L2 flushed that is 3 more dependent round trips per program, the structural reason the baseline (whose
  pipelined loop issues all inputs as cp.async at once) was faster at K=V=256, B=8. Registers for sm_90: K=128,
  BV=32, 4 warps 80 → 80 (static dims 70 → 77); K=256, BV=32, static dims 121 → 152 (4 → 3 programs per SM; 128
  without spills under ``max_registers=128``).
- ``stream_state``: the evict_first cache policy on the state's load and store.
- ``one_pass``: the output from the decayed state in the same reduction as the read (one reduction per token).
- ``static_dims``: H, K and V as compile-time constants instead of runtime arguments (one compiled kernel per head
  shape): the state tile's rows are then a known stride apart, addressed from one base register with immediate
  offsets, and its masks fold away where K and V are multiples of the tile; a padding or out-of-pool row skips
  the state's load and store by a branch rather than by a mask per row.
- ``max_registers``: a cap on registers per thread (Triton's ``maxnreg``; 0: ptxas's choice). The kernel streams
  the state through registers and holds each program's tile across a few barriers, so how many programs an SM
  keeps in flight (65536 registers / (threads · registers per thread)) sets how much state traffic overlaps those
  waits: at K=V=256, BV=32, 4 warps, ptxas's own choice of ~150-165 registers leaves 3 programs per SM, a cap of
  128 gives 4 (without spills with ``static_dims``, read off ptxas for sm_90); at K=128 a cap of 80, 6 instead of 4.

- ``programs_per_sm``: a persistent grid (issue 13). One program per work item starts each item's state load only
  when a program slot frees up, and every program runs load, then arithmetic, then store: the state loads in flight
  on an SM come and go in bursts (the memory-only "skeleton" probe on the default grid takes 78.5 µs cold at K=V=128,
  B=128 against the 63.2 µs floor). A grid of this many programs per SM instead loops each program over the items
  pid, pid + G, pid + 2G, ... (G the grid): the G items in flight at any moment are neighbours in memory, and no
  program launches or retires until the end. All of them must be resident at once, so the kernel is launched with
  the register cap that fits them on an SM (:func:`register_limit`; 4 programs of 4 warps: 128).
- ``prefetch``: with a persistent grid, the next item's state load is issued before this item's inputs, reductions
  and stores (and its slot index two items ahead), so that each program always has a state tile on its way: two
  tiles of registers (K=128, BV=32, 4 warps: 120 registers under the cap of 128 for 4 programs, no spills;
  ptxas for sm_90, triton 3.6).
- ``item_stages``: with a persistent grid, Triton's software pipelining of the item loop: the state tile is copied
  by cp.async (LDGSTS.128, L1 bypassed) into shared memory item_stages - 1 items ahead, its slot index a stage
  earlier, holding no registers while in flight (K=128, BV=32, 4 warps: 117 / 125 registers and 18.1 / 34.8 KiB
  shared at depth 2 / 3). Only an innermost loop is pipelined: at T = 1 the token loop is folded away, with several
  tokens the item loop stays plain.

K is never split across programs: the read r_t = S̄ᵀ(b ⊙ k) sums over all of K before any row can be updated, so a
K split would need a cross-program reduction every token.

The op is registered with the tuner, the tables and the dispatcher as ``"decode"`` (kernels/decode_spec.py), which
reads :data:`DECODE_SPACE`, :data:`DECODE_CONSTRAINTS` and :func:`default_decode_config` from here. The constraints
take the generic ``(cfg, shape, device)`` of every op's spec; ``shape`` may be a :class:`~kernels.config.Shape`
(B sequences, as the tables key it) or a :class:`DecodeShape` (N sequences): they read only K and V.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gdn2_tune.kernels.config import Param, Shape
from gdn2_tune.kernels.spec import DEFAULT_DEVICE, DeviceLimits

# A thread holds at most 255 32-bit registers; the kernel keeps the state tile and one product of its size live
# (the gated read and the output are reductions of state ⊙ vector), so a config whose two tiles exceed this per
# thread would spill on every token.
MAX_REGISTERS_PER_THREAD = 255
THREADS_PER_WARP = 32
LIVE_STATE_TILES = 2
# Registers a program needs besides its state tile under a register cap: ptxas for sm_90 fits the K=128, BV=32,
# 4-warp program (32 tile registers per thread) in 80 without spills but spills 44 bytes at 64, and the K=256 one
# (64 per thread) in 128. Below tile + this, a cap only spills.
REGISTERS_BESIDES_TILE = 32
# sm_90 (and sm_80): 64K 32-bit registers and 64 resident warps per SM (the space's 6 programs of 8 warps fit);
# registers are allocated to a warp in units of 256, i.e. 8 per thread. A persistent grid needs all its programs
# resident at once: a program that waits for an SM slot would run its whole share of the items after the others.
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 8
# sm_90: 228 KiB of shared memory per SM (227 of them for one block).
SHARED_MEMORY_PER_SM = 228 * 1024
# Shared memory per program besides the pipelined state tiles: the inputs' copies and the reductions' scratch (read
# off the sm_90 compile, triton 3.6: 2.1-4.5 KiB above the tiles at K=128/256, BV=16-64, depth 2-3, e.g. 18.1 KiB
# at K=128, BV=32, depth 2; 132.5 at K=256, BV=64, depth 3) and the 1 KiB the driver reserves per block.
SHARED_BESIDES_TILES = 6 * 1024
# The largest head dims the op accepts (the chunk op's cap, kernels/config.py MAX_HEAD_DIM).
MAX_HEAD_DIM = 256
# Rules of the built-in config, read off the first H200 sweep (benchmarks/bench_decode.py, 2026-11-30, T=1, H=16,
# K=V ∈ {128, 256}, B ∈ {1, 8, 32, 128, 512}, fp32 state, CUDA-graph replay with L2 flushed): its winner, or within
# 3% of it, at every one of the 10 points.
# - BV=32 (128-byte fp32 rows) unless that leaves fewer programs than this; then BV=16 (B=8 at K=128: 10.4 µs
#   against 10.9 at BV=32). Below 16 nothing was gained even at B=1.
MIN_PROGRAMS = 1024
# - BV=64 once even BV=64 gives this many programs. First set at 16384 (B=512 at K=128: 289.8 µs against 300.5 at
#   BV=32); lowered in session 9 (2026-11-30, H200, benchmarks/exp_decode_variants.py, K=128, serving mode): BV=64
#   on 4 warps took 70.9 µs at B=128 against 75.9 for BV=32 (1.12x against 1.20x the state-traffic floor), and
#   20.6 against 21.3 at B=32 (cold: 74.2 / 79.1 and 24.1 / 24.1). exp_decode_walk.py's memory-only probes showed
#   the same: [K, 64] tiles walk the state at 69.6 µs where [K, 32] tiles take 75.5-76.1.
MANY_PROGRAMS = 1024
DEFAULT_MIN_BV = 16
# - 4 warps, or 2 for tiles of at most this many elements (B=8, K=128, BV=16: 10.4 µs against 10.8 with 4); 8 warps
#   lost everywhere (K=256, B=512: 1287 µs against 1240 with 4).
SMALL_TILE = 2048

STATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The state dtype of every decode table entry: the tuner times an fp32 pool (kernels/decode_spec.py DecodeRun). A
# bf16 pool moves half the bytes per step, so its best tile need not be fp32's; its calls take the built-in default
# rather than an fp32-state entry (see served_by_tables).
TABLE_STATE_DTYPE = "fp32"


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles and launch parameters of the recurrent decode kernel."""

    BV: int = 32  # V tile per program: 128-byte fp32 rows of the state, one cache line
    num_warps: int = 4
    num_stages: int = 1
    # Load and store the state with evict_first: each call touches it once, so it need not displace the inputs
    # and indices from L2.
    stream_state: bool = False
    # Form o_t = S̄ᵀq + (k·q)u from the decayed state in the same reduction as the read r (kernels/decode.py),
    # instead of a second reduction after the update: one cross-thread reduction per token instead of two.
    # (The fields' own defaults are the plain kernel; default_decode_config turns on what the H200 measured faster.)
    one_pass: bool = False
    # Compile H, K, V into the kernel (see the module docstring): fewer registers and no per-row predicates.
    static_dims: bool = False
    # Registers per thread the compiler may use (0: its own choice). Within noise on the H200 (2026-11-30).
    max_registers: int = 0
    # Issue all of a token's input loads before the first one is moved into the state tile's layout, so that their
    # memory round trips overlap (see the module docstring).
    batch_inputs: bool = False
    # A persistent grid of this many programs per SM (0: one program per work item, a (sequence, head, V tile)),
    # each looping over every G-th item (G the grid), under the register cap that lets them all share an SM
    # (register_limit).
    programs_per_sm: int = 0
    # With a persistent grid: issue the next item's state load before this item's work (two state tiles live).
    prefetch: bool = False
    # With a persistent grid: Triton's pipelining of the item loop this deep (cp.async of the state into shared
    # memory item_stages - 1 items ahead; 1: none).
    item_stages: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> DecodeConfig:
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a dict, received {type(data).__name__}")
        expected = _CONFIG_FIELDS
        if set(data) != expected:
            raise ValueError(f"config: expected keys {sorted(expected)}, received {sorted(data)}")
        return DecodeConfig(**data)

    def flat(self) -> dict[str, Any]:
        """The space's names (:data:`DECODE_SPACE`): the fields themselves, the config has one stage."""
        return self.to_dict()

    @staticmethod
    def from_flat(params: dict[str, Any]) -> DecodeConfig:
        return DecodeConfig.from_dict(dict(params))

    def label(self) -> str:
        return (f"BV{self.BV}-w{self.num_warps}-s{self.num_stages}{'-stream' if self.stream_state else ''}"
                f"{'-1pass' if self.one_pass else ''}{'-static' if self.static_dims else ''}"
                f"{f'-r{self.max_registers}' if self.max_registers else ''}{'-batch' if self.batch_inputs else ''}"
                f"{f'-persist{self.programs_per_sm}' if self.programs_per_sm else ''}"
                f"{'-prefetch' if self.prefetch else ''}"
                f"{f'-items{self.item_stages}' if self.item_stages > 1 else ''}")


# The tuner checks every point of the space through from_dict: asking dataclasses for the fields each time was a
# third of it.
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(DecodeConfig))


@dataclass(frozen=True)
class DecodeShape:
    """A decode problem: N sequences of (at most) T tokens, H heads, head dims K and V, and the dtypes."""

    N: int
    T: int
    H: int
    K: int
    V: int
    dtype: str = "bf16"  # of q, k, v, b, w and the output
    state_dtype: str = "fp32"

    def label(self) -> str:
        return f"N{self.N}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-{self.dtype}-state{self.state_dtype}"


def table_shape(shape: DecodeShape) -> Shape:
    """The shape the tables key a decode call by (``decode/K128-V128-bf16/T1-BH2048``): B is the number of sequences
    and T the tokens per sequence, so that the dispatcher's buckets are the batch (B·H) and the T of a step.

    A packed step (``cu_seqlens``) keys as the padded batch of the same sequences (its T the mean length, as
    :func:`decode.decode_shape_of` takes it): the kernel runs one program per sequence either way. Every key is of
    a :data:`TABLE_STATE_DTYPE` state; a call with another state dtype is not looked up (:func:`served_by_tables`).
    """
    return Shape(shape.N, shape.T, shape.H, shape.K, shape.V, shape.dtype)


def served_by_tables(shape: DecodeShape) -> bool:
    """Whether a call's config may come from the tables: only a :data:`TABLE_STATE_DTYPE` state's, the state dtype
    every entry was timed with; a bf16-state call takes :func:`default_decode_config` instead."""
    return shape.state_dtype == TABLE_STATE_DTYPE


def decode_shape(shape: Shape, state_dtype: str = "fp32") -> DecodeShape:
    """The decode problem a table shape stands for (the inverse of :func:`table_shape`; a packed shape's T is
    spread evenly over its sequences)."""
    if shape.num_seqs:
        return DecodeShape(shape.num_seqs, cdiv(shape.T, shape.num_seqs), shape.H, shape.K, shape.V, shape.dtype,
                           state_dtype)
    return DecodeShape(shape.B, shape.T, shape.H, shape.K, shape.V, shape.dtype, state_dtype)


DECODE_SPACE: tuple[Param, ...] = (
    Param("BV", (8, 16, 32, 64, 128), "V tile per program (programs = N·H·ceil(V/BV))"),
    Param("num_warps", (1, 2, 4, 8), "warps per program"),
    Param("num_stages", (1, 2, 3), "pipelining depth of the token loop's input loads (at most T + 1)"),
    Param("stream_state", (False, True), "evict_first cache policy on the state's load and store"),
    Param("one_pass", (False, True), "output from the decayed state in the read's reduction"),
    Param("static_dims", (False, True), "H, K, V compiled in (immediate row offsets, folded masks)"),
    # The occupancy steps at 4 warps: 128 registers → 4 programs per SM, 96 → 5, 80 → 6.
    Param("max_registers", (0, 80, 96, 128), "registers per thread the compiler may use (0: its choice)"),
    Param("batch_inputs", (False, True), "a token's input loads all issued before the first one is used"),
    Param("programs_per_sm", (0, 1, 2, 4, 6), "a persistent grid of this many programs per SM (0: per item)"),
    Param("prefetch", (False, True), "persistent: the next item's state load issued before this item's work"),
    Param("item_stages", (1, 2, 3), "persistent: Triton's pipelining depth of the item loop (cp.async of the state)"),
)


def padded(n: int) -> int:
    """The power-of-two extent of a tile axis that covers ``n`` (the kernel masks the rest).

    Plain Python: ``triton.next_power_of_2`` goes through a JIT-function call on the host, ~30 µs each, and the
    op runs this on every decode step.
    """
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------------------
# Constraints: each returns None when the point is admissible, else a reason a person can read.


def decode_legal_values(
    cfg: DecodeConfig, shape: Shape | DecodeShape, device: DeviceLimits = DEFAULT_DEVICE
) -> str | None:
    for name, legal in _LEGAL_VALUES:
        value = getattr(cfg, name)
        # The type too: True would pass for 1 and 64.0 for 64, and reach Triton as the wrong constexpr.
        if (type(value), value) not in legal:
            return f"{name}={value!r} is not one of {[v for _, v in sorted(legal, key=lambda tv: tv[1])]}"
    return None


_LEGAL_VALUES = tuple((p.name, frozenset((type(v), v) for v in p.values)) for p in DECODE_SPACE)


def decode_tile_within_v(
    cfg: DecodeConfig, shape: Shape | DecodeShape, device: DeviceLimits = DEFAULT_DEVICE
) -> str | None:
    # A tile wider than the padded V only adds masked lanes; the smallest tile always fits.
    if cfg.BV > max(padded(shape.V), min(DECODE_SPACE[0].values)):
        return f"BV={cfg.BV} exceeds the padded V={padded(shape.V)}"
    return None


def decode_stages_within_tokens(
    cfg: DecodeConfig, shape: Shape | DecodeShape, device: DeviceLimits = DEFAULT_DEVICE
) -> str | None:
    # The pipelined loop is the token loop: depth d prefetches d - 1 tokens ahead, so beyond T + 1 the extra stages
    # only prefetch tokens that do not exist, the same program as depth T + 1 with more shared memory; each such
    # depth the tuner tried would be a wasted trial. Depth 2 at T = 1 is a different program (see the module
    # docstring), so it stays.
    if cfg.num_stages > shape.T + 1:
        return (f"num_stages={cfg.num_stages} pipelines the token loop deeper than its T={shape.T} token(s) + 1 "
                f"(use at most {shape.T + 1})")
    return None


def state_tiles_in_registers(cfg: DecodeConfig) -> int:
    """State tiles a program holds in registers: its item's, and the next item's when it prefetches. Triton's
    pipelined item loop costs about as much (read off ptxas for sm_90, K=128, BV=32, 4 warps, static dims, batched
    inputs, one pass, under the 128-register cap of 4 programs per SM: prefetch 120, item_stages 2 117, 3 125; one
    program per item 72)."""
    return 2 if cfg.prefetch or cfg.item_stages > 1 else 1


def live_state_tiles(cfg: DecodeConfig) -> int:
    """State-sized tiles a program keeps live: its state tiles and one product of a tile's size."""
    return LIVE_STATE_TILES - 1 + state_tiles_in_registers(cfg)


def register_limit(cfg: DecodeConfig) -> int:
    """The ``maxnreg`` a config launches with (0: ptxas's choice): ``max_registers``, and for a persistent grid at
    most the registers per thread that let ``programs_per_sm`` programs share an SM."""
    if not cfg.programs_per_sm:
        return cfg.max_registers
    fit = REGISTERS_PER_SM // (cfg.programs_per_sm * cfg.num_warps * THREADS_PER_WARP)
    if fit > MAX_REGISTERS_PER_THREAD:
        return cfg.max_registers
    fit -= fit % REGISTER_ALLOCATION_UNIT
    return min(cfg.max_registers, fit) if cfg.max_registers else fit


def decode_register_budget(
    cfg: DecodeConfig, shape: Shape | DecodeShape, device: DeviceLimits = DEFAULT_DEVICE
) -> str | None:
    live = live_state_tiles(cfg) * padded(shape.K) * cfg.BV
    per_thread = live / (cfg.num_warps * THREADS_PER_WARP)
    if per_thread > MAX_REGISTERS_PER_THREAD:
        return (f"the [K={padded(shape.K)}, BV={cfg.BV}] state tile needs ~{per_thread:.0f} fp32 registers per "
                f"thread with {cfg.num_warps} warps (> {MAX_REGISTERS_PER_THREAD})")
    return None


def decode_register_cap_holds_the_tile(
    cfg: DecodeConfig, shape: Shape | DecodeShape, device: DeviceLimits = DEFAULT_DEVICE
) -> str | None:
    # Below the state tile plus the registers every program needs besides it (pointers, the gate vectors of its
    # rows, reduction partials) the cap can only spill the tile to local memory on every token.
    if not cfg.max_registers:
        return None
    tiles = state_tiles_in_registers(cfg)
    tile = tiles * padded(shape.K) * cfg.BV / (cfg.num_warps * THREADS_PER_WARP)
    if cfg.max_registers < tile + REGISTERS_BESIDES_TILE:
        what = "state tiles' (this item's and the next)" if tiles > 1 else "state tile's"
        return (f"max_registers={cfg.max_registers} is below the [K={padded(shape.K)}, BV={cfg.BV}] {what} "
                f"~{tile:.0f} registers per thread with {cfg.num_warps} warps + {REGISTERS_BESIDES_TILE} "
                f"(raise it, or use 0)")
    return None


def decode_persistent_programs_fit_an_sm(
    cfg: DecodeConfig, shape: Shape | DecodeShape, device: DeviceLimits = DEFAULT_DEVICE
) -> str | None:
    # All the persistent programs must be resident at once (see REGISTERS_PER_SM), so the register cap that fits
    # them on an SM must hold their state tiles without spilling on every item. (Their warps always fit: the
    # space's largest programs_per_sm times its largest num_warps, 48, is below the 64 warps an SM holds.)
    if not cfg.programs_per_sm:
        if cfg.prefetch or cfg.item_stages > 1:
            return (f"{'prefetch=True' if cfg.prefetch else f'item_stages={cfg.item_stages}'} needs a persistent "
                    f"grid (programs_per_sm > 0): without one a program has no next item")
        return None
    if cfg.prefetch and cfg.item_stages > 1:
        return "prefetch=True and item_stages > 1 are two ways to fetch the next item ahead; take one"
    # Triton's pipelined loop keeps item_stages - 1 state tiles in shared memory per program, and every program is
    # resident at once.
    shared = cfg.programs_per_sm * ((cfg.item_stages - 1) * padded(shape.K) * cfg.BV * 4 + SHARED_BESIDES_TILES)
    if shared > SHARED_MEMORY_PER_SM:
        return (f"programs_per_sm={cfg.programs_per_sm} programs pipelining item_stages={cfg.item_stages} deep hold "
                f"{shared // 1024} KiB of state tiles in shared memory, more than an SM has "
                f"({SHARED_MEMORY_PER_SM // 1024} KiB)")
    limit = register_limit(cfg)
    tiles = state_tiles_in_registers(cfg)
    tile = tiles * padded(shape.K) * cfg.BV / (cfg.num_warps * THREADS_PER_WARP)
    if limit and limit < tile + REGISTERS_BESIDES_TILE:
        what = "state tiles (this item's and the next)" if tiles > 1 else "state tile"
        return (f"programs_per_sm={cfg.programs_per_sm} leaves {limit} registers per thread, below the "
                f"[K={padded(shape.K)}, BV={cfg.BV}] {what}: ~{tile:.0f} per thread with {cfg.num_warps} warps "
                f"+ {REGISTERS_BESIDES_TILE}")
    return None


DECODE_CONSTRAINTS: tuple[Callable[[DecodeConfig, Shape | DecodeShape, DeviceLimits], str | None], ...] = (
    decode_legal_values,
    decode_tile_within_v,
    decode_stages_within_tokens,
    decode_register_budget,
    decode_register_cap_holds_the_tile,
    decode_persistent_programs_fit_an_sm,
)


@functools.lru_cache(maxsize=1024)  # the op checks an explicit config on every step; both records are frozen
def decode_infeasibility(
    cfg: DecodeConfig, shape: DecodeShape, device: DeviceLimits = DEFAULT_DEVICE
) -> str | None:
    """The first constraint ``cfg`` violates at ``shape``, or None when it may be launched."""
    for rule in DECODE_CONSTRAINTS:
        reason = rule(cfg, shape, device)
        if reason is not None:
            return reason
    return None


def decode_space(shape: DecodeShape) -> list[DecodeConfig]:
    """Every admissible point of :data:`DECODE_SPACE` at ``shape``, in grid order."""
    names = [p.name for p in DECODE_SPACE]
    persist, prefetch, stages = (names.index(n) for n in ("programs_per_sm", "prefetch", "item_stages"))
    # The fetch-ahead knobs without a persistent grid, or both at once, are refused at every shape
    # (decode_persistent_programs_fit_an_sm): skipped before a config is built, most of the product.
    points = (DecodeConfig(**dict(zip(names, values, strict=True)))
              for values in itertools.product(*(p.values for p in DECODE_SPACE))
              if (values[persist] or not (values[prefetch] or values[stages] > 1))
              and not (values[prefetch] and values[stages] > 1))
    return [cfg for cfg in points if decode_infeasibility(cfg, shape) is None]


# The structural knobs of the built-in config, read off benchmarks/exp_decode_variants.py on an H200 (2026-11-30
# ~11:10 UTC, benchmarks/results/decode-variants-h200-2026-11-30-s7.json: T=1, H=16, fp32 state in place through
# 1-D indices, CUDA-graph replay with L2 flushed, median of 3 alternating rounds; µs of this config / the previous
# default / the baseline, flash-linear-attention's fused_recurrent_gdn2_fwd, timed in the same rounds):
# - H, K, V compiled in, a token's input loads batched, and the one-pass output, everywhere below the wide tile:
#   the fastest of the ten configs timed at 5 of the 8 points it serves, within 1% at K=256, B=32 and within 2% at
#   B=1 (where every config sits at the memory-only probe's 7.1 and 9.1 µs). K=V=128: B=1 7.0 / 7.5 / 7.7
#   (an empty kernel: 4.6), B=8 10.8 / 11.3 / 11.1, B=32 24.1 / 26.3 / 25.6, B=128 78.8 / 81.5 / 81.9, B=512
#   277.2 / 278.8 / 311.3. K=V=256: B=1 8.8 / 9.1 / 9.0, B=8 24.0 / 26.5 / 24.3, B=32 76.7 / 78.6 / 76.9.
# - At K=256 a V tile of 64 on 8 warps (the same 64 state registers per thread as BV=32 on 4, half the programs,
#   256-byte rows; static dims and batched inputs, no one-pass: that combination was not timed) once BV=64 gives
#   this many programs: B=128 272.7 / 286.3 / 288.8 (BV=32 with the knobs above: 288.6), B=512 1057.2 / 1118.0 /
#   1136.9 (1136.4). At B=32 (2048 programs) it took 76.2 against 76.7, within noise, so the threshold stays where
#   the gain was clear. At K=128 the same tile on 8 warps lost everywhere it was tried (B=32 33.5, B=128 103.3).
WIDE_MIN_K = 256
WIDE_PROGRAMS = 8192
WIDE = DecodeConfig(BV=64, num_warps=8, static_dims=True, batch_inputs=True)


@functools.lru_cache(maxsize=1024)  # asked on every decode step without an explicit config
def default_decode_config(shape: DecodeShape) -> DecodeConfig:
    """The built-in config at ``shape``, where no table entry serves it: rules fitted to the H200 runs of
    2026-11-30 (the tile and warps to the first sweep, the structural knobs to the variants run; see the constants
    above). The token loop is not pipelined: the variants run's two-deep pipeline at T = 1 (static-pipe) was at
    best level with the batched loads and 5% behind at K=128, B=512; deeper ones have not been timed. All figures
    are T = 1; a speculative step (T > 1) takes the same rules."""
    vp = max(padded(shape.V), min(DECODE_SPACE[0].values))

    def programs(bv: int) -> int:
        return shape.N * shape.H * cdiv(shape.V, bv)

    if padded(shape.K) >= WIDE_MIN_K and vp >= WIDE.BV and programs(WIDE.BV) >= WIDE_PROGRAMS:
        assert decode_infeasibility(WIDE, shape) is None, (WIDE, shape)
        return WIDE
    bv = min(32, vp)
    while bv > min(DEFAULT_MIN_BV, vp) and programs(bv) < MIN_PROGRAMS:
        bv //= 2
    wide = DecodeConfig(BV=64, num_warps=4)
    if bv == 32 and vp >= 64 and programs(64) >= MANY_PROGRAMS and decode_infeasibility(wide, shape) is None:
        bv = 64
    warps = 2 if padded(shape.K) * bv <= SMALL_TILE else 4
    cfg = DecodeConfig(BV=bv, num_warps=warps, num_stages=1, one_pass=True, static_dims=True, batch_inputs=True)
    while decode_infeasibility(cfg, shape) is not None and cfg.num_warps < 8:  # K=256 with a wide V tile
        cfg = dataclasses.replace(cfg, num_warps=cfg.num_warps * 2)
    assert decode_infeasibility(cfg, shape) is None, (cfg, shape)
    return cfg
