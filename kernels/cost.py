"""FLOPs and bytes of the two forward stages, as plain functions of the Shape and the FwdConfig.

Counted from the kernels as written (kernels/intra.py, kernels/state.py), in the style of tritonbench's operator
``flops()`` methods: every factor says where it comes from. Symbols: B T H K V (problem), C the chunk,
NB = C / BC sub-blocks, BK BV tiles, es the element size of the input dtype (2 for bf16/fp16, 4 for fp32).

Four quantities per stage (``Cost``):

- ``flops_tc``: the matrix products (``tl.dot``), each counted once at the tile sizes the kernel computes (full
  chunks of C rows, K and V padded up to whole tiles), 2 FLOP per multiply-add, whatever unit and precision run
  them: the intra stage's ``ieee`` dots (the diagonal-block inversion always, the assembly, Y and U with
  ``precision="ieee"``) are FMAs on the CUDA cores and are counted here too, under "fp32" in ``dot_mix``.
- ``flops_cuda``: exponentials, scalings, masks and sums on the CUDA cores, outside any ``tl.dot``. A rough count
  (about one FLOP per elementwise operation, an exp counted as one); it is shown, never used to pick the roof.
- ``bytes_min``: DRAM traffic if every tensor the stage touches is read or written exactly once.
- ``bytes_moved``: what the stage asks of the memory system as written, mostly served by L2/L1: in the intra
  stage the full-chunk k and g slices loaded again by every row block, the Y pass over q, k, b, g and the fp32
  [C, C] scratch tile (T and A stored and read back); in the state stage the re-reads of its K-wide and C-wide
  inputs by every V tile.

``dot_mix`` splits the executed ``tl.dot`` work by the unit and precision that run it ("bf16", "fp16", "tf32",
and "fp32" for ``ieee`` dots, which Triton runs as FMAs on the CUDA cores); ``tf32x3`` dots execute three tf32
products each, so the mix can sum to more than ``flops_tc``. The roofline model (reports/roofline.py) turns the
mix into a compute floor time.

Not modelled: the exact per-pair diagonal loop the intra stage takes when a K slice decays faster than
``SAFE_SPAN`` inside one sub-block (data dependent, CUDA-core work only), and the extra pass over q and k when
``use_qk_l2norm_in_kernel`` is on (2·T·H·K·es more bytes moved).
"""

from __future__ import annotations

from dataclasses import dataclass

from gdn2_tune.kernels.config import FwdConfig, Shape, state_row_parts

G_BYTES = 4  # g (log-decay) is fp32 in practice whatever the input dtype (kernels/inputs.py, BASELINE.md)
GAMMA_BYTES = 4  # γ_C is written in fp32 by the intra stage
STATE_BYTES = 4  # initial and final states are fp32 [N, H, K, V]
SCRATCH_BYTES = 4  # the intra stage's per-program scratch tile (T, then A) is fp32 [C, C]
STAGES = ("intra", "state")


@dataclass(frozen=True)
class Cost:
    flops_tc: float
    flops_cuda: float
    bytes_min: float
    bytes_moved: float
    # Executed dot FLOPs per unit/precision, e.g. (("fp32", 1.6e9), ("tf32", 2.0e10)), sorted by name: "bf16",
    # "fp16", "tf32" (tensor cores; tf32x3 dots count three times) and "fp32" (ieee dots, CUDA-core FMAs).
    # Empty means all of flops_tc in bf16.
    dot_mix: tuple[tuple[str, float], ...] = ()

    def __add__(self, other: Cost) -> Cost:
        mix: dict[str, float] = dict(self.dot_mix)
        for name, flops in other.dot_mix:
            mix[name] = mix.get(name, 0.0) + flops
        return Cost(
            self.flops_tc + other.flops_tc,
            self.flops_cuda + other.flops_cuda,
            self.bytes_min + other.bytes_min,
            self.bytes_moved + other.bytes_moved,
            tuple(sorted(mix.items())),
        )

    @property
    def intensity(self) -> float:
        """Tensor-core FLOPs per DRAM byte (bytes_min): the x axis of the roofline."""
        return self.flops_tc / self.bytes_min if self.bytes_min else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "flops_tc": self.flops_tc,
            "flops_cuda": self.flops_cuda,
            "bytes_min": self.bytes_min,
            "bytes_moved": self.bytes_moved,
            "dot_mix": {name: flops for name, flops in self.dot_mix},
        }

    @staticmethod
    def from_dict(data: dict[str, object]) -> Cost:
        mix = data.get("dot_mix") or {}
        if not isinstance(mix, dict):
            raise TypeError(f"cost.dot_mix: expected a dict of precision -> FLOPs, received {type(mix).__name__}")
        return Cost(
            float(data["flops_tc"]),  # type: ignore[arg-type]
            float(data["flops_cuda"]),  # type: ignore[arg-type]
            float(data["bytes_min"]),  # type: ignore[arg-type]
            float(data["bytes_moved"]),  # type: ignore[arg-type]
            tuple(sorted((str(k), float(v)) for k, v in mix.items())),
        )


def element_size(dtype: str) -> int:
    if dtype in ("bf16", "fp16"):
        return 2
    if dtype == "fp32":
        return 4
    raise ValueError(f"dtype: expected 'bf16', 'fp16' or 'fp32', received {dtype!r}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def num_sequences(shape: Shape) -> int:
    return shape.num_seqs or shape.B


def num_chunks(shape: Shape, chunk: int) -> int:
    """Chunks the kernels run (the intra grid's first axis, summed over the batch).

    For a packed batch the exact count depends on the sequence lengths, which a Shape does not carry; each
    sequence boundary can add at most one partial chunk, so ceil(T / C) + N − 1 is an upper bound (and exact
    when every boundary falls mid-chunk, the usual case for uneven lengths).
    """
    if shape.num_seqs:
        return _cdiv(shape.T, chunk) + shape.num_seqs - 1
    return shape.B * _cdiv(shape.T, chunk)


def _dot_precision(precision: str) -> tuple[str, int]:
    """(unit, executed products per product) of the intra stage's T, A_qk, assembly, Y and U dots for
    ``IntraConfig.precision`` (the diagonal-block inversion is always ``ieee``)."""
    if precision in ("tf32", "tf32rn"):
        return "tf32", 1  # tf32rn rounds some operands on the CUDA cores first, then one tf32 MMA
    if precision == "tf32x3":
        return "tf32", 3  # Triton's 3xTF32: hi·hi + hi·lo + lo·hi, three tf32 MMAs
    if precision == "ieee":
        return "fp32", 1  # fp32 FMAs on the CUDA cores
    raise ValueError(f"intra.precision: expected 'tf32', 'tf32rn', 'tf32x3' or 'ieee', received {precision!r}")


def intra_cost(shape: Shape, config: FwdConfig) -> Cost:
    """The intra stage: one program per (chunk, head). T and A_qk row block by row block over K slices, the solve
    through an fp32 scratch tile, then one pass over K for Y, Q_γ, K_tail, γ_C and one over V for U."""
    C, BC, BK, BV = config.chunk, config.intra.BC, config.intra.BK, config.intra.BV
    NB = C // BC
    es = element_size(shape.dtype)
    tokens = shape.B * shape.T  # every token row of every head is loaded (masked loads cost no bytes)
    rows = tokens * shape.H
    programs = num_chunks(shape, C) * shape.H
    n_k = _cdiv(shape.K, BK)  # the K loops run whole BK slices; padded columns are masked but multiplied
    n_v = _cdiv(shape.V, BV)
    Kp = n_k * BK
    Vp = n_v * BV
    log2_bc = BC.bit_length() - 1

    # --- matrix products (tl.dot), per program ---
    # T and A_qk: per row block I (NB of them) and K slice, dot([BC, BK], [BK, C]) for each: over the NB blocks
    # NB·BC·BK·C = C·C·BK FMAs per slice (all C columns are multiplied; the upper ones are masked afterwards),
    # at ``intra.precision``.
    tc_t = 2 * C * C * Kp
    tc_aqk = 2 * C * C * Kp
    # Diagonal blocks of I + T inverted as one batch [NB, BC, BC] by (I − P)(I + P²)(I + P⁴)…: LOG2_BC − 1 rounds
    # of two batched dots (P², M(I + P^2^j)), each NB·BC·BC·BC FMAs, in fp32 "ieee" (FMAs on the CUDA cores).
    tc_diag = 2 * (log2_bc - 1) * (2 * NB * BC * BC * BC)
    # Assembly for NB > 1: N = D L (one C×C×C dot), then Horner X ← D − N X, NB − 1 dots of C×C×C; at
    # ``intra.precision``. NB = 1 has none (A is the diagonal block's inverse).
    tc_asm = (NB if NB > 1 else 0) * (2 * C * C * C)
    tc_y = 2 * C * C * Kp  # Y = A Ē, one [C, C] × [C, BK] dot per K slice, at ``intra.precision`` precision
    tc_u = 2 * C * C * Vp  # U = A Z, one [C, C] × [C, BV] dot per V slice, at ``intra.precision`` precision
    flops_tc = programs * (tc_t + tc_aqk + tc_diag + tc_asm + tc_y + tc_u)
    unit, passes = _dot_precision(config.intra.precision)
    mix: dict[str, float] = {"fp32": float(programs * tc_diag)}
    mix[unit] = mix.get(unit, 0.0) + programs * passes * (tc_t + tc_aqk + tc_asm + tc_y + tc_u)
    mix = {name: flops for name, flops in mix.items() if flops}

    # --- CUDA cores, rough: ~1 FLOP per elementwise op (an exp counts one), per program ---
    # Per row block and K slice, on the full-chunk [C, BK] slices: cumsum of g, k·r, G at the row before the
    # block (a masked sum), ref − G, its clamps, an exp and the multiply by k: ~10 per element, NB times.
    cuda_cols = 10 * NB * C * Kp
    # On the block's own [BC, BK] rows (once over all blocks): cumsum, + ref, k·r, ·b, q·r, the decay span,
    # exp(G − ref) and the two row scalings: ~10 per element.
    cuda_rows = 10 * C * Kp
    # Two masked accumulations of [BC, C] per block and slice; per block the row picks of r_k, r_q from [C]
    # vectors (a where and a sum over [BC, C] each) and the two triangular masks before the stores.
    cuda_acc = 4 * C * C * n_k + 6 * C * C
    # Solve: diagonal-block extraction (a where and a sum over C·C), I − P and I + P^2^j on [NB, BC, BC], the
    # block-diagonal D (a where over C·C), the mask of L and the Horner subtractions (C·C each).
    cuda_solve = 3 * C * C + log2_bc * C * BC + (NB * C * C if NB > 1 else 0)
    # Y pass, per [C, BK] element: cumsum, the last row's G, k·r, q·r, exp(G), γ⊙b⊙k, γ⊙q, exp(G_C − G)⊙k.
    cuda_pass2 = 11 * C * Kp
    cuda_u = C * Vp  # Z = w ⊙ v
    # tf32rn: one rounding per element of A_qk's column factors (per block and slice), of its row factors and of Z.
    cuda_round = (NB * C * Kp + C * Kp + C * Vp) if config.intra.precision == "tf32rn" else 0
    flops_cuda = programs * (cuda_cols + cuda_rows + cuda_acc + cuda_solve + cuda_pass2 + cuda_u + cuda_round)

    # --- bytes ---
    reads_k = rows * shape.K * (3 * es + G_BYTES)  # q, k, b in the input dtype and g in fp32, K wide
    reads_v = rows * shape.V * 2 * es  # v and w, V wide
    writes = (
        rows * shape.K * 3 * es  # Y, Q_γ, K_tail
        + rows * shape.V * es  # U
        + rows * C * es  # A_qk: C columns per row (the full C×C tile of each chunk; its upper part is zeros)
        + num_chunks(shape, C) * shape.H * shape.K * GAMMA_BYTES  # γ_C, fp32, K per (chunk, head)
    )
    bytes_min = reads_k + reads_v + writes
    # Beyond one read of each tensor, from L2 when the chunk's slices are still there:
    reread_blocks = NB * rows * shape.K * (es + G_BYTES)  # full-chunk k and g slices, loaded again per row block
    reread_pass2 = reads_k  # the Y pass re-reads q, k, b, g
    # The fp32 scratch tile [C, C] per program (never masked): T stored and read back by the solve, A stored and
    # re-read by every Y K slice and every U V slice.
    scratch = programs * C * C * SCRATCH_BYTES * (2 + 1 + n_k + n_v)
    bytes_moved = bytes_min + reread_blocks + reread_pass2 + scratch
    return Cost(float(flops_tc), float(flops_cuda), float(bytes_min), float(bytes_moved), tuple(sorted(mix.items())))


def state_cost(shape: Shape, config: FwdConfig, *, initial_state: bool = True, final_state: bool = False) -> Cost:
    """The state stage: one program per (sequence, head, V tile), walking the chunks in order. Its four dots run in
    the input dtype (tf32 for fp32 inputs) with ``state.precision="input"``, in tf32 with ``"tf32"`` and
    ``"tf32rn"`` and as three tf32 products with ``"tf32x3"``.

    ``initial_state``/``final_state``: whether the call reads h0 and writes the final state (fp32 [N, H, K, V]);
    the defaults match how the tuner times the op (kernels.inputs.make_inputs gives an initial state).
    """
    C, BV = config.chunk, config.state.BV
    es = element_size(shape.dtype)
    rows = shape.B * shape.T * shape.H
    chunks = num_chunks(shape, C) * shape.H  # (chunk, head) steps over all sequences
    # Rows of the state tile [KP, BV]: K padded to a power of two, or the two row parts' sum (state.k_parts = 2,
    # kernels/config.state_row_parts: 96 -> 64 + 32, 192 -> 128 + 64), whose K-wide dots are summed over both.
    KP = sum(state_row_parts(shape.K, config.state.k_parts))
    n_v = _cdiv(shape.V, BV)
    Vp = n_v * BV

    # --- tensor cores, per (chunk, head), summed over the V tiles ---
    tc_ys = 2 * C * KP * Vp  # Y S0: [C, KP] × [KP, BV] per tile
    tc_qs = 2 * C * KP * Vp  # Q_γ S0
    tc_kr = 2 * KP * C * Vp  # K_tailᵀ R: [KP, C] × [C, BV]
    tc_ar = 2 * C * C * Vp  # A_qk R: [C, C] × [C, BV]
    flops_tc = chunks * (tc_ys + tc_qs + tc_kr + tc_ar)
    passes = 1
    if config.state.precision == "input":
        unit = "tf32" if shape.dtype == "fp32" else shape.dtype  # fp32 operands go through tl.dot as tf32
    elif config.state.precision in ("tf32", "tf32rn", "tf32x3"):
        unit, passes = _dot_precision(config.state.precision)
    else:
        raise ValueError(
            f"state.precision: expected 'input', 'tf32', 'tf32rn' or 'tf32x3', received {config.state.precision!r}"
        )

    # --- CUDA cores, rough: the decay Diag(γ_C) S and state add on [KP, Vp]; R = U − ·, O = · + · on [C, Vp] ---
    flops_cuda = chunks * (2 * KP * Vp + 2 * C * Vp)
    if config.state.precision == "tf32rn":
        # One rounding per element of the Q_γ, K_tail [C, KP] and A_qk [C, C] tiles each V tile loads, and of R.
        flops_cuda += chunks * ((2 * C * KP + C * C) * n_v + C * Vp)

    # --- bytes ---
    per_tile = rows * (3 * shape.K + C) * es + chunks * shape.K * GAMMA_BYTES  # Y, Q_γ, K_tail, A_qk, γ_C
    u_o = rows * shape.V * 2 * es  # U read and O written, each V column by exactly one tile
    states = num_sequences(shape) * shape.H * shape.K * shape.V * STATE_BYTES
    state_io = states * (int(initial_state) + int(final_state))
    bytes_min = per_tile + u_o + state_io
    bytes_moved = per_tile * n_v + u_o + state_io  # every V tile re-reads the K-wide and C-wide inputs
    if config.state.output == "split":
        # Each chunk's entering state [K, V] and R [C, V] go out in the dot dtype and come back for the output
        # launch; the pass reads Y, K_tail and γ_C per V tile, the output launch Q_γ and A_qk.
        dot_bytes = es if config.state.precision == "input" else STATE_BYTES
        handoff = 2 * (chunks * shape.K * shape.V + rows * shape.V) * dot_bytes
        bytes_min += handoff
        bytes_moved += handoff
    mix = {unit: float(passes * flops_tc)}
    if config.state.segment_chunks:
        # Sequence split (dense batches): launch 1 runs the pass's R and state dots on [K, K + V] columns per
        # segment, launch 2 carries S_{p+1} = M_p S_p + E_p, and the pass reads S_p instead of h0.
        seg_flops, seg_bytes = _segment_cost(shape, config)
        flops_tc += seg_flops["pass"] + seg_flops["carry"]
        mix[unit] += passes * seg_flops["pass"]
        mix["tf32"] = mix.get("tf32", 0.0) + 3 * seg_flops["carry"]  # 3xTF32 (kernels/state.CARRY_PRECISION)
        bytes_min += seg_bytes["min"]
        bytes_moved += seg_bytes["moved"]
    return Cost(float(flops_tc), float(flops_cuda), float(bytes_min), float(bytes_moved), tuple(sorted(mix.items())))


def _segment_cost(shape: Shape, config: FwdConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Launches 1 and 2 of the state stage's sequence split (kernels/state.py), FLOPs and bytes."""
    C, BV, seg = config.chunk, config.state.BV, config.state.segment_chunks
    es = element_size(shape.dtype)
    rows = shape.B * shape.T * shape.H
    chunks = num_chunks(shape, C) * shape.H
    KP = max(16, _next_pow2(shape.K))
    heads = num_sequences(shape) * shape.H
    n_seg = _cdiv(_cdiv(shape.T, C), seg)
    cols = (_cdiv(shape.K, BV) + _cdiv(shape.V, BV)) * BV  # M's K columns and E's V columns, in BV tiles
    # Launch 1, per (chunk, head): Y [C, KP] × X [KP, cols] and K_tailᵀ [KP, C] × R [C, cols].
    pass_flops = chunks * 2 * (2 * C * KP * cols)
    BR = min(64, KP)  # kernels/state.CARRY_BLOCK
    KR = _cdiv(shape.K, BR) * BR
    # Launch 2, per segment and head: M_p [K, K] × S_p [K, V] in [BR, BR] × [BR, BV] blocks.
    carry_flops = n_seg * heads * 2 * KR * KR * _cdiv(shape.V, BV) * BV
    mx = n_seg * heads * shape.K * shape.K * STATE_BYTES
    ex = n_seg * heads * shape.K * shape.V * STATE_BYTES
    hs = (n_seg + 1) * heads * shape.K * shape.V * STATE_BYTES
    # Launch 1 reads Y, K_tail (K wide), U (V wide) and γ_C once, writes M and E; launch 2 reads them and writes
    # every S_p; the pass reads them back.
    minimum = rows * (2 * shape.K + shape.V) * es + chunks * shape.K * GAMMA_BYTES + 2 * (mx + ex) + 2 * hs
    # Every column tile of launch 1 re-reads Y, K_tail and γ_C; launch 2 reads S_p once per K row block.
    n_cols = cols // BV
    moved = minimum + (n_cols - 1) * (rows * 2 * shape.K * es + chunks * shape.K * GAMMA_BYTES)
    moved += hs * (_cdiv(shape.K, BR) - 1)
    return {"pass": float(pass_flops), "carry": float(carry_flops)}, {"min": float(minimum), "moved": float(moved)}


def stage_costs(
    shape: Shape, config: FwdConfig, *, initial_state: bool = True, final_state: bool = False
) -> dict[str, Cost]:
    """``{"intra", "state", "total"}``. The total is the pipeline as built: both stages' traffic, intermediates
    included (for the floor of any implementation, see :func:`minimum_bytes`)."""
    intra = intra_cost(shape, config)
    state = state_cost(shape, config, initial_state=initial_state, final_state=final_state)
    return {"intra": intra, "state": state, "total": intra + state}


def minimum_bytes(shape: Shape) -> float:
    """Each input read once and the output written once: the floor of any forward of this op.

    q, k, b (K wide) and v, w (V wide) in the input dtype, g (K wide) in fp32, o (V wide) in the input dtype.
    Initial and final states are left out, as in BASELINE.md's figure (they are 1% of it at the anchor shape).
    """
    es = element_size(shape.dtype)
    rows = shape.B * shape.T * shape.H
    inputs = rows * (shape.K * (3 * es + G_BYTES) + shape.V * 2 * es)
    output = rows * shape.V * es
    return float(inputs + output)
