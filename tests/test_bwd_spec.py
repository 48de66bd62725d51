"""The chunk backward through the toolkit (kernels/bwd_spec.py, issue 11 §5): its spec registers and validates
its space and constraints (device-aware, at the forward's chunk), `tune --interpret --op bwd` writes an entry that
the dispatcher serves to ``gdn2_tune.chunk_gdn2``'s backward, and the gate rejects a wrong backward as a recorded
outcome."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gdn2_tune import ops
from gdn2_tune.kernels import chunk_bwd
from gdn2_tune.kernels.bwd_spec import BWD_OP
from gdn2_tune.kernels.chunk_bwd import BWD_FIELDS, BwdConfig, forward_chunk, value_side_fits
from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.fingerprint import constraint_sources
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.spec import SM90, DeviceLimits, get_spec, registered
from gdn2_tune.profiles import dispatch, table
from gdn2_tune.tuner import cli, measure
from gdn2_tune.tuner.outcome import Status

REPO = Path(__file__).resolve().parent.parent
WIDE = Shape(16, 2048, 8, 256, 256, "bf16")  # issue 11's K = V = 256 suite shape
ANCHOR = Shape(8, 4096, 16, 128, 128, "bf16")
# A GPU whose blocks get less shared memory than sm90's 227 KiB (sm80's 163 KiB).
SMALLER = DeviceLimits("sm80", 163 * 1024)


# ---------------------------------------------------------------------------------------------------------------
# The spec


def test_bwd_is_registered_after_the_forward_with_the_real_tunables() -> None:
    names = [spec.name for spec in registered()]
    assert names[0] == "fwd" and BWD_OP in names
    spec = get_spec(BWD_OP)
    assert spec.config_type is BwdConfig and spec.stages == ("recompute", "states", "reverse", "local")
    assert [p.name for p in spec.space] == list(BwdConfig().flat())
    assert set(BWD_FIELDS.values()) == {
        "recompute_precision", "BV", "num_warps", "num_stages", "precision", "pair_BK", "pair_warps",
        "pair_precision", "pair", "value_side", "value_tile", "value_BV", "value_BK", "value_warps",
        "segment_chunks", "state_dtype", "key_side", "recompute_store", "k_parts", "reverse_BV", "reverse_warps",
        "reverse_k_parts", "reverse_stages",
    } and list(BWD_FIELDS) == [p.name for p in spec.space]
    assert spec.suite == (ANCHOR, Shape(1, 32768, 16, 128, 128, "bf16"), Shape(32, 1024, 16, 128, 128, "bf16"), WIDE)


def test_defaults_are_admissible_and_round_trip_through_a_table_entry() -> None:
    spec = get_spec(BWD_OP)
    for shape in (*spec.suite, spec.interpret_shape):
        for device in (SM90, SMALLER):
            cfg = spec.default_config(shape, device)
            assert spec.infeasibility(cfg, shape, device) is None, (shape, device, cfg)
        cfg = spec.default_config(shape)
        assert table.parse_config(cfg.to_dict(), op=BWD_OP) == cfg
        assert spec.from_flat(cfg.flat()) == cfg
    # bf16: the "kv" tiling (measured faster at both K); fp16 keeps "v" where it fits on chip, and at K = V = 256,
    # where it does not, falls back to "kv" (still fused).
    wide = spec.default_config(WIDE)
    assert (wide.value_side, wide.value_tile) == ("triton", "kv") and spec.default_config(ANCHOR).value_tile == "kv"
    assert spec.default_config(dataclasses.replace(ANCHOR, dtype="fp16")).value_tile == "v"
    assert spec.default_config(dataclasses.replace(WIDE, dtype="fp16")).value_tile == "kv"


def test_the_fused_value_side_is_refused_where_it_does_not_fit_on_chip() -> None:
    spec = get_spec(BWD_OP)
    # The "v" tiling with its idle K tile left at the built-in value (a tile that has no effect is refused).
    fused = dataclasses.replace(spec.default_config(ANCHOR), value_side="triton", value_tile="v", value_BK=32,
                                value_BV=64, value_warps=8)
    chunk = forward_chunk(WIDE, SM90)
    assert not value_side_fits(WIDE, chunk)
    assert "fused value side" in (spec.infeasibility(fused, WIDE) or "")
    # It fits an H200 at K = V = 128, not a GPU with less shared memory per block.
    assert value_side_fits(ANCHOR, chunk) and spec.infeasibility(fused, ANCHOR) is None
    assert "fused value side" in (spec.infeasibility(fused, ANCHOR, SMALLER) or "")
    # A fitted neighbour moves to the "kv" tiling, which fits.
    tiled = dataclasses.replace(fused, value_BV=128, value_warps=4)
    fitted = spec.fit_to_shape(tiled, WIDE)
    assert fitted is not None and fitted.value_tile == "kv" and spec.infeasibility(fitted, WIDE) is None


def test_points_that_time_the_same_kernels_and_non_tunables_are_refused() -> None:
    spec = get_spec(BWD_OP)
    cfg = dataclasses.replace(spec.default_config(ANCHOR), value_tile="v", value_BK=32, value_BV=64, value_warps=8)
    idle = dataclasses.replace(cfg, value_side="torch", value_BV=32)
    assert "value_BV has no effect" in (spec.infeasibility(idle, ANCHOR) or "")
    assert "value_BK has no effect" in (spec.infeasibility(dataclasses.replace(cfg, value_BK=64), ANCHOR) or "")
    assert "not a tunable" in (spec.infeasibility(dataclasses.replace(cfg, local="autograd"), ANCHOR) or "")
    # K = V = 256: each pass fits its own stages, against the bytes of the operands it stages (the reverse pass
    # three [C, K] operands per chunk, the entering states two; the built-in store keeps Q_γ alone in fp32).
    wide = spec.default_config(WIDE)
    assert (wide.BV, wide.num_stages, wide.reverse_BV, wide.reverse_stages, wide.recompute_store) == (
        64, 2, 128, 1, "uykt")
    assert spec.infeasibility(dataclasses.replace(wide, num_stages=3, reverse_stages=2), WIDE) is None
    assert "reverse pass needs" in (spec.infeasibility(dataclasses.replace(wide, reverse_stages=3), WIDE) or "")
    fp32 = dataclasses.replace(wide, recompute_store="fp32", num_stages=3, reverse_stages=3)
    assert "entering states needs" in (spec.infeasibility(fp32, WIDE) or "")
    fitted = spec.fit_to_shape(fp32, WIDE)
    assert fitted is not None and (fitted.num_stages, fitted.BV, fitted.reverse_stages, fitted.reverse_BV) == (
        2, 64, 1, 128)
    assert "state.BV" in (spec.infeasibility(dataclasses.replace(cfg, BV=True), ANCHOR) or "")
    with pytest.raises(table.TableFieldError, match="BV"):
        table.parse_config({**cfg.to_dict(), "BV": 64.0}, op=BWD_OP)


def test_the_fingerprint_follows_the_constraints_into_the_backward_module() -> None:
    names = {name for name, _ in constraint_sources(get_spec(BWD_OP).constraints)}
    for helper in ("bwd_infeasibility", "value_side_fits", "pass_operand_bytes", "forward_chunk"):
        assert f"gdn2_tune.kernels.chunk_bwd.{helper}" in names, helper
    assert "gdn2_tune.kernels.chunk_bwd.VALUE_SIDE_MAX_FOOTPRINT" in names


def test_shipped_forward_entries_run_the_chunk_the_backward_is_tuned_at() -> None:
    """The backward follows the forward's chunk: a bwd entry is checked and timed at the forward's built-in chunk,
    so a shipped forward entry with another chunk would run a backward tuned for a different pipeline (it still
    runs: chunk_gdn2_bwd fits the config to the chunk the forward ran). Re-tune bwd if this fails."""
    for path in sorted((REPO / "profiles").glob("*.json")):
        profile, _ = table.load_profile(path)
        assert profile is not None, path
        for entry in profile.entries:
            if entry.stage == "fwd":
                assert entry.config.chunk == forward_chunk(entry.shape, SM90), (path.name, entry.key)


def test_the_cost_has_every_stage_and_a_total_above_the_floor() -> None:
    spec = get_spec(BWD_OP)
    for shape in spec.suite:
        costs = spec.cost(shape, spec.default_config(shape))
        assert set(costs) == {*spec.stages, "total"}
        total = sum((costs[s].bytes_min for s in spec.stages), 0.0)
        assert costs["total"].bytes_min == pytest.approx(total)
        assert spec.minimum_bytes(shape) < costs["total"].bytes_min <= costs["total"].bytes_moved
    # The torch value side runs its products on the CUDA cores.
    torch_side = dataclasses.replace(spec.default_config(WIDE), value_side="torch")
    assert dict(spec.cost(WIDE, torch_side)["local"].dot_mix).get("fp32", 0) > 0


# ---------------------------------------------------------------------------------------------------------------
# The gate


def test_the_gate_passes_the_default_and_records_a_corrupted_gradient_as_a_wrong_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = get_spec(BWD_OP)
    bench = measure.Bench(spec.interpret_shape, "cpu", op=BWD_OP, strong_decay=True)
    reference = bench.run.reference()
    cfg = spec.default_config(spec.interpret_shape)
    good = measure.gate(bench, reference, cfg)
    assert good.status == Status.OK, good.reason
    assert all(good.data[f"err_{name}"] < spec.gate_tolerance["fp32"] for name in spec.output_names)

    real = chunk_bwd.state_bwd

    def wrong(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        dhc, dh0 = real(*args, **kwargs)  # type: ignore[arg-type]
        return dhc * 1.01, dh0  # a 1% error in the state gradient reaching every chunk

    monkeypatch.setattr(chunk_bwd, "state_bwd", wrong)
    bad = measure.gate(bench, reference, cfg)
    assert bad.status == Status.WRONG_ANSWER and "error above tolerance" in (bad.reason or "")
    assert bad.data["err_dv"] > spec.gate_tolerance["fp32"] and bad.data["err_dh0"] < spec.gate_tolerance["fp32"]


# ---------------------------------------------------------------------------------------------------------------
# Tune, then serve


def _backward(shape: Shape, monkeypatch: pytest.MonkeyPatch) -> list[BwdConfig]:
    """The backward configs ``gdn2_tune.chunk_gdn2``'s backward launched for one call at ``shape``."""
    launched: list[BwdConfig] = []
    real = chunk_bwd.chunk_gdn2_bwd

    def spy(*args: object, bwd_config: BwdConfig, **kwargs: object) -> tuple[torch.Tensor, ...]:
        launched.append(bwd_config)
        return real(*args, bwd_config=bwd_config, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(chunk_bwd, "chunk_gdn2_bwd", spy)
    x = make_inputs(shape, "cpu", 0)
    xs = [t.clone().requires_grad_(True) for t in x.args()]
    o, _ = ops.chunk_gdn2(*xs, initial_state=x.initial_state)
    o.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in xs)
    return launched


def test_without_a_table_the_backward_runs_the_built_in_default(
    monkeypatch: pytest.MonkeyPatch, no_tables: None
) -> None:
    shape = get_spec(BWD_OP).interpret_shape
    assert dispatch.explain(shape, BWD_OP).source == "default"
    assert _backward(shape, monkeypatch) == [get_spec(BWD_OP).default_config(shape)]


def test_tune_interpret_writes_a_bwd_entry_the_dispatcher_serves_to_the_backward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_tables: None
) -> None:
    spec = get_spec(BWD_OP)
    shape = spec.interpret_shape
    out = tmp_path / "bwd.json"
    # Trials with two warps in the per-sequence passes (the default has four; it is re-timed too and may win).
    code = cli.main(["tune", "--op", BWD_OP, "--interpret", "--no-progress", "--trials", "2",
                     "--param", "state.num_warps=2", "--param", "reverse.num_warps=2",
                     "--param", "local.value_side=triton",
                     "--param", "local.value_tile=v", "--param", "local.value_BV=64",
                     # Neither the sequence split (one segment at T=40) nor bf16 states (fp32 inputs) fit here, and a
                     # TF32 recompute fails the fp32 gate: pinned, so that both trials complete whatever is drawn.
                     "--param", "state.segment_chunks=0", "--param", "state.state_dtype=fp32",
                     "--param", "recompute.precision=tf32x3",
                     "--run-dir", str(tmp_path / "run"), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    profile, problems = table.load_profile(out)
    assert profile is not None and not problems, problems
    (entry,) = profile.entries
    assert entry.key == table.entry_key(BWD_OP, shape) == "bwd/K16-V16-fp32/T40-BH1"
    assert isinstance(entry.config, BwdConfig) and spec.infeasibility(entry.config, shape) is None
    assert [t.params["state.num_warps"] for t in profile.trials if t.state == "COMPLETE"] == [2, 2]
    assert set(entry.stage_ms) == set(spec.stages) and not table.staleness(profile)
    assert cli.main(["report", "--profile", str(out), "--view", "shape", "--shape", entry.key, "--width", "120"]) == 0
    assert entry.config.label() in capsys.readouterr().out

    monkeypatch.setenv(dispatch.ENV_PROFILE, str(out))
    dispatch.clear_cache()
    choice = dispatch.explain(shape, BWD_OP)
    assert (choice.config, choice.source, choice.key) == (entry.config, "user", entry.key)
    assert dispatch.explain(shape).source == "default"  # the forward is not served a bwd entry
    assert _backward(shape, monkeypatch) == [entry.config]


def test_one_command_tunes_several_ops_into_one_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_tables: None
) -> None:
    """`tune --op decode,bwd`: each op's study runs in turn and merges into the one output table, which then holds
    both ops' entries and both fingerprints (a new GPU's whole table from one command)."""
    from gdn2_tune.kernels.decode_spec import DECODE_OP

    out = tmp_path / "both.json"
    code = cli.main(["tune", "--op", f"{DECODE_OP},{BWD_OP}", "--interpret", "--no-progress", "--trials", "2",
                     "--run-dir", str(tmp_path / "run"), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    profile, problems = table.load_profile(out)
    assert profile is not None and not problems, problems
    assert table.entry_ops(profile.entries) == (BWD_OP, DECODE_OP)
    assert set(profile.kernel_hash) == {BWD_OP, DECODE_OP} and not table.stale_ops(profile)


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--op", "fwd,nope"], "--op:", id="unknown-op"),
    pytest.param(["--op", ","], "--op:", id="empty-list"),
    pytest.param(["--op", "fwd,bwd", "--shapes", "2x64x2x32x32"], "--shapes: applies to one op", id="shapes-two-ops"),
    pytest.param(["--op", "all", "--param", "chunk=32"], "--param: applies to one op", id="param-all-ops"),
])
def test_an_op_list_is_checked_before_any_work(argv: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["tune", *argv, "--interpret", "--no-progress", "--run-dir", str(tmp_path / "run"),
                     "--output", str(tmp_path / "t.json")])
    captured = capsys.readouterr()
    assert code != 0 and message in captured.err, captured.err
    assert not (tmp_path / "t.json").exists()


def test_several_ops_share_the_budget_by_what_their_studies_need(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`tune --op fwd,algorithm,bwd --budget-minutes 13`: each study gets an equal share, except that a study whose
    whole space is smaller than --trials gets that fraction of one (algorithm: 2 of 30); what an op leaves unused
    flows on to the ops after it."""
    from gdn2_tune.kernels.fwd_spec import FWD
    from gdn2_tune.tuner import run as run_mod

    seen: list[run_mod.TuneOptions] = []
    monkeypatch.setattr(cli, "_require_gpus", lambda gpus: None)
    monkeypatch.setattr(run_mod, "tune", lambda options: seen.append(options) or run_mod.RunResult(None, (), ()))
    bwd, algorithm = get_spec(BWD_OP), get_spec("algorithm")
    cli.main(["tune", "--op", f"fwd,algorithm,{BWD_OP}", "--budget-minutes", "13", "--no-progress",
              "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "t.json")])
    assert [o.op for o in seen] == ["fwd", "algorithm", BWD_OP]
    weights = [len(FWD.suite), len(algorithm.suite) * 2 / 30, len(bwd.suite)]
    assert seen[0].budget_minutes == pytest.approx(13 * weights[0] / sum(weights), rel=1e-3)
    # The stand-in tune returns at once, so no op uses its share: the whole budget is left for each next one, and
    # the last gets all of it.
    assert seen[1].budget_minutes == pytest.approx(13 * weights[1] / sum(weights[1:]), rel=1e-3)
    assert seen[2].budget_minutes == pytest.approx(13, rel=1e-3)


@pytest.mark.parametrize(("gpus", "expected"), [(None, (8.0, 90.0)), ("0,1", (4.0, 90.0)), ("0,1,2,3", (2.0, 90.0))])
def test_the_default_budget_is_gpu_time(gpus: str | None, expected: tuple[float, float], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --budget-minutes or --timeout, a run on N GPUs gets 1/N of the default wall time: the GPUs search
    different studies at once. A study is searched on one GPU, so its own limit stays the same."""
    from gdn2_tune.tuner import run as run_mod

    seen: list[run_mod.TuneOptions] = []
    monkeypatch.setattr(cli, "_require_gpus", lambda gpus: None)
    monkeypatch.setattr(run_mod, "tune", lambda options: seen.append(options) or run_mod.RunResult(None, (), ()))
    cli.main(["tune", "--no-progress", *(["--gpus", gpus] if gpus else []), "--run-dir", str(tmp_path / "run"),
              "--output", str(tmp_path / "t.json")])
    assert (seen[0].budget_minutes, seen[0].timeout_s) == pytest.approx(expected)


def test_no_study_selects_a_recompute_store_with_q_gamma_in_bf16() -> None:
    # Q_γ in bf16 measured over the baseline's dh0 error on an H200 (kernels/bwd_spec.py SEARCH_RULES): an explicit
    # option only; the subsets that keep it fp32 measured at the fp32 store's dh0 and may be tuned.
    spec = get_spec(BWD_OP)
    cfg = spec.default_config(ANCHOR)
    assert cfg.recompute_store == "uykt"
    store = dataclasses.replace(cfg, recompute_store="input")
    assert spec.infeasibility(store, ANCHOR) is None
    assert "dh0" in (spec.search_refusal(store, ANCHOR) or "")
    assert spec.search_refusal(cfg, ANCHOR) is None
    # Every subset runs, those that narrow Q_γ are refused, and they cost fewer bytes the more tensors they narrow.
    from gdn2_tune.kernels.bwd_spec import bwd_costs
    from gdn2_tune.kernels.chunk_bwd import RECOMPUTE_STORE_TENSORS

    moved = {}
    for name, narrow in RECOMPUTE_STORE_TENSORS.items():
        sub = dataclasses.replace(cfg, recompute_store=name)
        assert spec.infeasibility(sub, ANCHOR) is None, name
        assert (spec.search_refusal(sub, ANCHOR) is None) == ("qg" not in narrow), name
        moved[narrow] = bwd_costs(ANCHOR, sub)["total"].bytes_min
    rows = ANCHOR.B * ANCHOR.T * ANCHOR.H
    # U is [rows, V] written once and read by the entering states; Q_γ [rows, K] read by the reverse pass; fp32 -> bf16
    # saves 2 bytes an element on each write and read.
    assert moved[()] - moved[("u",)] == 2 * 2 * rows * ANCHOR.V
    assert moved[("u",)] - moved[("u", "qg")] == 2 * 2 * rows * ANCHOR.K
    assert moved[("u", "y")] == moved[("u", "kt")] < moved[("u", "qg")]
    assert moved[("y", "u", "qg", "kt")] < moved[("u", "y", "kt")] < moved[("u", "y")]
