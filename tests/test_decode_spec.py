"""The decode op through the toolkit (kernels/decode_spec.py, issue 13 §5): its spec registers and validates, a
timed step leaves the gate valid, `tune --interpret --op decode` writes an entry that the dispatcher then serves to
``gdn2_tune.fused_recurrent_gdn2``, and the recurrent-or-chunk choice follows a table per T bucket and falls back to
the built-in crossover without one."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import triton

import gdn2_tune.kernels.decode as decode_module
from gdn2_tune import ops
from gdn2_tune.kernels.buffers import poisoned
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.decode_config import DecodeConfig, DecodeShape, table_shape
from gdn2_tune.kernels.decode_spec import (
    ALGORITHM_OP,
    DECODE_OP,
    DEFAULT_CROSSOVER_T,
    TIMED_INDEX_DTYPES,
    AlgorithmConfig,
    choose_algorithm,
    crossover_t,
    step_cost,
)
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.spec import get_spec, registered
from gdn2_tune.profiles import dispatch, table
from gdn2_tune.tuner import cli

REPO = Path(__file__).resolve().parent.parent


def record_decode_launches(monkeypatch: pytest.MonkeyPatch) -> list[DecodeConfig]:
    """The configs the decode launcher is called with from now on (it still runs)."""
    launched: list[DecodeConfig] = []
    real = decode_module.decode_fwd

    def spy(*args: object, cfg: DecodeConfig, **kwargs: object) -> None:
        launched.append(cfg)
        real(*args, cfg=cfg, **kwargs)

    monkeypatch.setattr(decode_module, "decode_fwd", spy)
    return launched


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double().cpu() - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------------------------
# The spec


def test_decode_and_algorithm_are_registered_after_the_forward() -> None:
    names = [spec.name for spec in registered()]
    assert names[0] == "fwd" and DECODE_OP in names and ALGORITHM_OP in names
    spec = get_spec(DECODE_OP)
    assert spec.config_type is DecodeConfig and spec.stages == ("step",)
    assert [p.name for p in spec.space] == list(DecodeConfig().flat())


def test_the_suite_covers_the_serving_batches_the_larger_head_and_a_speculative_step() -> None:
    suite = get_spec(DECODE_OP).suite
    assert {s.B for s in suite if (s.T, s.K, s.V) == (1, 128, 128)} == {1, 8, 32, 128, 512}
    assert sum((s.K, s.V) == (256, 256) for s in suite) >= 2
    assert any(s.T == 4 for s in suite) and all(s.H == 16 for s in suite)


@pytest.mark.parametrize("op", [DECODE_OP, ALGORITHM_OP])
def test_defaults_are_admissible_and_round_trip_through_a_table_entry(op: str) -> None:
    spec = get_spec(op)
    for shape in (*spec.suite, spec.interpret_shape):
        cfg = spec.default_config(shape)
        assert spec.infeasibility(cfg, shape) is None, (shape, cfg)
        assert table.parse_config(cfg.to_dict(), op=op) == cfg
        assert spec.from_flat(cfg.flat()) == cfg


def test_a_wrong_typed_value_is_rejected() -> None:
    spec = get_spec(DECODE_OP)
    shape = spec.interpret_shape
    assert "BV" in (spec.infeasibility(DecodeConfig(BV=True), shape) or "")
    assert "register" in (spec.infeasibility(DecodeConfig(BV=128, num_warps=1), Shape(1, 1, 1, 256, 256)) or "")
    with pytest.raises(table.TableFieldError, match="num_warps"):
        table.parse_config({**DecodeConfig().to_dict(), "num_warps": 4.0}, op=DECODE_OP)


def test_the_table_shape_is_the_batch_and_the_tokens_per_sequence() -> None:
    assert table.entry_key(DECODE_OP, table_shape(DecodeShape(128, 1, 16, 128, 128))) == \
        "decode/K128-V128-bf16/T1-BH2048"


def test_the_cost_counts_the_state_traffic_once_each_way_at_t1_and_per_token_when_speculating() -> None:
    # A timed step is one launch per index dtype (int32, int64): twice one launch's traffic and FLOPs.
    spec = get_spec(DECODE_OP)
    launches = len(TIMED_INDEX_DTYPES)
    state = 128 * 16 * 128 * 128 * 4
    one = spec.cost(Shape(128, 1, 16, 128, 128), DecodeConfig())["total"]
    assert launches * 2 * state < one.bytes_min < launches * 2.04 * state  # inputs and output: 1.5%
    four = spec.cost(Shape(128, 4, 16, 128, 128), DecodeConfig())["total"]
    assert launches * 5 * state < four.bytes_min < launches * 5.2 * state
    assert one.flops_tc == launches * 128 * 16 * 6 * 128 * 128 and one.dot_mix == (("fp32", one.flops_tc),)
    assert spec.minimum_bytes(Shape(128, 1, 16, 128, 128)) == one.bytes_min
    # the slot indices: 4 bytes per sequence in int32, 8 in int64
    assert step_cost(Shape(128, 1, 16, 128, 128), 32, 1, 8).bytes_min - \
        step_cost(Shape(128, 1, 16, 128, 128), 32, 1, 4).bytes_min == 128 * 4


def test_the_timed_pool_is_larger_than_the_step_within_its_byte_budget() -> None:
    from gdn2_tune.kernels.decode_spec import POOL_BYTES, POOL_FACTOR, pool_slots, touched_slots

    small, large = Shape(8, 1, 16, 256, 256), Shape(512, 1, 16, 256, 256)  # 32 MiB and 2 GiB of state a step
    assert pool_slots(small) == POOL_FACTOR * touched_slots(small) == 64
    assert pool_slots(large) == touched_slots(large) == 512 and 512 * 16 * 256 * 256 * 4 == POOL_BYTES
    assert pool_slots(Shape(4, 4, 2, 16, 16)) == POOL_FACTOR * 16  # a speculative step: a slot per token
    run = get_spec(DECODE_OP).prepare(Shape(3, 1, 2, 16, 16, "fp32"), "cpu", seed=0)
    assert run.pool.shape[0] == 3 * POOL_FACTOR and len(set(run.indices.tolist())) == 3


def test_a_timed_step_launches_once_per_index_dtype_on_pools_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from gdn2_tune.kernels import decode_spec

    seen = []
    real = decode_spec.decode_fwd

    def spy(*args, **kw):
        seen.append((kw["ssm_state_indices"].dtype, kw["initial_state"].data_ptr()))
        return real(*args, **kw)

    monkeypatch.setattr(decode_spec, "decode_fwd", spy)
    spec = get_spec(DECODE_OP)
    shape = Shape(2, 1, 2, 16, 16, "fp32")
    run = spec.prepare(shape, "cpu", seed=0)
    ref = run.reference()
    with poisoned():
        o, pool = run.forward(spec.default_config(shape))
    assert [dt for dt, _ in seen] == list(TIMED_INDEX_DTYPES) and len({ptr for _, ptr in seen}) == len(seen)
    assert relative(o, ref[0]) <= spec.gate_tolerance["fp32"] and relative(pool, ref[1]) <= spec.gate_tolerance["fp32"]
    for indices, other in run.launches[1:]:  # the same slots, the same result
        assert torch.equal(indices.long(), run.indices.long()) and torch.equal(other, pool)
    # The tuner times each launch alone (L2 flushed before each) and sums them.
    from gdn2_tune.tuner.measure import Bench

    bench = Bench(shape, "cpu", op=DECODE_OP)
    seen.clear()
    parts, launch = bench.replayable_parts(spec.default_config(shape))
    assert len(parts) == len(TIMED_INDEX_DTYPES) and launch == "eager"
    samples = bench.sample(parts, 2)
    assert len(samples) == 2 and [dt for dt, _ in seen] == list(TIMED_INDEX_DTYPES) * 2


def test_num_stages_is_at_most_one_more_than_the_tokens() -> None:
    from gdn2_tune.tuner.space import SearchSpace

    spec = get_spec(DECODE_OP)
    one, four = Shape(32, 1, 16, 128, 128), Shape(32, 4, 16, 128, 128)
    assert "deeper than its T=1 token(s) + 1" in spec.infeasibility(DecodeConfig(num_stages=3), one)
    # depth 2 at one token is its own program: the loop's prologue issues the input loads as cp.async copies
    assert spec.infeasibility(DecodeConfig(num_stages=2), one) is None
    assert spec.infeasibility(DecodeConfig(num_stages=3), four) is None
    # The tuner's space: no trial is spent on prefetching tokens that do not exist.
    values = {p.name: p.values for p in SearchSpace(op=DECODE_OP).for_shape(one).params}
    assert values["num_stages"] == (1, 2)
    assert {p.name: p.values for p in SearchSpace(op=DECODE_OP).for_shape(four).params}["num_stages"] == (1, 2, 3)


def test_a_bf16_state_call_is_not_served_the_tables_fp32_state_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_tables: None
) -> None:
    shape = Shape(2, 1, 2, 16, 16, "fp32")
    default = get_spec(DECODE_OP).default_config(shape)
    tuned = dataclasses.replace(default, num_warps=2 if default.num_warps != 2 else 1, stream_state=True)
    timing = table.Timing(1.0, 1.0, 1.0, 0.0)
    entry = table.Entry(table.entry_key(DECODE_OP, shape), DECODE_OP, shape, tuned, timing, timing, 1.0,
                        {"step": 1.0}, {"step": 1.0}, None, 1, 0, 0)
    device = table.DeviceInfo("h200", "NVIDIA H200", "sm90", (9, 0), 132, None, None, None, None)
    table.save_profile(table.Profile(
        schema_version=table.SCHEMA_VERSION, device=device, torch_version="x", triton_version=triton.__version__,
        kernel_hash={DECODE_OP: get_spec(DECODE_OP).fingerprint()}, created="2026-12-01T00:00:00+00:00",
        sampler="tpe", budget={}, interpret=True, roofs=None, entries=(entry,), trials=(),
    ), tmp_path / "decode.json")
    monkeypatch.setenv(dispatch.ENV_PROFILE, str(tmp_path / "decode.json"))
    launched = record_decode_launches(monkeypatch)
    x = make_inputs(shape, "cpu", 0)
    assert x.initial_state is not None
    for state_dtype in (torch.float32, torch.bfloat16):
        pool = x.initial_state.to(state_dtype)
        ops.fused_recurrent_gdn2(*x.args(), initial_state=pool, inplace_final_state=True)
    # The tables' entries are timed with an fp32 pool: a bf16 pool takes the built-in default.
    assert launched == [tuned, default]


@pytest.mark.parametrize("shape", [
    pytest.param(Shape(2, 1, 2, 16, 16, "fp32"), id="B2-T1-H2-K16-V16-fp32"),
    pytest.param(Shape(3, 3, 1, 16, 24, "bf16"), id="B3-T3-H1-K16-V24-bf16-speculative"),
])
def test_a_timed_step_mutates_the_pool_but_the_gate_still_compares_from_the_initial_pool(shape: Shape) -> None:
    spec = get_spec(DECODE_OP)
    run = spec.prepare(shape, "cpu", seed=0, strong_decay=True)
    ref = run.reference()
    cfg = spec.default_config(shape)
    tol = spec.gate_tolerance[shape.dtype]
    for _ in range(2):
        run.stage_fns(cfg)["step"]()  # what timing runs: in place, no reset
    assert relative(run.pool, ref[1]) > tol  # the pool moved on, as a served pool does
    with poisoned():
        o, pool = run.forward(cfg)
    assert relative(o, ref[0]) <= tol and relative(pool, ref[1]) <= tol


def test_the_gate_shape_compiles_what_is_timed_with_fewer_sequences() -> None:
    spec = get_spec(DECODE_OP)
    for shape in spec.suite:
        small = spec.gate_shape(shape)
        assert (small.T, small.H, small.K, small.V, small.dtype) == (shape.T, shape.H, shape.K, shape.V, shape.dtype)
        assert small.B <= min(shape.B, 16)


# ---------------------------------------------------------------------------------------------------------------
# Tune, then serve


def tune_interpret(
    op: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[Path, table.Profile, table.Entry]:
    """`tune.py tune --interpret --op OP` at the op's interpreter shape, two trials: the table, its one entry."""
    out = tmp_path / f"{op}.json"
    code = cli.main(["tune", "--op", op, "--interpret", "--no-progress", "--trials", "2", *extra,
                     "--run-dir", str(tmp_path / "run"), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    profile, problems = table.load_profile(out)
    assert profile is not None and not problems, problems
    (entry,) = profile.entries
    return out, profile, entry


def test_tune_interpret_writes_a_decode_entry_the_dispatcher_serves_to_the_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_tables: None
) -> None:
    out, profile, entry = tune_interpret(DECODE_OP, tmp_path, capsys, "--param", "num_stages=1",
                                         "--param", "num_warps=1,2")
    shape = get_spec(DECODE_OP).interpret_shape
    assert entry.key == table.entry_key(DECODE_OP, shape) == "decode/K16-V16-fp32/T1-BH4"
    assert isinstance(entry.config, DecodeConfig) and set(entry.stage_ms) == {"step"}
    assert profile.kernel_hash == {DECODE_OP: get_spec(DECODE_OP).fingerprint()}
    assert cli.main(["report", "--profile", str(out), "--view", "shape", "--shape", entry.key, "--width", "120"]) == 0
    assert entry.config.label() in capsys.readouterr().out

    monkeypatch.setenv(dispatch.ENV_PROFILE, str(out))
    dispatch.clear_cache()
    choice = dispatch.explain(shape, DECODE_OP)
    assert (choice.config, choice.source, choice.key) == (entry.config, "user", entry.key)
    # The forward's lookup is not served a decode entry.
    assert dispatch.explain(shape).source == "default"

    launched = record_decode_launches(monkeypatch)
    x = make_inputs(shape, "cpu", 0)
    ops.fused_recurrent_gdn2(*x.args(), initial_state=x.initial_state, inplace_final_state=True)
    assert launched == [entry.config]


# ---------------------------------------------------------------------------------------------------------------
# Recurrent or chunked


def test_the_package_exports_the_dispatched_ops() -> None:
    import gdn2_tune

    assert gdn2_tune.auto_gdn2 is ops.auto_gdn2 and gdn2_tune.fused_recurrent_gdn2 is ops.fused_recurrent_gdn2


def test_crossover_is_where_the_chunked_op_wins_from_on() -> None:
    assert crossover_t({1: "recurrent", 2: "recurrent", 4: "chunk", 8: "recurrent", 16: "chunk", 32: "chunk"}) == 16
    assert crossover_t({1: "recurrent", 64: "recurrent"}) is None
    assert crossover_t({1: "chunk", 4: "chunk"}) == 1


def _call(T: int, B: int = 1) -> tuple[torch.Tensor, ...]:
    x = make_inputs(Shape(B, T, 1, 16, 16, "fp32"), "cpu", 0)
    return x.args()


def test_without_a_table_the_built_in_crossover_decides(no_tables: None) -> None:
    for T, want in ((1, "recurrent"), (DEFAULT_CROSSOVER_T - 1, "recurrent"), (DEFAULT_CROSSOVER_T, "chunk")):
        got = choose_algorithm(*_call(T), initial_state=None, cu_seqlens=None, algorithm="auto",
                               choose=lambda s: dispatch.select_config(s, ALGORITHM_OP))
        assert got == want, T
        assert dispatch.explain(Shape(1, T, 1, 16, 16, "fp32"), ALGORITHM_OP).source == "default"


def test_a_forced_algorithm_and_grad_override_the_table(no_tables: None) -> None:
    args = _call(1)
    assert choose_algorithm(*args, initial_state=None, cu_seqlens=None, algorithm="chunk", choose=None) == "chunk"
    q = args[0].clone().requires_grad_()
    assert choose_algorithm(q, *args[1:], initial_state=None, cu_seqlens=None, algorithm="auto",
                            choose=None) == "chunk"
    with pytest.raises(NotImplementedError, match="inference only"):
        choose_algorithm(q, *args[1:], initial_state=None, cu_seqlens=None, algorithm="recurrent", choose=None)
    with pytest.raises(ValueError, match="algorithm: expected one of"):
        choose_algorithm(*args, initial_state=None, cu_seqlens=None, algorithm="fast", choose=None)


def test_tune_interpret_then_the_auto_entry_follows_the_table_per_t_bucket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_tables: None
) -> None:
    _, profile, entry = tune_interpret(ALGORITHM_OP, tmp_path, capsys)
    assert entry.key == "algorithm/K16-V16-fp32/T4-BH1" and isinstance(entry.config, AlgorithmConfig)

    # Replay: what a GPU run over T ∈ {1, 4, 8, 32} would have recorded, the chunked op winning from T = 8 on (the
    # interpreter's own timings mean nothing, so the winners are set here).
    winners = {1: "recurrent", 4: "recurrent", 8: "chunk", 32: "chunk"}
    entries = []
    for T, algorithm in winners.items():
        shape = dataclasses.replace(entry.shape, T=T)
        entries.append(dataclasses.replace(entry, key=table.entry_key(ALGORITHM_OP, shape), shape=shape,
                                           config=AlgorithmConfig(algorithm), incumbent=None))
    replayed = tmp_path / "replayed.json"
    table.save_profile(dataclasses.replace(profile, entries=tuple(entries), trials=()), replayed)
    loaded, problems = table.load_profile(replayed)
    assert loaded is not None and not problems, problems
    assert crossover_t({e.shape.T: e.config.algorithm for e in loaded.entries}) == 8

    monkeypatch.setenv(dispatch.ENV_PROFILE, str(replayed))
    dispatch.clear_cache()
    # Nearest bucket per T: 2 -> T=1 or 4 (recurrent), 16 -> 8 or 32 (chunk), 64 -> 32 (chunk); also at a batch
    # that has no entry of its own.
    for T, want in ((1, "recurrent"), (2, "recurrent"), (4, "recurrent"), (16, "chunk"), (64, "chunk")):
        for B in (1, 2):
            got = choose_algorithm(*_call(T, B), initial_state=None, cu_seqlens=None, algorithm="auto",
                                   choose=lambda s: dispatch.select_config(s, ALGORITHM_OP))
            assert got == want, (T, B)
    # The public entry runs the chosen op and agrees with the reference either way.
    for T in (2, 16):
        x = make_inputs(Shape(1, T, 1, 16, 16, "fp32"), "cpu", 0)
        o, ht = ops.auto_gdn2(*x.args(), initial_state=x.initial_state, output_final_state=True)
        ref_o, ref_ht = get_spec("fwd").prepare(Shape(1, T, 1, 16, 16, "fp32"), "cpu").reference()
        # Below the crossover (8) the recurrent kernel runs, exact in the interpreter; the chunked forward's fp32
        # default rounds its intra operands to nearest TF32 ("tf32rn", kernels.config.default_config):
        # tests/test_kernels.py's TF32RN_TOL budget, 2u of TF32's u = 2^-11.
        tol = 1e-4 if T < 8 else 2**-10
        assert relative(o, ref_o) < tol and relative(ht, ref_ht) < tol


def test_the_decode_spec_module_never_imports_profiles_tuner_or_reports() -> None:
    for name in ("decode_spec.py", "decode.py", "decode_config.py"):
        text = (REPO / "kernels" / name).read_text()
        assert "gdn2_tune.profiles" not in text and "gdn2_tune.tuner" not in text, name
    assert os.path.exists(REPO / "gdn2_tune" / "ops.py")
