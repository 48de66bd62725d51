"""The chunk forward's :class:`~gdn2_tune.kernels.spec.KernelSpec`: the first op registered (table keys ``fwd/...``).

Everything the tuner, the tables, the dispatcher and the reports need about the forward is gathered here from the
modules that own it: kernels/config.py (config, space, constraints, default), kernels/chunk.py and the stage
launchers (what is timed), kernels/cost.py (FLOPs and bytes), kernels/reference.py (the gate's ground truth).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gdn2_tune.kernels.chunk import ForwardLaunch, forward_launch
from gdn2_tune.kernels.config import (
    CONSTRAINTS,
    SPACE,
    FwdConfig,
    Shape,
    default_config,
    fit_to_shape,
    sequence_split_regime,
)
from gdn2_tune.kernels.cost import Cost, minimum_bytes, stage_costs
from gdn2_tune.kernels.inputs import Inputs, make_inputs
from gdn2_tune.kernels.reference import gdn2_reference
from gdn2_tune.kernels.spec import DeviceLimits, KernelSpec, SearchRule, register

_HERE = Path(__file__).resolve().parent
# The files whose @triton.jit functions the forward runs (the order is the fingerprint's).
JIT_FILES = tuple(_HERE / name for name in ("varlen.py", "intra.py", "state.py"))
# Sequences in the packed (varlen) member of the suite: uneven lengths from kernels.inputs.packed_lengths,
# enough of them that some are shorter than a chunk and some span many chunks.
PACKED_NUM_SEQS = 12
SUITE: tuple[Shape, ...] = (
    Shape(8, 4096, 16, 128, 128, "bf16"),  # the anchor
    Shape(1, 32768, 16, 128, 128, "bf16"),
    Shape(32, 1024, 16, 128, 128, "bf16"),
    Shape(4, 4096, 32, 64, 64, "bf16"),
    Shape(2, 8192, 16, 128, 256, "bf16"),
    Shape(1, 2048, 16, 128, 128, "bf16"),
    Shape(16, 2048, 8, 256, 256, "bf16"),
    Shape(1, 32768, 16, 128, 128, "bf16", num_seqs=PACKED_NUM_SEQS),
    # fp32 inputs are their own dtype bucket (issue 14): the anchor in fp32, so a tuned table serves them too.
    Shape(8, 4096, 16, 128, 128, "fp32"),
)
# The Triton interpreter runs every program instance in Python, so only a toy fits. T = 40 leaves a partial chunk
# at chunk 32 and a single partial chunk at 64.
INTERPRET_SHAPE = Shape(1, 40, 1, 32, 32, "fp32")
# fp32: the baseline's own error on fp32 inputs (1.41e-3, BASELINE.md; its dots run in TF32), so that no tuned fp32
# config is less accurate than the implementation it replaces; all-truncating TF32 measured 1.74e-3 at the accuracy
# shape on an H200 (2026-11-30). 16-bit inputs: their operand rounding (bf16's 2^-8) with headroom for T.
GATE_TOLERANCE = {"fp32": 1.4e-3, "bf16": 1e-2, "fp16": 1e-2}


# Pairs of (intra, state) dot precisions a study must not select for fp32 inputs, although the op runs them (an
# explicit config= is accepted): measured on an H200 (2026-11-30, benchmarks/exp_fp32.py, error of o against float64
# at the accuracy shape B=2 T=2048 H=4 K=V=128, BENCHMARKS.md), plain truncating TF32 in both stages ("input" is
# TF32 for fp32 operands too) gave 1.74e-3, above the baseline's own 1.41e-3, yet passed the gate at its small
# shape (the fp32 anchor study picked it at 2.50 ms). Every other pair measured is at or below the baseline:
# tf32x3/tf32 8.1e-4, tf32/tf32x3 1.03e-3, tf32rn/tf32rn 4.7e-4, ieee/tf32 8.1e-4, tf32x3/tf32rn 3.3e-4, and
# tf32rn/tf32 8.8e-4 (8.0e-4 under strong decay), the built-in default since benchmarks/exp_fwd_issue14.py timed it at
# 2.517 ms on the fp32 study's tiles against 2.463 for the refused tf32/tf32 and 4.221 for tf32x3/tf32 (8x4096x16,
# K = V = 128, H200, 2026-11-30; the baseline 3.23 ms).
FP32_REFUSED_PRECISIONS = (("tf32", "tf32"), ("tf32", "input"))  # a tuple: a set's repr, which the fingerprint hashes, varies per process


def fp32_precision_as_accurate_as_the_baseline(cfg: FwdConfig, shape: Shape, device: DeviceLimits) -> str | None:
    if shape.dtype != "fp32" or (cfg.intra.precision, cfg.state.precision) not in FP32_REFUSED_PRECISIONS:
        return None
    return (f"intra {cfg.intra.precision} / state {cfg.state.precision} dots on fp32 inputs measured 1.74e-3 "
            "output error, above the baseline's 1.41e-3")


SEARCH_RULES = (SearchRule(fp32_precision_as_accurate_as_the_baseline, ("intra.precision", "state.precision")),)


def _specialization(T: int, chunks: tuple[int, ...]) -> tuple[bool, ...]:
    """What Triton keys a compiled kernel on for the runtime ints T and NT = cdiv(T, chunk): divisibility by 16
    and equality to 1 (its default integer specialization). Two T with equal signatures share compiled kernels."""
    out = [T % 16 == 0, T == 1]
    for c in chunks:
        nt = -(-T // c)
        out += [nt % 16 == 0, nt == 1]
    return tuple(out)


# Below this many token-heads the tuned shape is gated as it is (the interpreter's toy shapes).
GATE_AS_IS_TOKENS = 400
# The gate's T starts here: several chunks of every length, so the chunk-to-chunk state pass is exercised.
GATE_MIN_T = 64


def gate_shape(shape: Shape) -> Shape:
    """The small shape the correctness gate compares with the float64 reference.

    Same K, V, dtype, H and layout (dense or packed) as ``shape``, and a T whose Triton specialization (see
    :func:`_specialization`) equals that of ``shape``'s T for every chunk length: then the kernels the gate
    compiles are exactly those the tuned shape runs, and a config is compiled once per trial, not twice (a compile
    is 10+ s on the GPU host). Among such T the smallest that is not a multiple of 32 is taken, so that the last
    chunk is partial. B is 1: it only sizes the launch grid. The reference loops over tokens in Python
    (~2 s at T = 2032, H = 16, K = V = 128), so T stays as small as the signature allows.
    """
    if shape.B * shape.T * shape.H <= GATE_AS_IS_TOKENS:
        return shape
    chunks = next(p.values for p in SPACE if p.name == "chunk")
    want = _specialization(shape.T, chunks)
    matching = [t for t in range(min(GATE_MIN_T, shape.T), shape.T + 1) if _specialization(t, chunks) == want]
    partial = [t for t in matching if t % 32]
    T = (partial or matching or [shape.T])[0]
    if shape.num_seqs is not None:
        return Shape(1, T, shape.H, shape.K, shape.V, shape.dtype, num_seqs=min(3, T))
    return Shape(1, T, shape.H, shape.K, shape.V, shape.dtype)


class FwdRun:
    """The forward's inputs at one shape: what the tuner gates, warms and times (kernels.spec.OpRun)."""

    def __init__(self, shape: Shape, device: str, *, seed: int = 0, strong_decay: bool = False) -> None:
        self.shape = shape
        self.inputs: Inputs = make_inputs(shape, device, seed, strong_decay=strong_decay)
        self.scale = shape.K**-0.5
        self.num_seqs = shape.num_seqs or shape.B

    def launch(self, cfg: FwdConfig) -> ForwardLaunch:
        """The two launches as ``chunk_gdn2`` makes them (kernels.chunk.forward_launch), minus the argument checks.

        Always with an initial state and the final state out: these are constexpr flags of the state kernel, and
        the gate, the warm-up and the timing must run one specialization so that each config compiles once. The
        final state is N·H·K·V fp32 (8 MB at the anchor), under 1% of the traffic of a call.
        """
        x = self.inputs
        return forward_launch(
            *x.args(),
            scale=self.scale, initial_state=x.initial_state, output_final_state=True,
            cu_seqlens=x.cu_seqlens, use_qk_l2norm_in_kernel=False, config=cfg, num_seqs=self.num_seqs,
        )

    def forward(self, cfg: FwdConfig) -> tuple[torch.Tensor, ...]:
        """The whole forward, the packed index included (``chunk_gdn2`` rebuilds it every call)."""
        o, ht = self.launch(cfg)()
        assert ht is not None
        return o, ht

    def reference(self) -> tuple[torch.Tensor, ...]:
        x = self.inputs
        o, ht = gdn2_reference(*x.args(), scale=self.scale, initial_state=x.initial_state, cu_seqlens=x.cu_seqlens)
        return o, ht

    def stage_fns(self, cfg: FwdConfig) -> dict[str, Callable[[], object]]:
        """Each stage's launch alone, on the same inputs (the packed index built once, outside both); the state
        stage reads one precomputed intra output."""
        launch = self.launch(cfg)
        inter = launch.intra()
        return {"intra": launch.intra, "state": lambda: launch.state(inter)}


def timed_costs(shape: Shape, config: FwdConfig) -> dict[str, Cost]:
    """Costs as the tuner times them (FwdRun): the state stage alone writes the final state, the whole call
    returns o only; both read an initial state."""
    staged = stage_costs(shape, config, final_state=True)
    return {**staged, "total": stage_costs(shape, config, final_state=False)["total"]}


FWD = register(KernelSpec(
    name="fwd",
    config_type=FwdConfig,
    space=SPACE,
    constraints=CONSTRAINTS,
    default=default_config,
    stages=("intra", "state"),
    prepare=FwdRun,
    cost=timed_costs,
    minimum_bytes=minimum_bytes,
    gate_tolerance=GATE_TOLERANCE,
    suite=SUITE,
    interpret_shape=INTERPRET_SHAPE,
    jit_files=JIT_FILES,
    gate_shape=gate_shape,
    fit=fit_to_shape,
    output_names=("o", "state"),
    search_rules=SEARCH_RULES,
    regime=sequence_split_regime,
))
