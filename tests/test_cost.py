"""FLOP and byte counts of kernels/cost.py against figures counted by hand from the kernels and BASELINE.md."""

from __future__ import annotations

import pytest

from kernels.config import FwdConfig, IntraConfig, Shape, StateConfig
from kernels.cost import Cost, intra_cost, minimum_bytes, num_chunks, stage_costs, state_cost

ANCHOR = Shape(8, 4096, 16, 128, 128, "bf16")
# A small awkward shape: T not a multiple of the chunk, V below K.
SMALL = Shape(2, 100, 3, 64, 32, "bf16")
SMALL_CFG = FwdConfig(32, IntraConfig(BC=16, BK=32, BV=32, solve="tf32"), StateConfig(BV=16, precision="input"))


def test_minimum_bytes_at_the_anchor_matches_baseline_md() -> None:
    rows = 8 * 4096 * 16
    # q, k, b: 128 bf16 each; g: 128 fp32; v, w: 128 bf16 each
    inputs = rows * (3 * 128 * 2 + 128 * 4 + 2 * 128 * 2)
    output = rows * 128 * 2
    assert inputs == 939_524_096 and output == 134_217_728
    assert minimum_bytes(ANCHOR) == inputs + output
    # BASELINE.md: "the inputs alone ... are about 0.94 GB and the output 0.13 GB"
    assert round(inputs / 1e9, 2) == 0.94 and round(output / 1e9, 2) == 0.13


def test_intra_bytes_by_hand() -> None:
    rows = 2 * 100 * 3  # every token of every head
    chunks = 2 * 4  # ceil(100 / 32) = 4 per sequence
    reads = rows * (64 * 2 + 64 * 2 + 64 * 2 + 64 * 4 + 32 * 2 + 32 * 2)  # q k b (bf16) g (fp32) v w (bf16)
    writes = rows * (64 * 2 * 3 + 32 * 2 + 32 * 2) + chunks * 3 * 64 * 4  # Y Qγ Kt, U, A_qk (C=32), γ_C fp32
    cost = intra_cost(SMALL, SMALL_CFG)
    assert cost.bytes_min == reads + writes
    second_pass = rows * (64 * 2 * 3 + 64 * 4)  # q, k, b, g again
    assert cost.bytes_moved == reads + writes + second_pass


def test_intra_tensor_core_flops_by_hand() -> None:
    programs = 8 * 3
    C = 32
    t_and_aqk = 2 * (2 * C * C * 64)
    solve = 2 * (2 * C**3)  # NB = 2: dot(D, L) and dot(M, D)
    y = 2 * C * C * 64
    u = 2 * C * C * 32
    cost = intra_cost(SMALL, SMALL_CFG)
    assert cost.flops_tc == programs * (t_and_aqk + solve + y + u)
    assert dict(cost.dot_mix) == {"tf32": cost.flops_tc}


@pytest.mark.parametrize(
    ("bc", "products"),
    [pytest.param(64, 0, id="NB1-no-dots"), pytest.param(32, 2, id="NB2"), pytest.param(16, 4, id="NB4")],
)
def test_solve_dots_follow_the_kernel(bc: int, products: int) -> None:
    base = FwdConfig(64, IntraConfig(BC=64, BK=64, BV=64, solve="tf32"))
    cfg = FwdConfig(64, IntraConfig(BC=bc, BK=64, BV=64, solve="tf32"))
    shape = Shape(1, 64, 1, 64, 64)
    extra = intra_cost(shape, cfg).flops_tc - intra_cost(shape, base).flops_tc
    assert extra == products * 2 * 64**3


def test_tf32x3_and_ieee_move_the_solve_work() -> None:
    tf32 = intra_cost(ANCHOR, FwdConfig(64, IntraConfig(solve="tf32")))
    x3 = intra_cost(ANCHOR, FwdConfig(64, IntraConfig(solve="tf32x3")))
    ieee = intra_cost(ANCHOR, FwdConfig(64, IntraConfig(solve="ieee")))
    assert tf32.flops_tc == x3.flops_tc == ieee.flops_tc  # the math is the same
    qk = dict(ieee.dot_mix)["tf32"]  # T and A_qk stay tf32
    assert dict(x3.dot_mix)["tf32"] == qk + 3 * (tf32.flops_tc - qk)
    assert dict(ieee.dot_mix)["fp32"] == tf32.flops_tc - qk


def test_state_bytes_and_flops_by_hand() -> None:
    rows = 2 * 100 * 3
    chunks = 8 * 3
    n_v = 2  # V = 32, BV = 16
    per_tile = rows * (3 * 64 + 32) * 2 + chunks * 64 * 4  # Y Qγ Kt A_qk (bf16), γ_C (fp32)
    u_o = rows * 32 * 2 * 2
    h0 = 2 * 3 * 64 * 32 * 4
    cost = state_cost(SMALL, SMALL_CFG)
    assert cost.bytes_min == per_tile + u_o + h0
    assert cost.bytes_moved == per_tile * n_v + u_o + h0
    assert state_cost(SMALL, SMALL_CFG, final_state=True).bytes_min == per_tile + u_o + 2 * h0
    # per (chunk, head): Y S0, Qγ S0, Ktᵀ R with KP = 64, and A_qk R
    assert cost.flops_tc == chunks * (3 * 2 * 32 * 64 * 32 + 2 * 32 * 32 * 32)
    assert cost.dot_mix == (("bf16", cost.flops_tc),)


def test_total_is_the_sum_and_intensity_is_flops_per_byte() -> None:
    costs = stage_costs(ANCHOR, FwdConfig())
    total = costs["total"]
    assert total.flops_tc == costs["intra"].flops_tc + costs["state"].flops_tc
    assert total.bytes_min == costs["intra"].bytes_min + costs["state"].bytes_min
    assert total.intensity == pytest.approx(total.flops_tc / total.bytes_min)
    # anchor, default config: intra 51.5 GFLOP over 1.55 GB; state 60.1 GFLOP over 0.751 GB
    assert costs["intra"].intensity == pytest.approx(33.3, abs=0.05)
    assert costs["state"].intensity == pytest.approx(80.1, abs=0.05)


def test_fp32_inputs_run_state_dots_in_tf32_and_double_the_bytes() -> None:
    fp32 = Shape(8, 4096, 16, 128, 128, "fp32")
    assert state_cost(fp32, FwdConfig()).dot_mix[0][0] == "tf32"
    # g is fp32 either way, so the floor grows by less than 2x
    assert minimum_bytes(fp32) == minimum_bytes(ANCHOR) + 8 * 4096 * 16 * (5 * 128 * 2 + 128 * 2)


def test_varlen_chunks_are_bounded_by_one_partial_chunk_per_boundary() -> None:
    assert num_chunks(Shape(1, 1000, 4, 64, 64, num_seqs=3), 64) == 16 + 2
    assert num_chunks(Shape(3, 1000, 4, 64, 64), 64) == 3 * 16


def test_cost_round_trips_through_a_dict() -> None:
    cost = stage_costs(SMALL, SMALL_CFG)["total"]
    assert Cost.from_dict(cost.to_dict()) == cost
