"""The benchmark suite: the shapes the tuner tunes by default and the benchmark script measures.

One place, so that the shipped table covers exactly what BENCHMARKS.md reports.
"""

from __future__ import annotations

import re

from gdn2_tune.kernels.config import DTYPES, MAX_HEAD_DIM, Shape

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
)
ANCHOR = SUITE[0]

# What --interpret tunes: the Triton interpreter runs every program instance in Python, so only a toy fits.
# T = 40 leaves a partial chunk at chunk 32 and a single partial chunk at 64.
INTERPRET_SHAPE = Shape(1, 40, 1, 32, 32, "fp32")

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
    from gdn2_tune.kernels.config import SPACE

    chunks = next(p.values for p in SPACE if p.name == "chunk")
    want = _specialization(shape.T, chunks)
    matching = [t for t in range(min(GATE_MIN_T, shape.T), shape.T + 1) if _specialization(t, chunks) == want]
    partial = [t for t in matching if t % 32]
    T = (partial or matching or [shape.T])[0]
    if shape.num_seqs is not None:
        return Shape(1, T, shape.H, shape.K, shape.V, shape.dtype, num_seqs=min(3, T))
    return Shape(1, T, shape.H, shape.K, shape.V, shape.dtype)
