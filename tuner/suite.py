"""The benchmark suite: the shapes the tuner tunes by default and the benchmark script measures.

One place, so that the shipped table covers exactly what BENCHMARKS.md reports.
"""

from __future__ import annotations

import re

from gdn2_tune.kernels.config import DTYPES, MAX_HEAD_DIM, Shape
from gdn2_tune.kernels.spec import DEFAULT_OP, get_spec

# The first op's suite (KernelSpec.suite: what `tune.py tune` tunes by default and the benchmark script measures),
# named here for the tools that predate per-op specs.
_FIRST = get_spec(DEFAULT_OP)
SUITE: tuple[Shape, ...] = _FIRST.suite
ANCHOR = SUITE[0]
INTERPRET_SHAPE = _FIRST.interpret_shape
PACKED_NUM_SEQS = next((s.num_seqs for s in SUITE if s.num_seqs), 0)

_SHAPE_RE = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+)x(\d+)(?::([a-z0-9]+))?(?::varlen(\d+))?")
SHAPE_SYNTAX = "BxTxHxKxV[:dtype][:varlenN], e.g. 8x4096x16x128x128:bf16 or 1x32768x16x128x128:bf16:varlen12"


def parse_shape(text: str) -> Shape:
    """``"8x4096x16x128x128:bf16"`` -> Shape; ``":varlen12"`` makes a packed batch of 12 sequences (B must be 1)."""
    m = _SHAPE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"--shapes: expected {SHAPE_SYNTAX}, received {text!r}")
    B, T, H, K, V = (int(m.group(i)) for i in range(1, 6))
    dtype = m.group(6) or "bf16"
    if dtype not in DTYPES:
        raise ValueError(f"--shapes: expected dtype one of {sorted(DTYPES)}, received {dtype!r} in {text!r}")
    if min(B, T, H, K, V) < 1:
        raise ValueError(f"--shapes: expected every size >= 1, received {text!r}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"--shapes: expected K and V <= {MAX_HEAD_DIM}, received K={K}, V={V} in {text!r}")
    num_seqs = int(m.group(7)) if m.group(7) else None
    if num_seqs is not None:
        if B != 1:
            raise ValueError(f"--shapes: a packed batch (:varlenN) needs B == 1, received B={B} in {text!r}")
        if not 1 <= num_seqs <= T:
            raise ValueError(f"--shapes: expected 1 <= N <= T in :varlenN, received N={num_seqs}, T={T}")
    return Shape(B, T, H, K, V, dtype, num_seqs)


def format_shape(shape: Shape) -> str:
    """The inverse of :func:`parse_shape`."""
    tail = f":varlen{shape.num_seqs}" if shape.num_seqs else ""
    return f"{shape.B}x{shape.T}x{shape.H}x{shape.K}x{shape.V}:{shape.dtype}{tail}"


def gate_shape(shape: Shape, op: str = DEFAULT_OP) -> Shape:
    """The small shape the correctness gate compares op ``op`` with its float64 reference at
    (KernelSpec.gate_shape)."""
    return get_spec(op).gate_shape(shape)
