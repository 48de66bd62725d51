"""chunk_gdn2 against the float64 recurrence: chunk lengths, awkward sizes, states, packed batches, dtypes, strong
decay, tied gates (KDA, Gated DeltaNet) and a sample of the tunable space.

Every test draws fresh random inputs (its own seed) and the launchers allocate every output filled with NaN, so an
element a kernel fails to write fails the comparison. On the CPU the kernels run in the Triton interpreter.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, INTERPRETED

from gdn2_tune.kernels import chunk_gdn2, gdn2_reference
from gdn2_tune.kernels.chunk import forward_launch
from gdn2_tune.kernels.config import (
    DEFAULT_CONFIG,
    SPACE,
    FwdConfig,
    IntraConfig,
    Shape,
    StateConfig,
    default_config,
    fit_to_shape,
    infeasibility,
    state_parts_fit,
    state_row_parts,
)
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.intra import round_tf32
from gdn2_tune.kernels.reference import rel_err
from gdn2_tune.kernels.varlen import chunk_index

# Relative Frobenius error budgets, from the arithmetic each run does:
# - fp32 in the interpreter: every product is exact fp32 (numpy), so errors are a few ulps times the growth of the
#   solve; 1e-4 leaves two orders of magnitude over the ~1e-6 seen.
# - fp32 compiled: tf32 dots (10-bit mantissa); the baseline shows 1.4e-3 on the same problem (BASELINE.md).
# - bf16/fp16: Y, U, Q_γ, K_tail, A_qk, the state operand and R are each rounded to 16 bits once (2^-8 relative
#   for bf16). The interpreter truncates instead of rounding (a one-sided error of up to 2^-7 that adds up
#   coherently), so errors there sit near 1e-2, twice the compiled ones; 2.5e-2 bounds ~3 coherent roundings.
TOL = {
    ("fp32", True): 1e-4,
    ("fp32", False): 2e-3,
    ("bf16", True): 2.5e-2,
    ("bf16", False): 1e-2,
    ("fp16", True): 1e-2,
    ("fp16", False): 5e-3,
}
# fp32 with precision "tf32rn" (the fp32 default) in the interpreter: the dots stay exact but the kernels round
# A_qk's two factors, Z, Q_γ, the A_qk tile, K_tail and R to nearest TF32, each a relative error of at most
# u = 2^-11 and unbiased, so the errors add in quadrature: an output term passes through at most six roundings
# (Z -> U -> R; A_qk's factors, then its tile), sqrt(6) u / sqrt(3) ≈ 1.4 u rms. 2u; the tests below see at most
# 1.2 u (5.7e-4, the reset-channel test), most 0.75-0.85 u.
# Compiled, the other dots truncate as with "tf32" (TOL covers that).
TF32RN_TOL = 2**-10


def tolerance(shape: Shape, cfg: FwdConfig | None = None) -> float:
    """The error budget of a run at ``shape`` with ``cfg`` (None: the built-in default the op falls back to)."""
    cfg = cfg or default_config(shape)
    if INTERPRETED and shape.dtype == "fp32" and "tf32rn" in (cfg.intra.precision, cfg.state.precision):
        return TF32RN_TOL
    return TOL[(shape.dtype, INTERPRETED)]


def config_for(shape: Shape, chunk: int | None = None, state: dict | None = None, **intra: int) -> FwdConfig:
    cfg = default_config(shape)
    if chunk is not None:
        cfg = dataclasses.replace(cfg, chunk=chunk, intra=dataclasses.replace(cfg.intra, BC=min(cfg.intra.BC, chunk)))
    if intra:
        cfg = dataclasses.replace(cfg, intra=dataclasses.replace(cfg.intra, **intra))
    if state:
        cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, **state))
    reason = infeasibility(cfg, shape)
    assert reason is None, reason
    return cfg


def check(shape: Shape, seed: int, cfg: FwdConfig | None = None, *, strong_decay: bool = False,
          initial_state: bool = True, l2norm: bool = False) -> None:
    inp = make_inputs(shape, DEVICE, seed, strong_decay=strong_decay, initial_state=initial_state)
    o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True,
                      cu_seqlens=inp.cu_seqlens, use_qk_l2norm_in_kernel=l2norm, config=cfg)
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, cu_seqlens=inp.cu_seqlens,
                                  use_qk_l2norm_in_kernel=l2norm)
    assert o.dtype == inp.q.dtype and o.shape == inp.v.shape
    assert s.dtype == torch.float32 and s.shape == ref_s.shape
    tol = tolerance(shape, cfg)
    err_o, err_s = rel_err(o, ref_o), rel_err(s, ref_s)
    assert err_o < tol and err_s < tol, f"o {err_o:.2e}, state {err_s:.2e} (budget {tol:.0e})"


CHUNKS = [
    pytest.param(Shape(2, 100, 2, 32, 32, "fp32"), 32, id="B2-T100-H2-K32-V32-C32-fp32"),
    pytest.param(Shape(2, 100, 2, 32, 32, "fp32"), 64, id="B2-T100-H2-K32-V32-C64-fp32"),
    pytest.param(Shape(1, 150, 2, 32, 32, "fp32"), 128, id="B1-T150-H2-K32-V32-C128-fp32"),
    pytest.param(Shape(1, 150, 2, 64, 64, "bf16"), 128, id="B1-T150-H2-K64-V64-C128-bf16"),
    pytest.param(Shape(2, 70, 3, 64, 64, "bf16"), 32, id="B2-T70-H3-K64-V64-C32-bf16"),
    pytest.param(Shape(2, 70, 3, 64, 64, "bf16"), 64, id="B2-T70-H3-K64-V64-C64-bf16"),
]


@pytest.mark.parametrize(("shape", "chunk"), CHUNKS)
def test_every_chunk_length(shape: Shape, chunk: int) -> None:
    # The default's tiles are too big for long chunks (register and shared-memory budgets in kernels/config.py).
    tiles: dict = {"BK": 32, "num_warps": 4} if chunk == 64 else {}
    state = None
    if chunk == 128:
        tiles = {"BC": 32, "BK": 16, "num_warps": 8}
        state = {"BV": 32, "num_stages": 1 if shape.dtype == "fp32" else 2}
    check(shape, seed=chunk, cfg=config_for(shape, chunk, state, **tiles))


@pytest.mark.parametrize(("shape", "chunk"), CHUNKS)
def test_split_output_at_every_chunk_length(shape: Shape, chunk: int) -> None:
    tiles: dict = {"BK": 32, "num_warps": 4} if chunk == 64 else {}
    state: dict = {"output": "split", "BV": 16}
    if chunk == 128:
        tiles = {"BC": 32, "BK": 16, "num_warps": 8}
        state["num_stages"] = 1 if shape.dtype == "fp32" else 2
    check(shape, seed=chunk + 1, cfg=config_for(shape, chunk, state, **tiles))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_split_output_equals_fused(dtype: str) -> None:
    # The split pass stores the very S0 and R the fused one multiplies, so only the dot tiling may differ.
    lengths = [45, 0, 70, 13]
    shape = Shape(1, sum(lengths), 2, 48, 40, dtype, num_seqs=len(lengths))
    inp = make_inputs(shape, DEVICE, seed=4)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(DEVICE)
    fused = config_for(shape, state={"BV": 32})
    split = config_for(shape, state={"BV": 32, "output": "split"})
    o1, s1 = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True, cu_seqlens=cu,
                        config=fused)
    o2, s2 = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True, cu_seqlens=cu,
                        config=split)
    assert torch.equal(s1, s2)  # the recurrence itself is the same code
    tol = 0.0 if INTERPRETED else (1e-6 if dtype == "fp32" else 2**-8)
    assert rel_err(o2, o1.double()) <= tol


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(Shape(1, 1, 2, 32, 32, "fp32"), id="T1-single-token"),
        pytest.param(Shape(3, 33, 1, 32, 32, "fp32"), id="T33-one-past-a-chunk"),
        pytest.param(Shape(1, 95, 2, 48, 80, "fp32"), id="K48-V80-not-powers-of-two"),
        pytest.param(Shape(1, 60, 2, 96, 40, "bf16"), id="K96-V40-bf16"),
        pytest.param(Shape(2, 50, 2, 64, 32, "fp16"), id="K64-V32-fp16"),
        pytest.param(Shape(1, 40, 1, 16, 16, "fp32"), id="K16-V16-smallest-tiles"),
        pytest.param(Shape(1, 20, 1, 8, 24, "fp32"), id="K8-V24-below-the-smallest-tile"),
        pytest.param(Shape(1, 40, 1, 256, 256, "fp32"), id="K256-V256-largest"),
        pytest.param(Shape(1, 33, 1, 200, 130, "bf16"), id="K200-V130-bf16"),
    ],
)
def test_awkward_sizes_and_dtypes(shape: Shape) -> None:
    check(shape, seed=shape.T)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_strong_decay_never_overflows(dtype: str) -> None:
    # g uniform in [-10, 0]: exp(-G) would overflow fp32 inside one sub-block, so this takes the exact path.
    shape = Shape(2, 80, 2, 32, 32, dtype)
    check(shape, seed=11, strong_decay=True)


def test_strong_decay_at_every_sub_block_size() -> None:
    shape = Shape(1, 64, 1, 32, 32, "fp32")
    for bc in (16, 32, 64):
        check(shape, seed=bc, cfg=config_for(shape, 64, BC=bc, BK=32, num_warps=4), strong_decay=True)


def test_without_initial_state_and_with_l2norm() -> None:
    shape = Shape(2, 45, 2, 32, 32, "fp32")
    check(shape, seed=3, initial_state=False, l2norm=True)


@triton.jit
def _round_kernel(x, y, N: tl.constexpr):
    o_n = tl.arange(0, N)
    tl.store(y + o_n, round_tf32(tl.load(x + o_n)))


def _rna_tf32(x: torch.Tensor) -> torch.Tensor:
    """x to 11 significant bits (TF32), ties away from zero, in float64 arithmetic: x = m 2^e with 1/2 ≤ |m| < 1."""
    m, e = torch.frexp(x.double())
    return torch.ldexp(torch.sign(m) * torch.floor(m.abs() * 2**11 + 0.5), e - 11).float()


def test_round_tf32_rounds_to_nearest_ties_away() -> None:
    one = 1.0 + 2.0**-10  # the TF32 neighbour above 1
    special = [
        (0.0, 0.0), (-0.0, 0.0), (1.0, 1.0), (-3.5, -3.5), (one, one),
        (1.0 + 2.0**-11, one), (-(1.0 + 2.0**-11), -one),  # exactly halfway: away from zero (ties-to-even gives 1)
        (1.0 + 2.0**-11 - 2.0**-23, 1.0),  # one fp32 ulp below halfway: down (truncation's answer too)
        (1.0 + 2.0**-10 - 2.0**-23, one),  # one ulp below the neighbour: up (truncation gives 1)
        (2.0 - 2.0**-11, 2.0),  # halfway below 2: the carry moves the exponent
        (-(2.0**-100) * (1.0 + 3 * 2.0**-11), -(2.0**-100) * (1.0 + 2.0**-9)),
    ]
    gen = torch.Generator().manual_seed(0)
    scale = torch.pow(10.0, torch.empty(256 - len(special)).uniform_(-30.0, 30.0, generator=gen))
    rand = torch.randn(256 - len(special), generator=gen) * scale
    x = torch.cat([torch.tensor([a for a, _ in special]), rand]).to(DEVICE)
    y = torch.full_like(x, float("nan"))
    _round_kernel[(1,)](x, y, N=x.numel())
    y = y.cpu()
    assert torch.equal(y[: len(special)], torch.tensor([b for _, b in special]))
    assert torch.equal(y, _rna_tf32(x.cpu()))
    assert not (y.view(torch.int32) & 0x1FFF).any()  # the 13 bits TF32 drops are clear


# fp32 at precision "tf32rn" in both stages (the fp32 default) at a size no tile divides.
TF32RN = [
    pytest.param(Shape(2, 95, 2, 48, 80, "fp32"), False, id="B2-T95-K48-V80-decay"),
    pytest.param(Shape(2, 95, 2, 48, 80, "fp32"), True, id="B2-T95-K48-V80-strong-decay"),
]


@pytest.mark.parametrize(("shape", "strong"), TF32RN)
def test_tf32rn_forward(shape: Shape, strong: bool) -> None:
    cfg = config_for(shape, state={"precision": "tf32rn"}, precision="tf32rn")
    inp = make_inputs(shape, DEVICE, seed=95 + strong, strong_decay=strong)
    o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True, config=cfg)
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state)
    err_o, err_s = rel_err(o, ref_o), rel_err(s, ref_s)
    tol = tolerance(shape, cfg)
    assert err_o < tol and err_s < tol, f"o {err_o:.2e}, state {err_s:.2e} (budget {tol:.0e})"
    if INTERPRETED:
        # The interpreter's dots are exact (1e-6 here with tf32x3): an error at TF32's scale shows the rounding ran.
        assert err_o > 2**-11 / 8 and err_s > 2**-11 / 8, f"o {err_o:.2e}, state {err_s:.2e}: operands not rounded?"


# The sequence split (StateConfig.segment_chunks) at segment lengths below the tuned space's (1-2 chunks), so that a
# toy T has several segments, the last one partial. Launched through the forward's own launch path
# (kernels.chunk.forward_launch), which takes any config; chunk_gdn2 admits only the space's values.
SEGMENTS = [
    pytest.param(Shape(2, 150, 2, 48, 40, "fp32"), 2, {"BV": 16}, False, True, id="B2-T150-K48-V40-seg2-fp32"),
    pytest.param(Shape(1, 150, 2, 32, 32, "bf16"), 1, {"BV": 16}, True, False, id="T150-seg1-bf16-strong-no-h0"),
    pytest.param(Shape(1, 100, 1, 100, 60, "fp32"), 2, {"BV": 32}, True, True, id="K100-V60-seg2-strong"),
    pytest.param(Shape(1, 130, 2, 32, 48, "fp32"), 1, {"BV": 16, "output": "split"}, False, True,
                 id="T130-seg1-split-output"),
]


@pytest.mark.parametrize(("shape", "seg", "state", "strong", "h0"), SEGMENTS)
def test_sequence_split_state_pass(shape: Shape, seg: int, state: dict, strong: bool, h0: bool) -> None:
    inp = make_inputs(shape, DEVICE, seed=seg + 20, strong_decay=strong, initial_state=h0)
    cfg = default_config(shape)
    cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, segment_chunks=seg, **state))
    o, s = forward_launch(
        *inp.args(), scale=shape.K**-0.5, initial_state=inp.initial_state, output_final_state=True,
        cu_seqlens=None, use_qk_l2norm_in_kernel=False, config=cfg, num_seqs=shape.B,
    )()
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state)
    tol = tolerance(shape, cfg)
    err_o, err_s = rel_err(o, ref_o), rel_err(s, ref_s)
    assert err_o < tol and err_s < tol, f"o {err_o:.2e}, state {err_s:.2e} (budget {tol:.0e})"


# The state tile in two row parts (StateConfig.k_parts = 2): K = 48 as 32 + 16 rows, 96 as 64 + 32, 40 as 32 + 16
# (8 rows of padding), 64 as two halves; fused and split output, with and without h0, strong decay.
K_PARTS = [
    pytest.param(Shape(2, 70, 2, 48, 40, "fp32"), {"BV": 16}, False, True, id="B2-T70-K48-V40-k2-fp32"),
    pytest.param(Shape(1, 60, 2, 96, 40, "bf16"), {"BV": 32}, True, True, id="T60-K96-V40-k2-bf16-strong"),
    pytest.param(Shape(1, 50, 1, 40, 24, "fp32"), {"BV": 16, "output": "split"}, True, False,
                 id="T50-K40-V24-k2-split-strong-no-h0"),
    pytest.param(Shape(1, 40, 1, 64, 32, "bf16"), {"BV": 32}, False, True, id="T40-K64-V32-k2-halves-bf16"),
]


@pytest.mark.parametrize(("shape", "state", "strong", "h0"), K_PARTS)
def test_state_in_two_row_parts(shape: Shape, state: dict, strong: bool, h0: bool) -> None:
    cfg = config_for(shape, state={"k_parts": 2, **state})
    check(shape, seed=41 + shape.K, cfg=cfg, strong_decay=strong, initial_state=h0)


def test_state_row_parts_constraints() -> None:
    shape = Shape(1, 8192, 2, 96, 64, "bf16")
    parts = FwdConfig(state=StateConfig(k_parts=2))
    assert infeasibility(parts, shape) is None
    assert "segment_chunks" in infeasibility(FwdConfig(state=StateConfig(k_parts=2, segment_chunks=128)), shape)
    narrow = Shape(1, 64, 2, 16, 64, "bf16")
    assert "K > 16" in state_parts_fit(parts, narrow)
    assert fit_to_shape(parts, narrow).state.k_parts == 1
    assert [state_row_parts(k, 2) for k in (96, 100, 192, 256)] == [(64, 32), (64, 64), (128, 64), (128, 128)]


def test_sequence_split_constraints() -> None:
    dense = Shape(1, 65536, 4, 128, 128, "bf16")
    cfg = dataclasses.replace(DEFAULT_CONFIG, state=dataclasses.replace(DEFAULT_CONFIG.state, segment_chunks=128))
    assert infeasibility(cfg, dense) is None
    packed = Shape(1, 65536, 4, 128, 128, "bf16", num_seqs=3)
    assert "dense batches only" in (infeasibility(cfg, packed) or "")
    short = Shape(1, 4096, 4, 128, 128, "bf16")  # 128 chunks of 32: one segment
    assert "leaves one segment" in (infeasibility(cfg, short) or "")
    assert fit_to_shape(cfg, packed).state.segment_chunks == 0
    # A table entry written before the field existed reads as the plain pass, and the plain pass writes no new key.
    old = DEFAULT_CONFIG.to_dict()
    assert "segment_chunks" not in old["state"] and FwdConfig.from_dict(old) == DEFAULT_CONFIG
    assert FwdConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["state"]["segment_chunks"] == 128


def test_l2norm_in_a_packed_batch_with_strong_decay() -> None:
    check(Shape(1, 90, 2, 32, 32, "fp32", num_seqs=3), seed=13, strong_decay=True, l2norm=True)


def test_no_final_state_returns_none() -> None:
    inp = make_inputs(Shape(1, 20, 1, 32, 32, "fp32"), DEVICE, seed=4)
    o, s = chunk_gdn2(*inp.args())
    assert s is None and torch.isfinite(o).all()


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([45, 11, 48, 46], id="uneven"),
        pytest.param([1, 33, 1, 64], id="single-tokens-and-exact-chunks"),
        pytest.param([20, 0, 30], id="an-empty-sequence"),
    ],
)
def test_packed_sequences_reset_the_state(lengths: list[int]) -> None:
    shape = Shape(1, sum(lengths), 2, 32, 48, "fp32", num_seqs=len(lengths))
    inp = make_inputs(shape, DEVICE, seed=len(lengths))
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(DEVICE)
    o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True, cu_seqlens=cu)
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, cu_seqlens=cu)
    tol = tolerance(shape)
    assert rel_err(o, ref_o) < tol and rel_err(s, ref_s) < tol


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([45, 11, 48, 46], id="uneven"),
        pytest.param([1, 33, 1, 64], id="single-tokens-and-exact-chunks"),
        pytest.param([20, 0, 30, 0], id="empty-sequences-last-too"),
        pytest.param([32, 32], id="whole-chunks-only"),
    ],
)
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunk_index_enumerates_every_chunk_then_phantoms(lengths: list[int], chunk: int) -> None:
    cu = torch.tensor([0, *lengths]).cumsum(0)
    pairs, first, num_chunks = chunk_index(cu, chunk, sum(lengths))
    exact = [(n, c) for n, length in enumerate(lengths) for c in range(-(-length // chunk))]
    assert num_chunks == len(pairs) >= len(exact)
    assert [tuple(p) for p in pairs[: len(exact)].tolist()] == exact
    assert first.tolist() == [sum(1 for e in exact if e[0] < n) for n in range(len(lengths))]
    # Past the exact count: chunks that start at or after the end of their sequence, so every row is masked.
    for n, c in pairs[len(exact):].tolist():
        assert c * chunk >= lengths[n]


def test_packed_equals_separate_calls() -> None:
    lengths = [37, 20]
    shape = Shape(1, sum(lengths), 1, 32, 32, "fp32", num_seqs=2)
    inp = make_inputs(shape, DEVICE, seed=9)
    cu = torch.tensor([0, 37, 57], dtype=torch.int32, device=DEVICE)
    o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True, cu_seqlens=cu)
    for n, (a, z) in enumerate([(0, 37), (37, 57)]):
        part = [x[:, a:z] for x in inp.args()]
        o_n, s_n = chunk_gdn2(*part, initial_state=inp.initial_state[n : n + 1], output_final_state=True)
        assert rel_err(o[:, a:z], o_n.double()) < 1e-5
        assert rel_err(s[n : n + 1], s_n.double()) < 1e-5


def test_non_contiguous_inputs_match_contiguous() -> None:
    shape = Shape(2, 40, 3, 32, 32, "fp32")
    inp = make_inputs(shape, DEVICE, seed=12)
    # The same values laid out [B, H, T, D] and viewed as [B, T, H, D]: strided, not contiguous.
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inp.args()]
    assert not strided[0].is_contiguous()
    o1, s1 = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True)
    o2, s2 = chunk_gdn2(*strided, initial_state=inp.initial_state, output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)


def _delta_rule(q, k, v, alpha, beta, scale, h0):
    """Independent float64 KDA / Gated DeltaNet recurrence: S = (I − β k kᵀ) Diag(α) S + β k vᵀ, o = Sᵀ q·scale."""
    q, k, v, alpha, beta = (x.double().cpu() for x in (q, k, v, alpha, beta))
    B, T, H, _ = q.shape
    S = h0.double().cpu().clone()
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        S = alpha[:, t, :, :, None] * S
        kt = k[:, t]
        S = S - beta[:, t, :, None, None] * kt[..., None] * torch.einsum("bhk,bhkv->bhv", kt, S)[:, :, None, :]
        S = S + beta[:, t, :, None, None] * kt[..., None] * v[:, t, :, None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale)
    return o, S


@pytest.mark.parametrize("scalar_decay", [False, True], ids=["KDA-channel-decay", "GatedDeltaNet-scalar-decay"])
def test_tied_gates_reduce_to_kda_and_gated_deltanet(scalar_decay: bool) -> None:
    shape = Shape(2, 50, 2, 32, 32, "fp32")
    inp = make_inputs(shape, DEVICE, seed=21 + scalar_decay)
    B, T, H, K = inp.q.shape
    gen = torch.Generator().manual_seed(5)
    beta = torch.rand(B, T, H, generator=gen)
    g = inp.g[..., :1].expand_as(inp.g).contiguous() if scalar_decay else inp.g
    b = beta[..., None].expand(B, T, H, K).contiguous().to(DEVICE)
    w = beta[..., None].expand(B, T, H, shape.V).contiguous().to(DEVICE)
    o, s = chunk_gdn2(inp.q, inp.k, inp.v, g, b, w, initial_state=inp.initial_state, output_final_state=True)
    ref_o, ref_s = _delta_rule(inp.q, inp.k, inp.v, g.exp(), beta, K**-0.5, inp.initial_state)
    tol = tolerance(shape)
    assert rel_err(o, ref_o) < tol and rel_err(s, ref_s) < tol


def _random_configs(shape: Shape, count: int, seed: int) -> list[FwdConfig]:
    rng = random.Random(seed)
    out: list[FwdConfig] = []
    while len(out) < count:
        flat = {p.name: rng.choice(p.values) for p in SPACE}
        cfg = FwdConfig.from_flat(flat)
        if infeasibility(cfg, shape) is None and cfg not in out:
            out.append(cfg)
    return out


SAMPLE_SHAPE = Shape(1, 70, 2, 32, 32, "fp32")


@pytest.mark.parametrize("cfg", _random_configs(SAMPLE_SHAPE, 8, seed=2026), ids=lambda c: c.label())
def test_sampled_points_of_the_tunable_space(cfg: FwdConfig) -> None:
    check(SAMPLE_SHAPE, seed=hash(cfg.label()) % 1000, cfg=cfg, strong_decay=cfg.intra.BC == 16)


def test_explicit_config_is_used_and_checked() -> None:
    shape = Shape(1, 40, 1, 32, 32, "fp32")
    inp = make_inputs(shape, DEVICE, seed=1)
    bad = FwdConfig(chunk=32, intra=IntraConfig(BC=64), state=StateConfig())
    with pytest.raises(ValueError, match=r"config: .*intra.BC=64 must divide chunk=32"):
        chunk_gdn2(*inp.args(), config=bad)
    with pytest.raises(TypeError, match="config: expected a kernels.FwdConfig"):
        chunk_gdn2(*inp.args(), config={"chunk": 32})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("strong", [False, True], ids=["decay", "strong-decay"])
def test_gpu_accuracy_no_worse_than_the_baseline(dtype: str, strong: bool) -> None:
    # BASELINE.md: fla's chunk_gdn2 at B=2, T=2048, H=4, K=V=128 with a random initial state. fp32 runs the
    # default's tf32rn intra and TF32 state dots (kernels.config.default_config): 8.8e-4 (8.0e-4 under strong decay)
    # on an H200, 2026-11-30 (benchmarks/exp_fwd_issue14.py, seed 3); plain tf32 gave 1.74e-3, over the bar.
    baseline = {("fp32", False): 1.4e-3, ("bf16", False): 3.8e-3, ("fp32", True): 1.1e-3, ("bf16", True): 3.2e-3}
    shape = Shape(2, 2048, 4, 128, 128, dtype)
    inp = make_inputs(shape, "cuda", seed=7, strong_decay=strong)
    with torch.no_grad():
        o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True)
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, device="cuda")
    assert rel_err(o, ref_o) <= baseline[(dtype, strong)]
    assert rel_err(s, ref_s) <= baseline[(dtype, strong)]


@pytest.mark.gpu
def test_gpu_long_sequence_stays_finite_and_accurate() -> None:
    shape = Shape(1, 32768, 2, 128, 128, "bf16")
    inp = make_inputs(shape, "cuda", seed=8)
    with torch.no_grad():
        o, s = chunk_gdn2(*inp.args(), initial_state=inp.initial_state, output_final_state=True)
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, device="cuda")
    assert rel_err(o, ref_o) < TOL[("bf16", False)] and rel_err(s, ref_s) < TOL[("bf16", False)]


# ---------------------------------------------------------------------------------------------------------------
# Gates at the edge of the range: g = -inf forgets a channel exactly (decay 0), as do finite g far below fp32's
# exp range; the other channels and tokens keep their accuracy.

def _tiles(chunk: int, dtype: str) -> tuple[dict, dict | None]:
    if chunk == 128:
        return {"BC": 32, "BK": 16, "num_warps": 8}, {"BV": 32, "num_stages": 1 if dtype == "fp32" else 2}
    return ({"BK": 32, "num_warps": 4} if chunk == 64 else {}), None


def _with_resets(g: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """g with a random ``fraction`` of its entries replaced by -inf and by finite values below the exp range."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(g.shape, generator=gen).to(g.device)
    huge = torch.tensor([-float("inf"), -3.0e38, -1.0e30, -1.0e4, -200.0, -104.0], device=g.device)
    pick = huge[torch.randint(len(huge), g.shape, generator=gen).to(g.device)]
    return torch.where(u < fraction, pick, g)


@pytest.mark.parametrize("chunk", [32, 64, 128])
@pytest.mark.parametrize("fraction", [0.03, 0.3], ids=["few-resets", "many-resets"])
def test_minus_inf_gates_are_exact_at_every_chunk_length(chunk: int, fraction: float) -> None:
    shape = Shape(1, 150, 2, 32, 32, "fp32", num_seqs=2)
    inp = make_inputs(shape, DEVICE, seed=chunk, strong_decay=True)
    g = _with_resets(inp.g, fraction, seed=chunk)
    assert torch.isinf(g).any()
    tiles, state = _tiles(chunk, "fp32")
    cfg = config_for(shape, chunk, state, **tiles)
    args = (inp.q, inp.k, inp.v, g, inp.b, inp.w)
    o, s = chunk_gdn2(*args, initial_state=inp.initial_state, output_final_state=True, cu_seqlens=inp.cu_seqlens,
                      config=cfg)
    ref_o, ref_s = gdn2_reference(*args, initial_state=inp.initial_state, cu_seqlens=inp.cu_seqlens)
    tol = tolerance(shape, cfg)
    assert rel_err(o, ref_o) < tol and rel_err(s, ref_s) < tol


def test_minus_inf_gates_in_bf16() -> None:
    shape = Shape(2, 70, 2, 64, 64, "bf16")
    inp = make_inputs(shape, DEVICE, seed=31, strong_decay=True)
    g = _with_resets(inp.g, 0.1, seed=31).to(torch.bfloat16)  # g may come in any float dtype
    args = (inp.q, inp.k, inp.v, g, inp.b, inp.w)
    o, s = chunk_gdn2(*args, initial_state=inp.initial_state, output_final_state=True)
    ref_o, ref_s = gdn2_reference(*args, initial_state=inp.initial_state)
    tol = TOL[("bf16", INTERPRETED)]
    assert rel_err(o, ref_o) < tol and rel_err(s, ref_s) < tol


def test_a_reset_channel_forgets_only_itself() -> None:
    """-inf at every token of channel 0 and a full reset (every channel) at token 40: channel 0 of the final state
    holds only the last token's write, every other channel stays accurate, and the output from token 40 on equals
    a fresh call started there without an initial state."""
    shape = Shape(1, 90, 1, 32, 32, "fp32")
    inp = make_inputs(shape, DEVICE, seed=41)
    g = inp.g.clone()
    g[..., 0] = -float("inf")
    g[:, 40] = -float("inf")
    args = (inp.q, inp.k, inp.v, g, inp.b, inp.w)
    o, s = chunk_gdn2(*args, initial_state=inp.initial_state, output_final_state=True)
    ref_o, ref_s = gdn2_reference(*args, initial_state=inp.initial_state)
    tol = tolerance(shape)
    assert rel_err(o, ref_o) < tol
    assert rel_err(s[..., 1:, :], ref_s[..., 1:, :]) < tol  # the other channels, on their own scale
    # Channel 0 after the last step: S̄ row 0 is 0, so S_T[0] = k_T0 (w_T v_T − r_T) with r_T from the other rows.
    assert rel_err(s[..., 0, :], ref_s[..., 0, :]) < tol
    o_tail, _ = chunk_gdn2(*(x[:, 40:] for x in args))
    assert rel_err(o[:, 40:], o_tail.double()) < tol


# ---------------------------------------------------------------------------------------------------------------
# Packed batches are memory-safe whatever cu_seqlens holds.

SANITISED = [
    pytest.param([0, 5, 20], [0, 5, 20], id="valid-unchanged"),
    pytest.param([0, 25, 20], [0, 20, 20], id="offset-past-T"),
    pytest.param([0, 12, 5, 20], [0, 12, 12, 20], id="decreasing"),
    pytest.param([3, 10, 19], [0, 10, 20], id="not-from-0-to-T"),
    pytest.param([0, -7, 2**62, -(2**62)], [0, 0, 20, 20], id="huge-and-negative"),
]


@pytest.mark.parametrize(("cu", "expected"), SANITISED)
def test_offsets_are_sanitised_to_a_partition_of_the_tokens(cu: list[int], expected: list[int]) -> None:
    from gdn2_tune.kernels.varlen import sanitize_offsets

    raw = torch.tensor(cu, dtype=torch.int64)
    out = sanitize_offsets(raw, 20)
    assert out.tolist() == expected and out.dtype == torch.int64
    assert raw.tolist() == cu  # the caller's tensor is never written
    if max(cu) < 2**31 and min(cu) >= -(2**31):
        assert sanitize_offsets(raw.to(torch.int32), 20).tolist() == expected


@pytest.mark.parametrize(("cu", "expected"), SANITISED[1:])
def test_invalid_offsets_give_the_result_of_the_sanitised_ones(cu: list[int], expected: list[int]) -> None:
    """What a CUDA cu_seqlens that is not checked (the default) computes: the launches behind chunk_gdn2 on the
    raw offsets equal the reference on the sanitised ones, every output row written."""
    from gdn2_tune.kernels.chunk import chunk_gdn2_fwd

    shape = Shape(1, 20, 2, 32, 16, "fp32", num_seqs=len(cu) - 1)
    inp = make_inputs(shape, DEVICE, seed=len(cu))
    o, s = chunk_gdn2_fwd(*inp.args(), scale=32**-0.5, initial_state=inp.initial_state, output_final_state=True,
                          cu_seqlens=torch.tensor(cu, device=DEVICE), use_qk_l2norm_in_kernel=False,
                          config=default_config(shape), num_seqs=shape.num_seqs)
    ref_o, ref_s = gdn2_reference(*inp.args(), initial_state=inp.initial_state, cu_seqlens=torch.tensor(expected))
    tol = tolerance(shape)
    assert rel_err(o, ref_o) < tol and rel_err(s, ref_s) < tol


GUARD = 4096  # elements of sentinel on each side of every buffer: wider than any stray row of these shapes


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("cu", [[0, 12, 5, 20], [0, 25, 20], [-7, 3, 2**40], [2**62, 0, 20]],
                         ids=["decreasing", "past-T", "negative-and-huge", "huge-first"])
def test_launchers_stay_inside_their_buffers_with_raw_offsets(
    monkeypatch: pytest.MonkeyPatch, cu: list[int], split: bool
) -> None:
    """The launchers called directly with raw offsets, as the tuner and benchmarks do, and an index built from
    other offsets: every output and scratch buffer sits between sentinel bands that no write may change. (Rows the
    index and the offsets disagree on may hold anything: only the public op pairs them consistently.)"""
    from gdn2_tune.kernels import intra, state
    from gdn2_tune.kernels.varlen import chunk_index

    bands: list[tuple[torch.Tensor, int]] = []

    def guarded(shape, dtype, device):
        n = 1
        for d in shape:
            n *= d
        big = torch.full((n + 2 * GUARD,), 7.0, dtype=dtype, device=device)
        big[GUARD:GUARD + n] = float("nan")
        bands.append((big, n))
        return big[GUARD:GUARD + n].view(tuple(shape))

    monkeypatch.setattr(intra, "output_buffer", guarded)
    monkeypatch.setattr(state, "output_buffer", guarded)
    shape = Shape(1, 20, 2, 32, 16, "fp32", num_seqs=len(cu) - 1)
    inp = make_inputs(shape, DEVICE, seed=5)

    def nan_banded(x: torch.Tensor) -> torch.Tensor:  # inputs too, so that a stray read finds NaN, not a fault
        big = torch.full((x.numel() + 2 * GUARD,), float("nan"), dtype=x.dtype, device=x.device)
        big[GUARD:GUARD + x.numel()] = x.flatten()
        return big[GUARD:GUARD + x.numel()].view(x.shape)

    args = [nan_banded(x) for x in inp.args()]
    h0 = nan_banded(inp.initial_state)
    cfg = config_for(shape, state={"output": "split", "BV": 16} if split else None)
    raw = torch.tensor(cu, device=DEVICE)
    # An index of as many sequences, built from other (valid) offsets, so that index and offsets disagree.
    valid = torch.linspace(0, 20, len(cu), device=DEVICE).round().long()
    pairs, first, num_chunks = chunk_index(valid, cfg.chunk, 20)
    inter = intra.intra_fwd(*args, scale=0.2, chunk=cfg.chunk, cfg=cfg.intra, cu_seqlens=raw, chunk_indices=pairs,
                            num_chunks=num_chunks, use_qk_l2norm=False, out_dtype=torch.float32)
    state.state_fwd(inter, out_dtype=torch.float32, v_shape=inp.v.shape, chunk=cfg.chunk, cfg=cfg.state,
                    initial_state=h0, output_final_state=True, cu_seqlens=raw, chunk_offsets=first,
                    chunk_indices=pairs, num_seqs=shape.num_seqs)
    assert bands
    for big, n in bands:
        assert bool((big[:GUARD] == 7.0).all()) and bool((big[GUARD + n:] == 7.0).all()), "a write left its buffer"


@pytest.mark.parametrize("cu", [
    pytest.param([0, 45, 56, 104, 150], id="valid"),
    pytest.param([0, 0, 0, 150], id="empty-sequences"),
    pytest.param([7, 200, -3, 90, 60, 149], id="invalid"),
    pytest.param([0, 150], id="one-sequence"),
    pytest.param(sorted(random.Random(3).randint(0, 150) for _ in range(1500)), id="N1499-several-blocks"),
])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_index_kernel_matches_its_torch_specification(cu: list[int], dtype: torch.dtype) -> None:
    from gdn2_tune.kernels.varlen import packed_index, packed_index_torch

    offsets = torch.tensor(cu, dtype=dtype, device=DEVICE)
    for chunk in (16, 64):
        got, want = packed_index(offsets, chunk, 150), packed_index_torch(offsets, chunk, 150)
        assert got.num_chunks == want.num_chunks == 150 // chunk + len(cu) - 1
        assert torch.equal(got.offsets, want.offsets) and torch.equal(got.first, want.first)
        assert torch.equal(got.pairs, want.pairs)


# The winners of benchmarks/exp_fwd_issue14.py on an H200 (2026-11-30), see kernels/config.py's shape rules.
@pytest.mark.parametrize(("shape", "want"), [
    pytest.param(Shape(1, 65536, 4, 128, 128, "bf16"), {"segment_chunks": 128, "k_parts": 1},
                 id="few-rows-long-seq-split-one-part"),
    pytest.param(Shape(1, 65536, 4, 128, 128, "bf16", num_seqs=3), {"segment_chunks": 0, "k_parts": 2},
                 id="packed-no-split"),
    pytest.param(Shape(8, 4096, 16, 128, 128, "bf16"),
                 {"segment_chunks": 0, "BK": 64, "BV": 128, "warps": 2, "state_BV": 64, "state_warps": 4,
                  "state_stages": 3, "k_parts": 2}, id="anchor-two-row-parts"),
    pytest.param(Shape(16, 2048, 8, 256, 256, "bf16"),
                 {"state_BV": 128, "state_warps": 8, "state_stages": 1, "k_parts": 2}, id="K256-wide-state-two-parts"),
    pytest.param(Shape(4, 4096, 16, 192, 160, "bf16"),
                 {"state_BV": 32, "state_warps": 4, "state_stages": 3, "k_parts": 2}, id="K192-V160-mid-state"),
    pytest.param(Shape(8, 4096, 16, 96, 96, "bf16"), {"BK": 64, "BV": 128, "warps": 2, "k_parts": 1},
                 id="K96-one-part"),
    pytest.param(Shape(8, 4096, 16, 100, 60, "bf16"), {"state_BV": 64, "k_parts": 1}, id="K100-V60-one-part"),
    pytest.param(Shape(8, 4096, 16, 128, 128, "fp32"),
                 {"precision": "tf32rn", "state_precision": "tf32", "BV": 128, "warps": 2, "state_BV": 64,
                  "state_warps": 4, "state_stages": 1, "k_parts": 1}, id="fp32-anchor-tf32rn-intra"),
])
def test_the_default_takes_the_measured_winners_by_shape(shape: Shape, want: dict) -> None:
    cfg = default_config(shape)
    i, s = cfg.intra, cfg.state
    got = {"segment_chunks": s.segment_chunks, "BK": i.BK, "BV": i.BV, "warps": i.num_warps, "precision": i.precision,
           "state_BV": s.BV, "state_warps": s.num_warps, "state_stages": s.num_stages, "state_precision": s.precision,
           "k_parts": s.k_parts}
    assert {k: got[k] for k in want} == want
    assert infeasibility(cfg, shape) is None
