"""The decode op's :class:`~gdn2_tune.kernels.spec.KernelSpec` (table keys ``decode/...``), and the choice between the
recurrent kernel and the chunked one (table keys ``algorithm/...``).

``decode``: ``fused_recurrent_gdn2`` (kernels/decode.py) as serving runs it, a state pool updated in place. Its
config, space, constraints and default come from kernels/decode_config.py, its float64 reference from
kernels/decode_reference.py. A table shape ``Shape(B, T, H, K, V, dtype)`` is B sequences of T tokens each
(decode_config.table_shape), so the dispatcher's buckets are the batch (B·H) and T of a step: a config per batch
bucket and T bucket.

``algorithm``: which op is faster for a whole call at a shape, ``"recurrent"`` (``fused_recurrent_gdn2``) or
``"chunk"`` (``chunk_gdn2``). Its space is that one choice; tuning it (``tune.py tune --op algorithm``) times both
at each suite shape, T ∈ {1, 2, ..., 64}, and the table's entries say, per batch and T bucket, which one won: the T
at which the chunked op overtakes is where the entries switch (:func:`crossover_t`). Without a table the built-in
default applies, :data:`DEFAULT_CROSSOVER_T`. ``gdn2_tune.ops.auto_gdn2`` asks the dispatcher for this choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gdn2_tune.kernels.buffers import is_poisoned
from gdn2_tune.kernels.checks import DTYPE_NAMES, check_token_inputs
from gdn2_tune.kernels.config import Param, Shape
from gdn2_tune.kernels.cost import G_BYTES, Cost, element_size
from gdn2_tune.kernels.decode import FINAL_AT_SLOT, FINAL_NONE, decode_fwd, fused_recurrent_gdn2
from gdn2_tune.kernels.decode_config import (
    DECODE_CONSTRAINTS,
    DECODE_SPACE,
    STATE_DTYPES,
    TABLE_STATE_DTYPE,
    DecodeConfig,
    cdiv,
    decode_shape,
    default_decode_config,
)
from gdn2_tune.kernels.decode_reference import recurrence
from gdn2_tune.kernels.fwd_spec import FWD
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.spec import DeviceLimits, KernelSpec, register

DECODE_OP = "decode"
ALGORITHM_OP = "algorithm"
_HERE = Path(__file__).resolve().parent
# The slot-index dtypes a timed step is launched with, one launch each on a pool of its own, in this order: serving
# stacks pass int32 indices (vLLM's state indices), torch's default is int64 (torch.arange, randperm), and the kernel
# is compiled per dtype. Their best configs differ: at K=V=256, B=8 on an H200 (2026-12-01,
# benchmarks/exp_decode_protocol.py) the configs with static dims ran ~3% slower with int64 indices and the masked
# ones did not, so the entry the tuner chose with int32 alone (BV32-w4-static-r128) was 0.7-1.4% slower than the
# baseline with int64 indices, while BV32-w4-r128 was faster with both (benchmarks/exp_decode_b8.py --index-dtype).
# An entry is the best config for the two launches together; its timing is theirs (decode_cost counts both).
TIMED_INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
ACCEPTED_BYTES = 4  # the accepted-draft counts of a speculative step are int32, as serving passes them
STATE_BYTES = STATE_DTYPES[TABLE_STATE_DTYPE].itemsize  # what is tuned: the default fp32 state pool

# T = 1 at every batch of issue 13's speed targets, for both head dims, and one speculative step (T = 4 draft
# tokens verified at once, a state stored per token). K = V = 256 at B = 8, 32 and 512 joined in session 9: served
# by the nearest bucket before, they ran level with the baseline at B = 8 (within 1-2% either way).
DECODE_SUITE: tuple[Shape, ...] = (
    *(Shape(B, 1, 16, K, K, "bf16") for K in (128, 256) for B in (1, 8, 32, 128, 512)),
    Shape(32, 4, 16, 128, 128, "bf16"),
)
# The interpreter runs every program in Python: two sequences, two heads, a V of two 8-wide tiles.
DECODE_INTERPRET_SHAPE = Shape(2, 1, 2, 16, 16, "fp32")
# fp32: one step rounds a few times at 2^-24; the pool is fp32 whatever the inputs. bf16/fp16: the output is stored
# in the input dtype (2^-9 / 2^-12 relative per element).
DECODE_GATE_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 2e-3}


# A serving pool holds more slots than one step touches (a server sizes it for its largest batch), so a step's
# slots are scattered over a larger pool: the timed pool has up to POOL_FACTOR times the slots a step touches, as
# many as fit in POOL_BYTES (each index dtype's pool). With exactly the touched slots the tuner ranked the K=V=256,
# B=8 configs differently from a pool of 8 times that (benchmarks/exp_decode_protocol.py, H200, 2026-12-01: with
# int32 indices BV32-w4-static-r128 was 0.9% ahead of BV32-w4-r128 without static dims on the small pool, level
# with it, 0.2%, on the large one), and the baseline comparisons (benchmarks/exp_decode_b8.py) use a large pool.
POOL_FACTOR = 8
POOL_BYTES = 2 << 30


def touched_slots(shape: Shape) -> int:
    """Slots a timed step touches: one per sequence at T = 1, one per token of a speculative step (T > 1)."""
    return shape.B * max(1, shape.T)


def pool_slots(shape: Shape) -> int:
    """Slots of the timed pool: :func:`touched_slots` times up to POOL_FACTOR, within POOL_BYTES."""
    touched = touched_slots(shape)
    step_bytes = touched * shape.H * shape.K * shape.V * STATE_BYTES
    return touched * max(1, min(POOL_FACTOR, POOL_BYTES // step_bytes))


def _specialization(n: int) -> tuple[bool, ...]:
    # What Triton keys a compiled kernel on for a runtime int: divisibility by 16 and equality to 1.
    return n % 16 == 0, n == 1


def decode_gate_shape(shape: Shape) -> Shape:
    """The fewest sequences whose pool size specializes the kernel as ``shape``'s does (the pool size is the only
    runtime int that changes with the batch), so that the gate compiles what is timed and the float64 reference
    stays small. Same T, H, K, V and dtype."""
    want = _specialization(pool_slots(shape))
    B = next(n for n in range(1, shape.B + 1) if _specialization(pool_slots(dataclasses.replace(shape, B=n))) == want)
    return dataclasses.replace(shape, B=B)


class DecodeRun:
    """A decode step at one shape, as serving runs it: ``out`` given, the pool updated in place (kernels.spec.OpRun),
    launched once per :data:`TIMED_INDEX_DTYPES` entry with indices of that dtype on a pool of its own (the timed
    "step" is those launches together).

    T = 1: 1-D slot indices, one slot per sequence. T > 1: a speculative step, 2-D indices ``[B, T]`` (the state
    after token t goes to slot ``[n, t]``) and ``num_accepted_tokens`` = 1 (each sequence starts from slot
    ``[n, 0]``). The step's slots are a random subset of a larger pool (:func:`pool_slots`), so the reads and
    writes are scattered, as in a serving pool. Both pools start equal and see the same inputs, so both launches
    write the same ``out``; ``pool`` is the first's.

    Timing lets the pool evolve call after call as serving does: what the kernel does does not depend on the
    values, and with decay ≤ 1 and erase gates in [0, 1] the state stays bounded. Inside
    :func:`kernels.buffers.poisoned` (the tuner's gate and warm-up, the tests) the pool is first reset to its
    initial contents and ``out`` filled with NaN, so the results can be compared with :meth:`reference`.
    """

    def __init__(self, shape: Shape, device: str, *, seed: int = 0, strong_decay: bool = False) -> None:
        if shape.num_seqs is not None:
            raise ValueError(f"shape: expected a padded batch for the decode op (B sequences of T tokens), received "
                             f"the packed {shape.label()}; tune its padded equivalent")
        self.shape = shape
        self.inputs = make_inputs(shape, device, seed, strong_decay=strong_decay, initial_state=False)
        B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
        gen = torch.Generator().manual_seed(seed + 1)
        self.pool0 = torch.randn(pool_slots(shape), H, K, V, generator=gen).to(device)
        order = torch.randperm(pool_slots(shape), generator=gen)[: touched_slots(shape)]
        order = (order if T == 1 else order.view(B, T)).to(device)
        # (indices, pool) of each launch; the first's are the ones the reference checks
        self.launches = [(order.to(dt), self.pool0.clone()) for dt in TIMED_INDEX_DTYPES]
        self.indices, self.pool = self.launches[0]
        self.accepted = None if T == 1 else torch.ones(B, dtype=torch.int32, device=device)
        self.out = torch.empty(B, T, H, V, dtype=shape.torch_dtype, device=device)
        self.scale = K**-0.5

    def launch(self, cfg: DecodeConfig, i: int) -> None:
        """Launch ``i`` of a serving step (kernels.decode.decode_fwd): the index dtype and pool of ``launches[i]``."""
        indices, pool = self.launches[i]
        decode_fwd(
            *self.inputs.args(), self.out,
            scale=self.scale, initial_state=pool, final_state=pool,
            final_at=FINAL_AT_SLOT if self.accepted is None else FINAL_NONE,
            per_token_slots=self.accepted is not None, cu_seqlens=None, ssm_state_indices=indices,
            num_accepted_tokens=self.accepted, use_qk_l2norm=False, num_seqs=self.shape.B, cfg=cfg,
        )

    def step(self, cfg: DecodeConfig) -> None:
        """A serving step with each index dtype, on the prepared pools and buffers."""
        for i in range(len(self.launches)):
            self.launch(cfg, i)

    def timed_parts(self, cfg: DecodeConfig) -> list[Callable[[], object]]:
        """The tuner times each launch alone, L2 flushed before each (tuner.measure.Bench.sample), and sums them:
        launched back to back, the second would find L2 holding the first's state stores instead of cold."""
        return [lambda i=i: self.launch(cfg, i) for i in range(len(self.launches))]

    def forward(self, cfg: DecodeConfig) -> tuple[torch.Tensor, ...]:
        if is_poisoned():
            for _, pool in self.launches:
                pool.copy_(self.pool0)
            self.out.fill_(float("nan"))
        self.step(cfg)
        return self.out, self.pool

    def stage_fns(self, cfg: DecodeConfig) -> dict[str, Callable[[], object]]:
        return {"step": lambda: self.step(cfg)}

    def reference(self) -> tuple[torch.Tensor, ...]:
        """o and the whole pool after one step from the initial pool, in float64."""
        x = self.inputs
        idx = self.indices.to("cpu", torch.int64)
        start = idx if idx.dim() == 1 else idx[:, 0]
        pool0 = self.pool0.to("cpu", torch.float64)
        o, states = recurrence(*(t.cpu() for t in x.args()), pool0[start], scale=self.scale)
        pool = pool0.clone()
        if idx.dim() == 1:
            pool[idx] = states[:, -1]
        else:
            pool[idx.reshape(-1)] = states.reshape(-1, *states.shape[2:])
        return o, pool


def decode_default(shape: Shape, device: DeviceLimits) -> DecodeConfig:
    """The built-in config (fitted to an H200 sweep, kernels/decode_config.py); the same for every family."""
    return default_decode_config(decode_shape(shape))


def state_stores(shape: Shape) -> int:
    """States a timed step stores per sequence: one (T = 1), or one per token (a speculative step)."""
    return max(1, shape.T)


def step_cost(shape: Shape, BV: int, stores: int, index_bytes: int) -> Cost:
    """FLOPs and bytes of one launch over B sequences of T tokens that reads each sequence's state once and stores
    it ``stores`` times, its slot indices ``index_bytes`` each.

    Per token and head the kernel runs three K×V multiply-add passes on the CUDA cores, each 2·K·V FLOP: the read
    r = S̄ᵀ(b ⊙ k), the update S̄ + k uᵀ and the output Sᵀq. They are the work an ``ieee`` dot would do, so they are
    counted in ``flops_tc`` under the "fp32" unit (the CUDA-core FMA roof); the decay S ⊙ exp(g) (K·V multiplies)
    and the K exponentials are ``flops_cuda``. ``bytes_min``: every input read once, the output written once (both
    in the input dtype, g in fp32), the fp32 state read once and stored ``stores`` times, the slot indices (and
    the int32 accepted counts of a speculative step) read once. ``bytes_moved`` adds the K-wide inputs that every V
    tile's program reads again.
    """
    es = element_size(shape.dtype)
    rows = shape.B * shape.T * shape.H  # token-heads
    fma = rows * 3 * 2 * shape.K * shape.V
    elementwise = rows * (shape.K * shape.V + shape.K)
    k_wide = rows * shape.K * (3 * es + G_BYTES)  # q, k, b and g
    v_wide = rows * shape.V * 3 * es  # v and w read, o written
    state = shape.B * shape.H * shape.K * shape.V * STATE_BYTES * (1 + stores)
    indices = shape.B * (index_bytes * stores + (ACCEPTED_BYTES if stores > 1 else 0))
    bytes_min = float(k_wide + v_wide + state + indices)
    rereads = k_wide * (cdiv(shape.V, BV) - 1)
    return Cost(float(fma), float(elementwise), bytes_min, bytes_min + rereads, (("fp32", float(fma)),))


def timed_step_cost(shape: Shape, BV: int) -> Cost:
    """A timed step: one launch per :data:`TIMED_INDEX_DTYPES` entry."""
    costs = [step_cost(shape, BV, state_stores(shape), dt.itemsize) for dt in TIMED_INDEX_DTYPES]
    return sum(costs[1:], costs[0])


def decode_minimum_bytes(shape: Shape) -> float:
    """The state-traffic floor of a timed step (:func:`timed_step_cost`'s ``bytes_min``; no tile re-reads)."""
    return timed_step_cost(shape, shape.V).bytes_min


def decode_cost(shape: Shape, cfg: DecodeConfig) -> dict[str, Cost]:
    """The step as timed (its launches, one per index dtype), which is the total."""
    step = timed_step_cost(shape, cfg.BV)
    return {"step": step, "total": step}


DECODE = register(KernelSpec(
    name=DECODE_OP,
    config_type=DecodeConfig,
    space=DECODE_SPACE,
    constraints=DECODE_CONSTRAINTS,
    default=decode_default,
    stages=("step",),
    prepare=DecodeRun,
    cost=decode_cost,
    minimum_bytes=decode_minimum_bytes,
    gate_tolerance=DECODE_GATE_TOLERANCE,
    suite=DECODE_SUITE,
    interpret_shape=DECODE_INTERPRET_SHAPE,
    jit_files=(_HERE / "decode.py",),
    gate_shape=decode_gate_shape,
    output_names=("o", "pool"),
    # On an H200 (2026-11-30, session 9, `--gpus 1` on a 32-core host: 30 gate workers on one GPU, 2.8 GB each) the
    # GPU's 140 GB ran out at K = V = 256, B = 512 (a 2 GB state pool): every trial of that study failed its gate.
    max_gate_workers=8,
))


# ---------------------------------------------------------------------------------------------------------------
# The algorithm: recurrent or chunked, per batch and T bucket

ALGORITHMS = ("recurrent", "chunk")
# Below this many tokens per sequence the built-in choice is the recurrent kernel. Not a measured crossover: the
# only figures at hand are at T = 1 (H200, H=16, K=V=128; BENCHMARKS.md and issue 13), where chunk_gdn2 takes
# 47.6 µs at B=1 and 254.7 µs at B=128 against the recurrent kernel's 7.4 µs and 80.8 µs. The chunked op's cost
# barely grows until T fills a chunk (≥ 32 tokens); the recurrent kernel's grows with T (a token loop). 16 keeps
# the recurrent kernel where it would have to slow down over 3x from T = 1 to lose, and hands longer steps to the
# chunked op; a table (`tune.py tune --op algorithm`) replaces it with measured choices.
DEFAULT_CROSSOVER_T = 16
ALGORITHM_SUITE: tuple[Shape, ...] = tuple(
    Shape(B, T, 16, 128, 128, "bf16") for B in (1, 32, 128) for T in (1, 2, 4, 8, 16, 32, 64)
)
ALGORITHM_INTERPRET_SHAPE = Shape(1, 4, 1, 16, 16, "fp32")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Which op runs a call: ``"recurrent"`` (``fused_recurrent_gdn2``) or ``"chunk"`` (``chunk_gdn2``)."""

    algorithm: str = "recurrent"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AlgorithmConfig:
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a dict, received {type(data).__name__}")
        if set(data) != {"algorithm"}:
            raise ValueError(f"config: expected keys ['algorithm'], received {sorted(data)}")
        return AlgorithmConfig(**data)

    def flat(self) -> dict[str, Any]:
        return self.to_dict()

    @staticmethod
    def from_flat(params: dict[str, Any]) -> AlgorithmConfig:
        return AlgorithmConfig.from_dict(dict(params))

    def label(self) -> str:
        return self.algorithm


ALGORITHM_SPACE = (Param("algorithm", ALGORITHMS, "the recurrent kernel (a token loop) or the chunked op"),)


def known_algorithm(cfg: AlgorithmConfig, shape: Shape, device: DeviceLimits) -> str | None:
    if cfg.algorithm not in ALGORITHMS:
        return f"algorithm={cfg.algorithm!r} is not one of {list(ALGORITHMS)}"
    return None


def tokens_per_sequence(shape: Shape) -> float:
    return shape.T / shape.num_seqs if shape.num_seqs else float(shape.T)


def algorithm_default(shape: Shape, device: DeviceLimits) -> AlgorithmConfig:
    """The recurrent kernel below :data:`DEFAULT_CROSSOVER_T` tokens per sequence, the chunked op from there."""
    return AlgorithmConfig("recurrent" if tokens_per_sequence(shape) < DEFAULT_CROSSOVER_T else "chunk")


def algorithm_shape(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None) -> Shape:
    """The table shape of a call, as the forward keys it: ``Shape(B, T, H, K, V, dtype)``, packed batches with
    ``num_seqs`` (the dispatcher compares their tokens per sequence with a padded batch's T)."""
    B, T, H, K = q.shape
    n = None if cu_seqlens is None else cu_seqlens.numel() - 1
    return Shape(B, T, H, K, v.shape[-1], DTYPE_NAMES[q.dtype], n)


def choose_algorithm(
    q: object, k: object, v: object, g: object, b: object, w: object,
    *,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    algorithm: str,
    choose: Callable[[Shape], AlgorithmConfig] | None,
) -> str:
    """``"recurrent"`` or ``"chunk"`` for a call: ``algorithm`` when it names one, else (``"auto"``) ``choose`` of
    the call's table shape (the dispatcher: gdn2_tune.ops.auto_gdn2), or the built-in default without one. Inputs
    that require grad always take the chunked op: the recurrent kernel has no backward."""
    if algorithm not in (*ALGORITHMS, "auto"):
        raise ValueError(f"algorithm: expected one of {[*ALGORITHMS, 'auto']}, received {algorithm!r}")
    check_token_inputs(q, k, v, g, b, w)
    assert isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor)
    tensors = (q, k, v, g, b, w, initial_state)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors):
        if algorithm == "recurrent":
            raise NotImplementedError("algorithm: 'recurrent' is inference only (no backward); use 'chunk' or "
                                      "'auto' for inputs that require grad")
        return "chunk"
    if algorithm != "auto":
        return algorithm
    shape = algorithm_shape(q, v, cu_seqlens)
    chosen = choose(shape) if choose is not None else ALGORITHM.default_config(shape)
    return chosen.algorithm


def crossover_t(winners: Mapping[int, str]) -> int | None:
    """The T from which the chunked op wins at every measured T (``winners``: T -> algorithm, one batch bucket's
    table entries); None when the recurrent kernel wins at the largest T measured."""
    crossover = None
    for T in sorted(winners, reverse=True):
        if winners[T] != "chunk":
            break
        crossover = T
    return crossover


class AlgorithmRun:
    """Both ops on the same dense (or packed) inputs, from an initial state to a fresh final state, each with its
    own built-in config at the shape (kernels/ never reads the tables): whichever ``cfg`` names runs."""

    def __init__(self, shape: Shape, device: str, *, seed: int = 0, strong_decay: bool = False) -> None:
        self.shape = shape
        self.chunk = FWD.prepare(shape, device, seed=seed, strong_decay=strong_decay)
        # The same inputs as the chunk run's (same shape and seed), for the recurrent kernel.
        self.inputs = make_inputs(shape, device, seed, strong_decay=strong_decay)
        self.device = device

    def forward(self, cfg: AlgorithmConfig) -> tuple[torch.Tensor, ...]:
        if cfg.algorithm == "chunk":
            return self.chunk.forward(FWD.default_config(self.shape))
        x = self.inputs
        o, ht = fused_recurrent_gdn2(
            *x.args(), initial_state=x.initial_state, output_final_state=True, cu_seqlens=x.cu_seqlens,
            config=default_decode_config(decode_shape(self.shape)),
        )
        assert ht is not None
        return o, ht

    def stage_fns(self, cfg: AlgorithmConfig) -> dict[str, Callable[[], object]]:
        return {"call": lambda: self.forward(cfg)}

    def reference(self) -> tuple[torch.Tensor, ...]:
        return self.chunk.reference()


def algorithm_cost(shape: Shape, cfg: AlgorithmConfig) -> dict[str, Cost]:
    """The chosen op's total as timed: the forward's (kernels/fwd_spec.py), or the recurrent kernel's with one
    state read and one final state stored per sequence (a packed batch costed as its padded equivalent)."""
    if cfg.algorithm == "chunk":
        total = FWD.cost(shape, FWD.default_config(shape))["total"]
    else:
        n = shape.num_seqs or shape.B
        padded = Shape(n, max(1, round(tokens_per_sequence(shape))), shape.H, shape.K, shape.V, shape.dtype)
        total = step_cost(padded, default_decode_config(decode_shape(shape)).BV, 1, 0)  # no slot indices
    return {"call": total, "total": total}


def algorithm_minimum_bytes(shape: Shape) -> float:
    return FWD.minimum_bytes(shape)


ALGORITHM = register(KernelSpec(
    name=ALGORITHM_OP,
    config_type=AlgorithmConfig,
    space=ALGORITHM_SPACE,
    constraints=(known_algorithm,),
    default=algorithm_default,
    stages=("call",),
    prepare=AlgorithmRun,
    cost=algorithm_cost,
    minimum_bytes=algorithm_minimum_bytes,
    gate_tolerance={"fp32": 2e-3, "bf16": 1e-2, "fp16": 1e-2},  # the chunked op's (kernels/fwd_spec.py)
    suite=ALGORITHM_SUITE,
    interpret_shape=ALGORITHM_INTERPRET_SHAPE,
    jit_files=(_HERE / "decode.py", *FWD.jit_files),
    gate_shape=FWD.gate_shape,
    output_names=("o", "state"),
))
