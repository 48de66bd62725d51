"""FLOP and byte counts of kernels/cost.py against figures counted by hand from the kernels and BASELINE.md."""

from __future__ import annotations

import dataclasses

import pytest

from gdn2_tune.kernels.config import FwdConfig, IntraConfig, Shape, StateConfig
from gdn2_tune.kernels.cost import Cost, intra_cost, minimum_bytes, num_chunks, stage_costs, state_cost

ANCHOR = Shape(8, 4096, 16, 128, 128, "bf16")
# A small awkward shape: T not a multiple of the chunk, V below K.
SMALL = Shape(2, 100, 3, 64, 32, "bf16")
SMALL_CFG = FwdConfig(32, IntraConfig(BC=16, BK=32, BV=32, precision="tf32"), StateConfig(BV=16, precision="input"))


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
    programs = 2 * 4 * 3  # ceil(100 / 32) = 4 chunks per sequence, 3 heads
    reads = rows * (64 * 2 + 64 * 2 + 64 * 2 + 64 * 4 + 32 * 2 + 32 * 2)  # q k b (bf16) g (fp32) v w (bf16)
    writes = rows * (64 * 2 * 3 + 32 * 2 + 32 * 2) + programs * 64 * 4  # Y Qγ Kt, U, A_qk (C=32), γ_C fp32
    assert (reads, writes) == (460_800, 313_344)
    cost = intra_cost(SMALL, SMALL_CFG)
    assert cost.bytes_min == reads + writes == 774_144
    row_blocks = 2 * rows * 64 * (2 + 4)  # NB = 2 row blocks each load the chunk's k (bf16) and g (fp32) again
    second_pass = rows * (64 * 2 * 3 + 64 * 4)  # the Y pass reads q, k, b, g again
    # fp32 [32, 32] scratch per program: T stored + read back, A stored, A read by 2 K slices (BK 32) and 1 V slice
    scratch = programs * 32 * 32 * 4 * (1 + 1 + 1 + 2 + 1)
    assert (row_blocks, second_pass, scratch) == (460_800, 384_000, 589_824)
    assert cost.bytes_moved == reads + writes + row_blocks + second_pass + scratch == 2_208_768


def test_intra_flops_by_hand() -> None:
    programs = 8 * 3
    C, BC, NB = 32, 16, 2
    t_and_aqk = 2 * (2 * C * C * 64)  # two dots [16, 32] x [32, 32] per row block (2) and K slice (2), each
    diag = 2 * (4 - 1) * (2 * NB * BC**3)  # log2(16) - 1 = 3 rounds of P², M(I + P²ʲ) on [2, 16, 16], fp32
    assembly = 2 * (2 * C**3)  # N = D L, then NB - 1 = 1 Horner step
    y = 2 * C * C * 64  # K = 64 in two BK = 32 slices
    u = 2 * C * C * 32
    assert (t_and_aqk, diag, assembly, y, u) == (262_144, 98_304, 131_072, 131_072, 65_536)
    cost = intra_cost(SMALL, SMALL_CFG)
    assert cost.flops_tc == programs * (t_and_aqk + diag + assembly + y + u) == 16_515_072
    assert dict(cost.dot_mix) == {"tf32": programs * (t_and_aqk + assembly + y + u), "fp32": programs * diag}
    assert dict(cost.dot_mix) == {"tf32": 14_155_776, "fp32": 2_359_296}


@pytest.mark.parametrize(
    ("bc", "diag", "assembly"),
    [
        pytest.param(64, 10 * 2 * 64**3, 0, id="NB1-diagonal-only"),  # log2 64 - 1 = 5 rounds of 2 dots, 1 block
        pytest.param(32, 8 * 2 * 2 * 32**3, 2 * 2 * 64**3, id="NB2"),  # 4 rounds on [2, 32, 32]; D L + 1 step
        pytest.param(16, 6 * 2 * 4 * 16**3, 4 * 2 * 64**3, id="NB4"),  # 3 rounds on [4, 16, 16]; D L + 3 steps
    ],
)
def test_solve_dots_follow_the_kernel(bc: int, diag: int, assembly: int) -> None:
    cfg = FwdConfig(64, IntraConfig(BC=bc, BK=64, BV=64, precision="tf32"))
    cost = intra_cost(Shape(1, 64, 1, 64, 64), cfg)  # one program
    others = 2 * 2 * 64 * 64 * 64 + 2 * 64 * 64 * 64 + 2 * 64 * 64 * 64  # T and A_qk, Y, U: one slice each
    assert cost.flops_tc == others + diag + assembly
    assert dict(cost.dot_mix) == {"tf32": others + assembly, "fp32": diag}


def test_tf32x3_and_ieee_move_every_intra_dot_but_the_diagonal_inverse() -> None:
    # SMALL per program: T + A_qk 262,144, assembly + Y + U 327,680, diagonal inverse 98,304 (fp32 always)
    diag, dots = 24 * 98_304, 24 * (262_144 + 327_680)
    for precision, mix in (
        ("tf32", {"tf32": dots, "fp32": diag}),
        ("tf32rn", {"tf32": dots, "fp32": diag}),  # operands rounded on the CUDA cores, then one tf32 product
        ("tf32x3", {"tf32": 3 * dots, "fp32": diag}),
        ("ieee", {"fp32": diag + dots}),
    ):
        intra = dataclasses.replace(SMALL_CFG.intra, precision=precision)
        cost = intra_cost(SMALL, FwdConfig(32, intra, SMALL_CFG.state))
        assert cost.flops_tc == dots + diag, precision  # the math is the same
        assert dict(cost.dot_mix) == mix, precision
    with pytest.raises(ValueError, match="intra.precision"):
        intra_cost(SMALL, FwdConfig(32, dataclasses.replace(SMALL_CFG.intra, precision="bf16")))


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
    # stage_costs passes the state keywords through: no h0 read, the final state written
    assert stage_costs(SMALL, SMALL_CFG, initial_state=False, final_state=True)["state"].bytes_min == per_tile + u_o + h0
    assert stage_costs(SMALL, SMALL_CFG, initial_state=False)["state"].bytes_min == per_tile + u_o
    # per (chunk, head): Y S0, Qγ S0, Ktᵀ R with KP = 64, and A_qk R
    assert cost.flops_tc == chunks * (3 * 2 * 32 * 64 * 32 + 2 * 32 * 32 * 32)
    assert cost.dot_mix == (("bf16", cost.flops_tc),)


def test_total_is_the_sum_and_intensity_is_flops_per_byte() -> None:
    costs = stage_costs(ANCHOR, FwdConfig())  # C32, intra BC16 BK64 BV64 tf32, state BV64 in bf16
    total = costs["total"]
    assert total.flops_tc == costs["intra"].flops_tc + costs["state"].flops_tc
    assert total.bytes_min == costs["intra"].bytes_min + costs["state"].bytes_min
    assert total.bytes_moved == costs["intra"].bytes_moved + costs["state"].bytes_moved
    assert dict(total.dot_mix) == {
        "bf16": dict(costs["state"].dot_mix)["bf16"],
        "tf32": dict(costs["intra"].dot_mix)["tf32"],
        "fp32": dict(costs["intra"].dot_mix)["fp32"],
    }
    assert total.intensity == pytest.approx(total.flops_tc / total.bytes_min)
    # intra, per (chunk, head) program: T + A_qk 4·32·32·128, diagonal 6·2·2·16³, assembly 2·2·32³, Y + U 4·32·32·128
    programs = 8 * 128 * 16
    assert costs["intra"].flops_tc == programs * (524_288 + 98_304 + 131_072 + 524_288) == 20_937_965_568
    rows = 8 * 4096 * 16
    intra_bytes = rows * (128 * 10 + 128 * 4 + 128 * 8 + 32 * 2) + programs * 128 * 4
    assert costs["intra"].bytes_min == intra_bytes == 1_518_338_048
    # state, per (chunk, head): Y S0, Qγ S0, Ktᵀ R (3·2·32·128·128) and A_qk R (2·32·32·128)
    assert costs["state"].flops_tc == programs * (3_145_728 + 262_144) == 55_834_574_848
    state_bytes = rows * (3 * 128 + 32) * 2 + programs * 128 * 4 + rows * 128 * 4 + 8 * 16 * 128 * 128 * 4
    assert costs["state"].bytes_min == state_bytes == 721_420_288
    # 20.9 GFLOP over 1.52 GB and 55.8 GFLOP over 0.721 GB
    assert costs["intra"].intensity == pytest.approx(13.79, abs=0.005)
    assert costs["state"].intensity == pytest.approx(77.40, abs=0.005)


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


def test_state_tf32x3_counts_three_tf32_products() -> None:
    fp32 = Shape(8, 4096, 16, 128, 128, "fp32")
    plain = state_cost(fp32, FwdConfig(state=StateConfig(precision="tf32")))
    triple = state_cost(fp32, FwdConfig(state=StateConfig(precision="tf32x3")))
    assert triple.flops_tc == plain.flops_tc
    assert dict(triple.dot_mix) == {"tf32": 3 * plain.flops_tc}
    rounded = state_cost(fp32, FwdConfig(state=StateConfig(precision="tf32rn")))
    assert dict(rounded.dot_mix) == dict(plain.dot_mix) and rounded.flops_cuda > plain.flops_cuda


def test_split_output_adds_the_state_and_r_handoff() -> None:
    fused = state_cost(ANCHOR, FwdConfig())
    split = state_cost(ANCHOR, FwdConfig(state=StateConfig(output="split")))
    chunks = 8 * 128 * 16  # 4096 / 32 chunks per sequence, 8 sequences, 16 heads
    handoff = 2 * (chunks * 128 * 128 + 8 * 4096 * 16 * 128) * 2  # S0 per chunk and R, bf16, out and back
    assert handoff == 1_342_177_280
    assert split.bytes_moved - fused.bytes_moved == handoff
    assert split.flops_tc == fused.flops_tc


def test_sequence_split_adds_the_transition_pass_and_the_carry() -> None:
    long = Shape(1, 65536, 4, 128, 128, "bf16")
    plain = state_cost(long, FwdConfig(state=StateConfig(BV=32)))
    split = state_cost(long, FwdConfig(state=StateConfig(BV=32, segment_chunks=128)))
    chunks = 2048 * 4  # 65536 / 32 chunks, 4 heads
    # Launch 1: Y·X and K_tailᵀ·R over K + V = 256 columns per (chunk, head); the pass itself: four dots on V.
    transition = chunks * 2 * (2 * 32 * 128 * 256)
    # Launch 2: 16 segments × 4 heads, [128, 128] × [128, 128] each, in 3xTF32.
    carry = 16 * 4 * 2 * 128 * 128 * 128
    assert split.flops_tc - plain.flops_tc == transition + carry
    assert dict(split.dot_mix) == {"bf16": plain.flops_tc + transition, "tf32": 3 * carry}
    # M_p [K, K] and E_p [K, V] out and back, S_p for 17 slots out and back, and one read of Y, K_tail, U, γ_C.
    states = 2 * (16 * 4 * 128 * 128 * 4) * 2 + 2 * 17 * 4 * 128 * 128 * 4
    inputs = 65536 * 4 * 3 * 128 * 2 + chunks * 128 * 4
    assert split.bytes_min - plain.bytes_min == states + inputs
