"""fused_recurrent_gdn2 (kernels/decode.py) against the float64 recurrence: chained decode steps, prefill then decode,
state pools (1-D and 2-D indices, accepted drafts, padding, out-of-pool indices), packed sequences, bf16 state,
awkward sizes, a sample of the config space, and every error a caller can cause.

Every output the op allocates starts as NaN (conftest's poisoned fixture); caller-provided buffers are NaN-filled
here, so an element the kernel fails to write fails the comparison. On the CPU the kernel runs in the Triton
interpreter, so sizes are small; the gpu-marked tests repeat the checks at serving sizes and check that a step can be
captured in a CUDA graph without host syncs or allocations.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, INTERPRETED

from gdn2_tune import DecodeConfig, fused_recurrent_gdn2
from gdn2_tune.kernels import chunk_gdn2, gdn2_reference
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.decode import check_state_indices
from gdn2_tune.kernels.decode_config import (
    DECODE_SPACE,
    DecodeShape,
    decode_infeasibility,
    decode_space,
    default_decode_config,
    register_limit,
)
from gdn2_tune.kernels.decode_reference import recurrence
from gdn2_tune.kernels.inputs import make_inputs

# Relative Frobenius error budgets, from the arithmetic:
# - fp32 state: each operation rounds once in fp32 (2^-24) and the recurrence is contractive (decay ≤ 1, erase gate
#   in [0, 1], unit keys), so errors stay near 1e-6 however many steps are chained; 1e-4 is two orders above that.
#   bf16 inputs are exact in fp32 and the reference reads the same rounded values, so the budget holds for them too.
# - bf16 state: rounding the state once per store is the whole cost, so the kernel is held to the float64 recurrence
#   with the state rounded the same way after every step (kernels/decode_reference.py): within 1.5x its error plus
#   one bf16 rounding unit for steps where fp32-vs-float64 differences flip a single rounding. The interpreter
#   truncates (2^-7 relative, one-sided) where a GPU rounds to nearest (2^-8), so the emulated rounding follows it.
FP32_STATE_TOL = 1e-4
BF16_RATIO = 1.5
BF16_ROUNDING = "bf16-trunc" if INTERPRETED else "bf16"
BF16_UNIT = 2.0**-7 if INTERPRETED else 2.0**-8
# The chunk op's own fp32 budget (tests/test_kernels.py TOL): prefill followed by decode may not exceed it.
CHUNK_FP32_TOL = 1e-4 if INTERPRETED else 2e-3


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to("cpu", torch.float64)
    assert torch.isfinite(x).all(), "non-finite values (an unwritten NaN-poisoned element, or an overflow)"
    ref = ref.to("cpu", torch.float64)
    return float((x - ref).norm() / ref.norm())


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality is bitwise (-0.0 differs from 0.0, NaN equals itself)."""
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


def inputs(N: int, T: int, H: int, K: int, V: int, dtype: str = "fp32", seed: int = 0, *,
           strong_decay: bool = False):
    inp = make_inputs(Shape(N, T, H, K, V, dtype), DEVICE, seed, strong_decay=strong_decay, initial_state=False)
    return inp.args()


def pool_of(size: int, H: int, K: int, V: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, H, K, V, generator=gen).to(DEVICE, dtype)


def index(values: list, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


# The kernel's code paths that a config selects beyond the tile: the built-in default (runtime dims, a row limit in
# the state masks) and compiled-in dims (branches on the slot's validity instead of masks), with the token loop
# pipelined (a loop even for one token) and a register cap (launch options the interpreter ignores, so that only
# their plumbing is tested), and the batched input loads (joined and split before use) with runtime dims; a
# persistent grid (kernels/decode.py sizes it for one SM in the interpreter: 2 or 6 programs, each looping over
# one or several work items, ragged in the packed and 2-D cases) with runtime dims and the item loop pipelined (a
# plain loop in the interpreter; the state's load masked rather than branched on), and with the next item's state
# prefetched (masked, up to two items past a program's last) with compiled-in dims.
PATHS = [
    pytest.param(None, id="default"),
    pytest.param(DecodeConfig(BV=8, num_warps=1, num_stages=2, static_dims=True, max_registers=80), id="static-dims"),
    pytest.param(DecodeConfig(BV=8, num_warps=1, batch_inputs=True), id="batched-inputs"),
    pytest.param(DecodeConfig(BV=8, num_warps=1, programs_per_sm=2, item_stages=2), id="persistent"),
    pytest.param(DecodeConfig(BV=8, num_warps=1, static_dims=True, one_pass=True, batch_inputs=True,
                              programs_per_sm=6, prefetch=True), id="persistent-prefetch"),
]


# --- chained decode against float64 ----------------------------------------------------------------------------


STEPS = 1000
CHAIN_SLOTS = 5
CHAIN_SLOT = 3  # the one live slot; the interpreter spends ~25 ms per program and step, so one program it is
CHAIN_REST = [0, 1, 2, 4]


def chain(state_dtype: torch.dtype, K: int, V: int, seed: int) -> dict:
    """``STEPS`` single-token calls, each starting from the state the previous one left in the pool."""
    H = 1
    args = inputs(1, STEPS, H, K, V, seed=seed)
    pool = pool_of(CHAIN_SLOTS, H, K, V, seed, torch.bfloat16).to(state_dtype)  # the same bf16-exact start
    before = pool.clone()
    idx = index([CHAIN_SLOT])
    outs = []
    for t in range(STEPS):
        o, final = fused_recurrent_gdn2(*(x[:, t : t + 1] for x in args), initial_state=pool, inplace_final_state=True,
                                        ssm_state_indices=idx, config=DecodeConfig(BV=8, num_warps=1))
        assert final is pool
        outs.append(o)
    return {"o": torch.cat(outs, 1), "pool": pool, "before": before, "args": args,
            "start": before[CHAIN_SLOT : CHAIN_SLOT + 1].double()}


@pytest.fixture(scope="module")
def chains() -> dict:
    """1000 chained steps with an fp32 and with a bf16 state from the same start, and the float64 references."""
    K = V = 8
    fp32, bf16 = chain(torch.float32, K, V, seed=3), chain(torch.bfloat16, K, V, seed=3)
    ref_o, ref_states = recurrence(*fp32["args"], fp32["start"])
    emu_o, emu_states = recurrence(*fp32["args"], fp32["start"], rounding=BF16_ROUNDING)
    return {"fp32": fp32, "bf16": bf16, "ref_o": ref_o, "ref_s": ref_states[:, -1], "emu_o": emu_o,
            "emu_s": emu_states[:, -1]}


def test_1000_chained_steps_with_fp32_state_match_float64(chains: dict) -> None:
    run = chains["fp32"]
    err_o, err_s = rel_err(run["o"], chains["ref_o"]), rel_err(run["pool"][CHAIN_SLOT], chains["ref_s"][0])
    assert err_o < FP32_STATE_TOL and err_s < FP32_STATE_TOL, f"o {err_o:.2e}, state {err_s:.2e}"
    assert torch.equal(bits(run["pool"][CHAIN_REST]), bits(run["before"][CHAIN_REST]))


def test_1000_chained_steps_with_bf16_state_cost_only_bf16_rounding(chains: dict, record_property) -> None:
    run, ref_o, ref_s = chains["bf16"], chains["ref_o"], chains["ref_s"]
    err_o, err_s = rel_err(run["o"], ref_o), rel_err(run["pool"][CHAIN_SLOT], ref_s[0])
    err32_o = rel_err(chains["fp32"]["o"], ref_o)
    err32_s = rel_err(chains["fp32"]["pool"][CHAIN_SLOT], ref_s[0])
    storage_o, storage_s = rel_err(chains["emu_o"], ref_o), rel_err(chains["emu_s"], ref_s)
    report = (f"after {STEPS} steps (K=V=8) vs float64: fp32 state: output {err32_o:.2e}, state {err32_s:.2e}; "
              f"bf16 state: output {err_o:.2e}, state {err_s:.2e} (bf16 storage alone: {storage_o:.2e}, "
              f"{storage_s:.2e}; {'truncating interpreter' if INTERPRETED else 'round to nearest'})")
    print("\n" + report)
    record_property("decode_state_accuracy", report)
    assert err_s <= BF16_RATIO * storage_s + BF16_UNIT, report
    assert err_o <= BF16_RATIO * storage_o + BF16_UNIT, report
    assert run["pool"].dtype == torch.bfloat16
    assert torch.equal(bits(run["pool"][CHAIN_REST]), bits(run["before"][CHAIN_REST]))


def test_prefill_with_chunk_gdn2_then_decode_matches_the_reference() -> None:
    B, T0, steps, H, K, V = 2, 50, 12, 2, 32, 32
    inp = make_inputs(Shape(B, T0 + steps, H, K, V, "fp32"), DEVICE, seed=5)
    args = inp.args()
    _, state = chunk_gdn2(*(x[:, :T0] for x in args), initial_state=inp.initial_state, output_final_state=True)
    outs = []
    for t in range(T0, T0 + steps):
        o, final = fused_recurrent_gdn2(*(x[:, t : t + 1] for x in args), initial_state=state,
                                        inplace_final_state=True)
        assert final is state
        outs.append(o)
    ref_o, ref_s = gdn2_reference(*args, initial_state=inp.initial_state)
    err_o, err_s = rel_err(torch.cat(outs, 1), ref_o[:, T0:]), rel_err(state, ref_s)
    assert err_o < CHUNK_FP32_TOL and err_s < CHUNK_FP32_TOL, f"o {err_o:.2e}, state {err_s:.2e}"


# --- one call, several tokens: the dense layouts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("N", "T", "H", "K", "V", "dtype", "cfg"),
    [
        pytest.param(3, 1, 2, 16, 16, "fp32", None, id="N3-T1-H2-K16-V16-fp32-default"),
        pytest.param(2, 7, 2, 24, 40, "fp32", DecodeConfig(BV=16, num_warps=2, num_stages=2),
                     id="N2-T7-H2-K24-V40-not-powers-of-two-BV16"),
        pytest.param(1, 5, 1, 64, 8, "bf16", DecodeConfig(BV=8, num_warps=1, num_stages=3), id="N1-T5-K64-V8-bf16"),
        pytest.param(2, 3, 1, 16, 32, "fp16", DecodeConfig(BV=32, num_warps=4), id="N2-T3-K16-V32-fp16-BV32"),
        pytest.param(1, 2, 1, 256, 16, "bf16", DecodeConfig(BV=16, num_warps=8), id="N1-T2-K256-largest-K"),
        pytest.param(2, 6, 2, 40, 24, "fp32", DecodeConfig(BV=8, num_warps=2, one_pass=True),
                     id="N2-T6-H2-K40-V24-one-pass-output"),
        pytest.param(1, 4, 1, 16, 16, "bf16", DecodeConfig(BV=16, num_warps=1, one_pass=True, stream_state=True),
                     id="N1-T4-K16-bf16-one-pass-streamed-state"),
        pytest.param(2, 3, 2, 24, 40, "bf16", DecodeConfig(BV=16, num_warps=2, num_stages=3, static_dims=True),
                     id="N2-T3-H2-K24-V40-static-dims-masks-kept"),
        pytest.param(1, 3, 2, 24, 40, "bf16", DecodeConfig(BV=16, num_warps=2, batch_inputs=True, static_dims=True,
                                                           one_pass=True), id="N1-T3-H2-K24-V40-batched-inputs"),
        pytest.param(3, 3, 2, 24, 40, "fp32", DecodeConfig(BV=16, num_warps=2, num_stages=2, programs_per_sm=4,
                                                           prefetch=True),
                     id="N3-T3-H2-K24-V40-persistent-prefetch-pipelined-tokens"),
    ],
)
def test_tokens_in_one_call_match_float64(N, T, H, K, V, dtype, cfg) -> None:
    args = inputs(N, T, H, K, V, dtype, seed=T * K)
    h0 = pool_of(N, H, K, V, seed=T)
    o, final = fused_recurrent_gdn2(*args, initial_state=h0, output_final_state=True, config=cfg)
    ref_o, ref_states = recurrence(*args, h0.double())
    assert o.dtype == args[0].dtype and final.dtype == torch.float32 and final is not h0
    # a 16-bit output is rounded once: 2^-8 (bf16) or 2^-11 (fp16) relative on top of the fp32 arithmetic
    tol_o = {"fp32": FP32_STATE_TOL, "bf16": 2.0**-8, "fp16": 2.0**-11}[dtype]
    assert rel_err(o, ref_o) < tol_o and rel_err(final, ref_states[:, -1]) < FP32_STATE_TOL


@pytest.mark.parametrize("one_pass", [pytest.param(False, id="two-pass"), pytest.param(True, id="one-pass")])
def test_l2norm_strong_decay_and_custom_scale_match_float64(one_pass: bool) -> None:
    args = inputs(2, 6, 2, 32, 16, seed=8, strong_decay=True)
    h0 = pool_of(2, 2, 32, 16, seed=8)
    o, final = fused_recurrent_gdn2(*args, initial_state=h0, output_final_state=True, scale=0.3,
                                    use_qk_l2norm_in_kernel=True, config=DecodeConfig(BV=16, one_pass=one_pass))
    ref_o, ref_states = recurrence(*args, h0.double(), scale=0.3, use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ref_o) < FP32_STATE_TOL and rel_err(final, ref_states[:, -1]) < FP32_STATE_TOL


def test_without_initial_state_starts_from_zero_and_returns_no_state_unless_asked() -> None:
    args = inputs(2, 3, 1, 16, 16, seed=9)
    o, final = fused_recurrent_gdn2(*args)
    assert final is None
    ref_o, _ = recurrence(*args, torch.zeros(2, 1, 16, 16, dtype=torch.float64, device=DEVICE))
    assert rel_err(o, ref_o) < FP32_STATE_TOL


def test_caller_output_buffer_is_filled_and_returned() -> None:
    args = inputs(2, 2, 2, 16, 16, seed=10)
    out = nan_like(args[2])
    o, _ = fused_recurrent_gdn2(*args, out=out)
    assert o is out and torch.isfinite(out).all()


@pytest.mark.parametrize("cfg", PATHS)
def test_bf16_state_in_place_without_indices_rounds_once_per_call(cfg: DecodeConfig | None) -> None:
    args = inputs(2, 4, 1, 16, 16, seed=11)
    h0 = pool_of(2, 1, 16, 16, seed=11, dtype=torch.bfloat16)
    start = h0.double()
    _, final = fused_recurrent_gdn2(*args, initial_state=h0, inplace_final_state=True, config=cfg)
    assert final is h0 and h0.dtype == torch.bfloat16
    # the 4 tokens run in fp32 registers; only the final store rounds
    _, ref_states = recurrence(*args, start)
    assert rel_err(h0, ref_states[:, -1]) < BF16_UNIT


# --- state pools -----------------------------------------------------------------------------------------------


def test_1d_indices_padding_and_out_of_pool_rows_with_a_fresh_final_state() -> None:
    H, K, V = 2, 16, 24
    args = inputs(4, 3, H, K, V, seed=12)
    pool = pool_of(5, H, K, V, seed=12)
    before = pool.clone()
    idx = index([3, -1, 0, 5], torch.int64)  # live, padding, live, one past the pool
    o, final = fused_recurrent_gdn2(*args, initial_state=pool, output_final_state=True, ssm_state_indices=idx)
    assert torch.equal(bits(pool), bits(before)), "not in place: the pool is only read"
    ref_o, ref_states = recurrence(*(x[[0, 2]] for x in args), before[[3, 0]].double())
    assert rel_err(o[[0, 2]], ref_o) < FP32_STATE_TOL
    assert rel_err(final[[0, 2]], ref_states[:, -1]) < FP32_STATE_TOL
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.equal(final[1], torch.zeros_like(final[1]))
    assert o[3].isnan().all() and final[3].isnan().all()


@pytest.mark.parametrize("cfg", PATHS)
def test_2d_indices_store_every_token_and_accepted_drafts_pick_the_start(cfg: DecodeConfig | None) -> None:
    N, T, H, K, V = 3, 4, 2, 16, 16
    args = inputs(N, T, H, K, V, seed=13)
    pool = pool_of(16, H, K, V, seed=13)
    before = pool.clone()
    idx = index([[0, 1, 2, 3], [4, 5, -1, 7], [8, 9, 10, 11]])  # row 1 skips storing its third token's state
    accepted = index([1, 2, 4])
    out = nan_like(args[2])
    o, final = fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx,
                                    num_accepted_tokens=accepted, out=out, config=cfg)
    assert o is out and final is pool
    start = before[[0, 5, 11]].double()  # slot [n, accepted - 1]
    ref_o, ref_states = recurrence(*args, start)
    assert rel_err(o, ref_o) < FP32_STATE_TOL
    for n in range(N):
        for t in range(T):
            slot = int(idx[n, t])
            if slot >= 0:
                assert rel_err(pool[slot], ref_states[n, t]) < FP32_STATE_TOL, (n, t)
    assert torch.equal(bits(pool[[6, 12, 13, 14, 15]]), bits(before[[6, 12, 13, 14, 15]]))


@pytest.mark.parametrize("cfg", PATHS)
def test_2d_indices_without_accepted_start_at_column_0_and_bad_entries_are_masked(cfg: DecodeConfig | None) -> None:
    N, T, H, K, V = 3, 2, 1, 8, 8
    args = inputs(N, T, H, K, V, seed=14)
    pool = pool_of(6, H, K, V, seed=14)
    before = pool.clone()
    # row 0 live; row 1 padding from its start; row 2 stores its second token's state past the pool
    idx = index([[0, 1], [-1, 2], [3, 60]])
    accepted = None
    o, _ = fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx,
                                num_accepted_tokens=accepted, config=cfg)
    ref_o, ref_states = recurrence(*(x[[0, 2]] for x in args), before[[0, 3]].double())
    assert rel_err(o[0], ref_o[0]) < FP32_STATE_TOL and rel_err(o[2, :1], ref_o[1, :1]) < FP32_STATE_TOL
    assert torch.equal(o[1], torch.zeros_like(o[1])), "a padding row writes zero outputs"
    assert o[2, 1].isnan().all(), "a token whose state slot is past the pool is marked NaN"
    assert rel_err(pool[[0, 1, 3]], ref_states[[0, 0, 1], [0, 1, 0]]) < FP32_STATE_TOL
    assert torch.equal(bits(pool[[2, 4, 5]]), bits(before[[2, 4, 5]])), "slot 2 belongs to a padding row"


@pytest.mark.parametrize("cfg", PATHS)
def test_accepted_count_outside_the_indices_is_masked(cfg: DecodeConfig | None) -> None:
    args = inputs(2, 2, 1, 8, 8, seed=15)
    pool = pool_of(4, 1, 8, 8, seed=15)
    before = pool.clone()
    idx = index([[0, 1], [2, 3]])
    o, _ = fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx,
                                num_accepted_tokens=index([0, 3]), config=cfg)  # 0, 3: no column of [2, 2]
    assert o.isnan().all()
    assert torch.equal(bits(pool), bits(before))


@pytest.mark.parametrize("cfg", PATHS)
@pytest.mark.parametrize("state_dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_1d_indices_in_place_skip_padding_and_out_of_pool_rows(cfg: DecodeConfig | None,
                                                               state_dtype: torch.dtype) -> None:
    # serving's own call (the pool updated in place through 1-D indices), with a padding and an out-of-pool row
    H, K, V = 2, 16, 24
    args = inputs(4, 1, H, K, V, seed=20)
    pool = pool_of(6, H, K, V, seed=20, dtype=state_dtype)
    before = pool.clone()
    idx = index([4, -1, 1, 6])  # live, padding, live, one past the pool
    o, final = fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx,
                                    config=cfg)
    assert final is pool
    ref_o, ref_states = recurrence(*(x[[0, 2]] for x in args), before[[4, 1]].double())
    # a bf16 pool: the one token runs on the bf16-exact start in fp32 and only the store rounds
    tol = FP32_STATE_TOL if state_dtype == torch.float32 else BF16_UNIT
    assert rel_err(o[[0, 2]], ref_o) < FP32_STATE_TOL and rel_err(pool[[4, 1]], ref_states[:, -1]) < tol
    assert torch.equal(o[1], torch.zeros_like(o[1])) and o[3].isnan().all()
    assert torch.equal(bits(pool[[0, 2, 3, 5]]), bits(before[[0, 2, 3, 5]]))


def test_strided_pool_slots_are_read_and_written_in_place() -> None:
    H, K, V = 1, 8, 16
    big = pool_of(8, H, K, V, seed=16)
    pool = big[::2]  # every other slot of a larger cache: slot stride 2·H·K·V
    before = big.clone()
    args = inputs(2, 1, H, K, V, seed=16)
    fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=index([3, 1]))
    _, ref_states = recurrence(*args, before[[6, 2]].double())
    assert rel_err(big[[6, 2]], ref_states[:, -1]) < FP32_STATE_TOL
    assert torch.equal(bits(big[[0, 1, 3, 4, 5, 7]]), bits(before[[0, 1, 3, 4, 5, 7]]))


# --- packed sequences ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", PATHS)
@pytest.mark.parametrize("two_d", [pytest.param(False, id="1d-indices"), pytest.param(True, id="2d-indices")])
def test_packed_sequences_reset_the_state_at_each_start(two_d: bool, cfg: DecodeConfig | None) -> None:
    lengths = [3, 0, 4, 1]  # an empty sequence among them
    H, K, V = 2, 16, 16
    total = sum(lengths)
    args = inputs(1, total, H, K, V, seed=17)
    cu = torch.tensor([0, *lengths], device=DEVICE).cumsum(0)
    pool = pool_of(20, H, K, V, seed=17)
    before = pool.clone()
    if two_d:
        idx = index([[n * 4 + t for t in range(4)] for n in range(len(lengths))])
        starts = [n * 4 for n in range(len(lengths))]
    else:
        idx = index([7, 3, 12, 0])
        starts = idx.tolist()
    o, _ = fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx,
                                cu_seqlens=cu, config=cfg)
    touched = set()
    for n, (a, z) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if z == a:
            continue
        ref_o, ref_states = recurrence(*(x[:, a:z] for x in args), before[starts[n] : starts[n] + 1].double())
        assert rel_err(o[:, a:z], ref_o) < FP32_STATE_TOL
        slots = [int(idx[n, t]) for t in range(z - a)] if two_d else [starts[n]]
        states = ref_states[0] if two_d else ref_states[0, -1:]
        for slot, ref in zip(slots, states, strict=True):
            assert rel_err(pool[slot], ref) < FP32_STATE_TOL
            touched.add(slot)
    rest = [s for s in range(20) if s not in touched]
    assert torch.equal(bits(pool[rest]), bits(before[rest]))


def test_packed_tokens_without_an_index_column_are_marked_and_not_stored() -> None:
    H, K, V = 1, 8, 8
    args = inputs(1, 5, H, K, V, seed=19)
    cu = index([0, 2, 5])  # the second sequence has 3 tokens, the indices only 2 columns
    pool = pool_of(6, H, K, V, seed=19)
    before = pool.clone()
    idx = index([[0, 1], [2, 3]])
    o, _ = fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx,
                                cu_seqlens=cu)
    ref_o, ref_states = recurrence(*(x[:, 2:5] for x in args), before[2:3].double())
    assert rel_err(o[:, 2:4], ref_o[:, :2]) < FP32_STATE_TOL and o[0, 4].isnan().all()
    assert rel_err(pool[3], ref_states[0, 1]) < FP32_STATE_TOL
    assert torch.equal(bits(pool[4:]), bits(before[4:]))


def test_packed_offsets_past_the_tokens_are_clamped_not_read() -> None:
    args = inputs(1, 4, 1, 8, 8, seed=18)
    h0 = pool_of(2, 1, 8, 8, seed=18)
    cu = index([0, 3, 99])  # the second sequence claims tokens the batch does not have
    o, final = fused_recurrent_gdn2(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    ref_o, ref_states = recurrence(*(x[:, 3:4] for x in args), h0[1:].double())
    assert rel_err(o[:, 3:], ref_o) < FP32_STATE_TOL and rel_err(final[1], ref_states[0, -1]) < FP32_STATE_TOL


# --- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(DecodeShape(1, 1, 16, 128, 128), id="B1-H16-K128"),
        pytest.param(DecodeShape(512, 1, 16, 128, 128), id="B512-H16-K128"),
        pytest.param(DecodeShape(32, 4, 16, 256, 256), id="B32-T4-K256"),
        pytest.param(DecodeShape(128, 1, 16, 256, 256), id="B128-H16-K256-wide-tile"),
        pytest.param(DecodeShape(128, 1, 16, 256, 200), id="B128-H16-K256-V200-wide-tile"),
        pytest.param(DecodeShape(2, 1, 1, 8, 3), id="K8-V3-tiny"),
        pytest.param(DecodeShape(1, 1, 1, 256, 200), id="K256-V200"),
    ],
)
def test_default_config_is_admissible_and_in_the_space(shape: DecodeShape) -> None:
    cfg = default_decode_config(shape)
    assert decode_infeasibility(cfg, shape) is None
    assert cfg in decode_space(shape)


def test_config_round_trips_and_rejects_bad_points() -> None:
    cfg = DecodeConfig(BV=64, num_warps=8, num_stages=2)
    assert DecodeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="expected keys"):
        DecodeConfig.from_dict({"BV": 64})
    shape = DecodeShape(1, 1, 1, 256, 256)
    assert "registers" in decode_infeasibility(DecodeConfig(BV=128, num_warps=4), shape)
    assert "exceeds the padded V" in decode_infeasibility(DecodeConfig(BV=64), DecodeShape(1, 1, 1, 16, 16))
    assert "is not one of" in decode_infeasibility(DecodeConfig(BV=48), shape)
    assert [p.name for p in DECODE_SPACE] == ["BV", "num_warps", "num_stages", "stream_state", "one_pass",
                                              "static_dims", "max_registers", "batch_inputs", "programs_per_sm",
                                              "prefetch", "item_stages"]
    assert "max_registers=80 is below" in decode_infeasibility(DecodeConfig(BV=32, max_registers=80), shape)
    assert decode_infeasibility(DecodeConfig(BV=32, static_dims=True, max_registers=128), shape) is None


def test_a_persistent_grid_fits_its_programs_on_an_sm() -> None:
    k128, k256 = DecodeShape(128, 1, 16, 128, 128), DecodeShape(128, 1, 16, 256, 256)
    # 65536 registers / (programs · threads), in allocation units of 8: 4 programs of 4 warps get 128, 6 get 80
    # (85 rounded down); one program of 4 warps needs no cap; an explicit cap below that stays.
    assert register_limit(DecodeConfig(BV=32, programs_per_sm=4)) == 128
    assert register_limit(DecodeConfig(BV=32, programs_per_sm=6)) == 80
    assert register_limit(DecodeConfig(BV=32, programs_per_sm=1)) == 0
    assert register_limit(DecodeConfig(BV=32, programs_per_sm=4, max_registers=96)) == 96
    assert register_limit(DecodeConfig(BV=32, max_registers=96)) == 96
    assert decode_infeasibility(DecodeConfig(BV=32, programs_per_sm=4, prefetch=True), k128) is None
    # two [128, 32] tiles on 4 warps (64 registers) + 32 do not fit 80
    assert "leaves 80 registers" in decode_infeasibility(DecodeConfig(BV=32, programs_per_sm=6, prefetch=True), k128)
    assert "leaves 128 registers" in decode_infeasibility(
        DecodeConfig(BV=64, num_warps=8, programs_per_sm=2, prefetch=True), k256)
    assert "leaves 40 registers" in decode_infeasibility(DecodeConfig(BV=64, num_warps=8, programs_per_sm=6), k256)
    assert "needs a persistent grid" in decode_infeasibility(DecodeConfig(BV=32, prefetch=True), k128)
    assert "this item's and the next" in decode_infeasibility(
        DecodeConfig(BV=32, programs_per_sm=1, prefetch=True, max_registers=80), k128)
    # Triton's pipelined item loop: a persistent grid, not with prefetch, its state tiles within shared memory
    # (4 programs · 2 tiles of [256, 64] fp32 are 512 KiB).
    assert "item_stages=2 needs a persistent grid" in decode_infeasibility(DecodeConfig(BV=32, item_stages=2), k128)
    assert "take one" in decode_infeasibility(DecodeConfig(BV=32, programs_per_sm=4, prefetch=True, item_stages=2),
                                              k128)
    assert decode_infeasibility(DecodeConfig(BV=32, programs_per_sm=4, item_stages=3), k128) is None
    assert "more than an SM has" in decode_infeasibility(
        DecodeConfig(BV=64, num_warps=8, programs_per_sm=4, item_stages=3), k256)


SAMPLE_SHAPE = DecodeShape(2, 3, 1, 16, 32)
SAMPLED = decode_space(SAMPLE_SHAPE)[::1900]  # ~20 points


def test_the_sampled_points_take_every_value_of_the_space() -> None:
    admissible = decode_space(SAMPLE_SHAPE)
    for p in DECODE_SPACE:
        missing = {getattr(c, p.name) for c in admissible} - {getattr(c, p.name) for c in SAMPLED}
        assert not missing, f"{p.name}: {sorted(missing)} admissible but never sampled"


@pytest.mark.parametrize("cfg", [pytest.param(c, id=c.label()) for c in SAMPLED])
def test_sampled_points_of_the_config_space(cfg: DecodeConfig) -> None:
    args = inputs(2, 3, 1, 16, 32, seed=cfg.BV + cfg.num_warps)
    h0 = pool_of(2, 1, 16, 32, seed=cfg.num_stages)
    o, final = fused_recurrent_gdn2(*args, initial_state=h0, output_final_state=True, config=cfg)
    ref_o, ref_states = recurrence(*args, h0.double())
    assert rel_err(o, ref_o) < FP32_STATE_TOL and rel_err(final, ref_states[:, -1]) < FP32_STATE_TOL


def test_check_state_indices_finds_an_index_past_the_pool() -> None:
    check_state_indices(index([0, -1, 4]), 5)
    with pytest.raises(ValueError, match=r"ssm_state_indices: expected values < 5 .* received 7"):
        check_state_indices(index([[0, 1], [7, -1]]), 5)


# --- errors a caller can cause ---------------------------------------------------------------------------------


def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, dtype=dtype, device=DEVICE)


def good_args() -> dict:
    q, k, v, g, b, w = inputs(2, 3, 2, 16, 8, seed=0)
    return {"q": q, "k": k, "v": v, "g": g, "b": b, "w": w}


POOL = (6, 2, 16, 8)
ERRORS = [
    pytest.param({"q": [1.0]}, {}, TypeError, r"q: expected a torch.Tensor, received list", id="q-not-a-tensor"),
    pytest.param({"g": t(2, 3, 2)}, {}, ValueError, r"g: expected 4 dims", id="g-3-dims"),
    pytest.param({"k": t(2, 3, 2, 8)}, {}, ValueError, r"k: expected shape \(2, 3, 2, 16\)", id="k-shape"),
    pytest.param({"w": t(2, 3, 2, 4)}, {}, ValueError, r"w: expected shape \(2, 3, 2, 8\)", id="w-shape"),
    pytest.param({"v": t(1, 3, 2, 8)}, {}, ValueError, r"v: expected shape", id="v-batch"),
    pytest.param({"b": t(2, 3, 2, 16, dtype=torch.float64)}, {}, TypeError, r"b: expected dtype bf16, fp16 or fp32",
                 id="b-float64"),
    pytest.param({"v": t(2, 3, 2, 8, dtype=torch.bfloat16)}, {}, TypeError, r"v: expected dtype torch.float32",
                 id="mixed-dtypes"),
    pytest.param({k: t(2, 0, 2, 16 if k in "qkgb" else 8) for k in "qkvgbw"}, {}, ValueError,
                 r"q: expected T >= 1, received T=0", id="T-zero"),
    pytest.param({k: t(2, 3, 2, 320 if k in "qkgb" else 8) for k in "qkvgbw"}, {}, ValueError,
                 r"expected K and V <= 256, received K=320", id="K-over-256"),
    pytest.param({}, {"initial_state": t(2, 2, 8, 16)}, ValueError,
                 r"initial_state: expected shape \(2, 2, 16, 8\)", id="state-transposed"),
    pytest.param({}, {"initial_state": t(2, 2, 16, 8, dtype=torch.float16)}, TypeError,
                 r"initial_state: expected dtype torch.float32 \(or torch.bfloat16 .*received torch.float16",
                 id="state-fp16"),
    pytest.param({}, {"initial_state": "zeros"}, TypeError, r"initial_state: expected a torch.Tensor",
                 id="state-not-a-tensor"),
    pytest.param({}, {"initial_state": t(2, 2, 8, 16).transpose(2, 3)}, ValueError,
                 r"initial_state: expected each slot \[H, K, V\] contiguous", id="state-slot-not-dense"),
    pytest.param({}, {"inplace_final_state": True}, ValueError,
                 r"inplace_final_state: expected an initial_state", id="inplace-without-state"),
    pytest.param({}, {"output_final_state": 1}, TypeError, r"output_final_state: expected a bool, received int",
                 id="flag-not-bool"),
    pytest.param({}, {"ssm_state_indices": index([0, 1])}, ValueError,
                 r"ssm_state_indices: expected an initial_state \(the state pool", id="indices-without-pool"),
    pytest.param({}, {"initial_state": t(*POOL), "ssm_state_indices": torch.tensor([0.0, 1.0], device=DEVICE)},
                 TypeError, r"ssm_state_indices: expected dtype torch.int32 or torch.int64, received torch.float32",
                 id="indices-float"),
    pytest.param({}, {"initial_state": t(*POOL), "ssm_state_indices": index([0, 1, 2])}, ValueError,
                 r"ssm_state_indices: expected shape \[2\] .* or \[2, T\]", id="indices-wrong-N"),
    pytest.param({}, {"initial_state": t(*POOL), "ssm_state_indices": index([[0, 1], [2, 3]])}, ValueError,
                 r"ssm_state_indices: expected \[2, T\] with at least T=3 columns", id="indices-too-few-columns"),
    pytest.param({}, {"initial_state": t(6, 2, 16, 4), "ssm_state_indices": index([0, 1])}, ValueError,
                 r"initial_state: expected shape \('P', 2, 16, 8\) \(a pool", id="pool-wrong-V"),
    pytest.param({}, {"initial_state": t(*POOL), "ssm_state_indices": index([0, 1]),
                      "num_accepted_tokens": index([1, 1])}, ValueError,
                 r"num_accepted_tokens: expected 2-D ssm_state_indices .* received 1-D", id="accepted-with-1d"),
    pytest.param({}, {"initial_state": t(*POOL), "ssm_state_indices": index([[0, 1, 2], [3, 4, 5]]),
                      "num_accepted_tokens": index([1, 1, 1])}, ValueError,
                 r"num_accepted_tokens: expected shape \(2,\), received \(3,\)", id="accepted-wrong-N"),
    pytest.param({}, {"cu_seqlens": index([0, 3, 6])}, ValueError, r"cu_seqlens: expected B == 1", id="cu-with-B2"),
    pytest.param({}, {"cu_seqlens": torch.tensor([0.0, 3.0], device=DEVICE)}, TypeError,
                 r"cu_seqlens: expected dtype torch.int32 or torch.int64", id="cu-float"),
    pytest.param({}, {"out": t(2, 3, 2, 4)}, ValueError, r"out: expected shape \(2, 3, 2, 8\)", id="out-shape"),
    pytest.param({}, {"out": t(2, 3, 2, 8, dtype=torch.bfloat16)}, TypeError,
                 r"out: expected dtype torch.float32 \(that of q\), received torch.bfloat16", id="out-dtype"),
    pytest.param({}, {"out": t(2, 3, 8, 2).transpose(2, 3)}, ValueError, r"out: expected a contiguous tensor",
                 id="out-not-contiguous"),
    pytest.param({}, {"config": {"BV": 8}}, TypeError, r"config: expected a kernels.DecodeConfig, received dict",
                 id="config-dict"),
    pytest.param({}, {"config": DecodeConfig(BV=128)}, ValueError,
                 r"config: BV128-w4-s1 is not supported at .*: BV=128 exceeds the padded V=8", id="config-too-wide"),
    pytest.param({}, {"scale": "0.5"}, TypeError, r"scale: expected a float, received str", id="scale-str"),
]


@pytest.mark.parametrize(("over", "kw", "exc", "match"), ERRORS)
def test_bad_input_raises_naming_the_argument(over: dict, kw: dict, exc: type, match: str) -> None:
    args = good_args()
    args.update(over)
    with pytest.raises(exc, match=match):
        fused_recurrent_gdn2(args["q"], args["k"], args["v"], args["g"], args["b"], args["w"], **kw)


def test_inputs_that_require_grad_are_refused() -> None:
    args = good_args()
    args["q"].requires_grad_(True)
    with pytest.raises(NotImplementedError, match="inference only"):
        fused_recurrent_gdn2(*args.values())
    with torch.no_grad():
        fused_recurrent_gdn2(*args.values())


# --- GPU: serving sizes, CUDA graphs, no syncs, no allocations -------------------------------------------------


def serving_step(N: int = 32, H: int = 16, K: int = 128, V: int = 128):
    args = [x.contiguous() for x in inputs(N, 1, H, K, V, "bf16", seed=30)]
    pool = 0.1 * pool_of(2 * N, H, K, V, seed=30)
    idx = torch.randperm(2 * N, device=DEVICE)[:N]
    out = torch.empty_like(args[2])
    return args, pool, idx, out


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_matches_eager_without_syncs_or_allocations() -> None:
    args, pool, idx, out = serving_step()
    start = pool.clone()

    def step() -> None:
        fused_recurrent_gdn2(*args, initial_state=pool, inplace_final_state=True, ssm_state_indices=idx, out=out)

    step()  # compile
    torch.cuda.synchronize()
    pool.copy_(start)
    allocs = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocs, "the hot path allocated"
    eager_out, eager_pool = out.clone(), pool.clone()

    pool.copy_(start)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        step()
    pool.copy_(start)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_out) and torch.equal(pool, eager_pool)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32-state", "bf16-state"])
def test_gpu_1000_steps_at_serving_size(state_dtype: torch.dtype) -> None:
    N, H, K, V, steps = 8, 16, 128, 128, 1000
    q, k, v, g, b, w = inputs(N, steps, H, K, V, "bf16", seed=31)
    pool = pool_of(N + 3, H, K, V, seed=31, dtype=state_dtype)
    before = pool.clone()
    idx = torch.randperm(N + 3, device=DEVICE)[:N]
    outs = [fused_recurrent_gdn2(*(x[:, t : t + 1] for x in (q, k, v, g, b, w)), initial_state=pool,
                                 inplace_final_state=True, ssm_state_indices=idx)[0] for t in range(steps)]
    start = before[idx].double()
    ref_o, ref_states = recurrence(q, k, v, g, b, w, start)
    err_o, err_s = rel_err(torch.cat(outs, 1), ref_o), rel_err(pool[idx], ref_states[:, -1])
    if state_dtype == torch.float32:
        assert err_o < 2.0**-8 and err_s < FP32_STATE_TOL  # the output is rounded to bf16 once
    else:
        emu_o, emu_states = recurrence(q, k, v, g, b, w, start, rounding="bf16")
        assert err_s <= BF16_RATIO * rel_err(emu_states[:, -1], ref_states[:, -1]) + BF16_UNIT
        assert err_o <= BF16_RATIO * rel_err(emu_o, ref_o) + BF16_UNIT
    rest = torch.ones(N + 3, dtype=torch.bool, device=DEVICE)
    rest[idx] = False
    assert torch.equal(bits(pool[rest]), bits(before[rest]))
