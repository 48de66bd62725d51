"""FLOPs and bytes of the two forward stages, as plain functions of the Shape and the FwdConfig.

Counted from the kernels as written (kernels/intra.py, kernels/state.py), in the style of tritonbench's operator
``flops()`` methods: every factor says where it comes from. Symbols: B T H K V (problem), C the chunk,
NB = C / BC sub-blocks, BK BV tiles, es the element size of the input dtype (2 for bf16/fp16, 4 for fp32).

Four quantities per stage (``Cost``):

- ``flops_tc``: the matrix products (``tl.dot``), each counted once at the tile sizes the kernel computes (full
  chunks of C rows, K and V padded up to whole tiles): work a tensor core does, whatever precision it runs at.
- ``flops_cuda``: exponentials, scalings, masks and sums on the CUDA cores. A rough count (about one FLOP per
  elementwise operation, an exp counted as one); it is shown, never used to pick the binding roof.
- ``bytes_min``: DRAM traffic if every tensor the stage touches is read or written exactly once.
- ``bytes_moved``: what the stage asks of the memory system as written: the intra stage's second pass over
  q, k, b, g (served mostly by L2) and the state stage's re-reads of its K-wide and C-wide inputs by every V tile.

``dot_mix`` splits the executed tensor-core work by the unit and precision that run it ("bf16", "fp16", "tf32",
and "fp32" for ``ieee`` dots, which Triton runs as FMAs on the CUDA cores); ``tf32x3`` dots execute three tf32
products each. The roofline model (reports/roofline.py) turns the mix into a compute floor time.

Not modelled: the exact per-pair diagonal loop the intra stage takes when a K slice decays faster than
``SAFE_SPAN`` inside one sub-block (data dependent, CUDA-core work only), and the extra pass over q and k when
``use_qk_l2norm_in_kernel`` is on (2·T·H·K·es more bytes moved).
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels.config import FwdConfig, Shape

G_BYTES = 4  # g (log-decay) is fp32 in practice whatever the input dtype (kernels/inputs.py, BASELINE.md)
GAMMA_BYTES = 4  # γ_C is written in fp32 by the intra stage
STATE_BYTES = 4  # initial and final states are fp32 [N, H, K, V]
STAGES = ("intra", "state")


@dataclass(frozen=True)
class Cost:
    flops_tc: float
    flops_cuda: float
    bytes_min: float
    bytes_moved: float
    # Executed tensor-core FLOPs per precision, e.g. (("tf32", 3.1e11),); empty means all of flops_tc in bf16.
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


def _dot_precision(solve: str) -> tuple[str, int]:
    """(unit, executed products per product) of the intra stage's solve/Y/U dots for ``IntraConfig.solve``."""
    if solve == "tf32":
        return "tf32", 1
    if solve == "tf32x3":
        return "tf32", 3  # Triton's 3xTF32: hi·hi + hi·lo + lo·hi, three tf32 MMAs
    if solve == "ieee":
        return "fp32", 1  # fp32 FMAs on the CUDA cores
    raise ValueError(f"intra.solve: expected 'tf32', 'tf32x3' or 'ieee', received {solve!r}")


def intra_cost(shape: Shape, config: FwdConfig) -> Cost:
    """The intra stage: one program per (chunk, head), two passes over K, one over V."""
    C, BC, BK, BV = config.chunk, config.intra.BC, config.intra.BK, config.intra.BV
    NB = C // BC
    es = element_size(shape.dtype)
    tokens = shape.B * shape.T  # every token row of every head is loaded (masked loads cost no bytes)
    rows = tokens * shape.H
    programs = num_chunks(shape, C) * shape.H
    Kp = _cdiv(shape.K, BK) * BK  # the K loops run whole BK slices; padded columns are masked but multiplied
    Vp = _cdiv(shape.V, BV) * BV

    # --- tensor cores, per program (all operands are fp32 in registers, so tl.dot runs them in tf32) ---
    tc_t = 2 * C * C * Kp  # T: dot([NB, BC, BK], [NB, BK, C]) per K slice = NB·BC·C·BK FMAs = C·C·BK
    tc_aqk = 2 * C * C * Kp  # A_qk: the same batched product with q in place of b ⊙ k
    # Solve: for NB > 1, dot(D, L), then LOG2_NB − 1 rounds of two dots (P², M(I + P)), then dot(M, D):
    # 2 + 2·(log2 NB − 1) = 2·log2 NB products of C×C×C. NB = 1 has no dots (the diagonal solve is elementwise).
    log2_nb = NB.bit_length() - 1
    tc_solve = 2 * log2_nb * (2 * C * C * C)
    tc_y = 2 * C * C * Kp  # Y = A Ē, one [C, C] × [C, BK] dot per K slice
    tc_u = 2 * C * C * Vp  # U = A Z, one [C, C] × [C, BV] dot per V slice
    flops_tc = programs * (tc_t + tc_aqk + tc_solve + tc_y + tc_u)
    unit, passes = _dot_precision(config.intra.solve)
    mix: dict[str, float] = {"tf32": float(programs * (tc_t + tc_aqk))}  # T and A_qk use tl.dot's default (tf32)
    mix[unit] = mix.get(unit, 0.0) + programs * passes * (tc_solve + tc_y + tc_u)

    # --- CUDA cores, rough: ~1 FLOP per elementwise op, per program ---
    cuda_pass1 = C * Kp * (8 + 4 * NB)  # cumsum, k·r, q·r, b⊙k, exp(G−ref), two row scalings; the [NB, C, BK]
    #                                    column factor: a subtract, a clamp, an exp and a multiply per element
    cuda_acc = 4 * C * C * (Kp // BK)  # two masked accumulations of [NB, BC, C] per K slice
    cuda_solve = 4 * C * BC * BC + 10 * C * C  # forward substitution (BC steps over [NB, BC, BC]) + C×C masks
    cuda_pass2 = 8 * C * Kp  # cumsum, exp(G), γ⊙b⊙k, γ⊙q, exp(G_C − G)⊙k
    cuda_u = C * Vp  # Z = w ⊙ v
    flops_cuda = programs * (cuda_pass1 + cuda_acc + cuda_solve + cuda_pass2 + cuda_u)

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
    bytes_moved = bytes_min + reads_k  # the second K pass re-reads q, k, b, g (from L2 when the chunk fits)
    return Cost(float(flops_tc), float(flops_cuda), float(bytes_min), float(bytes_moved), tuple(sorted(mix.items())))


def state_cost(shape: Shape, config: FwdConfig, *, initial_state: bool = True, final_state: bool = False) -> Cost:
    """The state stage: one program per (sequence, head, V tile), walking the chunks in order.

    ``initial_state``/``final_state``: whether the call reads h0 and writes the final state (fp32 [N, H, K, V]);
    the defaults match how the tuner times the op (kernels.inputs.make_inputs gives an initial state).
    """
    C, BV = config.chunk, config.state.BV
    es = element_size(shape.dtype)
    rows = shape.B * shape.T * shape.H
    chunks = num_chunks(shape, C) * shape.H  # (chunk, head) steps over all sequences
    KP = max(16, _next_pow2(shape.K))  # the state tile is [KP, BV] with KP the padded K (kernels/state.py)
    n_v = _cdiv(shape.V, BV)
    Vp = n_v * BV

    # --- tensor cores, per (chunk, head), summed over the V tiles ---
    tc_ys = 2 * C * KP * Vp  # Y S0: [C, KP] × [KP, BV] per tile
    tc_qs = 2 * C * KP * Vp  # Q_γ S0
    tc_kr = 2 * KP * C * Vp  # K_tailᵀ R: [KP, C] × [C, BV]
    tc_ar = 2 * C * C * Vp  # A_qk R: [C, C] × [C, BV]
    flops_tc = chunks * (tc_ys + tc_qs + tc_kr + tc_ar)
    if config.state.precision == "input":
        unit = "tf32" if shape.dtype == "fp32" else shape.dtype  # fp32 operands go through tl.dot as tf32
    elif config.state.precision == "tf32":
        unit = "tf32"
    else:
        raise ValueError(f"state.precision: expected 'input' or 'tf32', received {config.state.precision!r}")

    # --- CUDA cores, rough: the decay Diag(γ_C) S and state add on [KP, Vp]; R = U − ·, O = · + · on [C, Vp] ---
    flops_cuda = chunks * (2 * KP * Vp + 2 * C * Vp)

    # --- bytes ---
    per_tile = rows * (3 * shape.K + C) * es + chunks * shape.K * GAMMA_BYTES  # Y, Q_γ, K_tail, A_qk, γ_C
    u_o = rows * shape.V * 2 * es  # U read and O written, each V column by exactly one tile
    states = num_sequences(shape) * shape.H * shape.K * shape.V * STATE_BYTES
    state_io = states * (int(initial_state) + int(final_state))
    bytes_min = per_tile + u_o + state_io
    bytes_moved = per_tile * n_v + u_o + state_io  # every V tile re-reads the K-wide and C-wide inputs
    return Cost(float(flops_tc), float(flops_cuda), float(bytes_min), float(bytes_moved), ((unit, float(flops_tc)),))


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
