"""The chunk backward's :class:`~gdn2_tune.kernels.spec.KernelSpec` (table keys ``bwd/...``): the autograd of
``chunk_gdn2``, timed on its own.

Gathered from the modules that own it: kernels/chunk_bwd.py (BwdConfig, BWD_SPACE, BWD_CONSTRAINTS, the default,
the launch), kernels/cost.py (the forward's stage costs, reused for the recompute) and kernels/reference_grad.py
(the gate's float64 gradients).

**The backward follows the forward's chunk length; they are not tuned jointly.** The backward recomputes with the
forward's intra stage and per-chunk buffers, so one call's two passes must agree on the chunk, and the forward's
own table is what picks it (the forward is also run alone, at inference, where the backward's cost is no
argument). Tuning both jointly would let a training-time optimum change what inference runs, and would multiply
the two spaces. So a ``bwd`` entry is tuned, checked and costed at the chunk of the forward's built-in config at
its shape (:func:`kernels.chunk_bwd.forward_chunk`; kernels/ cannot ask the dispatcher), which every shipped
forward entry uses too (chunk 32); at run time ``chunk_gdn2_bwd`` fits whatever config it is given to the chunk
the forward actually ran (``fit_bwd``), so a forward table that picks another chunk still gets a legal backward.

**What is timed**: the backward alone, on inputs saved by a forward that already ran: ``chunk_gdn2_bwd``'s four
steps (:class:`kernels.chunk_bwd.BackwardLaunch`) with the forward's config, a random upstream gradient for o and
for the final state, an initial state (so dh0 is computed), and for a packed batch the index the forward saved.
Each step can be timed alone (``stage_fns``): the recompute, the entering states, the reverse pass, the local
gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gdn2_tune.kernels.chunk import running_limits
from gdn2_tune.kernels.chunk_bwd import (
    BWD_CONSTRAINTS,
    BWD_SPACE,
    DEFAULT_BWD_CONFIG,
    RECOMPUTE_STORE_TENSORS,
    BackwardLaunch,
    BwdConfig,
    backward_launch,
    default_bwd_config,
    fit_bwd,
    forward_chunk,
    pass_operand_bytes,
    recompute_dtype,
    recompute_dtypes,
)
from gdn2_tune.kernels.config import FwdConfig, Shape, padded_dim, sequence_split_regime, state_row_parts
from gdn2_tune.kernels.cost import (
    G_BYTES,
    GAMMA_BYTES,
    STATE_BYTES,
    Cost,
    _dot_precision,
    element_size,
    intra_cost,
    num_chunks,
    num_sequences,
)
from gdn2_tune.kernels.fwd_spec import FWD
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.reference_grad import reference_grads
from gdn2_tune.kernels.spec import DEFAULT_DEVICE, DeviceLimits, KernelSpec, SearchRule, register
from gdn2_tune.kernels.varlen import packed_index

BWD_OP = "bwd"
_HERE = Path(__file__).resolve().parent
# What the backward launches: its own passes and local gradients, the forward's intra stage (the recompute) and
# its sequence split's transitions and carry (kernels/state.py, with segment_chunks).
JIT_FILES = tuple(_HERE / name for name in ("chunk_bwd.py", "bwd_local.py", "pairwise.py", "intra.py", "varlen.py",
                                            "state.py"))
# Issue 11's four shapes, where forward + backward is compared with the baseline.
SUITE: tuple[Shape, ...] = (
    Shape(8, 4096, 16, 128, 128, "bf16"),  # the anchor
    Shape(1, 32768, 16, 128, 128, "bf16"),
    Shape(32, 1024, 16, 128, 128, "bf16"),
    Shape(16, 2048, 8, 256, 256, "bf16"),  # the fused value side does not fit: value_side="torch"
)
# The interpreter runs a backward at this size in seconds: two chunks of 32 (the second partial), so the entering
# states and the reverse pass cross a chunk boundary.
INTERPRET_SHAPE = Shape(1, 40, 1, 16, 16, "fp32")
# Relative Frobenius error of each gradient against float64 autograd through the recurrence, under strong decay:
# - fp32: 3xTF32 dots and fp32 accumulators give ~1e-6 on small shapes (tests/test_chunk_bwd.py sees 2e-6 for dg
#   and db under g = -10 per step); 1e-4 is that budget with room for longer sequences, and fails TF32 dots in an
#   fp32 backward (~1e-3), which would not be an fp32 result.
# - bf16: each gradient is rounded once to bf16 (2^-9 relative, rms about a third); with the TF32 recompute of the
#   default an H200 measured 1.8e-3 to 2.4e-3 at the anchor (kernels/chunk_bwd.py default_bwd_config). 8e-3 leaves
#   three times that; a wrong answer is O(1).
# - fp16: one rounding is 2^-12, but the TF32 dots (unit roundoff 2^-11) dominate: half of bf16's budget.
GATE_TOLERANCE = {"fp32": 1e-4, "bf16": 8e-3, "fp16": 4e-3}
OUTPUT_NAMES = ("dq", "dk", "dv", "dg", "db", "dw", "dh0")


def recompute_store_as_accurate_as_the_baseline(cfg: BwdConfig, shape: Shape, device: DeviceLimits) -> str | None:
    """The gate's 8e-3 bounds every gradient at once; issue 11's bar is the baseline's error per gradient. dh0 comes
    out of the reverse pass, which reads Q_γ, K_tail and Y. On an H200 (session 9, benchmarks/exp_bwd_store.py,
    2x2048x4, K = V = 128, bf16, g down to −10, where dh0 comes from the first chunk alone) dh0's error against
    float64 was 4.86e-4 with the fp32 store and with every subset that keeps Q_γ in fp32 ("u", "uy", "ukt",
    "uykt": 4.86e-4 to 4.87e-4), and 1.60e-3 with Q_γ in bf16 ("uqg", "input"), above the baseline's 1.5e-3 on
    those inputs; every other gradient stayed within 3e-5 of the fp32 store's."""
    if "qg" in RECOMPUTE_STORE_TENSORS[cfg.recompute_store]:
        return (f"recompute_store={cfg.recompute_store!r} stores Q_γ in the input dtype: dh0 measured 1.60e-3 against "
                "float64, above the baseline's 1.5e-3")
    return None


SEARCH_RULES = (SearchRule(recompute_store_as_accurate_as_the_baseline, ("recompute_store",)),)


def bwd_fit(cfg: BwdConfig, shape: Shape, device: DeviceLimits) -> BwdConfig | None:
    """The nearest admissible config to ``cfg`` at ``shape`` (kernels.chunk_bwd.fit_bwd at the forward's chunk on
    ``device``: the value side in torch where the fused one does not fit, then fewer stages, a narrower V tile),
    or None where there is none. A value side moved to torch drops the fused side's tiling (it no longer acts)."""
    chunk = forward_chunk(shape, device)
    smem = device.shared_memory_per_block
    try:
        cfg = fit_bwd(cfg, shape, chunk, pass_operand_bytes(shape, chunk, smem), smem)
    except ValueError:
        return None
    if cfg.value_side == "torch":
        d = DEFAULT_BWD_CONFIG
        cfg = dataclasses.replace(cfg, value_tile=d.value_tile, value_BV=d.value_BV, value_BK=d.value_BK,
                                  value_warps=d.value_warps)
    return cfg if BWD.infeasibility(cfg, shape, device) is None else None


def bwd_default(shape: Shape, device: DeviceLimits) -> BwdConfig:
    """The built-in backward config (kernels.chunk_bwd.default_bwd_config) fitted at ``shape`` on ``device``."""
    cfg = bwd_fit(default_bwd_config(shape), shape, device)
    assert cfg is not None, f"no admissible backward config at {shape.label()} on {device.family}"
    return cfg


class BwdRun:
    """The backward's inputs at one shape (kernels.spec.OpRun): what a forward saves for it (the inputs, an initial
    state, a packed batch's index), the forward's config, and a random upstream gradient for o and the final
    state. ``forward`` returns the gradients (:data:`OUTPUT_NAMES`)."""

    def __init__(self, shape: Shape, device: str, *, seed: int = 0, strong_decay: bool = False) -> None:
        self.shape = shape
        self.device = device
        self.inputs = make_inputs(shape, device, seed, strong_decay=strong_decay)
        self.scale = shape.K**-0.5
        self.num_seqs = num_sequences(shape)
        # The forward's config for this shape without a table (kernels/ does not read tables): its chunk is the one
        # the constraints check at (kernels.chunk_bwd.forward_chunk).
        self.forward_config: FwdConfig = FWD.default_config(shape, running_limits(torch.device(device)))
        gen = torch.Generator().manual_seed(seed + 1)
        B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
        self.do = torch.randn(B, T, H, V, generator=gen).to(device, shape.torch_dtype)
        self.dht = torch.randn(self.num_seqs, H, K, V, generator=gen).to(device)
        cu = self.inputs.cu_seqlens
        # Built once, as the forward builds and saves it (kernels.chunk_bwd._ChunkGDN2.forward).
        self.index = None if cu is None else packed_index(cu, self.forward_config.chunk, T)

    def launch(self, cfg: BwdConfig) -> BackwardLaunch:
        x = self.inputs
        return backward_launch(
            *x.args(), self.do, self.dht,
            scale=self.scale, initial_state=x.initial_state,
            cu_seqlens=None if self.index is None else self.index.offsets, use_qk_l2norm_in_kernel=False,
            config=self.forward_config, bwd_config=cfg, num_seqs=self.num_seqs, index=self.index,
        )

    def forward(self, cfg: BwdConfig) -> tuple[torch.Tensor, ...]:
        grads = self.launch(cfg)()
        assert all(g is not None for g in grads)
        return tuple(grads)  # type: ignore[arg-type]

    def stage_fns(self, cfg: BwdConfig) -> dict[str, Callable[[], object]]:
        """Each step alone, on the outputs of the steps before it (computed once, here). A sequence split's
        transitions, shared by both passes, are timed with the entering states."""
        launch = self.launch(cfg)
        inter = launch.recompute()
        segments = launch.segments(inter)
        hc = launch.states(inter, segments)
        dhc, dh0 = launch.reverse(inter, segments)
        return {
            "recompute": launch.recompute,
            "states": lambda: launch.states(inter),
            "reverse": lambda: launch.reverse(inter, segments),
            "local": lambda: launch.local(inter.a, inter.aqk, hc, dhc, dh0),
        }

    def reference(self) -> tuple[torch.Tensor, ...]:
        """Float64 gradients by autograd through the token recurrence, on the run's device (a GPU holds the
        gate shape's graph: ~2000 steps of [H, K, V] states)."""
        x = self.inputs
        ref = reference_grads(*x.args(), self.do, self.dht, scale=self.scale, initial_state=x.initial_state,
                              cu_seqlens=x.cu_seqlens, device=self.device)
        return tuple(t for _, t in ref.items())


# ---------------------------------------------------------------------------------------------------------------
# Cost: FLOPs and bytes of each step as chunk_gdn2_bwd runs it. Symbols: rows = B·T·H token-heads, NH = chunks ×
# H (chunk, head) programs, C the forward's chunk, KP and VP the padded head dims, es the input element size,
# ib the recomputed intermediates' (4 where the reverse pass stages fp32 operands, else es).


def _dots(precision: str, flops: float) -> tuple[tuple[str, float], ...]:
    """``flops`` of dots at a Triton input precision as the roofline's units (3xTF32 executes three products)."""
    unit, passes = _dot_precision(precision)
    return ((unit, passes * flops),)


@dataclass(frozen=True)
class Sizes:
    """The factors every step's count is written in (see the section's comment)."""

    C: int
    KP: int
    VP: int
    NH: int
    rows: int
    es: int
    ib: int
    # Element sizes of the recomputed Y, U, Q_γ, K_tail (BwdConfig.recompute_store: each ib or es).
    iy: int
    iu: int
    iq: int
    ik: int


def sizes(shape: Shape, cfg: BwdConfig) -> Sizes:
    """The backward's sizes at ``shape``, at the forward's chunk under the default device's limits (the tables'
    cost is drawn without a GPU)."""
    C = forward_chunk(shape, DEFAULT_DEVICE)
    each = {name: dt.itemsize for name, dt in recompute_dtypes(cfg, shape, C).items()}
    return Sizes(C, padded_dim(shape.K), padded_dim(shape.V), num_chunks(shape, C) * shape.H,
                 shape.B * shape.T * shape.H, element_size(shape.dtype), recompute_dtype(cfg, shape, C).itemsize,
                 each["y"], each["u"], each["qg"], each["kt"])


def pass_rows(shape: Shape, cfg: BwdConfig) -> int:
    """Rows of the two passes' [rows, BV] tiles (BwdConfig.k_parts): K padded to a power of two in one part, to the
    parts' sum in two (K = 96: 128 against 64 + 32; K = 256: 256 either way). The dots of the passes run over
    these rows; the segment transitions keep one part."""
    return sum(state_row_parts(shape.K, cfg.k_parts))


def recompute_cost(shape: Shape, cfg: BwdConfig) -> Cost:
    """The forward's intra stage (kernels.cost.intra_cost at the recompute's precision), writing Y, Q_γ, K_tail
    and U in their stored sizes (iy, iq, ik, iu) instead of es, A_qk in fp32, and keeping A (fp32 [C, C] per
    program) for the local step."""
    z = sizes(shape, cfg)
    C, NH, rows, es = z.C, z.NH, z.rows, z.es
    fwd = FWD.default_config(shape)
    intra = intra_cost(shape, dataclasses.replace(fwd, intra=dataclasses.replace(fwd.intra,
                                                                                  precision=cfg.recompute_precision)))
    wider = rows * (shape.K * (z.iy + z.iq + z.ik - 3 * es) + shape.V * (z.iu - es))  # Y, Q_γ, K_tail and U
    wider += rows * C * (4 - es)  # A_qk [rows, C] in fp32
    wider += NH * C * C * 4  # A: the scratch tile, now an output read by the local step
    return intra + Cost(0.0, 0.0, float(wider), float(wider))


def _state_store_bytes(cfg: BwdConfig) -> int:
    """Bytes per element of the stored S0 and dS_C (BwdConfig.state_dtype)."""
    return 2 if cfg.state_dtype == "bf16" else STATE_BYTES


def _segment_count(shape: Shape, cfg: BwdConfig) -> int:
    """Segments per sequence of the sequence split (0 without one)."""
    if not cfg.segment_chunks:
        return 0
    chunks = -(-shape.T // sizes(shape, cfg).C)  # per sequence
    return -(-chunks // cfg.segment_chunks)


def segments_cost(shape: Shape, cfg: BwdConfig) -> Cost:
    """The sequence split's shared work (zero without one): the transitions [M | E], the forward's recurrence on
    KP + VP columns from [I | 0] (two dots per chunk, as the entering states but on K + V columns, nothing stored
    per chunk), and the two fp32 carries over the P segments, a [K, K] × [K, V] product per segment in 3xTF32."""
    P = _segment_count(shape, cfg)
    if not P:
        return Cost(0.0, 0.0, 0.0, 0.0)
    z = sizes(shape, cfg)
    C, KP, VP, NH, rows = z.C, z.KP, z.VP, z.NH, z.rows
    seq_heads = shape.B * shape.H
    trans = NH * 2 * (2 * C * KP * (KP + VP))
    carry = 2 * P * seq_heads * 2 * KP * KP * VP
    cuda = NH * (2 * KP * (KP + VP) + C * (KP + VP))
    k_wide = rows * shape.K * (z.iy + z.ik)  # Y and K_tail, read by every column tile of the transitions
    # M and E written, read by the carries (M twice, transposed once in torch), every segment state written.
    per_seg = P * seq_heads * shape.K * (shape.K + shape.V) * 4
    bytes_min = k_wide + rows * shape.V * z.iu + NH * shape.K * GAMMA_BYTES + 5 * per_seg
    n_c = -(-shape.K // cfg.BV) + -(-shape.V // cfg.BV)
    return (Cost(float(trans), float(cuda), float(bytes_min), float(bytes_min + k_wide * (n_c - 1)),
                 _dots(cfg.precision, trans))
            + Cost(float(carry), 0.0, 0.0, 0.0, _dots("tf32x3", carry)))


def states_cost(shape: Shape, cfg: BwdConfig) -> Cost:
    """The entering states: the forward's recurrence storing each chunk's S0 (in ``cfg.state_dtype``). Per
    (chunk, head) and V tile, two dots: Y S0 [C, KP] × [KP, BV] and K_tailᵀ R [KP, C] × [C, BV], KP the passes'
    rows (:func:`pass_rows`, two parts summed); with a sequence split, the transitions and both carries
    (:func:`segments_cost`: the stage times them) on top."""
    z = sizes(shape, cfg)
    C, VP, NH, rows = z.C, z.VP, z.NH, z.rows
    KP = pass_rows(shape, cfg)
    flops = NH * 2 * (2 * C * KP * VP)
    cuda = NH * (2 * KP * VP + C * VP)  # the decay Diag(γ_C) S and the add; R = U − ·
    k_wide = rows * shape.K * (z.iy + z.ik)  # Y and K_tail
    states = NH * shape.K * shape.V * _state_store_bytes(cfg)  # S0 of every chunk, written
    h0 = num_sequences(shape) * shape.H * shape.K * shape.V * STATE_BYTES
    bytes_min = k_wide + rows * shape.V * z.iu + NH * shape.K * GAMMA_BYTES + h0 + states
    n_v = -(-shape.V // cfg.BV)
    own = Cost(float(flops), float(cuda), float(bytes_min), float(bytes_min + k_wide * (n_v - 1)),
               _dots(cfg.precision, flops))
    return own + segments_cost(shape, cfg) if cfg.segment_chunks else own


def reverse_cost(shape: Shape, cfg: BwdConfig) -> Cost:
    """The reverse pass. Per (chunk, head) and V tile, four dots: A_qkᵀ dO [C, C] × [C, BV], K_tail dS_C
    [C, KP] × [KP, BV], Q_γᵀ dO and Yᵀ dR [KP, C] × [C, BV], KP the passes' rows (:func:`pass_rows`). A sequence
    split runs it twice: once from dS = 0 for each segment's F (nothing stored per chunk), once from the carried
    gradients. At the reverse pass's own tile (BwdConfig.reverse_pass)."""
    cfg = cfg.reverse_pass()
    z = sizes(shape, cfg)
    C, VP, NH, rows, es = z.C, z.VP, z.NH, z.rows, z.es
    KP = pass_rows(shape, cfg)
    walks = 2 if cfg.segment_chunks else 1
    flops = walks * NH * (2 * C * C * VP + 3 * 2 * C * KP * VP)
    cuda = walks * NH * (2 * KP * VP)  # Diag(γ_C) dS_C and the add
    k_wide = walks * rows * (shape.K * (z.iq + z.ik + z.iy) + C * 4)  # Q_γ, K_tail, Y and the fp32 A_qk
    per_seq = num_sequences(shape) * shape.H * shape.K * shape.V * STATE_BYTES  # dht read, dh0 written
    bytes_min = (k_wide + walks * (rows * shape.V * es + NH * shape.K * GAMMA_BYTES)
                 + NH * shape.K * shape.V * _state_store_bytes(cfg))
    bytes_min += 2 * per_seq
    n_v = -(-shape.V // cfg.BV)
    return Cost(float(flops), float(cuda), float(bytes_min), float(bytes_min + k_wide * (n_v - 1)),
                _dots(cfg.precision, flops))


# The local step's chunk-major fp32 temporaries per (chunk, head), each written once and read once, as [C, K]
# tiles: the key factors (q̂·scale, k̂, b⊙k̂, b, g, G, Ē, K_tail) and the value side's results for the key side
# (dĒ, dQ_γ, dK_tail, and dq dk dg db before the token layout).
LOCAL_FUSED_TILES = 15
# key_side="fused" (kernels/chunk_bwd.py's _key_tail_kernel) re-forms q̂·scale, k̂, b⊙k̂, b, g from the token layout
# and keeps the pair backward's results in registers: the key factors store G, Ē, K_tail and the value side its
# three, each written once and read once.
LOCAL_KEY_TAIL_TILES = 6
# value_side="torch" keeps about 30 such [C, max(K, V)] fp32 tensors (kernels/chunk_bwd.py, group_elements).
LOCAL_TORCH_TILES = 30


def local_cost(shape: Shape, cfg: BwdConfig) -> Cost:
    """The local gradients of every chunk (kernels/bwd_local.py's value side, kernels/pairwise.py's pair backward,
    the key-side tail). Per (chunk, head), in the equations of bwd_local.py:

    - 5 products over C·K·V: R = U − Y S0, dR's K_tail dS_C, dQ_γ = dO S0ᵀ, dK_tail = R dS_Cᵀ, dY = −dR S0ᵀ;
    - 5 over C·C·V: U = A Z, dR's A_qkᵀ dO, dA_qk = dO Rᵀ, dZ = Aᵀ dR, dA's dR Zᵀ;
    - 3 over C·C·K: Y = A Ē, dA's dY Ēᵀ, dĒ = Aᵀ dY; and dT = Aᵀ dA Aᵀ, 2 over C³;
    - the pair backward, 4 over C·C·K (dM1 and dM2 against the column factors, and their transposes for DY),
      in ``pair_precision``. ``value_side="torch"`` re-forms T and A_qk (2 more over C·C·K) and runs the value
      side as fp32 torch matmuls (CUDA cores, "fp32").
    """
    z = sizes(shape, cfg)
    C, KP, NH, rows, es = z.C, z.KP, z.NH, z.rows, z.es
    K, V = shape.K, shape.V
    value = NH * 2 * (5 * C * K * V + 5 * C * C * V + 3 * C * C * K + 2 * C * C * C)
    pairs = NH * 2 * 4 * C * C * KP
    if cfg.value_side == "torch":
        pairs += NH * 2 * 2 * C * C * KP
        mix = dict(_dots(cfg.pair_precision, pairs))
        mix["fp32"] = mix.get("fp32", 0.0) + value
        tiles = LOCAL_TORCH_TILES * C * max(K, V)
    else:
        mix = dict(_dots(cfg.pair_precision, pairs))
        for unit, flops in _dots(cfg.precision, value):
            mix[unit] = mix.get(unit, 0.0) + flops
        tiles = (LOCAL_KEY_TAIL_TILES if cfg.key_side == "fused" else LOCAL_FUSED_TILES) * C * K
    cuda = NH * C * (20 * K + 4 * V)  # exponentials, masks, the reverse cumulative sum and scalings (rough)
    k_io = rows * K * 2 * (3 * es + G_BYTES)  # q, k, b, g read; dq, dk, db, dg (fp32) written
    v_io = rows * V * 5 * es  # v, w, dO read; dv, dw written
    per_chunk = NH * (C * C * 4 + 2 * K * V * _state_store_bytes(cfg))  # A, S0 and dS_C
    bytes_min = k_io + v_io + rows * C * 4 + per_chunk  # and the fp32 A_qk
    moved = bytes_min + NH * tiles * 4 * 2
    return Cost(float(value + pairs), float(cuda), float(bytes_min), float(moved), tuple(sorted(mix.items())))


STAGE_COSTS: dict[str, Callable[[Shape, BwdConfig], Cost]] = {
    "recompute": recompute_cost,
    "states": states_cost,
    "reverse": reverse_cost,
    "local": local_cost,
}


def bwd_costs(shape: Shape, cfg: BwdConfig) -> dict[str, Cost]:
    """Each step as timed alone and the whole backward (their sum: the steps hand over through memory)."""
    out = {name: cost(shape, cfg) for name, cost in STAGE_COSTS.items()}
    total = out["recompute"]
    for name in ("states", "reverse", "local"):
        total = total + out[name]
    return {**out, "total": total}


def bwd_minimum_bytes(shape: Shape) -> float:
    """Any backward's floor: the inputs q, k, b, v, w (input dtype), g (fp32) and dO read once, their gradients
    written once (dg in fp32). States (h0, dht, dh0) are left out, as in the forward's floor."""
    es = element_size(shape.dtype)
    rows = shape.B * shape.T * shape.H
    return float(rows * (shape.K * 2 * (3 * es + G_BYTES) + shape.V * 5 * es))


BWD = register(KernelSpec(
    name=BWD_OP,
    config_type=BwdConfig,
    space=BWD_SPACE,
    constraints=BWD_CONSTRAINTS,
    default=bwd_default,
    stages=tuple(STAGE_COSTS),
    prepare=BwdRun,
    cost=bwd_costs,
    minimum_bytes=bwd_minimum_bytes,
    gate_tolerance=GATE_TOLERANCE,
    suite=SUITE,
    interpret_shape=INTERPRET_SHAPE,
    jit_files=JIT_FILES,
    gate_shape=FWD.gate_shape,
    fit=bwd_fit,
    output_names=OUTPUT_NAMES,
    # On an H200 (2026-11-30, 14 gate workers on 16 cores) the workers held 6-17 GB each at 1 x 32768 x 16 and at
    # K = V = 256, and the GPU's 140 GB ran out: two of the four bwd studies got no entry. Four keep it under half.
    max_gate_workers=4,
    regime=sequence_split_regime,
    search_rules=SEARCH_RULES,
))
