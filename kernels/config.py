"""Launch configurations of the GDN-2 chunk forward and the space the tuner searches.

The forward is a pipeline of two stages (see ``kernels/chunk_fwd.py``):

- ``intra`` (``kernels/intra.py``): one program per (chunk, head). Cumulative decay, the C×C matrices
  T and A_qk, the triangular solve A = (I + T)^-1 and the WY auxiliaries Y = A Ē, U = A Z.
- ``state`` (``kernels/state.py``): one program per (sequence, head, V tile). The sequential chunk-to-chunk
  state pass, fused with the output O = Q_γ S0 + A_qk R.

The chunk length couples both stages (the intra stage writes what the state stage reads, chunk by chunk), so
it sits at the top of :class:`FwdConfig`. Every tunable is declared once, as data, in :data:`SPACE`; the
constraints a point must satisfy are the named functions in :data:`CONSTRAINTS`. The tuner, the dispatcher and
the tests all read these two tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gdn2_tune.kernels.spec import SM90, DeviceLimits

# Triton's tl.dot needs every operand dimension to be at least 16 (the smallest MMA tile).
MIN_DOT_DIM = 16
# Hopper's shared memory per block; the constraints read it from the device record (kernels.spec.DeviceLimits).
# Kept for the backward (kernels/chunk_bwd.py), whose constraints do not take a device yet.
SHARED_MEMORY_LIMIT_BYTES = SM90.shared_memory_per_block
# 65536 32-bit registers per SM; one block may use them all, and a thread at most 255. We budget the live
# fp32 tensors of a program against this so that the tuner skips configs that would spill heavily.
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
THREADS_PER_WARP = 32
# K and V above this need tiles the intra stage cannot hold (the issue caps the op at 256).
MAX_HEAD_DIM = 256

# Triton 3.6 on an H100 faults (illegal memory access at launch) in the state kernel when its chunk loop is not
# pipelined (num_stages=1) at chunk >= 64 with 16-bit operands: every such config of a 36-config matrix on
# 2026-11-26 faulted, every other passed (benchmarks/fault_matrix.py). Known Triton bug class: triton-lang/triton
# #10573 and #10486 (illegal memory access from kernels with several tl.dot on sm_90).
STATE_MIN_STAGES_AT_LONG_CHUNKS = 2
LONG_CHUNK = 64
# The families the fault above was seen on; no other GPU has been tested, so only these pay for the rule.
STATE_FAULT_FAMILIES = ("sm90",)

# "tf32rn": tf32 dots whose error-carrying operands the kernels first round to nearest TF32 (kernels/intra.py
# round_tf32); the tensor cores truncate a raw fp32 operand.
INTRA_PRECISIONS = ("tf32", "tf32x3", "ieee", "tf32rn")
STATE_PRECISIONS = ("input", "tf32", "tf32x3", "tf32rn")
STATE_OUTPUTS = ("fused", "split")
# Segment lengths (in chunks) of the state pass's sequence split. At C = 32 a 65536-token sequence has 2048 chunks:
# 16 gives 128 segments, 256 gives 8; a few heads times 8-128 segments fill the 132 SMs of an H100/H200.
SEGMENT_CHUNKS = (0, 16, 32, 64, 128, 256)
STATE_K_PARTS = (1, 2)


@dataclass(frozen=True)
class IntraConfig:
    """Tiles and launch parameters of the intra-chunk stage."""

    BC: int = 16  # sub-block of the chunk: diagonal blocks are solved exactly, off-diagonal ones by dots
    BK: int = 64  # K slice for the T / A_qk accumulation and for Y = A Ē
    BV: int = 64  # V slice for U = A Z
    num_warps: int = 4
    num_stages: int = 1
    precision: str = "tf32"  # input precision of the intra dots with fp32 operands: T, A_qk, the assembly, Y, U


@dataclass(frozen=True)
class StateConfig:
    """Tiles and launch parameters of the state-pass + output stage."""

    BV: int = 64  # V tile of the state each program owns; more tiles = more parallel programs
    num_warps: int = 4
    num_stages: int = 3
    precision: str = "input"  # state dots in the input dtype (bf16/fp16), or fp32 operands: tf32, tf32rn, 3xTF32
    output: str = "fused"  # O formed inside the sequential pass, or "split" into a parallel second launch
    # Chunks per segment of the sequence split (kernels/state.py): 0 walks each sequence in one pass; n > 0 cuts
    # it into segments of n chunks that three launches walk in parallel (more programs, about twice the FLOPs).
    segment_chunks: int = 0
    # Row parts of the state tile: 1 holds S as one [KP, BV] tile, KP = K padded to a power of two; 2 holds it as
    # two, [KA, BV] and [KB, BV] (state_row_parts), which pads K = 96, 160, 192 not at all (64 + 32, 128 + 32,
    # 128 + 64 rows) where one tile pads them by a third, and halves every K-wide dot at a power-of-two K.
    k_parts: int = 1


@dataclass(frozen=True)
class FwdConfig:
    """The whole forward launch: what ``chunk_gdn2(config=...)`` takes and the tuner searches."""

    # The best of a 74-config per-stage sweep at the anchor shape on an H100 (2026-11-26), see BENCHMARKS.md.
    chunk: int = 32
    intra: IntraConfig = IntraConfig()
    state: StateConfig = StateConfig()

    def to_dict(self) -> dict[str, Any]:
        """Nested dict; a field of LATER_FIELDS at the value older entries ran is left out, so that tables written
        before it existed round-trip unchanged (from_dict fills it back in)."""
        out = dataclasses.asdict(self)
        for stage, fields in LATER_FIELDS.items():
            for name, legacy in fields.items():
                if out[stage][name] == legacy:
                    del out[stage][name]
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> FwdConfig:
        """Build from a nested dict (a table entry). Unknown or missing keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a dict, received {type(data).__name__}")
        expected = {"chunk", "intra", "state"}
        if set(data) != expected:
            raise ValueError(f"config: expected keys {sorted(expected)}, received {sorted(data)}")
        parts = {}
        for name, cls in (("intra", IntraConfig), ("state", StateConfig)):
            sub = data[name]
            fields = {f.name for f in dataclasses.fields(cls)}
            if isinstance(sub, dict):
                # A table written before a field existed ran that field's default, which the field names.
                sub = {**{k: v for k, v in LATER_FIELDS.get(name, {}).items() if k not in sub}, **sub}
            if not isinstance(sub, dict) or set(sub) != fields:
                got = sorted(sub) if isinstance(sub, dict) else type(sub).__name__
                raise ValueError(f"config.{name}: expected keys {sorted(fields)}, received {got}")
            parts[name] = cls(**sub)
        return FwdConfig(chunk=data["chunk"], **parts)

    def flat(self) -> dict[str, Any]:
        """``{"chunk": 64, "intra.BC": 16, ...}``: the names the search space uses."""
        out: dict[str, Any] = {"chunk": self.chunk}
        for stage in ("intra", "state"):
            for key, value in dataclasses.asdict(getattr(self, stage)).items():
                out[f"{stage}.{key}"] = value
        return out

    @staticmethod
    def from_flat(params: dict[str, Any]) -> FwdConfig:
        nested: dict[str, Any] = {"chunk": params["chunk"], "intra": {}, "state": {}}
        for key, value in params.items():
            if "." in key:
                stage, name = key.split(".", 1)
                nested[stage][name] = value
        return FwdConfig.from_dict(nested)

    def label(self) -> str:
        i, s = self.intra, self.state
        return (
            f"C{self.chunk}/intra:BC{i.BC}-BK{i.BK}-BV{i.BV}-w{i.num_warps}-s{i.num_stages}-{i.precision}"
            f"/state:BV{s.BV}-w{s.num_warps}-s{s.num_stages}-{s.precision}{'-split' if s.output == 'split' else ''}"
            f"{f'-seg{s.segment_chunks}' if s.segment_chunks else ''}{f'-k{s.k_parts}' if s.k_parts > 1 else ''}"
        )


DEFAULT_CONFIG = FwdConfig()
# Fields added after tables were shipped, with the value every older entry ran: a missing one reads as that.
LATER_FIELDS: dict[str, dict[str, Any]] = {"state": {"segment_chunks": 0, "k_parts": 1}}


@dataclass(frozen=True)
class Shape:
    """A problem size. ``T`` is the padded length per sequence (or the packed total when varlen)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str = "bf16"
    num_seqs: int | None = None  # set for a packed (cu_seqlens) batch: B == 1 and T is the total

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        tail = f"-N{self.num_seqs}" if self.num_seqs else ""
        return f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-{self.dtype}{tail}"


DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Param:
    """One tunable: its flat name, its legal values (the order is the grid order) and why it matters."""

    name: str
    values: tuple[Any, ...]
    doc: str


SPACE: tuple[Param, ...] = (
    Param("chunk", (32, 64, 128), "chunk length C: longer chunks mean fewer sequential steps, more C×C work"),
    Param("intra.BC", (16, 32, 64), "diagonal sub-block; exact per-pair exponentials only inside it"),
    Param("intra.BK", (16, 32, 64, 128), "K slice of the intra stage"),
    Param("intra.BV", (16, 32, 64, 128), "V slice of U = A Z"),
    Param("intra.num_warps", (2, 4, 8), "warps of an intra program"),
    Param("intra.num_stages", (1, 2, 3), "software pipelining depth of the intra K/V loops"),
    Param("intra.precision", INTRA_PRECISIONS, "precision of the intra dots: T, A_qk, (I + T)^-1, Y, U"),
    Param("state.BV", (16, 32, 64, 128), "V tile of the state pass"),
    Param("state.num_warps", (2, 4, 8), "warps of a state program"),
    Param("state.num_stages", (1, 2, 3, 4), "software pipelining depth of the chunk loop"),
    Param("state.precision", STATE_PRECISIONS, "operand precision of the state dots"),
    Param("state.output", STATE_OUTPUTS, "O inside the sequential pass, or in a parallel launch after it"),
    Param("state.segment_chunks", SEGMENT_CHUNKS,
          "0: one pass per sequence; n: the sequence cut into segments of n chunks, walked in parallel"),
    Param("state.k_parts", STATE_K_PARTS, "the state tile as one padded [KP, BV] tile or two row parts"),
)


def _padded(n: int) -> int:
    return max(MIN_DOT_DIM, 1 << (n - 1).bit_length())


# A head dim as the kernels tile it: the next power of two, at least one MMA tile (the state kernels' KP). The
# launchers import this name; the constraints call ``_padded`` because the table fingerprint hashes the helper
# functions they call by name (kernels/fingerprint.py), and a rename would mark every shipped table stale.
padded_dim = _padded


def state_row_parts(K: int, parts: int) -> tuple[int, int]:
    """Rows (KA, KB) of the state tile's parts (StateConfig.k_parts): (KP, 0) in one; in two, the largest power of
    two below K (half of a power-of-two K) and the rest padded to a power of two. K = 96 -> (64, 32), 100 -> (64,
    64), 192 -> (128, 64), 256 -> (128, 128)."""
    if parts == 1:
        return _padded(K), 0
    ka = max(MIN_DOT_DIM, 1 << ((K - 1).bit_length() - 1))
    return ka, _padded(max(K - ka, 1))


# ---------------------------------------------------------------------------------------------------------------
# Constraints: each returns None when the point is admissible, else a reason a person can read.


def sub_block_divides_chunk(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    if cfg.intra.BC > cfg.chunk or cfg.chunk % cfg.intra.BC:
        return f"intra.BC={cfg.intra.BC} must divide chunk={cfg.chunk}"
    return None


def tiles_within_head_dims(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    kp, vp = _padded(shape.K), _padded(shape.V)
    if cfg.intra.BK > kp:
        return f"intra.BK={cfg.intra.BK} exceeds the padded K={kp}"
    if cfg.intra.BV > vp:
        return f"intra.BV={cfg.intra.BV} exceeds the padded V={vp}"
    if cfg.state.BV > vp:
        return f"state.BV={cfg.state.BV} exceeds the padded V={vp}"
    return None


def intra_register_budget(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    """Live fp32 elements of an intra program (see intra.py) against the registers its warps can hold."""
    c, bk, nb = cfg.chunk, cfg.intra.BK, cfg.chunk // cfg.intra.BC
    # Peak inside the K loop; the solve's C×C temporaries reuse the registers of the column factors.
    live = (
        2 * c * c  # T and A_qk accumulators
        + nb * c * bk  # the per-row-block column factors k_s exp(ref_I - G_s)
        + 3 * c * bk  # G, k·b and q slices
    )
    threads = cfg.intra.num_warps * THREADS_PER_WARP
    per_thread = live / threads
    if per_thread > MAX_REGISTERS_PER_THREAD:
        return f"intra stage holds ~{per_thread:.0f} fp32 values per thread (> {MAX_REGISTERS_PER_THREAD})"
    return None


def state_shared_memory(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    """Dot operands of one chunk step staged in shared memory: Y, Q_γ, K_tail [C, K], U [C, BV], A_qk [C, C].

    Triton 3.6 on an H100 multi-buffers the chunk loop num_stages deep (C=128, K=128, BV=32, bf16, 2 stages
    asked for 286720 bytes, this formula gives 278528); triton 3.9 compiled for sm_90 buffers it once. The
    bound follows the deeper of the two so that no admitted config fails to launch.
    """
    esize = 4 if shape.dtype == "fp32" else 2
    c, kp = cfg.chunk, sum(state_row_parts(shape.K, cfg.state.k_parts))
    per_stage = esize * (3 * c * kp + c * cfg.state.BV + c * c)
    total = int(1.1 * max(1, cfg.state.num_stages) * per_stage)
    if total > device.shared_memory_per_block:
        return (f"state stage needs ~{total // 1024} KiB of shared memory (> {device.shared_memory_per_block // 1024} "
                f"on {device.family})")
    return None


def state_register_budget(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    rows = sum(state_row_parts(shape.K, cfg.state.k_parts))
    live = rows * cfg.state.BV + 2 * cfg.chunk * cfg.state.BV  # state + R + O accumulators
    per_thread = live / (cfg.state.num_warps * THREADS_PER_WARP)
    if per_thread > MAX_REGISTERS_PER_THREAD:
        return f"state stage holds ~{per_thread:.0f} fp32 values per thread (> {MAX_REGISTERS_PER_THREAD})"
    return None


def state_pipelining_avoids_fault(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    if device.family not in STATE_FAULT_FAMILIES:
        return None
    if shape.dtype != "fp32" and cfg.chunk >= LONG_CHUNK and cfg.state.num_stages < STATE_MIN_STAGES_AT_LONG_CHUNKS:
        return (f"state.num_stages={cfg.state.num_stages} at chunk={cfg.chunk} with 16-bit inputs faults on "
                f"triton 3.6 / sm_90 (needs >= {STATE_MIN_STAGES_AT_LONG_CHUNKS})")
    return None


def sequence_split_on_dense_batches(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    """The sequence split needs every sequence to have the same length (a packed batch's segments would depend on
    its offsets), and at least two segments: with one it is the plain pass plus two launches of overhead."""
    n = cfg.state.segment_chunks
    if not n:
        return None
    if shape.num_seqs is not None:
        return f"state.segment_chunks={n}: the sequence split takes dense batches only, not packed (cu_seqlens) ones"
    chunks = -(-shape.T // cfg.chunk)
    if n >= chunks:
        return f"state.segment_chunks={n} leaves one segment: the sequence has {chunks} chunks of {cfg.chunk}"
    return None


def state_parts_fit(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    """Two row parts need a K beyond one MMA tile, and the plain pass: the sequence split's segment and carry
    launches hold the state as one tile."""
    if cfg.state.k_parts == 1:
        return None
    if shape.K <= MIN_DOT_DIM:
        return f"state.k_parts={cfg.state.k_parts} needs K > {MIN_DOT_DIM}, received K={shape.K}"
    if cfg.state.segment_chunks:
        return (f"state.k_parts={cfg.state.k_parts} does not combine with "
                f"state.segment_chunks={cfg.state.segment_chunks}")
    return None


def _type_name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def field_type_error(cfg: Any) -> str | None:
    """Why ``cfg`` is not a FwdConfig whose fields have their declared types, or None.

    Each field must have the type of its default: ints are ints (not floats, whose 32.0 passes ``in (32, 64)``,
    nor bools, which are ints to Python), strings are strings. The message names the field, the expected type
    and the received value.
    """
    if not isinstance(cfg, FwdConfig):
        return f"config: expected a kernels.FwdConfig, received {type(cfg).__name__}"
    parts: tuple[tuple[str, Any, Any], ...] = (
        ("chunk", cfg.chunk, DEFAULT_CONFIG.chunk),
        ("intra", cfg.intra, DEFAULT_CONFIG.intra),
        ("state", cfg.state, DEFAULT_CONFIG.state),
    )
    for name, value, default in parts:
        if dataclasses.is_dataclass(default):
            if type(value) is not type(default):
                return f"config.{name}: expected a {type(default).__name__}, received {_type_name(value)}"
            for f in dataclasses.fields(default):
                sub, want = getattr(value, f.name), getattr(default, f.name)
                if type(sub) is not type(want):
                    return f"config.{name}.{f.name}: expected {type(want).__name__}, received {_type_name(sub)}"
        elif type(value) is not type(default):
            return f"config.{name}: expected {type(default).__name__}, received {_type_name(value)}"
    return None


def legal_values(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    wrong_type = field_type_error(cfg)
    if wrong_type is not None:
        return wrong_type
    for p in SPACE:
        value = cfg.flat()[p.name]
        if value not in p.values:
            return f"{p.name}={value!r} is not one of {list(p.values)}"
    return None


CONSTRAINTS: tuple[Callable[[FwdConfig, Shape, DeviceLimits], str | None], ...] = (
    legal_values,
    sub_block_divides_chunk,
    tiles_within_head_dims,
    intra_register_budget,
    state_register_budget,
    state_shared_memory,
    state_pipelining_avoids_fault,
    sequence_split_on_dense_batches,
    state_parts_fit,
)


def infeasibility(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> str | None:
    """The first constraint ``cfg`` violates at ``shape`` on ``device``, or None when it may be launched."""
    for rule in CONSTRAINTS:
        reason = rule(cfg, shape, device)
        if reason is not None:
            return reason
    return None


def fit_to_shape(cfg: FwdConfig, shape: Shape, device: DeviceLimits = SM90) -> FwdConfig:
    """The nearest admissible config: tiles clipped to the padded head dims, then, while a constraint fails,
    one stage less of pipelining, then a shorter chunk. The built-in default must work at every shape."""
    kp, vp = _padded(shape.K), _padded(shape.V)
    intra = dataclasses.replace(cfg.intra, BK=min(cfg.intra.BK, kp), BV=min(cfg.intra.BV, vp))
    state = dataclasses.replace(cfg.state, BV=min(cfg.state.BV, vp))
    cfg = dataclasses.replace(cfg, intra=intra, state=state)
    if sequence_split_on_dense_batches(cfg, shape, device) is not None:
        cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, segment_chunks=0))
    if state_parts_fit(cfg, shape, device) is not None:
        cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, k_parts=1))
    while infeasibility(cfg, shape, device) is not None:
        faulty = device.family in STATE_FAULT_FAMILIES and shape.dtype != "fp32" and cfg.chunk >= LONG_CHUNK
        floor = STATE_MIN_STAGES_AT_LONG_CHUNKS if faulty else 1
        if cfg.state.num_stages > floor:
            cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, num_stages=cfg.state.num_stages - 1))
        elif cfg.chunk > min(SPACE[0].values):
            chunk = cfg.chunk // 2
            cfg = dataclasses.replace(cfg, chunk=chunk, intra=dataclasses.replace(cfg.intra, BC=min(cfg.intra.BC, chunk)))
        else:
            raise AssertionError(f"no admissible config near {cfg.label()} at {shape.label()}")
    return cfg


# Shape rules of the built-in default, each the winner of a same-run comparison on an H200 (2026-11-30): the
# sequence split from benchmarks/exp_fwd_variants.py (BENCHMARKS.md "Forward variants"), the rest from
# benchmarks/exp_fwd_issue14.py (benchmarks/results/fwd-issue14-h200-2026-11-30.jsonl: torch 2.11, triton 3.6, median
# of 3 alternating rounds of do_bench, L2 flushed). The default is what an untabled shape gets and every study's
# first warm start, so these make the tuner try the structural options where they pay.
# - Intra V tiles of 128 on 2 warps (K slices of 64), every dtype: the H200 table's pick at 6 of its 7 bf16 shapes,
#   and the intra of the fastest entry at every shape of the issue-14 run. K = V = 96: 1.535 ms, against 1.607 with
#   K slices of 32 (the old rule for odd multiples of 32) and 1.690 for the old default (those slices, V tiles of 64
#   on 4 warps); K = 100, V = 60: 1.759 against 1.950 on 4 warps. Offline sm_90 compiles (triton 3.6): no spills at
#   K = V = 128 in bf16 (254 registers) nor in fp32 with tf32rn (255).
DEFAULT_INTRA = IntraConfig(BC=16, BK=64, BV=128, num_warps=2, num_stages=1)
# - Few rows in the state pass and long sequences: split the sequence. At 1x32768x16 (16 rows, 1024 chunks) the
#   split with 128-chunk segments and V tiles of 64 took 2.05 ms against 2.38; at 1x65536x4 1.27 against 2.93.
SPLIT_MAX_STATE_ROWS = 32  # sequences x heads at or below which the sequence split is the default
SPLIT_MIN_CHUNKS = 512  # chunks per sequence from which it is
SPLIT_SEGMENT_CHUNKS = 128
# - K >= 128: the state tile in two row parts (StateConfig.k_parts). 8x4096x16 K = V = 128: 1.539 ms against 1.582
#   (state V tiles of 64 on 4 warps, 3 stages); 16x2048x8 K = V = 256: 1.946 against 2.035 (WIDE_STATE's tiles);
#   4x4096x16 K = 192, V = 160: 1.575 against 1.736 (V tiles of 128 on 8 warps). Below it lost: K = 100, V = 60 1.882
#   against 1.759 (V tiles of 64 on 4 warps, 3 stages), and at K = V = 96 one part (1.535) beat two (1.556).
PARTS_MIN_K = 128
# - Two-part state tiles of 256 rows (K > 192) at V padded to 256: V tiles of 128 on 8 warps, one stage; at
#   16x2048x8 K = V = 256 1.946 ms against 1.968 for V tiles of 64 on 4 warps and 2.077 for the table's one-part tiles
#   (offline sm_90: 392 bytes of spills, 528 in one part).
WIDE_HEAD_DIM = 256
WIDE_STATE = StateConfig(BV=128, num_warps=8, num_stages=1, k_parts=2)
# - Two-part state tiles between 128 and 256 rows (K = 160, 192: 128 + 32 or 64 rows): V tiles of 32 on 4 warps,
#   3 stages; at 4x4096x16 K = 192, V = 160 1.511 ms against 1.575 on WIDE_STATE's and 1.598 on V tiles of 64
#   (8 bytes of spills offline, against 208 for the anchor's two-part tiles).
MID_STATE = StateConfig(BV=32, num_warps=4, num_stages=3, k_parts=2)
# fp32 inputs: intra 'tf32rn' on DEFAULT_INTRA's tiles, state 'tf32' with V tiles of 64 on 4 warps, one stage, one
# row part (two are untimed in fp32). At 8x4096x16 K = V = 128: 2.517 ms against 3.199 for 3xTF32 intra dots on 4
# warps (benchmarks/exp_fwd_issue14.py); the error at the accuracy shape is under default_config. Offline sm_90
# compiles (triton 3.6, the anchor): the fp32 state pass spills 896 bytes with three stages and 272 with one; the
# tf32rn intra none on 2 warps (255 registers), where the 3xTF32 intra spills 216 bytes.
FP32_INTRA_PRECISION = "tf32rn"
FP32_STATE_PRECISION = "tf32"
FP32_STATE_STAGES = 1


def sequence_split_regime(shape: Shape) -> bool:
    """Few state rows along long dense sequences: where the built-in defaults of the forward and the backward split
    each sequence into segments walked in parallel, and elsewhere not.

    Also the regime a table's nearest bucket must share with the shape it serves (KernelSpec.regime): an entry tuned
    for many rows carries no split, and served at 1x32768x16 it denied the backward its split (20.56 ms against
    16.37, H200, 2026-11-30)."""
    rows = (shape.num_seqs or shape.B) * shape.H
    return shape.num_seqs is None and rows <= SPLIT_MAX_STATE_ROWS and shape.T >= SPLIT_MIN_CHUNKS * DEFAULT_CONFIG.chunk


def _shaped_default(shape: Shape) -> FwdConfig:
    state = DEFAULT_CONFIG.state
    rows = sum(state_row_parts(shape.K, 2)) if shape.K >= PARTS_MIN_K else 0  # the two-part state tile's rows
    if rows >= WIDE_HEAD_DIM and _padded(shape.V) >= WIDE_HEAD_DIM:
        state = WIDE_STATE
    elif PARTS_MIN_K < rows < WIDE_HEAD_DIM:
        state = MID_STATE
    elif rows:
        state = dataclasses.replace(state, k_parts=2)
    cfg = FwdConfig(chunk=DEFAULT_CONFIG.chunk, intra=DEFAULT_INTRA, state=state)
    if sequence_split_regime(shape):
        # Measured with one row part, and the split's launches hold the state as one tile (state_parts_fit).
        split = dataclasses.replace(cfg.state, segment_chunks=SPLIT_SEGMENT_CHUNKS, k_parts=1)
        cfg = dataclasses.replace(cfg, state=split)
    return cfg


def default_config(shape: Shape, device: DeviceLimits = SM90) -> FwdConfig:
    """The built-in configuration fitted to ``shape`` on ``device``: what the dispatcher falls back to.

    One default for every family today: it was chosen on sm90, and fitting it to the device's limits is what
    changes between families.

    fp32 inputs get "tf32rn" dots in the intra stage (operands rounded to nearest TF32 first: the tensor cores
    truncate them) and plain TF32 in the state pass. On an H200 (2026-11-30, benchmarks/exp_fwd_issue14.py, the
    fp32 anchor 8x4096x16 K = V = 128 on this default's tiles; output error against float64 at the accuracy shape
    B=2 T=2048 H=4, normal / strong decay): this default 2.517 ms, 8.8e-4 / 8.0e-4; 3xTF32 intra with TF32 state
    4.221 ms, 8.1e-4 / 7.7e-4 (3.199 on 4 intra warps, the previous default); TF32 in both 2.463 ms but 1.74e-3,
    above the baseline's 1.41e-3 (BASELINE.md; the baseline ran 3.23 ms), which studies refuse (kernels/fwd_spec.py);
    tf32rn in both 4.352 ms, 4.7e-4 / 3.6e-4. 3xTF32 in both: 4.6e-7 at 9.64 ms (benchmarks/exp_fp32.py, an earlier
    run on other tiles). bf16 and fp16 operands are exact in TF32.
    """
    cfg = _shaped_default(shape)
    if shape.dtype == "fp32":
        cfg = dataclasses.replace(
            cfg,
            intra=dataclasses.replace(cfg.intra, precision=FP32_INTRA_PRECISION),
            state=dataclasses.replace(cfg.state, precision=FP32_STATE_PRECISION, num_stages=FP32_STATE_STAGES,
                                      k_parts=1),
        )
    return fit_to_shape(cfg, shape, device)
