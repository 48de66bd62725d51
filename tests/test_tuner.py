"""The tuner on a CPU: search logic replayed from recorded trials, infeasible points never compiled, worker
failures and hangs recorded as outcomes, resume after kill -9, two processes on one PostgreSQL study, and the
whole `tune.py tune --interpret` pipeline down to a loadable table."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from gdn2_tune.kernels.config import FwdConfig, Shape, default_config, fit_to_shape, infeasibility
from gdn2_tune.kernels.spec import SM90, DeviceLimits, get_spec
from gdn2_tune.profiles import table
from gdn2_tune.tuner import study as study_mod
from gdn2_tune.tuner.device import decode_throttle_reasons
from gdn2_tune.tuner.measure import quantiles
from gdn2_tune.tuner.outcome import Outcome, Status, failed, ok
from gdn2_tune.tuner.replay import RecordedGrid, replay
from gdn2_tune.tuner.space import SearchSpace, parse_param_choices
from gdn2_tune.tuner.suite import INTERPRET_SHAPE, SUITE, format_shape, gate_shape, parse_shape
from gdn2_tune.tuner.worker import WorkerPool, WorkerProcess

REPO = Path(__file__).resolve().parent.parent
ANCHOR = SUITE[0]
# A space of a few dozen points at the interpreter shape: small enough that interpreter studies finish in seconds.
TINY_PARAMS = [
    "chunk=32,64", "intra.BC=16", "intra.BK=16,32", "intra.BV=32", "intra.num_warps=4", "intra.num_stages=1",
    "intra.precision=tf32x3,ieee", "state.BV=16,32", "state.num_warps=4", "state.num_stages=1,2",
    "state.precision=input", "state.k_parts=1",
]


def tune_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "tune.py"), "tune", "--interpret", "--no-progress", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [e.get("PYTHONPATH")])])
    e["TRITON_INTERPRET"] = "1"
    return e


def journal_study(run_dir: Path, key: str) -> optuna.Study:
    storage = study_mod.open_storage(None, run_dir)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    name = next(n for n in names if n.startswith(key + "@"))
    return optuna.load_study(study_name=name, storage=storage)


# ---------------------------------------------------------------------------------------------------------------
# Small pieces


@pytest.mark.parametrize(
    "text, shape",
    [
        pytest.param("8x4096x16x128x128:bf16", Shape(8, 4096, 16, 128, 128, "bf16"), id="anchor"),
        pytest.param("1x100x3x64x32:fp32", Shape(1, 100, 3, 64, 32, "fp32"), id="B1-T100-H3-K64-V32-fp32"),
        pytest.param("1x32768x16x128x128:bf16:varlen12", Shape(1, 32768, 16, 128, 128, "bf16", 12), id="varlen"),
    ],
)
def test_parse_shape_round_trips(text: str, shape: Shape) -> None:
    assert parse_shape(text) == shape
    assert parse_shape(format_shape(shape)) == shape


@pytest.mark.parametrize("text", ["8x4096x16x128", "8x4096x16x128x128:bf8", "2x64x1x32x32:bf16:varlen3",
                                  "1x64x1x512x32"])
def test_parse_shape_rejects_with_the_argument_name(text: str) -> None:
    with pytest.raises(ValueError, match="--shapes"):
        parse_shape(text)


def test_gate_shape_keeps_what_selects_kernel_variants() -> None:
    from gdn2_tune.kernels.fwd_spec import _specialization

    chunks = (32, 64, 128)
    for shape in SUITE:
        g = gate_shape(shape)
        assert (g.K, g.V, g.H, g.dtype, g.num_seqs is None) == (shape.K, shape.V, shape.H, shape.dtype,
                                                                 shape.num_seqs is None)
        # Same Triton specialization of T and NT: the gate compiles the kernels the tuned shape runs.
        assert _specialization(g.T, chunks) == _specialization(shape.T, chunks)
        assert g.T % 32, "the gate shape must end in a partial chunk"
        assert g.B * g.T <= 2048, "the float64 reference must stay cheap"
    assert gate_shape(INTERPRET_SHAPE) == INTERPRET_SHAPE


def test_quantiles_and_throttle_decoding() -> None:
    q = quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (q.p20_ms, q.p50_ms, q.p80_ms) == pytest.approx((1.8, 3.0, 4.2))
    assert decode_throttle_reasons(0x4 | 0x40) == ("sw_power_cap", "hw_thermal_slowdown")
    assert decode_throttle_reasons(0x10000) == ("unknown_0x10000",)


def test_grid_is_exactly_the_feasible_product() -> None:
    space = SearchSpace().narrowed(parse_param_choices(["chunk=32,64,128", "intra.num_stages=1", "intra.precision=tf32",
                                                        "state.num_stages=1,4", "state.precision=input"]))
    import itertools

    names = [p.name for p in space.params]
    brute = {
        vals for vals in itertools.product(*(p.values for p in space.params))
        if infeasibility(FwdConfig.from_flat(dict(zip(names, vals))), ANCHOR) is None
    }
    grid = {tuple(p[n] for n in names) for p in space.grid(ANCHOR)}
    assert grid == brute and grid


def test_for_shape_drops_only_values_no_feasible_point_takes() -> None:
    space = SearchSpace().for_shape(INTERPRET_SHAPE)
    values = {p.name: p.values for p in space.params}
    assert values["intra.BK"] == (16, 32) and values["state.BV"] == (16, 32)  # K = V = 32
    feasible = list(SearchSpace().narrowed(parse_param_choices(TINY_PARAMS)).grid(INTERPRET_SHAPE))
    assert feasible and all(space.contains(p) for p in feasible)


def test_param_narrowing_names_the_argument() -> None:
    with pytest.raises(ValueError, match="--param"):
        parse_param_choices(["chunks=64"])
    with pytest.raises(ValueError, match="--param chunk"):
        SearchSpace().narrowed({"chunk": [48]})


# ---------------------------------------------------------------------------------------------------------------
# Search logic, replayed


def synthetic_grid() -> RecordedGrid:
    """A recorded grid at the anchor with the optimum far from the default config and a few failed points."""
    space = SearchSpace().narrowed(parse_param_choices([
        "chunk=32,64,128", "intra.BC=16,32", "intra.BK=32,64", "intra.BV=32,64", "intra.num_warps=4,8",
        "intra.num_stages=1,2", "intra.precision=tf32x3", "state.BV=16,32,64", "state.num_warps=4,8",
        "state.num_stages=1,2,3", "state.precision=input",
    ]))

    def cost(p: Mapping[str, Any]) -> float | None:
        if p["intra.BV"] == 64 and p["state.BV"] == 16 and p["chunk"] == 32:
            return None  # "wrong answer" region
        c = {32: 1.3, 64: 1.1, 128: 1.0}[p["chunk"]]
        c *= 1 + 0.1 * abs(math.log2(p["state.BV"]) - 6) + (0.08 if p["intra.num_warps"] == 4 or p["intra.BK"] == 32 else 0)
        c *= 1 + 0.05 * (p["state.num_stages"] - 3) ** 2 + 0.03 * (p["intra.BC"] == 16) + 0.04 * (p["state.num_warps"] == 4)
        return c

    return RecordedGrid.from_records(ANCHOR, [(p, cost(p)) for p in space.grid(ANCHOR)])


def test_replayed_tpe_reaches_the_grid_best_faster_than_random() -> None:
    grid = synthetic_grid()
    assert len(grid.values) > 500
    tpe = replay(grid, sampler="tpe", seeds=range(3), max_trials=80)
    rnd = replay(grid, sampler="random", seeds=range(3), max_trials=80)
    assert all(n is not None for n in tpe.trials_to_target), tpe.summary()
    assert tpe.median is not None and tpe.median <= 40, tpe.summary()
    assert rnd.median is None or rnd.median > tpe.median, (tpe.summary(), rnd.summary())


def test_replay_is_deterministic_per_seed() -> None:
    grid = synthetic_grid()
    a = replay(grid, seeds=(7,), max_trials=30)
    b = replay(grid, seeds=(7,), max_trials=30)
    assert a.trials_to_target == b.trials_to_target


class RecordingEvaluator:
    """Answers every point as valid, and remembers which points reached a worker."""

    parallel = 2

    def __init__(self) -> None:
        self.gated: list[dict[str, Any]] = []

    def _done(self, out: Outcome) -> Future[Outcome]:
        f: Future[Outcome] = Future()
        f.set_result(out)
        return f

    def gate(self, shape: Shape, gate_shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        self.gated.append(dict(params))
        return self._done(ok())

    def time(self, shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        return self._done(ok(p50_ms=1.0 + 0.01 * params["chunk"] / 32))

    def abandon(self) -> None:
        pass


def spec_for(shape: Shape, space: SearchSpace, trials: int, sampler: str = "random") -> study_mod.StudySpec:
    return study_mod.StudySpec(
        key=table.entry_key("fwd", shape), stage="fwd", shape=shape, gate_shape=shape, space=space,
        sampler=sampler, seed=0, trials=trials, timeout_s=60, warm_start=(default_config(shape).flat(),),
    )


def test_infeasible_points_are_pruned_with_a_reason_before_any_compile() -> None:
    # At K = V = 32 most of the full space is infeasible; a random sampler proposes plenty of such points.
    shape = INTERPRET_SHAPE
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ev = RecordingEvaluator()
    counts = study_mod.run_study(study, spec_for(shape, SearchSpace(), trials=12), ev)
    assert counts.evaluated == 12
    assert all(infeasibility(FwdConfig.from_flat(p), shape) is None for p in ev.gated)
    infeasible = [t for t in study.trials if t.user_attrs.get("status") == "infeasible"]
    assert infeasible, "the random sampler should have proposed infeasible points"
    for t in infeasible:
        assert t.state == TrialState.PRUNED
        # The op's constraints, then its search rules (the fp32 precision rule of kernels/fwd_spec.py).
        assert t.user_attrs["reason"] == get_spec("fwd").search_infeasibility(FwdConfig.from_flat(t.params), shape)
        assert not t.user_attrs["evaluated"]
    assert study.trials[0].params == default_config(shape).flat(), "the default config is the first trial"


# ---------------------------------------------------------------------------------------------------------------
# Isolation: failing and hanging workers

FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    for line in sys.stdin:
        req = json.loads(line)
        p = req.get("params", {})
        if req["op"] == "gate":
            if p.get("state.BV") == 16 and p.get("chunk") == 32:
                time.sleep(60)          # a hang: the parent's timeout must fire
            if p.get("state.BV") == 16 and p.get("chunk") == 64:
                os._exit(7)             # a crash (as after a CUDA fault)
            if p.get("state.BV") == 32 and p.get("chunk") == 32 and p.get("state.num_stages") == 2:
                out = {"status": "fault", "reason": "CUDA error: an illegal memory access was encountered"}
            else:
                out = {"status": "ok", "reason": None}
        else:
            out = {"status": "ok", "reason": None, "p50_ms": 1.0 + p["state.num_stages"], "p20_ms": 1.0,
                   "p80_ms": 9.0, "telemetry": {"sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
                                                "throttle_reasons": [], "temperature_c": 50, "power_w": 300.0}}
        sys.stdout.write(json.dumps(out) + "\\n")
        sys.stdout.flush()
        if out["status"] == "fault":
            sys.exit(3)
""")


class FakeEvaluator:
    def __init__(self, script: Path, log_dir: Path, timeout: float) -> None:
        argv = [sys.executable, str(script)]
        self.gates = WorkerPool(2, lambda i: WorkerProcess(f"fake-gate{i}", os.environ, log_dir, argv))
        self.timer = WorkerPool(1, lambda i: WorkerProcess("fake-time", os.environ, log_dir, argv))
        self.parallel = 2
        self.timeout = timeout

    def gate(self, shape: Shape, gate_shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        return self.gates.submit({"op": "gate", "params": dict(params)}, self.timeout)

    def time(self, shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        return self.timer.submit({"op": "time", "params": dict(params)}, self.timeout)

    def abandon(self) -> None:
        for w in [*self.gates.workers, *self.timer.workers]:
            w.kill()

    def close(self) -> None:
        self.gates.close()
        self.timer.close()


def test_hangs_crashes_and_faults_are_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    space = SearchSpace().narrowed(parse_param_choices(TINY_PARAMS))
    points = list(space.grid(INTERPRET_SHAPE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    # Every point of the tiny grid, in an order that puts bad ones first: the study must get through all of them.
    bad_first = sorted(points, key=lambda p: (p["state.BV"] != 16, p["chunk"]))
    spec = study_mod.StudySpec(
        key="fwd/test", stage="fwd", shape=INTERPRET_SHAPE, gate_shape=INTERPRET_SHAPE, space=space,
        sampler="random", seed=0, trials=len(points), timeout_s=120, warm_start=tuple(bad_first),
    )
    ev = FakeEvaluator(script, tmp_path / "logs", timeout=1.5)
    try:
        t0 = time.monotonic()
        counts = study_mod.run_study(study, spec, ev)
        elapsed = time.monotonic() - t0
    finally:
        ev.close()
    by_status: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in study.trials:
        by_status.setdefault(t.user_attrs.get("status", "?"), []).append(t)
    n_hang = sum(1 for p in points if p["state.BV"] == 16 and p["chunk"] == 32)
    n_crash = sum(1 for p in points if p["state.BV"] == 16 and p["chunk"] == 64)
    assert len(by_status.get("timeout", [])) == n_hang
    assert len(by_status.get("crash", [])) == n_crash
    assert len(by_status.get("fault", [])) >= 1
    for status in ("timeout", "crash", "fault"):
        for t in by_status[status]:
            assert t.state == TrialState.FAIL and t.user_attrs["reason"], (status, t.user_attrs)
    assert "exit code 7" in by_status["crash"][0].user_attrs["reason"]
    ok = by_status["ok"]
    assert ok and all(t.state == TrialState.COMPLETE for t in ok)
    assert ok[0].user_attrs["telemetry"]["sm_clock_mhz"] == 1980
    assert counts.evaluated == len(points)
    # Two gate workers wait out the hangs in parallel: the timeouts bound the run.
    assert elapsed < 1.5 * n_hang + 30


def test_real_worker_answers_errors_and_survives(tmp_path: Path) -> None:
    w = WorkerProcess("real", env(), tmp_path)
    try:
        out = w.call({"op": "gate", "shape": {}, "gate_shape": {}, "params": {"chunk": 64}}, timeout=120)
        assert out.status == Status.ERROR and out.reason is not None and "intra" in out.reason
        pong = w.call({"op": "ping"}, timeout=60)
        assert pong.ok and w.restarts == 0
    finally:
        w.kill()


# ---------------------------------------------------------------------------------------------------------------
# Whole runs through tune.py (interpreter)


def test_tune_interpret_writes_a_loadable_profile(tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    r = subprocess.run(tune_cmd("--trials", "3", "--run-dir", str(tmp_path / "run"), "--output", str(out)),
                       env=env(), capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    profile, warnings = table.load_profile(out)
    assert profile is not None and not warnings, warnings
    assert profile.interpret and profile.device.device_id == "cpu-interpreter"
    (entry,) = profile.entries
    assert entry.key == table.entry_key("fwd", INTERPRET_SHAPE)
    assert entry.trials == 3 and set(entry.stage_ms) == {"intra", "state"}
    assert entry.default_timing.p50_ms > 0 and entry.speedup > 0
    assert [t.number for t in profile.trials] == sorted({t.number for t in profile.trials})
    assert sum(1 for t in profile.trials if t.state == "COMPLETE") >= 3

    shown = subprocess.run([sys.executable, str(REPO / "tune.py"), "show", str(out)], env=env(), capture_output=True,
                           text=True, timeout=120, cwd=REPO, check=False)
    assert shown.returncode == 0 and "INTERPRETER" in shown.stdout, shown.stdout + shown.stderr
    merged = tmp_path / "merged.json"
    m = subprocess.run([sys.executable, str(REPO / "tune.py"), "merge", str(out), str(out), "-o", str(merged)],
                       env=env(), capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert m.returncode == 0 and "kept" in m.stdout, m.stdout + m.stderr
    assert table.load_profile(merged)[0] is not None


def test_resume_after_kill_9_loses_and_repeats_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trials = 10  # long enough (~10 s) that a slow poll under load still kills it mid-run
    args = tune_cmd("--trials", str(trials), "--run-dir", str(run_dir), *[a for p in TINY_PARAMS for a in ("--param", p)])
    key = table.entry_key("fwd", INTERPRET_SHAPE)
    proc = subprocess.Popen(args, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    before: list[optuna.trial.FrozenTrial] = []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            if not (run_dir / "studies.journal.log").exists():
                continue
            try:
                st = journal_study(run_dir, key)
            except StopIteration:
                continue
            if sum(1 for t in st.trials if t.state == TrialState.COMPLETE) >= 2:
                break
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = journal_study(run_dir, key).trials
    complete_before = {t.number: (t.params, t.value) for t in before if t.state == TrialState.COMPLETE}
    assert len(complete_before) >= 2

    r = subprocess.run(args, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    after = journal_study(run_dir, key).trials
    # Nothing completed before the kill is lost or changed.
    for number, (params, value) in complete_before.items():
        assert after[number].state == TrialState.COMPLETE and (after[number].params, after[number].value) == (params, value)
    assert not [t for t in after if t.state == TrialState.RUNNING]
    evaluated = [t for t in after if study_mod.is_evaluated(t)]
    assert len(evaluated) == trials, [(t.number, t.state, t.user_attrs.get("status")) for t in after]
    # No point measured twice: a duplicate proposal is answered from the record, an interrupted trial is retried once.
    measured = [study_mod._freeze(t.params) for t in evaluated]
    assert len(measured) == len(set(measured)), [(t.number, t.user_attrs) for t in evaluated]
    for t in after:
        if t.user_attrs.get("status") == "interrupted":
            assert any(u.user_attrs.get("retry_of") == t.number for u in after)
    profile, _ = table.load_profile(run_dir / "cpu-interpreter.json")
    assert profile is not None and profile.entries[0].trials == trials, (r.stdout, r.stderr)


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL: two worker processes on one study

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(user: str | None, cmd: list[str]) -> list[str]:
    return cmd if user is None else ["runuser", "-u", user, "--", *cmd]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (.ci/run installs them)")
    pytest.importorskip("psycopg2", reason="psycopg2-binary is needed for postgresql:// storage")
    user = None
    if os.geteuid() == 0:
        # The server refuses to run as root: run it as the postgres system user (created if missing).
        user = "postgres"
        exists = subprocess.run(["id", user], capture_output=True, check=False).returncode == 0
        if not exists and subprocess.run(["useradd", "--system", "--no-create-home", user], capture_output=True,
                                         check=False).returncode:
            pytest.skip("running as root and cannot create a postgres user for the server")
    base = Path(tempfile.mkdtemp(prefix="gdn2-pg-"))
    data = base / "data"
    base.chmod(0o755)
    if user is not None:
        shutil.chown(base, user)
    port = _free_port()
    try:
        subprocess.run(_as_user(user, [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "tuner",
                                       "--no-sync"]), check=True, capture_output=True)
        subprocess.run(_as_user(user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w",
                                       "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
                                       "start"]), check=True, capture_output=True, timeout=60)
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="tuner", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE tune")
        conn.close()
        yield f"postgresql://tuner@127.0.0.1:{port}/tune"
    finally:
        subprocess.run(_as_user(user, [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       check=False, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_two_processes_share_one_postgres_study(tmp_path: Path, postgres_url: str) -> None:
    trials = 8
    procs = []
    for i in range(2):
        args = tune_cmd("--trials", str(trials), "--storage", postgres_url, "--run-dir", str(tmp_path / f"run{i}"),
                        "--seed", str(i), *[a for p in TINY_PARAMS for a in ("--param", p)])
        procs.append(subprocess.Popen(args, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    storage = optuna.storages.RDBStorage(study_mod.postgres_driver(postgres_url))
    (summary,) = optuna.get_all_study_summaries(storage, include_best_trial=False)
    all_trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    numbers = [t.number for t in all_trials]
    assert numbers == list(range(len(all_trials))), "every trial is recorded once, numbered once"
    assert not [t for t in all_trials if not t.state.is_finished()]
    evaluated = [t for t in all_trials if study_mod.is_evaluated(t)]
    # Both processes count each other's running trials; only two asks at the very same instant can overshoot.
    assert trials <= len(evaluated) <= trials + 1
    owners = {t.user_attrs["owner"] for t in evaluated}
    assert len(owners) == 2, "both processes measured trials"


def test_deadline_gives_up_stuck_compiles_and_enqueues_them_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(study_mod, "DRAIN_S", 0.5)
    space = SearchSpace().narrowed(parse_param_choices(TINY_PARAMS))
    hang = next(p for p in space.grid(INTERPRET_SHAPE) if p["state.BV"] == 16 and p["chunk"] == 32)
    spec = study_mod.StudySpec(
        key="fwd/test", stage="fwd", shape=INTERPRET_SHAPE, gate_shape=INTERPRET_SHAPE, space=space,
        sampler="random", seed=0, trials=50, timeout_s=1.0, warm_start=(hang,),
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ev = FakeEvaluator(script, tmp_path / "logs", timeout=60)
    try:
        t0 = time.monotonic()
        study_mod.run_study(study, spec, ev)
        assert time.monotonic() - t0 < 20, "the deadline must not wait for the 60 s worker timeout"
    finally:
        ev.close()
    first = study.trials[0]
    assert first.params == hang and first.user_attrs["status"] == "interrupted" and first.state == TrialState.FAIL
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == first.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING, "re-enqueued for the next run"
    assert not study_mod.is_evaluated(first)


@pytest.mark.parametrize("shape", [pytest.param(s, id=s.label()) for s in SUITE])
def test_default_config_survives_the_shape_pruned_space(shape: Shape) -> None:
    # The warm start enqueues the default config; a space that dropped one of its values would silently skip it.
    assert SearchSpace().for_shape(shape).contains(default_config(shape).flat())


def test_live_view_shows_each_stage_percent_of_roof() -> None:
    from gdn2_tune.profiles.table import load_profile
    from gdn2_tune.tuner.run import roof_summary

    profile, _ = load_profile(Path(__file__).resolve().parents[1] / "profiles" / "h100-80gb-hbm3.json")
    entry = next(e for e in profile.entries if e.key == "fwd/K128-V128-bf16/T4096-BH128")
    # The anchor's intra stage must move 1.518 GB (kernels/cost.py) in entry.stage_ms["intra"] ms, against the
    # theoretical 3.352 TB/s of the H100 (2 × 2619 MHz × 5120 bit / 8).
    expected = 1.518e9 / 3.352e12 * 1e3 / entry.stage_ms["intra"] * 100
    summary = roof_summary(entry, profile.device)
    assert summary.startswith(f"intra {expected:.0f}% memory, state ")
    cpu = dataclasses.replace(profile.device, family="cpu", compute_capability=None, sm_count=None,
                              sm_clock_mhz=None, mem_clock_mhz=None, bus_width_bits=None)
    assert roof_summary(entry, cpu) == "-"


def test_a_trial_killed_between_ask_and_owner_is_recovered() -> None:
    from gdn2_tune.tuner.study import OWNERLESS_GRACE_S, is_stale, owner_token

    study = optuna.create_study()
    orphan = study.ask()  # its process "died" before writing the owner
    owned = study.ask()
    owned.set_user_attr("owner", owner_token())
    t = study.trials[orphan.number]
    now = t.datetime_start.timestamp()
    assert not is_stale(t, now=now + OWNERLESS_GRACE_S / 2, newest_owned=owned.number)  # its creator may be mid-way
    assert not is_stale(t, now=now + OWNERLESS_GRACE_S * 2, newest_owned=-1)  # nothing later is owned yet
    assert is_stale(t, now=now + OWNERLESS_GRACE_S * 2, newest_owned=owned.number)
    assert not is_stale(study.trials[owned.number])  # owned by this live process


def test_late_studies_keep_half_a_share_when_early_ones_overrun() -> None:
    import time

    from gdn2_tune.tuner.run import FINALIZE_RESERVE_S, ROOFS_RESERVE_S, TuneOptions, study_timeout

    options = TuneOptions(budget_minutes=10.0, timeout_s=None)
    search = 600 - 8 * FINALIZE_RESERVE_S - ROOFS_RESERVE_S
    fresh = study_timeout(options, time.monotonic(), 8, 8)
    assert fresh == pytest.approx(search / 8, rel=1e-3)
    overrun = study_timeout(options, time.monotonic() - 10 * search, 2, 8)  # the budget is long gone
    assert overrun == pytest.approx(0.5 * search / 8, rel=1e-3)
    capped = study_timeout(TuneOptions(budget_minutes=10.0, timeout_s=20.0), time.monotonic(), 8, 8)
    assert capped == 20.0
    # A per-GPU child of a two-GPU run: the parent finalizes two studies at a time, so half the reserve; and two
    # studies are searched at once, so each of the 8 gets a quarter of the wall time.
    child = TuneOptions(budget_minutes=10.0, timeout_s=None, gpus=(1,), search_only=True, finalizers=2)
    search2 = 600 - 4 * FINALIZE_RESERVE_S - ROOFS_RESERVE_S
    assert study_timeout(child, time.monotonic(), 8, 8) == pytest.approx(search2 / 4, rel=1e-3)
    # The other GPU's running study holds a quarter until its deadline: the 7 left share the rest of both GPUs.
    second = study_timeout(child, time.monotonic(), 7, 8, committed_s=search2 / 4)
    assert second == pytest.approx((2 * search2 - search2 / 4) / 7, rel=1e-3)
    # The last study never runs past the budget's end, however many GPUs are free.
    assert study_timeout(child, time.monotonic() - search2 / 2, 1, 8) == pytest.approx(search2 / 2, rel=1e-3)


def test_gpus_take_unstarted_studies_first_then_join_the_least_helped_open_one() -> None:
    from gdn2_tune.tuner.run import Claim, pick_study

    order = ["a", "b", "c"]
    assert pick_study(order, {}, now=0.0) == ("a", False)
    assert pick_study(order, {"a": Claim(1)}, now=0.0) == ("b", False)  # a second GPU: another study, not "a"
    assert pick_study(order, {"a": Claim(1), "b": Claim(1)}, now=0.0) == ("c", False)
    assert pick_study(order, {}, now=0.0, skip=frozenset({"a"})) == ("b", False)
    # Every study started: join an open one, the one with the fewest searchers, the earliest on ties.
    claims = {"a": Claim(2), "b": Claim(1), "c": Claim(1)}
    assert pick_study(order, claims, now=0.0) == ("b", True)
    assert pick_study(order, claims, now=0.0, skip=frozenset({"b"})) == ("c", True)
    # Done studies, and studies whose deadline has passed, are not joined; nothing left: None.
    claims = {"a": Claim(0, done=True), "b": Claim(1, deadline=10.0), "c": Claim(1, deadline=30.0)}
    assert pick_study(order, claims, now=20.0) == ("c", True)
    assert pick_study(order, claims, now=40.0) is None
    assert pick_study(order, {k: Claim(0, done=True) for k in order}, now=0.0) is None


def test_two_gpus_search_different_studies_through_the_queue_each_with_its_share(tmp_path: Path) -> None:
    import time

    from gdn2_tune.tuner.run import FINALIZE_RESERVE_S, ROOFS_RESERVE_S, StudyQueue, TuneOptions

    child = TuneOptions(budget_minutes=10.0, timeout_s=None, gpus=(0,), search_only=True, finalizers=2)
    search = 600 - 2 * FINALIZE_RESERVE_S - ROOFS_RESERVE_S  # 4 studies finalized two at a time
    queue = StudyQueue(tmp_path / "studies.json")
    assert not queue.wait(0.2)  # the parent has not written it yet
    queue.create(["a", "b", "c", "d"])
    assert queue.wait(0.2)
    started = time.monotonic()
    first, second = queue.take(child, started), queue.take(child, started)  # GPU 0, then GPU 1
    assert first is not None and second is not None
    assert (first.key, first.joined, second.key, second.joined) == ("a", False, "b", False)
    assert first.timeout_s == pytest.approx(search / 2, rel=1e-2)  # 4 studies over 2 GPUs: half of each GPU's time
    assert second.timeout_s == pytest.approx(search / 2, rel=1e-2)  # "a" holds the rest of GPU 0's half
    queue.leave("a", done=True)
    third = queue.take(child, started, frozenset({"a"}))
    assert third is not None and third.key == "c"
    fourth = queue.take(child, started, frozenset({"b"}))
    assert fourth is not None and fourth.key == "d"
    queue.leave("c", done=True)
    # Nothing unstarted: GPU 0 joins the open study with the fewest searchers, up to its deadline.
    joined = queue.take(child, started, frozenset({"a", "c"}))
    assert joined is not None and joined.joined and joined.key == "b"
    assert joined.timeout_s is not None and joined.timeout_s <= second.timeout_s
    _, claims = queue.read()
    assert claims["b"].searchers == 2 and claims["a"].done and not claims["d"].done


def test_each_study_is_warm_started_with_every_table_entry_fitted_to_its_shape() -> None:
    from gdn2_tune.tuner.run import TuneOptions, build_specs, existing_profile

    profile, _ = existing_profile(REPO / "profiles" / "h100-80gb-hbm3.json")
    assert profile is not None
    k64 = Shape(4, 4096, 32, 64, 64)
    spec = build_specs(TuneOptions(shapes=(k64,)), profile)[0]
    points = list(spec.warm_start)
    assert points[0] == default_config(k64).flat()
    own = next(e for e in profile.entries if e.shape == k64)
    assert own.config.flat() in points[:2]
    others = [fit_to_shape(e.config, k64).flat() for e in profile.entries if e.shape != k64]
    assert all(p in points for p in others)
    assert len(points) == len({tuple(sorted(p.items())) for p in points})  # no point twice
    assert all(infeasibility(FwdConfig.from_flat(p), k64) is None for p in points)


def test_warm_start_enqueues_only_points_of_a_narrowed_space() -> None:
    """Both enqueue paths (a single process, and the parent of a --gpus run) go through enqueue_warm_start."""
    from gdn2_tune.tuner.run import TuneOptions, build_specs, existing_profile

    profile, _ = existing_profile(REPO / "profiles" / "h100-80gb-hbm3.json")
    assert profile is not None
    options = TuneOptions(shapes=(Shape(8, 4096, 16, 128, 128),), param_choices={"state.k_parts": (1,)})
    spec = build_specs(options, profile)[0]
    assert any(p["state.k_parts"] != 1 for p in spec.warm_start)  # the default has 2: the case that crashed
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    assert study_mod.enqueue_warm_start(study, spec) > 0
    enqueued = [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False)]
    assert enqueued and all(p["state.k_parts"] == 1 for p in enqueued)
    study.ask(spec.space.for_shape(spec.shape).distributions())  # Optuna accepts every enqueued point


# ---------------------------------------------------------------------------------------------------------------
# Issue 12: the budget goes to feasible, new points; duplicates are never complete trials (issue 9)


def feasible_spec(shape: Shape, space: SearchSpace, trials: int, sampler: str = "tpe") -> tuple[
        study_mod.StudySpec, optuna.Study]:
    spec = spec_for(shape, space, trials, sampler)
    sampler_ = study_mod.make_sampler(sampler, 0, study_mod.startup_trials(trials),
                                      feasible=study_mod.Feasible.of(space, shape))
    return spec, optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=sampler_)


def _group_of(name: str) -> str:
    return name.split(".", 1)[0] if "." in name else ""


def test_crossovers_take_one_group_from_a_donor_and_stay_feasible() -> None:
    shape = Shape(16, 2048, 8, 256, 256, "bf16")
    space = SearchSpace(op="bwd")
    spec = space.spec
    best = spec.fit_to_shape(spec.default_config(shape), shape).flat()
    rng = random.Random()  # fresh donors each run
    donors = [space.feasible(shape).sample(rng) for _ in range(3)]
    points = space.crossovers(best, donors, shape)
    assert points, "three random donors share no group with the built-in config"
    assert len({tuple(sorted(p.items())) for p in points}) == len(points) and best not in points
    coupling = space.params[0].name
    for point in points:
        assert spec.search_infeasibility(spec.from_flat(point), shape) is None, point
        assert point[coupling] == best[coupling]
        changed = {name for name in point if point[name] != best[name]}
        assert len({_group_of(n) for n in changed}) == 1, changed
        group = _group_of(next(iter(changed)))
        assert any(all(d[n] == point[n] for n in point if _group_of(n) == group) for d in donors)
    one_group = SearchSpace(op="decode")  # no prefixes: one group, nothing to cross
    decode_shape = Shape(8, 1, 16, 128, 128, "bf16")
    d = one_group.feasible(decode_shape).sample(rng)
    assert one_group.crossovers(d, [one_group.feasible(decode_shape).sample(rng)], decode_shape) == []


class StageSumEvaluator(RecordingEvaluator):
    """A config's time is the sum of its stages': the state group is fast only as in ``state_of``, the intra group
    only as in ``intra_of``."""

    def __init__(self, state_of: Mapping[str, Any], intra_of: Mapping[str, Any]) -> None:
        super().__init__()
        self.state_of, self.intra_of = state_of, intra_of

    def time(self, shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        slow_state = any(params[n] != v for n, v in self.state_of.items())
        slow_intra = any(params[n] != v for n, v in self.intra_of.items())
        return self._done(ok(p50_ms=1.0 + 0.5 * slow_state + 0.3 * slow_intra))


def test_a_study_combines_the_warm_starts_best_stages_through_a_crossover() -> None:
    shape = INTERPRET_SHAPE
    space = SearchSpace()
    default = default_config(shape).flat()
    rng = random.Random(5)
    donor = next(p for p in iter(lambda: space.feasible(shape).sample(rng), None)
                 if p["chunk"] == default["chunk"]
                 and any(p[n] != default[n] for n in p if n.startswith("intra."))
                 and any(p[n] != default[n] for n in p if n.startswith("state.")))
    state_of = {n: v for n, v in default.items() if n.startswith("state.")}
    intra_of = {n: v for n, v in donor.items() if n.startswith("intra.")}
    target = {**default, **intra_of}
    spec, study = feasible_spec(shape, space, trials=12, sampler="random")
    spec = dataclasses.replace(spec, warm_start=(default, donor))
    study_mod.run_study(study, spec, StageSumEvaluator(state_of, intra_of))
    # The default (1.3 ms) is the best of the warm starts and of what a random sampler draws (1.8, rarely 1.5);
    # only the default with the donor's intra group is 1.0.
    best = study.best_trial
    assert best.value == pytest.approx(1.0) and best.params == target
    assert best.user_attrs.get("crossover") and study.trials[best.user_attrs["crossover_of"]].params == default


@pytest.mark.parametrize("sampler", ["tpe", "random"])
@pytest.mark.parametrize("shape", [pytest.param(INTERPRET_SHAPE, id="K32-V32-fp32"), pytest.param(ANCHOR, id="anchor")])
def test_the_sampler_proposes_only_feasible_points_never_twice(shape: Shape, sampler: str) -> None:
    spec, study = feasible_spec(shape, SearchSpace(), trials=30, sampler=sampler)
    ev = RecordingEvaluator()
    counts = study_mod.run_study(study, spec, ev)
    assert counts.evaluated == 30 and len(study.trials) == 30, "every stored trial was timed"
    assert counts.pruned == counts.duplicates == 0
    assert all(infeasibility(FwdConfig.from_flat(p), shape) is None for p in ev.gated)
    assert len({study_mod._freeze(p) for p in ev.gated}) == len(ev.gated)
    # The box is mostly infeasible at these shapes: the sampler did reject draws, without storing them.
    assert study.sampler.rejected > 0


def _in_feasible_set(feasible: Any, point: Mapping[str, Any]) -> bool:
    """Whether ``point`` is one of the factored set's: some block's head matches and each group holds its part."""
    for head, groups in feasible.blocks:
        if any(point[k] != v for k, v in head):
            continue
        if all(tuple(sorted((k, point[k]) for k, _ in parts[0])) in set(parts) for parts in groups):
            return True
    return False


@pytest.mark.parametrize(("op", "shape"), [
    pytest.param("fwd", INTERPRET_SHAPE, id="fwd-K32-V32-fp32"),
    pytest.param("bwd", get_spec("bwd").interpret_shape, id="bwd-interpret"),
    pytest.param("bwd", Shape(16, 2048, 8, 256, 256, "bf16"), id="bwd-K256-bf16"),
    pytest.param("decode", get_spec("decode").suite[0], id="decode-B1"),
])
def test_the_factored_feasible_set_is_exactly_the_feasible_points(op: str, shape: Shape) -> None:
    """Every drawn point passes the op's constraints and search rules, and every point of the whole box that passes
    them is in the set: the groups' separability (SearchSpace.stage_parts) holds for each op's space, the
    backward's four groups included (fresh random points, a different draw per run)."""
    space = SearchSpace(op=op)
    spec, feasible = space.spec, space.feasible(shape)
    rng = random.Random()
    for _ in range(200):
        point = feasible.sample(rng)
        assert point is not None and spec.search_infeasibility(spec.from_flat(point), shape) is None, point
    inside = 0
    for _ in range(3000):
        point = {p.name: rng.choice(p.values) for p in space.params}
        ok = spec.search_infeasibility(spec.from_flat(point), shape) is None
        assert ok == _in_feasible_set(feasible, point), (ok, point)
        inside += ok
    assert feasible.size > 0 and (inside > 0 or feasible.size < 1e-3 * space.size()), (inside, feasible.size)


def test_an_exhausted_space_ends_the_study_without_duplicates() -> None:
    space = SearchSpace().narrowed(parse_param_choices(TINY_PARAMS))
    n = space.feasible(INTERPRET_SHAPE).size
    assert n == len(list(space.grid(INTERPRET_SHAPE))) and n < 100
    spec, study = feasible_spec(INTERPRET_SHAPE, space, trials=n + 20)
    counts = study_mod.run_study(study, spec, RecordingEvaluator())
    assert counts.evaluated == n and counts.duplicates == 0 and len(study.trials) == n


def test_a_duplicate_proposal_is_a_failed_trial_not_a_completed_one() -> None:
    # A sampler that is not wrapped (or two processes asking at the same instant) can still propose a measured
    # point: it is stored as FAIL with status "duplicate", and counted neither as evaluated nor as a failure.
    shape = INTERPRET_SHAPE
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    point = default_config(shape).flat()
    study.enqueue_trial(point)
    study.enqueue_trial(point)
    counts = study_mod.run_study(study, spec_for(shape, SearchSpace(), trials=3), RecordingEvaluator())
    dup = [t for t in study.trials if t.user_attrs.get("status") == "duplicate"]
    # Of trial 0, or of "a point being measured" when both were asked before trial 0 finished.
    assert len(dup) == 1 and dup[0].state == TrialState.FAIL and dup[0].user_attrs["duplicate_of"] in (0, None)
    assert counts.evaluated == 3 and counts.failed == 0 and counts.duplicates == 1
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and all(study_mod.is_evaluated(t) for t in complete)


# ---------------------------------------------------------------------------------------------------------------
# Issue 12: warm starts from every known table; the incumbent competes in the final


def write_table(path: Path, device_id: str, family: str, entries: list[tuple[Shape, FwdConfig]], *,
                interpret: bool = False) -> None:
    import triton

    device = table.DeviceInfo(device_id, device_id.upper(), family, None, None, None, None, None, None)
    timing = table.Timing(1.0, 1.0, 1.0, 0.0)
    table.save_profile(table.Profile(
        schema_version=table.SCHEMA_VERSION, device=device, torch_version="x", triton_version=triton.__version__,
        kernel_hash=table.kernel_source_hash(), created="2026-11-30T00:00:00+00:00", sampler="tpe", budget={},
        interpret=interpret, roofs=None, trials=(),
        entries=tuple(table.Entry(table.entry_key("fwd", s), "fwd", s, c, timing, timing, 1.0, {}, {}, None, 1, 0, 0)
                      for s, c in entries),
    ), path)


def flat_config(base: Shape, **changes: Any) -> FwdConfig:
    return FwdConfig.from_flat({**default_config(base).flat(), **changes})


# The H100 table's anchor entry: the default's tiles before the state tile had row parts.
H100_ANCHOR = flat_config(ANCHOR, **{"intra.BV": 128, "intra.num_warps": 2, "state.BV": 64, "state.k_parts": 1})
H100_NEAR = flat_config(ANCHOR, **{"intra.num_warps": 2, "state.num_warps": 8})  # its T2048 bucket
H100_OTHER_DIMS = flat_config(Shape(16, 2048, 8, 256, 256), **{"state.BV": 64, "state.num_stages": 1})
A100_ANCHOR = flat_config(ANCHOR, **{"intra.num_warps": 8})


@pytest.fixture
def h200_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Shipped tables as on the issue's H200: an H100 table (sm90) and an A100 one (sm80), none of its own."""
    from gdn2_tune.profiles import dispatch

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    write_table(shipped / "h100-80gb-hbm3.json", "h100-80gb-hbm3", "sm90", [
        (Shape(16, 2048, 8, 256, 256), H100_OTHER_DIMS), (Shape(8, 2048, 16, 128, 128), H100_NEAR),
        (ANCHOR, H100_ANCHOR),
    ])
    write_table(shipped / "a100-sxm4-80gb.json", "a100-sxm4-80gb", "sm80", [(ANCHOR, A100_ANCHOR)])
    monkeypatch.setattr(dispatch, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(dispatch, "_running_device", lambda: dispatch.Device("h200", "sm90"))
    monkeypatch.delenv("GDN2_PROFILE", raising=False)
    monkeypatch.delenv("GDN2_CONFIG", raising=False)
    dispatch.clear_cache()
    yield shipped
    dispatch.clear_cache()


H200 = table.DeviceInfo("h200", "NVIDIA H200", "sm90", (9, 0), 132, None, None, None, None)


def test_an_h200_study_starts_from_what_the_h100_table_serves(h200_world: Path, tmp_path: Path) -> None:
    from gdn2_tune.profiles.dispatch import TableWarning
    from gdn2_tune.tuner import known
    from gdn2_tune.tuner.run import TuneOptions, build_specs

    with pytest.warns(TableWarning, match=r"no tuned table for this GPU \(h200\); falling back to sm90"):
        (served_d,) = known.served_now([dataclasses.asdict(ANCHOR)])  # as the timing worker answers
    served = known.Served.from_dict(served_d)
    assert served == known.Served(H100_ANCHOR, table.ServedFrom.FAMILY, "h100-80gb-hbm3.json",
                                  table.entry_key("fwd", ANCHOR))
    tables, warnings = known.known_tables(H200, tmp_path / "h200.json", None)
    assert not warnings and [t.path.name for t in tables] == ["h100-80gb-hbm3.json"], "same family only"
    options = TuneOptions(shapes=(ANCHOR,), trials=30)
    (spec,) = build_specs(options, None, tables=tables, served={table.entry_key("fwd", ANCHOR): served})
    points = [FwdConfig.from_flat(p) for p in spec.warm_start]
    # The incumbent, the default, then the H100 entries nearest first; fitted, so each is legal at the shape.
    assert points == [H100_ANCHOR, default_config(ANCHOR), H100_NEAR, fit_to_shape(H100_OTHER_DIMS, ANCHOR)]
    assert A100_ANCHOR not in points

    # Replayed: the study measures them first, the incumbent before anything else.
    spec, study = feasible_spec(ANCHOR, SearchSpace(), trials=8)
    spec = dataclasses.replace(spec, warm_start=tuple(p.flat() for p in points))
    ev = RecordingEvaluator()
    study_mod.run_study(study, spec, ev)
    assert [FwdConfig.from_flat(p) for p in ev.gated[:4]] == points


@pytest.mark.parametrize(
    ("candidate", "incumbent", "verdict"),
    [
        pytest.param((1.00, 1.01, 1.02, 0.01), (1.20, 1.21, 1.22, 0.01), "new", id="clearly-faster"),
        pytest.param((1.17, 1.19, 1.21, 0.01), (1.18, 1.20, 1.22, 0.01), "kept", id="ranges-overlap"),
        pytest.param((1.10, 1.11, 1.12, 0.10), (1.13, 1.14, 1.15, 0.10), "kept", id="within-round-spread"),
        pytest.param((1.30, 1.31, 1.32, 0.01), (1.20, 1.21, 1.22, 0.01), "kept", id="incumbent-fastest"),
    ],
)
def test_a_candidate_replaces_the_incumbent_only_beyond_the_spread(
    candidate: tuple[float, ...], incumbent: tuple[float, ...], verdict: str
) -> None:
    from gdn2_tune.tuner import known

    timings = [table.Timing(*candidate), table.Timing(1.5, 1.6, 1.7, 0.01), table.Timing(*incumbent)]
    decision = known.decide(timings, 2)
    assert decision.verdict == verdict
    assert decision.chosen == (0 if verdict == "new" else 2)
    assert known.decide(timings, None) == known.Decision(decision.best, decision.best, known.Verdict.UNCHECKED)


# Overlapping quantiles (a 1.4% gain under 3% of sample noise, the K=V=256, B=8 decode case): the per-round medians
# of the same interleaved re-time decide.
OVERLAPPING = [table.Timing(0.0230, 0.0233, 0.0240, 0.01), table.Timing(0.0300, 0.0310, 0.0320, 0.01),
               table.Timing(0.0232, 0.0236, 0.0243, 0.01)]


@pytest.mark.parametrize(
    ("candidate_rounds", "incumbent_rounds", "verdict"),
    [
        pytest.param([23.3, 23.2, 23.4, 23.3, 23.1], [23.6, 23.6, 23.7, 23.5, 23.6], "new", id="faster-in-every-round"),
        pytest.param([23.3, 23.2, 23.8, 23.3, 23.1], [23.6, 23.6, 23.7, 23.5, 23.6], "kept", id="slower-in-one-round"),
        pytest.param([23.3, 23.2, 23.4, 23.3], [23.6, 23.6, 23.7, 23.5], "kept", id="too-few-rounds"),
        pytest.param([23.55, 23.58, 23.6, 23.5, 23.55], [23.6, 23.6, 23.7, 23.52, 23.6], "kept", id="gain-below-0.5%"),
    ],
)
def test_a_candidate_faster_in_every_interleaved_round_replaces_the_incumbent(
    candidate_rounds: list[float], incumbent_rounds: list[float], verdict: str
) -> None:
    from gdn2_tune.tuner import known

    assert known.decide(OVERLAPPING, 2).verdict == "kept"  # the quantiles alone keep it
    rounds = [[r / 1000 for r in candidate_rounds], None, [r / 1000 for r in incumbent_rounds]]
    decision = known.decide(OVERLAPPING, 2, rounds=rounds)
    assert decision.verdict == verdict and decision.paired == (verdict == "new")
    assert decision.chosen == (0 if verdict == "new" else 2)


class FinalEvaluator:
    """What finalize_entry calls, answering re-times from fixed per-config timings."""

    def __init__(self, timings: Mapping[FwdConfig, tuple[float, float, float, float]], gate_fails: set[FwdConfig]):
        from gdn2_tune.tuner.run import TuneOptions

        self.options = TuneOptions(top_k=2)
        self.timings = timings
        self.gate_fails = gate_fails
        self.retimed: list[FwdConfig] = []
        outer = self

        class Gates:
            def call(self, req: Mapping[str, Any], timeout: float) -> Outcome:
                bad = FwdConfig.from_flat(req["params"]) in outer.gate_fails
                return failed(Status.WRONG_ANSWER, "bad") if bad else ok()

        self.gates = Gates()

    def call_timer(self, req: Mapping[str, Any], timeout: float) -> Outcome:
        cfgs = [FwdConfig.from_flat(p) for p in req["configs"]]
        if req["op"] == "retime":
            self.retimed = cfgs
            return ok(timings=[dict(zip(("p20_ms", "p50_ms", "p80_ms", "spread"), self.timings[c])) for c in cfgs])
        return ok(stages=[{"intra": 0.5, "state": 0.5} for _ in cfgs])


FAST = flat_config(ANCHOR, **{"intra.num_warps": 8, "state.num_warps": 8})
SLOW = flat_config(ANCHOR, **{"state.num_warps": 8})


@pytest.mark.parametrize(
    ("fast", "verdict"),
    [pytest.param((1.00, 1.01, 1.02, 0.01), "new", id="beats-the-incumbent"),
     pytest.param((1.58, 1.60, 1.62, 0.01), "kept", id="within-the-spread")],
)
def test_finalize_times_the_incumbent_and_keeps_it_unless_beaten(fast: tuple[float, ...], verdict: str) -> None:
    from gdn2_tune.tuner import known
    from gdn2_tune.tuner.run import finalize_entry

    served = known.Served(H100_ANCHOR, table.ServedFrom.FAMILY, "h100-80gb-hbm3.json", table.entry_key("fwd", ANCHOR))
    timings = {FAST: fast, SLOW: (2.0, 2.1, 2.2, 0.01), default_config(ANCHOR): (1.9, 2.0, 2.1, 0.01),
               H100_ANCHOR: (1.59, 1.61, 1.63, 0.01)}
    study = optuna.create_study()
    for cfg, value in ((FAST, 1.0), (SLOW, 2.1)):  # the search found these; it never reached the incumbent
        study.add_trial(optuna.trial.create_trial(params=cfg.flat(), value=value, user_attrs={"status": "ok"},
                        distributions=SearchSpace().distributions()))
    ev = FinalEvaluator(timings, set())
    notes: list[str] = []
    spec = spec_for(ANCHOR, SearchSpace(), trials=2)
    entry = finalize_entry(study, spec, ev, notes, served)  # type: ignore[arg-type]
    assert entry is not None and set(ev.retimed) == set(timings), "top 2, default and incumbent re-timed together"
    assert entry.incumbent == served.timed(table.Timing(*timings[H100_ANCHOR]))
    if verdict == "new":
        assert entry.config == FAST and not entry.kept_incumbent and entry.vs_before == pytest.approx(1.61 / 1.01)
        assert any("beats the incumbent" in n for n in notes), notes
    else:
        assert entry.config == H100_ANCHOR and entry.kept_incumbent and entry.timing == entry.incumbent.timing
        assert any("kept the incumbent" in n and "within the spread" in n for n in notes), notes

    # An incumbent that fails its gate here is not a candidate: the best candidate wins, and the note says why.
    ev = FinalEvaluator(timings, {H100_ANCHOR})
    notes = []
    entry = finalize_entry(study, spec, ev, notes, served)  # type: ignore[arg-type]
    assert entry is not None and entry.incumbent is None and H100_ANCHOR not in ev.retimed
    assert entry.config == FAST
    assert any("failed its gate" in n for n in notes), notes


def test_tune_interpret_races_the_incumbent_logs_each_trial_and_says_what_it_resumed(tmp_path: Path) -> None:
    # The user's table (GDN2_PROFILE) serves a non-default config at the toy shape: the study measures it first,
    # the final re-time times it, and the entry records it as the incumbent.
    space = SearchSpace().narrowed(parse_param_choices(TINY_PARAMS))
    incumbent = next(FwdConfig.from_flat(p) for p in space.grid(INTERPRET_SHAPE) if p != default_config(
        INTERPRET_SHAPE).flat() and p["chunk"] == 64 and p["intra.precision"] == "ieee" and p["state.BV"] == 16)
    assert infeasibility(incumbent, INTERPRET_SHAPE) is None
    user = tmp_path / "mine.json"
    write_table(user, "cpu-interpreter", "cpu", [(INTERPRET_SHAPE, incumbent)], interpret=True)
    run_dir, out = tmp_path / "run", tmp_path / "out.json"
    args = tune_cmd("--trials", "3", "--run-dir", str(run_dir), "--output", str(out),
                    *[a for p in TINY_PARAMS for a in ("--param", p)])
    e = {**env(), "GDN2_PROFILE": str(user)}
    r = subprocess.run(args, env=e, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    log = " ".join((r.stdout + r.stderr).split())  # rich may wrap long lines
    assert r.returncode == 0, log
    key = table.entry_key("fwd", INTERPRET_SHAPE)
    assert f"serving {incumbent.label()} from mine.json {key} (user)" in log
    for n in range(3):  # --no-progress: one line per trial, as it finishes
        assert f"{key} #{n}: " in log
    profile, _ = table.load_profile(out)
    assert profile is not None
    (entry,) = profile.entries
    assert entry.incumbent is not None and entry.incumbent.config == incumbent
    assert entry.incumbent.source is table.ServedFrom.USER and entry.incumbent.table == "mine.json"
    if entry.kept_incumbent:
        assert entry.timing == entry.incumbent.timing and "kept the incumbent" in log
    else:  # beyond the spread, or in every interleaved round (whose medians the table does not keep)
        assert entry.timing.p50_ms < entry.incumbent.timing.p50_ms and "beats the incumbent" in log
    first = journal_study(run_dir, key).trials[0]
    assert FwdConfig.from_flat(first.params) == incumbent, "the incumbent is measured first"

    args[args.index("--trials") + 1] = "4"  # the same run dir, one trial more: a resumed run
    r = subprocess.run(args, env=e, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    log = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, log
    assert f"{key}: resuming, found 3 trials in storage (3 evaluated" in log and "1 more to evaluate" in log
    assert f"{key} #3: " in log and f"{key} #0: " not in log


def test_a_multi_gpu_run_logs_each_trial_and_finalizes_on_every_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --gpus through the library (the command line refuses it with --interpret): two search processes share the
    # studies, the parent logs their trials as it reads them back, then finalizes one study per "GPU" at once.
    from gdn2_tune.tuner.run import TuneOptions, tune

    shapes = (INTERPRET_SHAPE, Shape(1, 24, 1, 32, 32, "fp32"))
    options = TuneOptions(
        shapes=shapes, trials=3, timeout_s=None, budget_minutes=None, run_dir=tmp_path / "run", gpus=(0, 1),
        interpret=True, output=tmp_path / "out.json", progress=False,
        param_choices={k: tuple(v) for k, v in parse_param_choices(TINY_PARAMS).items()},
    )
    from gdn2_tune.tuner import progress

    lines: list[str] = []
    monkeypatch.setattr(progress.ProgressView, "log", lambda self, message: lines.append(message))
    result = tune(options)
    assert [e.key for e in result.entries] == [table.entry_key("fwd", s) for s in shapes]
    # The two processes share each study and each checks the cap before it asks, so a study may end one trial over
    # it per extra process (the race Optuna's own MaxTrialsCallback has); what is counted must be what ran.
    for e in result.entries:
        assert e.incumbent is not None, e.key
        assert 3 <= e.trials <= 3 + len(options.gpus) - 1, (e.key, e.trials)
        assert sum(1 for line in lines if line.startswith(f"{e.key} #")) == e.trials, lines
    logs = {p.name for p in (tmp_path / "run" / "logs").glob("worker-*-time.log")}
    assert any(name.startswith("worker-cpu1-") for name in logs), logs  # the second finalizer timed a study
    # Each study was taken from the run's queue by exactly one search process (another may only join it later).
    taken = [line.split(":")[0] for p in sorted((tmp_path / "run" / "logs").glob("search-gpu*.log"))
             for line in p.read_text().splitlines() if ": search taken by this process done in" in line]
    assert sorted(taken) == sorted(e.key for e in result.entries), taken


# ---------------------------------------------------------------------------------------------------------------
# Typed outcomes across the worker pipe; the tuned GPU's limits


def test_an_outcome_crosses_the_pipe_as_json_with_a_readable_status() -> None:
    out = failed(Status.COMPILE_ERROR, "CompilationError: boom", elapsed_s=1.5)
    data = out.to_json()
    assert data == {"status": "compile_error", "reason": "CompilationError: boom", "elapsed_s": 1.5}
    assert Outcome.from_json(data) == out
    assert Outcome.from_json({"status": "no-such-status", "reason": 3}).status == Status.ERROR
    assert ok(p50_ms=1.0)["p50_ms"] == 1.0 and ok().ok and not out.ok


def test_the_search_space_checks_the_tuned_gpus_limits() -> None:
    # The sm_90 fault rule (kernels/config.py) must not prune a point on a GPU of another family.
    shape = Shape(1, 256, 2, 64, 64, "bf16")
    base = default_config(shape)
    cfg = dataclasses.replace(base, chunk=64, intra=dataclasses.replace(base.intra, num_warps=8),
                              state=dataclasses.replace(base.state, num_stages=1))
    sm100 = DeviceLimits("sm100", SM90.shared_memory_per_block)
    _, reason = SearchSpace().check(cfg.flat(), shape)
    assert reason is not None and "faults" in reason
    assert SearchSpace(device=sm100).check(cfg.flat(), shape) == (cfg, None)
    assert SearchSpace(device=sm100).narrowed({"chunk": [64]}).for_shape(shape).device == sm100
    from gdn2_tune.tuner.run import TuneOptions, build_specs

    (spec,) = build_specs(TuneOptions(shapes=(shape,), trials=4), None, device=sm100)
    assert spec.space.device == sm100


# ---------------------------------------------------------------------------------------------------------------
# 2026-11-30 on two H200s: a duplicate flood on a 2-point space, studies that got no result, the fp32 accuracy bar


class SlowEvaluator(RecordingEvaluator):
    """Gates pass at once; each timing finishes ``delay_s`` later, on a thread (the GPU is busy)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def time(self, shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        import threading

        f: Future[Outcome] = Future()
        threading.Timer(self.delay_s, lambda: f.set_result(ok(p50_ms=1.0))).start()
        return f


def test_a_tiny_space_waits_for_its_points_in_flight_instead_of_storing_duplicates() -> None:
    # The algorithm op's space is {recurrent, chunk}. Another process is measuring "chunk" (a RUNNING trial it owns,
    # finished 1.5 s in); this one measures "recurrent" (0.5 s). Nothing is left to ask meanwhile: the loop must
    # wait, not ask the sampler again and again (5346 duplicates in 80 s), and end once both points are measured.
    import threading

    from gdn2_tune.kernels.decode_spec import ALGORITHM_SUITE

    shape = ALGORITHM_SUITE[0]
    space = SearchSpace(op="algorithm")
    assert space.feasible(shape).size == 2
    spec = study_mod.StudySpec(
        key=table.entry_key("algorithm", shape), stage="algorithm", shape=shape, gate_shape=shape, space=space,
        sampler="tpe", seed=0, trials=30, timeout_s=20.0, warm_start=({"algorithm": "recurrent"},),
    )
    sampler = study_mod.make_sampler("tpe", 0, 3, feasible=study_mod.Feasible.of(space, shape))
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=sampler)
    other = study.ask(space.distributions())
    while other.params != {"algorithm": "chunk"}:  # the other process's point
        study.tell(other, state=TrialState.FAIL)
        study._storage.set_trial_user_attr(other._trial_id, "status", Status.DUPLICATE.value)
        other = study.ask(space.distributions())
    for name, value in (("owner", study_mod.owner_token()), ("evaluated", True), ("status", None)):
        other.set_user_attr(name, value)
    threading.Timer(1.5, lambda: study.tell(other, 2.0)).start()
    t0 = time.monotonic()
    counts = study_mod.run_study(study, spec, SlowEvaluator(0.5))
    assert time.monotonic() - t0 < 10, "ends when every feasible point is measured, well before its deadline"
    assert counts.evaluated == 2 and counts.duplicates == 0
    assert sorted(t.params["algorithm"] for t in study.trials if t.state == TrialState.COMPLETE) == ["chunk", "recurrent"]


def test_duplicates_are_bounded_and_left_out_of_the_table() -> None:
    # An unwrapped sampler on the 2-point space proposes measured points: each is a FAIL "duplicate", at most
    # MAX_DUPLICATE_STREAK in a row, and the table's trial history keeps only the two real trials.
    from gdn2_tune.kernels.decode_spec import ALGORITHM_SUITE
    from gdn2_tune.tuner.run import trial_records

    shape = ALGORITHM_SUITE[0]
    space = SearchSpace(op="algorithm")
    spec = study_mod.StudySpec(
        key=table.entry_key("algorithm", shape), stage="algorithm", shape=shape, gate_shape=shape, space=space,
        sampler="random", seed=0, trials=30, timeout_s=20.0, warm_start=({"algorithm": "chunk"},),
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    counts = study_mod.run_study(study, spec, SlowEvaluator(0.01))
    assert counts.evaluated == 2
    assert counts.duplicates <= study_mod.MAX_DUPLICATE_STREAK
    assert len(study.trials) == 2 + counts.duplicates
    records = trial_records(study, spec.key)
    assert sorted(r.params["algorithm"] for r in records) == ["chunk", "recurrent"]


def test_a_study_with_no_timed_trial_still_gets_an_entry_from_the_incumbent() -> None:
    # Every trial of the study was interrupted by its deadline (cold compiles): the final re-time still gates and
    # times the incumbent and the default, and the entry is one of them, not "no trial passed the gate".
    from gdn2_tune.tuner import known
    from gdn2_tune.tuner.run import finalize_entry

    served = known.Served(H100_ANCHOR, table.ServedFrom.OWN, "h200.json", table.entry_key("fwd", ANCHOR))
    timings = {default_config(ANCHOR): (1.9, 2.0, 2.1, 0.01), H100_ANCHOR: (1.59, 1.61, 1.63, 0.01)}
    study = optuna.create_study()
    for cfg in (H100_ANCHOR, FAST):
        study.add_trial(optuna.trial.create_trial(
            params=cfg.flat(), distributions=SearchSpace().distributions(), state=TrialState.FAIL,
            user_attrs={"status": "interrupted", "reason": "study deadline passed while it compiled"}))
    ev = FinalEvaluator(timings, set())
    notes: list[str] = []
    entry = finalize_entry(study, spec_for(ANCHOR, SearchSpace(), trials=30), ev, notes, served)  # type: ignore[arg-type]
    assert entry is not None and entry.config == H100_ANCHOR and entry.kept_incumbent
    assert set(ev.retimed) == set(timings) and entry.trials == 0
    assert any("timed no trial (2 interrupted" in n for n in notes), notes


def test_a_key_the_run_got_nothing_for_keeps_its_entry_marked_not_re_tuned(tmp_path: Path) -> None:
    # The existing table was tuned against other kernels; merging keeps only the newest fingerprint's entries, so
    # the key this run studied without a result would lose its entry. It is carried over, marked, and says so.
    from gdn2_tune.tuner.run import carry_untuned, merge_with_existing

    path = tmp_path / "h200.json"
    other = Shape(1, 2048, 16, 128, 128)
    write_table(path, "h200", "sm90", [(ANCHOR, H100_ANCHOR), (other, H100_NEAR)])
    existing, _ = table.load_profile(path)
    assert existing is not None
    existing = dataclasses.replace(existing, kernel_hash={"fwd": "0123456789abcdef"})
    timing = table.Timing(1.0, 1.0, 1.0, 0.0)
    new_entry = table.Entry(table.entry_key("fwd", other), "fwd", other, FAST, timing, timing, 1.0, {}, {}, None,
                            3, 0, 0)
    new = dataclasses.replace(existing, kernel_hash=table.current_fingerprints(["fwd"]), entries=(new_entry,))
    notes: list[str] = []
    anchor_key = table.entry_key("fwd", ANCHOR)
    merged = merge_with_existing(carry_untuned(new, existing, [anchor_key], notes), existing, path, notes)
    by_key = {e.key: e for e in merged.entries}
    assert by_key[anchor_key].config == H100_ANCHOR and by_key[anchor_key].tuned_against == "0123456789abcdef"
    assert by_key[new_entry.key].config == FAST and by_key[new_entry.key].tuned_against is None
    assert any(n.startswith(f"{anchor_key}: NOT RE-TUNED") for n in notes), notes
    table.save_profile(merged, path)
    loaded, warnings = table.load_profile(path)
    assert loaded is not None and not warnings and loaded.entries == merged.entries
    assert any("1 entries not re-tuned" in r and anchor_key in r for r in table.staleness(loaded, "fwd"))


FP32_ANCHOR = Shape(8, 4096, 16, 128, 128, "fp32")
PLAIN_TF32 = flat_config(FP32_ANCHOR, **{"intra.precision": "tf32", "state.precision": "tf32"})


@pytest.mark.parametrize(
    ("intra", "state", "refused"),
    [pytest.param("tf32", "tf32", True, id="tf32-tf32"), pytest.param("tf32", "input", True, id="tf32-input"),
     pytest.param("tf32x3", "tf32", False, id="tf32x3-tf32"), pytest.param("tf32", "tf32x3", False, id="tf32-tf32x3"),
     pytest.param("tf32rn", "tf32rn", False, id="tf32rn-tf32rn")],
)
def test_fp32_studies_refuse_the_precision_pairs_less_accurate_than_the_baseline(
    intra: str, state: str, refused: bool
) -> None:
    from gdn2_tune.kernels.fwd_spec import FWD

    cfg = flat_config(FP32_ANCHOR, **{"intra.precision": intra, "state.precision": state})
    assert FWD.infeasibility(cfg, FP32_ANCHOR) is None, "chunk_gdn2(config=...) keeps accepting it"
    reason = SearchSpace().check(cfg.flat(), FP32_ANCHOR)[1]
    assert (reason is not None and "1.74e-3" in reason) == refused
    assert SearchSpace().check(cfg.flat(), ANCHOR.__class__(8, 4096, 16, 128, 128, "bf16"))[1] is None  # bf16: exact
    # The feasible set the sampler draws from is exactly the checked grid (the rule couples the two stages).
    # Pinned to the fp32 default's tiles (cfg's), so that cfg is in the grid unless the rule refuses it.
    pinned = ("intra.BV", "intra.BK", "state.BV", "state.output", "state.segment_chunks", "intra.num_stages",
              "state.num_stages", "state.k_parts")
    narrowed = SearchSpace().narrowed({name: [cfg.flat()[name]] for name in pinned})
    grid = {study_mod._freeze(p) for p in narrowed.grid(FP32_ANCHOR)}
    feasible = narrowed.feasible(FP32_ANCHOR)
    assert feasible.size == len(grid) and (study_mod._freeze(cfg.flat()) in grid) != refused


def test_an_fp32_incumbent_the_rule_refuses_is_neither_warm_started_nor_retimed() -> None:
    from gdn2_tune.tuner import known
    from gdn2_tune.tuner.run import finalize_entry

    served = known.Served(PLAIN_TF32, table.ServedFrom.OWN, "h200.json", table.entry_key("fwd", FP32_ANCHOR))
    points = known.warm_start(FP32_ANCHOR, "fwd", [], served, 30)
    assert points == [default_config(FP32_ANCHOR).flat()]
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params=FAST.flat(), value=1.0, user_attrs={"status": "ok"},
                                              distributions=SearchSpace().distributions()))
    timings = {FAST: (1.0, 1.0, 1.0, 0.01), default_config(FP32_ANCHOR): (2.0, 2.0, 2.0, 0.01),
               PLAIN_TF32: (0.5, 0.5, 0.5, 0.01)}
    ev = FinalEvaluator(timings, set())
    notes: list[str] = []
    spec = spec_for(FP32_ANCHOR, SearchSpace(), trials=2)
    entry = finalize_entry(study, spec, ev, notes, served)  # type: ignore[arg-type]
    assert entry is not None and entry.config != PLAIN_TF32 and PLAIN_TF32 not in ev.retimed
    assert entry.incumbent is None
    assert any("refused for tuning" in n and "not a candidate" in n for n in notes), notes


def test_an_op_caps_its_gate_workers_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward's gates hold GPU memory (6-17 GB each at 1x32768x16 on an H200): its cap bounds the workers a
    run starts per GPU whatever the core count; an op without a cap keeps one per spare core."""
    from gdn2_tune.kernels.bwd_spec import BWD_OP
    from gdn2_tune.tuner.run import TuneOptions

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert TuneOptions(op=BWD_OP).gate_workers() == get_spec(BWD_OP).max_gate_workers == 4
    assert TuneOptions(op="fwd").gate_workers() == 30
    assert TuneOptions(op="fwd", gpus=(0, 1)).gate_workers() == 15
    assert TuneOptions(op=BWD_OP, parallel=9).gate_workers() == 9  # --parallel is the user's explicit choice


def test_gate_workers_count_the_cores_the_run_may_use_not_the_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run pinned to 16 of a host's 32 cores (taskset; a one-H200 machine's CPU in benchmarks/halving.py) starts
    one gate worker per spare core it may run on: 30 would share 16 cores."""
    from gdn2_tune.tuner.run import TuneOptions, available_cores

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert available_cores() == 16
    assert TuneOptions(op="fwd", gpus=(0,)).gate_workers() == 14
    monkeypatch.delattr(os, "sched_getaffinity")  # not Linux: the host's count
    assert TuneOptions(op="fwd", gpus=(0,)).gate_workers() == 30


@pytest.mark.parametrize(
    ("mask", "gpu", "cuda", "nvml"),
    [(None, 1, "1", "1"), ("2,3", 1, "3", "3"), (" 5 , 4 ", 0, "5", "5"), ("GPU-0f1e", 0, "GPU-0f1e", None)],
)
def test_a_worker_is_pinned_to_the_gpu_its_index_names_among_the_visible_ones(
    mask: str | None, gpu: int, cuda: str, nvml: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --gpus counts the GPUs CUDA_VISIBLE_DEVICES leaves visible, as torch does; a UUID entry passes through, and
    # NVML (which ignores the mask) gets no index it cannot resolve (no NVML on the CPU machine).
    from gdn2_tune.tuner import device as device_mod
    from gdn2_tune.tuner.run import worker_env

    if mask is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    monkeypatch.setenv(device_mod.NVML_INDEX_ENV, "7")  # a stale value from a parent must not survive
    if nvml is None:
        monkeypatch.setattr(device_mod, "_nvml", lambda: (_ for _ in ()).throw(RuntimeError("no NVML")))
    env = worker_env(gpu, interpret=False)
    assert env["CUDA_VISIBLE_DEVICES"] == cuda
    assert env.get(device_mod.NVML_INDEX_ENV) == nvml


def test_a_gpu_index_past_the_visible_ones_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from gdn2_tune.tuner.run import worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ValueError, match=r"--gpus: expected an index below 1 .*received 1"):
        worker_env(1, interpret=False)
