"""``tune.py tune``: every study of a run, then the table.

    detect device ─► what the dispatcher serves now at each shape (the incumbents) and every known table
        ─► per shape: study (tuner.study), warm-started from those (tuner.known) ─► finalize: re-time the best few,
        the default and the incumbent interleaved; keep the incumbent unless a candidate beats it by more than the
        spread or in every round; time each stage's launch ─► Entry ─► profiles.table.save_profile (merged with
        the existing file)

The study process never launches a kernel: gate workers (one per spare CPU core) compile and gate candidates in
parallel, one timing worker per GPU measures them one at a time (tuner.worker). With ``gpus=(0, 1, ...)`` one child
process per GPU, started with the run, takes the next study no GPU has started (StudyQueue, pick_study), so N
studies are searched at once; a child with none left joins a running study that still has trials to give (trials
are shared through the storage; the run's last N studies hand theirs out a share at a time, study_sharers). The
budget is GPU time: each study gets its share of N GPUs' time (study_timeout). The parent then finalizes the
studies on every GPU at once. Every worker process starts with the run (its imports paid while the incumbents are
timed), once per run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import queue as queue_mod
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.spec import DEFAULT_DEVICE, DEFAULT_OP, DeviceLimits, KernelSpec, device_limits, get_spec
from gdn2_tune.profiles import table
from gdn2_tune.reports.roofline import percent_of_roof
from gdn2_tune.tuner import known
from gdn2_tune.tuner import study as study_mod
from gdn2_tune.tuner.device import detect_device, telemetry, visible_gpu
from gdn2_tune.tuner.outcome import Outcome, Status
from gdn2_tune.tuner.progress import ProgressView
from gdn2_tune.tuner.space import SearchSpace
from gdn2_tune.tuner.suite import SUITE, format_shape
from gdn2_tune.tuner.worker import WorkerPool, WorkerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR = REPO_ROOT / "runs"
# Seconds kept back from --budget-minutes per shape for the final interleaved re-time and stage timing, and once
# for the roofs: measured ~5-10 s per shape on a GPU (a few hundred launches of ~1 ms plus input allocation).
FINALIZE_RESERVE_S = 15.0
ROOFS_RESERVE_S = 30.0
INTERPRET_FINALIZE_RESERVE_S = 20.0


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity (taskset, a container's cpuset), not the host's count,
    which os.cpu_count() gives even when the run is pinned to part of the host."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity outside Linux
        return os.cpu_count() or 4


@dataclass(frozen=True)
class TuneOptions:
    """Everything a tuning run depends on; JSON-able so that per-GPU children get exactly the parent's view."""

    shapes: tuple[Shape, ...] = SUITE
    sampler: str = "tpe"
    seed: int = 0
    trials: int = 30
    timeout_s: float | None = 90.0  # per study
    budget_minutes: float | None = 8.0  # the whole run
    storage: str | None = None
    run_dir: Path = RUNS_DIR / "default"
    gpus: tuple[int, ...] | None = None
    interpret: bool = False
    output: Path | None = None
    param_choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    parallel: int | None = None  # gate workers; default: CPU cores - 2 (GPU), 1 (interpreter)
    gate_timeout_s: float = 240.0
    time_timeout_s: float = 120.0
    top_k: int = 4  # the search's timings share the GPU with gate workers: re-time a few, quietly, at the end
    retime_rounds: int = 5
    progress: bool = True
    search_only: bool = False  # a per-GPU child: search, do not finalize or write the table
    # GPUs of the run, searching and finalizing studies at once (a per-GPU child: the run's GPU count).
    finalizers: int = 1
    study_queue: Path | None = None  # a per-GPU child: the file it takes its studies from (StudyQueue)
    run_started: float | None = None  # a per-GPU child: time.time() at the parent's start, which the budget counts from
    op: str = DEFAULT_OP  # the registered KernelSpec to tune (the table key's first part)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["shapes"] = [format_shape(s) for s in self.shapes]
        d["run_dir"] = str(self.run_dir)
        d["output"] = None if self.output is None else str(self.output)
        d["study_queue"] = None if self.study_queue is None else str(self.study_queue)
        d["param_choices"] = {k: list(v) for k, v in self.param_choices.items()}
        return json.dumps(d)

    @staticmethod
    def from_json(text: str) -> TuneOptions:
        from gdn2_tune.tuner.suite import parse_shape

        d = json.loads(text)
        d["shapes"] = tuple(parse_shape(s) for s in d["shapes"])
        d["run_dir"] = Path(d["run_dir"])
        d["output"] = None if d["output"] is None else Path(d["output"])
        d["study_queue"] = None if d["study_queue"] is None else Path(d["study_queue"])
        d["gpus"] = None if d["gpus"] is None else tuple(d["gpus"])
        d["param_choices"] = {k: tuple(v) for k, v in d["param_choices"].items()}
        return TuneOptions(**d)

    @property
    def spec(self) -> KernelSpec:
        return get_spec(self.op)

    def space(self, device: DeviceLimits = DEFAULT_DEVICE) -> SearchSpace:
        """The op's space, narrowed by ``--param``, checked against ``device`` (the tuned GPU's limits)."""
        return SearchSpace(op=self.op, device=device).narrowed({k: list(v) for k, v in self.param_choices.items()})

    def gate_workers(self) -> int:
        if self.parallel is not None:
            return max(1, self.parallel)
        if self.interpret:
            return 1
        # Compiles are CPU-bound; keep one core for the study process and one for the timing worker's launches.
        per_gpu = max(1, available_cores() - 2) // max(1, len(self.gpus or (0,)))
        cap = self.spec.max_gate_workers  # gates also hold GPU memory: an op's cap per GPU
        return max(1, per_gpu if cap is None else min(per_gpu, cap))


@dataclass(frozen=True)
class RunResult:
    profile_path: Path | None
    entries: tuple[table.Entry, ...]
    notes: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------------
# Workers


def worker_env(gpu: int | None, interpret: bool, preload: str | None = None) -> dict[str, str]:
    from gdn2_tune.tuner.device import NVML_INDEX_ENV
    from gdn2_tune.tuner.worker import PRELOAD_ENV

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop(PRELOAD_ENV, None)
    if preload is not None:
        env[PRELOAD_ENV] = preload
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
        if gpu is not None:
            entry, nvml = visible_gpu(gpu)
            env["CUDA_VISIBLE_DEVICES"] = entry
            if nvml is None:
                env.pop(NVML_INDEX_ENV, None)
            else:
                env[NVML_INDEX_ENV] = str(nvml)
    return env


class WorkerEvaluator:
    """The :class:`tuner.study.Evaluator` of a real run: a pool of gate workers and one timing worker."""

    def __init__(self, options: TuneOptions, gpu: int | None, log_dir: Path) -> None:
        env = worker_env(gpu, options.interpret, preload=options.spec.module)
        self.options = options
        # The pid keeps the logs of several search processes sharing a run dir apart.
        tag = f"{'cpu' if options.interpret else 'gpu'}{'' if gpu is None else gpu}-{os.getpid()}"
        self.gates = WorkerPool(options.gate_workers(), lambda i: WorkerProcess(f"{tag}-gate{i}", env, log_dir))
        self.timer = WorkerPool(1, lambda i: WorkerProcess(f"{tag}-time", env, log_dir))
        self.parallel = self.gates.size

    def request(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """``req`` addressed to the run's op: its name and the module that registers it (tuner.worker)."""
        return {**req, "kernel": self.options.op, "kernel_module": self.options.spec.module}

    def gate(self, shape: Shape, gate_shape_: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        req = {"op": "gate", "shape": dataclasses.asdict(shape), "gate_shape": dataclasses.asdict(gate_shape_),
               "params": dict(params)}
        return self.gates.submit(self.request(req), self.options.gate_timeout_s)

    def time(self, shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        req = {"op": "time", "shape": dataclasses.asdict(shape), "params": dict(params)}
        return self.timer.submit(self.request(req), self.options.time_timeout_s)

    def call_timer(self, req: Mapping[str, Any], timeout: float) -> Outcome:
        return self.timer.call(self.request(req), timeout)

    def start(self, gates: bool = True) -> None:
        """Start the workers now, while the run sets up, rather than at their first request (``gates=False``: only
        the timing worker, for a process that never gates)."""
        self.timer.start()
        if gates:
            self.gates.start()

    def abandon(self) -> None:
        for w in self.gates.workers:
            w.kill()

    def close(self) -> None:
        self.gates.close()
        self.timer.close()


# ---------------------------------------------------------------------------------------------------------------
# Specs, budget


def existing_profile(path: Path) -> tuple[table.Profile | None, list[str]]:
    if not path.exists():
        return None, []
    return table.load_profile(path)


def build_specs(
    options: TuneOptions,
    existing: table.Profile | None,
    *,
    tables: Sequence[known.KnownTable] | None = None,
    served: Mapping[str, known.Served] | None = None,
    device: DeviceLimits = DEFAULT_DEVICE,
) -> list[study_mod.StudySpec]:
    """One study per shape, warm-started from every known config (tuner.known.warm_start): ``served`` (the
    incumbent per key) first, then the default and the entries of ``tables`` (default: only ``existing``).
    Every point is checked against ``device``, the limits of the GPU being tuned.

    Entries of other shapes count too, fitted: a winner found at one shape is often the best or close at its
    neighbours, and TPE alone can miss it. On an H100 (2026-11-26) a 36-point grid at the anchor found
    intra.num_warps=2 at 1.65 ms where 46 TPE trials over the whole space stayed at 1.92.
    """
    space = options.space(device)
    if options.sampler not in study_mod.SAMPLERS:
        raise ValueError(f"--sampler: expected one of {list(study_mod.SAMPLERS)}, received {options.sampler!r}")
    if tables is None:
        tables = [] if existing is None else [known.KnownTable(Path("existing"), existing, "output")]
    specs = []
    op = options.spec
    for shape in options.shapes:
        key = table.entry_key(op.name, shape)
        warm = known.warm_start(shape, op.name, tables, (served or {}).get(key), options.trials, device)
        trials = options.trials
        if options.sampler == "grid":
            size = space.feasible(shape).size  # counted, not listed: the bwd space holds ~10^10 points
            if size > study_mod.GRID_MAX_POINTS:
                raise ValueError(
                    f"--sampler grid: {size} feasible points at {shape.label()}, expected at most "
                    f"{study_mod.GRID_MAX_POINTS}; narrow the space with --param NAME=V1,V2"
                )
            grid = list(space.grid(shape))
            warm = warm + grid
            trials = len(grid)
        specs.append(
            study_mod.StudySpec(
                key=key, stage=op.name, shape=shape, gate_shape=op.gate_shape(shape), space=space,
                sampler=options.sampler, seed=options.seed, trials=trials, timeout_s=options.timeout_s,
                warm_start=tuple(warm),
            )
        )
    return specs


def study_timeout(
    options: TuneOptions, started: float, remaining_studies: int, total_studies: int, committed_s: float = 0.0
) -> float | None:
    """This study's share of what is left of --budget-minutes (unused time of earlier studies flows on), after
    keeping back the time the final re-time of every study and the roofs need (done by the parent process).

    With N GPUs (``options.finalizers`` in a per-GPU child) N studies are searched at once, one per GPU: what is
    left is N GPUs' time, less ``committed_s``, the seconds the studies running on the other GPUs still have until
    their deadlines; ``remaining_studies`` counts the studies no process has started, this one included. A share
    never runs past the budget's end.

    A study never gets less than half of an equal share: trials in flight at a deadline still finish, so early
    studies overrun, and on an H100 (2026-11-26, a 6.3-minute budget) the last two suite shapes were left ~1 s
    each and got no entry. The floor lets the run overrun its budget by at most half a share per study instead.
    """
    per_study = options.timeout_s
    if options.budget_minutes is None:
        return per_study
    reserve_each = INTERPRET_FINALIZE_RESERVE_S if options.interpret else FINALIZE_RESERVE_S
    # The parent finalizes on every GPU of the run at once, so N GPUs need 1/N of the serial reserve.
    gpus = max(1, len(options.gpus or ()), options.finalizers)
    reserve = reserve_each * -(-total_studies // gpus) + (0 if options.interpret else ROOFS_RESERVE_S)
    search = options.budget_minutes * 60 - reserve
    left = search - (time.monotonic() - started)
    floor = max(1.0, 0.5 * search * gpus / max(1, total_studies))
    share = max(floor, min(left, (left * gpus - committed_s) / max(1, remaining_studies)))
    return share if per_study is None else min(per_study, share)


# ---------------------------------------------------------------------------------------------------------------
# Studies across GPUs


@dataclass
class Claim:
    """Where one study stands among the per-GPU search processes of a run (:class:`StudyQueue`)."""

    searchers: int = 0  # processes searching it now
    done: bool = False  # a process finished searching it (its budget, deadline or space is spent)
    deadline: float | None = None  # time.time() at which its search ends; None: no deadline

    def open(self, now: float) -> bool:
        return not self.done and (self.deadline is None or self.deadline > now)


def pick_study(
    order: Sequence[str], claims: Mapping[str, Claim], now: float, skip: frozenset[str] = frozenset()
) -> tuple[str, bool] | None:
    """The study a per-GPU search process takes next: ``(key, False)``, the first in ``order`` no process has
    started, so that the GPUs search different studies at once; once every study is started, ``(key, True)``, an
    open one (not done, deadline not passed) to join, the one with the fewest searchers (the earliest on ties),
    so that no GPU idles while a study still has trials to give; None when there is nothing left (``skip``: keys
    this process has searched or found full already).

    Trial-level sharing of every study by every GPU (the earlier scheme) ran the GPUs one after another: with as
    many gate workers as trials, the first process asked for every trial of the study and the second waited
    (2026-11-30, two H200s: 93 s on two GPUs against 76 s on one).
    """
    for key in order:
        if key not in claims and key not in skip:
            return key, False
    running = [k for k in order if k in claims and k not in skip and claims[k].open(now)]
    if not running:
        return None
    return min(running, key=lambda k: claims[k].searchers), True


@dataclass(frozen=True)
class Taken:
    """A study a per-GPU search process took from the queue, and its search time (None: no limit)."""

    key: str
    timeout_s: float | None
    joined: bool  # another process started it; this one helps with what is left of its trials
    sharers: int = 1  # processes that may search it at once (tuner.study.StudySpec.sharers)


def study_sharers(gpus: int, unstarted: int) -> int:
    """How many per-GPU processes may share a study taken with ``unstarted`` studies left to start: the run's
    GPUs for one of its last ``gpus`` studies, which a GPU that has finished its own may join; 1 for an earlier
    one, which is searched alone (no GPU joins while studies are left to start), every gate worker busy."""
    return max(1, gpus) if unstarted < gpus else 1


class StudyQueue:
    """The file through which the per-GPU search processes of one run take their studies (:func:`pick_study`),
    under an exclusive lock: ``{"order": [keys], "claims": {key: Claim}}``. The parent writes it once every study
    exists with its warm starts enqueued; until then the children wait for it (:meth:`wait`), their workers already
    starting. The processes share one host (the parent spawns them), so a file lock is enough, whatever the
    Optuna storage."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def create(self, order: Sequence[str]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"order": list(order), "claims": {}}))
        os.replace(tmp, self.path)

    def wait(self, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
        """Until the parent has written the queue; False if it did not within ``timeout_s`` or ``alive()`` failed."""
        end = time.monotonic() + timeout_s
        while not self.path.exists():
            if time.monotonic() > end or not alive():
                return False
            time.sleep(0.1)
        return True

    def read(self) -> tuple[list[str], dict[str, Claim]]:
        if not self.path.exists():
            return [], {}
        data = json.loads(self.path.read_text())
        return list(data["order"]), {k: Claim(**v) for k, v in data["claims"].items()}

    def _update(self, change: Callable[[list[str], dict[str, Claim]], Any]) -> Any:
        import fcntl

        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                order, claims = self.read()
                result = change(order, claims)
                data = {"order": order, "claims": {k: dataclasses.asdict(c) for k, c in claims.items()}}
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, self.path)
                return result
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def take(self, options: TuneOptions, started: float, skip: frozenset[str] = frozenset()) -> Taken | None:
        """Claim the next study (:func:`pick_study`) with its search time: a new study gets its share of the budget
        (:func:`study_timeout`, started: the run's start on time.monotonic()), a joined one what is left of its
        deadline."""

        def change(order: list[str], claims: dict[str, Claim]) -> Taken | None:
            now = time.time()
            picked = pick_study(order, claims, now, skip)
            if picked is None:
                return None
            key, joined = picked
            remaining = sum(1 for k in order if k not in claims)
            if joined:
                claim = claims[key]
                timeout = None if claim.deadline is None else claim.deadline - now
            else:
                committed = sum(max(0.0, c.deadline - now) for c in claims.values()
                                if c.searchers > 0 and not c.done and c.deadline is not None)
                timeout = study_timeout(options, started, remaining, len(order), committed_s=committed)
                claim = claims[key] = Claim(deadline=None if timeout is None else now + timeout)
                remaining -= 1
            claim.searchers += 1
            return Taken(key, timeout, joined, study_sharers(options.finalizers, remaining))

        return self._update(change)

    def leave(self, key: str, done: bool) -> None:
        """This process stops searching ``key``; ``done``: because the study's search is over."""

        def change(order: list[str], claims: dict[str, Claim]) -> None:
            claim = claims[key]
            claim.searchers = max(0, claim.searchers - 1)
            claim.done = claim.done or done

        self._update(change)


def load_study(
    spec: study_mod.StudySpec, storage: optuna.storages.BaseStorage, worker_index: int, *, search: bool = True
) -> optuna.Study:
    """The study of ``spec``; ``search=False`` for reading, enqueueing and finalizing, which never sample."""
    name = study_mod.study_name(spec.key, table.kernel_source_hash(op=spec.stage), spec.space)
    n_startup = study_mod.startup_trials(spec.trials)
    # Each process sharing a study gets its own seed: identical seeds would propose identical points.
    sampler = study_mod.make_sampler(spec.sampler, spec.seed + 1000 * worker_index, n_startup,
                                     feasible=study_mod.Feasible.of(spec.space, spec.shape) if search else None)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize",
                               load_if_exists=True)


def query_served(evaluator: WorkerEvaluator, shapes: Sequence[Shape], notes: list[str]) -> dict[str, known.Served]:
    """What the dispatcher serves at each shape now, by entry key, asked of the timing worker (tuner.known)."""
    out = evaluator.call_timer({"op": "served", "shapes": [dataclasses.asdict(s) for s in shapes]},
                               evaluator.options.time_timeout_s)
    if not out.ok:
        notes.append(f"could not ask the dispatcher what it serves now ({out.describe()}); "
                     "no incumbent is timed, each entry is the best candidate")
        return {}
    op = evaluator.options.op
    return {table.entry_key(op, shape): known.Served.from_dict(d, op)
            for shape, d in zip(shapes, out["served"], strict=True)}


def rejected_draws(study: optuna.Study) -> int:
    """Infeasible draws the sampler rejected over every process and run (tuner.study.FeasibleSampler)."""
    return sum(int(v) for k, v in study.user_attrs.items() if k.startswith(study_mod.REJECTED_ATTR))


# ---------------------------------------------------------------------------------------------------------------
# Finalize: the entry of one study


def _params_key(p: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(p.items()))


def _gate_failure(
    study: optuna.Study, spec: study_mod.StudySpec, evaluator: WorkerEvaluator, params: Mapping[str, Any]
) -> str | None:
    """Why ``params`` cannot be a final candidate (its gate failed, in the study or now), or None when it passed.

    A point the study measured passed; one it never reached (a deadline) is gated here, as the study would have.
    """
    trials = study.get_trials(deepcopy=False)
    same = [t for t in trials if _params_key(t.params) == _params_key(params) and t.state.is_finished()]
    if any(t.state == TrialState.COMPLETE for t in same):
        return None
    failed = [t for t in same if t.user_attrs.get("status") in study_mod.CONFIG_OUTCOMES]
    if failed:
        return str(failed[-1].user_attrs.get("reason"))
    out = evaluator.gates.call(
        {"op": "gate", "shape": dataclasses.asdict(spec.shape), "gate_shape": dataclasses.asdict(spec.gate_shape),
         "params": dict(params), "kernel": spec.stage, "kernel_module": get_spec(spec.stage).module},
        evaluator.options.gate_timeout_s)
    return None if out.ok else out.describe()


def finalize_entry(
    study: optuna.Study,
    spec: study_mod.StudySpec,
    evaluator: WorkerEvaluator,
    notes: list[str],
    served: known.Served | None = None,
) -> table.Entry | None:
    """Re-time the best ``top_k`` points, the default config and the incumbent (``served``: what the dispatcher
    served before tuning) interleaved; the entry gets the fastest unless it does not beat the incumbent by more
    than the spread or in every interleaved round (tuner.known.decide), in which case the incumbent stays. Then
    time the stages of the choice."""
    options = evaluator.options
    trials = study.get_trials(deepcopy=False)
    complete = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and t.value is not None),
        key=lambda t: t.value,  # type: ignore[arg-type, return-value]
    )
    op = get_spec(spec.stage)
    device = spec.space.device
    default = op.default_config(spec.shape, device)
    if op.infeasibility(default, spec.shape, device) is not None:
        notes.append(f"{spec.key}: the built-in default is infeasible here; entry skipped")
        return None
    dflat = default.flat()
    why = _gate_failure(study, spec, evaluator, dflat)
    if why is not None:
        notes.append(f"{spec.key}: the built-in default failed its gate ({why}); entry skipped: the kernels need fixing")
        return None
    # The default is re-timed whatever happens (the entry's speedup is against it), but one the op's search rules
    # refuse is not chosen.
    default_refused = op.search_refusal(default, spec.shape, device)
    if default_refused is not None:
        notes.append(f"{spec.key}: the built-in default {default.label()} is {default_refused}; timed, not chosen")
    if served is not None:
        refused = op.search_refusal(served.config, spec.shape, device)
        failure = None if refused is not None or served.config == default else _gate_failure(
            study, spec, evaluator, served.config.flat())
        if refused is not None or failure is not None:
            why = f"is {refused}" if refused is not None else f"failed its gate here ({failure})"
            notes.append(f"{spec.key}: the incumbent {served.config.label()} ({served.describe()}) {why}; "
                         "it is not a candidate")
            served = None
    candidates: list[dict[str, Any]] = []
    for t in complete:
        if len(candidates) < options.top_k and dict(t.params) not in candidates:
            candidates.append(dict(t.params))
    if not complete:
        # A study whose every trial a deadline interrupted (cold compiles, 2026-11-30 on two H200s) still re-times
        # what was served before and the default, both gated above: the table must not lose the shape's entry.
        interrupted = sum(1 for t in trials if t.user_attrs.get("status") == Status.INTERRUPTED)
        notes.append(f"{spec.key}: the search timed no trial ({interrupted} interrupted by its deadline); "
                     "the entry is chosen between the incumbent and the default only")
    for extra in (dflat, None if served is None else served.config.flat()):
        if extra is not None and extra not in candidates:
            candidates.append(extra)
    eligible = [i for i, c in enumerate(candidates) if c != dflat or default_refused is None]
    if not eligible:
        notes.append(f"{spec.key}: no candidate the op's search rules accept was timed; entry skipped")
        return None
    shape_d = dataclasses.asdict(spec.shape)
    # The re-time does top_k+1 configs × rounds blocks of the per-trial repetitions: allow it several trial timeouts.
    out = evaluator.call_timer({"op": "retime", "shape": shape_d, "configs": candidates, "rounds": options.retime_rounds},
                               options.time_timeout_s * (len(candidates) + 1))
    if not out.ok:
        notes.append(f"{spec.key}: the final re-time failed ({out.describe()}); entry skipped")
        return None
    timings = [table.Timing(**{k: t[k] for k in ("p20_ms", "p50_ms", "p80_ms", "spread")}) for t in out["timings"]]
    i_def = candidates.index(dflat)
    i_inc = None if served is None else candidates.index(served.config.flat())
    decision = known.decide(timings, i_inc, eligible, rounds=[t.get("round_p50_ms") for t in out["timings"]])
    chosen = decision.chosen
    stages = evaluator.call_timer({"op": "stages", "shape": shape_d, "configs": [candidates[chosen], dflat]},
                                  options.time_timeout_s * 3)
    if not stages.ok:
        notes.append(f"{spec.key}: stage timing failed ({stages.describe()}); entry skipped")
        return None
    c = study_mod.count(trials)
    if complete and decision.best != 0 and decision.verdict != known.Verdict.KEPT:
        notes.append(f"{spec.key}: the interleaved re-time picked candidate #{decision.best + 1} over the search's best")
    if served is not None and i_inc is not None:
        best, inc = timings[decision.best], timings[i_inc]
        if decision.verdict == known.Verdict.KEPT:
            if decision.best == i_inc:
                why = "it was the fastest"
            else:
                why = (f"the fastest candidate, {op.from_flat(candidates[decision.best]).label()}, was only "
                       f"{1 - best.p50_ms / inc.p50_ms:.1%} faster, within the spread and not in every round")
            notes.append(f"{spec.key}: kept the incumbent {served.config.label()} from {served.describe()}: {why}")
        else:
            how = (f", faster in each of the {len(out['timings'][i_inc]['round_p50_ms'])} interleaved rounds"
                   if decision.paired else "")
            notes.append(f"{spec.key}: new config beats the incumbent from {served.describe()} by "
                         f"{1 - best.p50_ms / inc.p50_ms:.1%} ({inc.p50_ms:.4f} -> {best.p50_ms:.4f} ms{how})")
    return table.Entry(
        key=spec.key, stage=spec.stage, shape=spec.shape, config=op.from_flat(candidates[chosen]),
        timing=timings[chosen], default_timing=timings[i_def],
        speedup=timings[i_def].p50_ms / timings[chosen].p50_ms,
        stage_ms=dict(stages["stages"][0]), default_stage_ms=dict(stages["stages"][1]),
        baseline_ms=None, trials=c.evaluated, failed=c.failed, pruned=c.pruned,
        incumbent=None if served is None or i_inc is None else served.timed(timings[i_inc]),
    )


@dataclass(frozen=True)
class Finalized:
    """What finalizing one study gives the run: its entry (None if it has none), notes and trial history."""

    entry: table.Entry | None
    notes: tuple[str, ...]
    records: tuple[table.TrialRecord, ...]


def _finalize(
    spec: study_mod.StudySpec,
    prog: study_mod.StudyProgress,
    study: optuna.Study,
    evaluator: WorkerEvaluator,
    served: known.Served | None,
) -> Finalized:
    """One study's final re-time on ``evaluator``'s GPU (run in a thread: one per GPU)."""
    notes: list[str] = []
    prog.phase = "finalize"
    entry = finalize_entry(study, spec, evaluator, notes, served)
    prog.phase = "done" if entry is not None else "no entry"
    c = study_mod.count(study.get_trials(deepcopy=False))
    notes.append(f"{spec.key}: {c.evaluated} evaluated trials, {c.pruned} pruned (gate, compile), {c.failed} failed, "
                 f"{c.duplicates} duplicate proposals, {rejected_draws(study)} infeasible draws rejected by the "
                 "sampler (neither kept in the table)")
    return Finalized(entry, tuple(notes), tuple(trial_records(study, spec.key)))


def roof_summary(entry: table.Entry, device: table.DeviceInfo) -> str:
    """``"intra 27% memory, state 50% memory"``: each stage's measured median against the theoretical roof that
    binds it (the measured roofs come at the end of the run); "-" where the device's peaks are unknown."""
    parts = []
    for stage, ms in sorted(entry.stage_ms.items()):
        pct, bound = percent_of_roof(entry.shape, entry.config, stage, ms, device, op=entry.stage)
        if pct is None:
            return "-"
        parts.append(f"{stage} {pct:.0f}% {bound}")
    return ", ".join(parts) or "-"


def trial_records(study: optuna.Study, key: str) -> list[table.TrialRecord]:
    out = []
    for t in study.get_trials(deepcopy=False):
        # Duplicates are counted (study.Counts, the run's notes), never kept: they say nothing about a config.
        if not t.state.is_finished() or t.user_attrs.get("status") == Status.DUPLICATE:
            continue
        out.append(table.TrialRecord(
            key=key, number=t.number, state=t.state.name,
            value_ms=t.value if t.state == TrialState.COMPLETE else None,
            params=dict(t.params), reason=t.user_attrs.get("reason"),
        ))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run


def output_path(options: TuneOptions, device: table.DeviceInfo) -> Path:
    if options.output is not None:
        return Path(options.output)
    if options.interpret:
        # An interpreter table must never land among the shipped ones.
        return options.run_dir / f"{device.device_id}.json"
    return table.profile_path(device.device_id)


def _measure_roofs(evaluator: WorkerEvaluator, device: table.DeviceInfo, notes: list[str]) -> table.Roofs | None:
    if evaluator.options.interpret:
        return None
    out = evaluator.call_timer({"op": "roofs", "device": device.to_dict()}, ROOFS_RESERVE_S * 4)
    if not out.ok:
        notes.append(f"roofs not measured: {out.describe()}")
        return None
    return table.Roofs.from_dict(out["roofs"])


def _spawn_children(
    options: TuneOptions, log_dir: Path, queue: StudyQueue, run_started: float
) -> list[subprocess.Popen[bytes]]:
    """One search process per GPU, started at once: each sets up and starts its workers while the parent asks what
    is served and enqueues the warm starts, then takes studies from ``queue`` once the parent has written it."""
    assert options.gpus is not None
    procs = []
    for i, gpu in enumerate(options.gpus):
        child = dataclasses.replace(options, gpus=(gpu,), search_only=True, progress=False,
                                    parallel=options.gate_workers(), finalizers=len(options.gpus),
                                    study_queue=queue.path, run_started=run_started)
        path = log_dir / f"options-gpu{gpu}.json"
        path.write_text(child.to_json())
        log = open(log_dir / f"search-gpu{gpu}.log", "ab")  # noqa: SIM115 - owned by the child
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gdn2_tune.tuner.run", str(path), str(i)], stdout=log, stderr=subprocess.STDOUT,
            env=worker_env(None, options.interpret), cwd=str(REPO_ROOT),
        ))
        log.close()
    return procs


def _watch_children(
    children: Sequence[subprocess.Popen[bytes]],
    specs: Sequence[study_mod.StudySpec],
    progresses: Sequence[study_mod.StudyProgress],
    storage: optuna.storages.BaseStorage,
    view: ProgressView,
    log_trials: bool,
    queue: StudyQueue,
) -> None:
    """Until every per-GPU search process exits, show each study's progress as read back from the storage; with
    ``log_trials`` (no live view) also one line per trial finished since the last look."""
    names = {s.key: study_mod.study_name(s.key, table.kernel_source_hash(op=s.stage), s.space) for s in specs}
    logged: dict[str, set[int]] = {
        s.key: {t.number for t in optuna.load_study(study_name=names[s.key], storage=storage).get_trials(deepcopy=False)
                if t.state.is_finished()}
        for s in specs
    }  # what the resume summary already covered
    while any(p.poll() is None for p in children):
        time.sleep(2.0)
        _, claims = queue.read()
        for spec, prog in zip(specs, progresses):
            st = optuna.load_study(study_name=names[spec.key], storage=storage)
            trials = st.get_trials(deepcopy=False)
            c = study_mod.count(trials)
            claim = claims.get(spec.key)
            prog.phase = ("waiting" if claim is None else "searched" if claim.done or c.evaluated >= spec.trials
                          else "search")
            prog.done, prog.pruned, prog.failed, prog.best_ms = c.evaluated, c.pruned, c.failed, c.best_ms
            if log_trials:
                for t in trials:
                    if t.state.is_finished() and t.number not in logged[spec.key]:
                        logged[spec.key].add(t.number)
                        view.log(study_mod.TrialEvent.of(spec.key, t, c, spec.trials).line())
        view.update(force=True)


def _stop(children: Sequence[subprocess.Popen[bytes]], evaluators: Sequence[WorkerEvaluator]) -> None:
    """End what a run started: per-GPU search processes still running (a parent that failed or was interrupted;
    their workers exit with their pipes) and the workers of this process."""
    for p in children:
        if p.poll() is None:
            p.kill()
            p.wait()
    for ev in evaluators:
        ev.close()


# A per-GPU child waits this long for its parent to write the study queue (the parent's setup: the incumbents).
CHILD_WAIT_S = 900.0


def _search_queue(
    queue: StudyQueue,
    specs: Sequence[study_mod.StudySpec],
    progresses: Sequence[study_mod.StudyProgress],
    storage: optuna.storages.BaseStorage,
    evaluator: WorkerEvaluator,
    options: TuneOptions,
    started: float,
    worker_index: int,
    view: ProgressView,
    log_trials: bool,
) -> None:
    """A per-GPU child's search: the studies it takes from the run's queue (:func:`pick_study`), one at a time,
    until none is left; a study another GPU started is joined only while its budget has trials to give."""
    parent = os.getppid()
    if not queue.wait(CHILD_WAIT_S, alive=lambda: os.getppid() == parent):
        raise RuntimeError(f"the tuning process never wrote the study queue {queue.path}, or exited")
    by_key = {s.key: (s, p) for s, p in zip(specs, progresses, strict=True)}
    skip: set[str] = set()
    while (taken := queue.take(options, started, frozenset(skip))) is not None:
        skip.add(taken.key)
        spec, prog = by_key[taken.key]
        spec = dataclasses.replace(spec, timeout_s=taken.timeout_s, sharers=taken.sharers)
        study = load_study(spec, storage, worker_index)
        done = False
        try:
            if taken.joined:
                c = study_mod.count(study.get_trials(deepcopy=False))
                if c.evaluated + c.running >= spec.trials:
                    continue  # every trial of its budget is asked for: nothing to help with
            prog.started, prog.phase = time.monotonic(), "search"
            on_trial = (lambda ev: view.log(ev.line())) if log_trials else None
            c = study_mod.run_study(study, spec, evaluator, progress=prog, on_update=view.update, on_trial=on_trial)
            done = True
            view.log(f"{spec.key}: search {'joined' if taken.joined else 'taken'} by this process done in "
                     f"{time.monotonic() - prog.started:.0f} s (limit "
                     f"{'none' if spec.timeout_s is None else f'{spec.timeout_s:.0f} s'}): {c.summary()}")
        finally:
            queue.leave(taken.key, done)


def _resume_summary(study: optuna.Study, spec: study_mod.StudySpec) -> str | None:
    """What a resumed run found of a study in its storage; None for a new study."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state != TrialState.WAITING]
    if not done:
        return None
    c = study_mod.count(trials)
    left = max(0, spec.trials - c.evaluated)
    return (f"{spec.key}: resuming, found {len(done)} trials in storage ({c.summary()}); {left} more to evaluate")


def tune(options: TuneOptions, worker_index: int = 0) -> RunResult:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    run_dir = Path(options.run_dir)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    multi = options.gpus is not None and len(options.gpus) > 1
    gpu = None if options.interpret else (options.gpus[0] if options.gpus else None)
    nvml = None if gpu is None or options.interpret else visible_gpu(gpu)[1]  # NVML numbers GPUs unmasked
    device = detect_device(nvml, interpret=options.interpret)
    # The constraints check the tuned GPU's limits; the interpreter has none and gets sm90's, as the dispatcher
    # does without a GPU.
    limits = device_limits(None if options.interpret else device.family)
    out_path = output_path(options, device)
    existing, warnings = existing_profile(out_path)
    notes: list[str] = [*warnings]
    tables, table_warnings = known.known_tables(device, out_path, existing)
    notes.extend(table_warnings)
    storage = study_mod.open_storage(options.storage, run_dir)
    evaluator = WorkerEvaluator(options, gpu, log_dir)
    finalizers = [evaluator]
    children: list[subprocess.Popen[bytes]] = []
    queue: StudyQueue | None = None
    if options.run_started is not None:  # a per-GPU child: the budget counts from the parent's start
        started = time.monotonic() - (time.time() - options.run_started)
    # Start now whatever the run will need, so that it starts while the incumbents are asked for and timed: the
    # per-GPU search processes (their setup, their workers), and the workers of this process.
    if multi:
        assert options.gpus is not None
        queue = StudyQueue(log_dir / f"studies-{os.getpid()}.json")
        queue.path.unlink(missing_ok=True)
        children = _spawn_children(options, log_dir, queue, time.time() - (time.monotonic() - started))
        # The per-GPU searches gate; this process only times (the incumbents, then the finalize on every GPU).
        finalizers += [WorkerEvaluator(options, g, log_dir) for g in options.gpus[1:]]
        for ev in finalizers:
            ev.start(gates=False)
    else:
        evaluator.start()
    try:
        # A per-GPU child searches studies whose warm starts (the incumbent first) the parent has already enqueued.
        served = {} if options.search_only else query_served(evaluator, options.shapes, notes)
        specs = build_specs(options, existing, tables=tables, served=served, device=limits)
    except BaseException:
        _stop(children, finalizers)
        raise
    # Wall time by phase, for the log: where a run's time goes beyond the search (its fixed costs decide whether
    # a second GPU shortens a run: benchmarks/halving.py).
    phases: dict[str, float] = {"setup": time.monotonic() - started}
    progresses = [study_mod.StudyProgress(s.key, s.trials, phase="waiting") for s in specs]
    title = f"gdn2-tune on {device.name} ({options.sampler}, {evaluator.parallel} gate workers)"
    entries: list[table.Entry] = []
    records: list[table.TrialRecord] = []
    untuned: list[str] = []  # keys studied without a result: the table's entries for them are carried over
    view = ProgressView(progresses, title=title, enabled=options.progress)
    # Without the live table (--no-progress, or output to a file), one line per finished trial.
    log_trials = not view.enabled
    try:
        with view:
            if not options.search_only:
                view.log(f"warm starts from {len(tables)} known tables"
                         + (f" ({', '.join(f'{t.path.name}: {t.role}' for t in tables)})" if tables else ""))
                for spec in specs:
                    inc = served.get(spec.key)
                    if inc is not None:
                        view.log(f"{spec.key}: serving {inc.config.label()} from {inc.describe()} before tuning; "
                                 f"{len(spec.warm_start)} warm-start points")
            if options.study_queue is None:
                for spec in specs:
                    # Create the studies and their warm starts up front: --gpus children must not race to create
                    # the same study or enqueue the same points, and a resumed run says what it found before any
                    # work. (A per-GPU child finds them created once its parent has written the study queue.)
                    study = load_study(spec, storage, worker_index, search=False)
                    found = _resume_summary(study, spec)
                    if found is not None and not options.search_only:
                        view.log(found)
                    study_mod.enqueue_warm_start(study, spec)
            if queue is not None:
                queue.create([s.key for s in specs])  # the per-GPU search processes start taking studies
            if options.study_queue is not None:
                _search_queue(StudyQueue(options.study_queue), specs, progresses, storage, evaluator, options, started,
                              worker_index, view, log_trials)
            for i, (spec, prog) in enumerate(zip(specs, progresses)):
                if not multi and options.study_queue is None:
                    study = load_study(spec, storage, worker_index)
                    timeout = study_timeout(options, started, len(specs) - i, len(specs))
                    spec = dataclasses.replace(spec, timeout_s=timeout)
                    prog.started, prog.phase = time.monotonic(), "search"
                    prog.clocks = telemetry(nvml, interpret=options.interpret).short()
                    on_trial = (lambda ev: view.log(ev.line())) if log_trials else None
                    c = study_mod.run_study(study, spec, evaluator, progress=prog, on_update=view.update,
                                            on_trial=on_trial)
                    if log_trials:
                        view.log(f"{spec.key}: search done in {time.monotonic() - prog.started:.0f} s: {c.summary()}; "
                                 f"{prog.rejected} infeasible draws rejected by the sampler")
            if queue is not None:
                _watch_children(children, specs, progresses, storage, view, log_trials, queue)
                for p in children:
                    if p.returncode:
                        notes.append(f"a per-GPU search process exited with code {p.returncode} (see {log_dir})")
            phases["search"] = time.monotonic() - started - sum(phases.values())
            if options.search_only:
                view.log(f"search process of GPU {gpu}: setup {phases['setup']:.1f} s, search {phases['search']:.1f} s")
                return RunResult(None, (), tuple(notes))
            # With --gpus the per-GPU searches are over and their GPUs idle: finalize on all of them at once (each
            # study's re-time and stage timing take ~10 s of one GPU), each study on the next GPU that is free.
            free: queue_mod.Queue[WorkerEvaluator] = queue_mod.Queue()
            for ev in finalizers:
                free.put(ev)

            def finalize_on_a_free_gpu(spec: study_mod.StudySpec, prog: study_mod.StudyProgress) -> Finalized:
                ev = free.get()
                try:
                    return _finalize(spec, prog, load_study(spec, storage, worker_index, search=False), ev,
                                     served.get(spec.key))
                finally:
                    free.put(ev)

            roofs_notes: list[str] = []
            roofs_s: list[float] = []

            def roofs_on_a_free_gpu() -> table.Roofs | None:
                ev = free.get()
                t0 = time.monotonic()
                try:
                    return _measure_roofs(ev, device, roofs_notes)
                finally:
                    roofs_s.append(time.monotonic() - t0)
                    free.put(ev)

            with ThreadPoolExecutor(len(finalizers), thread_name_prefix="finalize") as pool:
                # With several GPUs the roofs are measured on one of them (first: the longest task) while the
                # others finalize studies; with one, after the studies as before.
                roofs_future = pool.submit(roofs_on_a_free_gpu) if multi else None
                futures = [pool.submit(finalize_on_a_free_gpu, spec, prog) for spec, prog in zip(specs, progresses)]
                while not all(f.done() for f in [*futures, *([roofs_future] if roofs_future else [])]):
                    time.sleep(0.5)
                    view.update(force=True)
            for spec, prog, fut in zip(specs, progresses, futures):  # in the order of the studies
                result = fut.result()
                notes.extend(result.notes)
                records.extend(result.records)
                if result.entry is None:
                    untuned.append(spec.key)
                else:
                    entries.append(result.entry)
                    prog.best_ms = result.entry.timing.p50_ms
                    prog.roof = roof_summary(result.entry, device)
            view.update(force=True)
            phases["finalize"] = time.monotonic() - started - sum(phases.values())
            if roofs_future is not None:
                roofs = roofs_future.result()
                notes.extend(roofs_notes)
                if roofs is not None:
                    notes.append(f"the roofs took {roofs_s[0]:.1f} s of one GPU during the finalize")
            else:
                roofs = _measure_roofs(evaluator, device, notes)
                phases["roofs"] = time.monotonic() - started - sum(phases.values())
    finally:
        _stop(children, finalizers)
    profile = table.Profile(
        schema_version=table.SCHEMA_VERSION, device=device, torch_version=_version("torch"),
        triton_version=_version("triton"), kernel_hash=table.current_fingerprints([options.op]), git_commit=_git_commit(),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), sampler=options.sampler,
        budget={"trials": options.trials, "timeout_s": options.timeout_s, "budget_minutes": options.budget_minutes,
                "seed": options.seed, "gpus": ",".join(map(str, options.gpus or ())) or None,
                "gate_workers": evaluator.parallel, "top_k": options.top_k,
                "wall_s": round(time.monotonic() - started, 1)},
        interpret=options.interpret, roofs=roofs, entries=tuple(entries), trials=tuple(records),
    )
    notes.append("wall time by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
                 + f" (setup: devices, workers, the incumbents timed; {len(specs)} studies)")
    profile = carry_untuned(profile, existing, untuned, notes)
    profile = merge_with_existing(profile, existing, out_path, notes)
    table.save_profile(profile, out_path)
    for e in entries:
        before = ("" if e.incumbent is None else
                  f"; {'kept the incumbent' if e.kept_incumbent else 'vs before tuning'} "
                  f"{e.incumbent.timing.p50_ms:.4f} ms, x{e.vs_before:.2f}")
        view.log(f"{e.key}: {e.config.label()}  {e.timing.p50_ms:.4f} ms (default {e.default_timing.p50_ms:.4f} ms, "
                 f"x{e.speedup:.2f}, spread {e.timing.spread:.1%}{before}; {roof_summary(e, device)})")
    for n in notes:
        view.log(f"note: {n}")
    view.log(f"wrote {out_path}" + (" (interpreter run: timings mean nothing)" if options.interpret else ""))
    return RunResult(out_path, tuple(entries), tuple(notes))


def carry_untuned(
    new: table.Profile, existing: table.Profile | None, keys: Sequence[str], notes: list[str]
) -> table.Profile:
    """``new`` plus the entries ``existing`` has for ``keys``, the keys this run studied and got no entry for.

    Merging keeps only the newest fingerprint's entries of an op (profiles.table.merge_profiles), so without this
    a run that changed the kernels and got no result at a shape would drop its entry (2026-11-30, two H200s: four
    fwd studies whose cold compiles outlasted their deadline left the table without its anchor entry). A carried
    entry records what it was tuned against (``Entry.tuned_against``), so the table reads as stale for its op until
    a run re-tunes the key.
    """
    old = {} if existing is None else {e.key: e for e in existing.entries}
    carried = []
    for key in keys:
        entry = old.get(key)
        if entry is None or existing is None:
            notes.append(f"{key}: NO ENTRY: this run got no result and the table had none; the dispatcher serves the "
                         "nearest entry or the built-in default there")
            continue
        against = entry.tuned_against or existing.kernel_hash.get(entry.stage) or "unknown"
        if existing.triton_version != new.triton_version and "@triton" not in against:
            against = f"{against}@triton{existing.triton_version}"
        fresh = against == new.kernel_hash.get(entry.stage)
        carried.append(dataclasses.replace(entry, tuned_against=None if fresh else against))
        how = "tuned against today's kernels" if fresh else f"marked not re-tuned (tuned against {against})"
        notes.append(f"{key}: NOT RE-TUNED: this run got no result; kept the table's entry {entry.config.label()} "
                     f"({entry.timing.p50_ms:.4f} ms), {how}")
    return dataclasses.replace(new, entries=new.entries + tuple(carried)) if carried else new


def merge_with_existing(
    new: table.Profile, existing: table.Profile | None, path: Path, notes: list[str]
) -> table.Profile:
    """Keep the faster entry per key; the new run's study history replaces the old one for the keys it tuned."""
    if existing is None:
        return new
    keys = {t.key for t in new.trials} | {e.key for e in new.entries}
    old = dataclasses.replace(existing, trials=tuple(t for t in existing.trials if t.key not in keys))
    try:
        merged, merge_notes = table.merge_profiles([old, new], names=[f"existing {path.name}", "this run"])
    except ValueError as err:
        carried = _carry_other_ops(existing, new)
        if carried is None:
            notes.append(f"replaced {path} instead of merging: {err}")
            return new
        notes.append(f"{path}: {err}; this run's ops replace their entries, and the entries of "
                     f"{', '.join(table.entry_ops(carried.entries[len(new.entries):]))} are kept, marked stale")
        return carried
    notes.extend(merge_notes)
    return merged


def _carry_other_ops(existing: table.Profile, new: table.Profile) -> table.Profile | None:
    """``new`` plus the entries of ``existing`` for the ops ``new`` did not tune, when the two tables cannot merge
    only because they were tuned with different Tritons (same device, same mode): tuning decode must not drop a
    table's forward entries. The table records one Triton version, the new run's, so the carried ops' fingerprints
    are recorded as "<fingerprint>@triton<version>": no running fingerprint matches that, and the dispatcher,
    `show` and `report` call those entries stale (they keep serving) until those ops are re-tuned. None when there
    is nothing to carry or the tables differ in more than the Triton version."""
    if existing.device.device_id != new.device.device_id or existing.interpret != new.interpret:
        return None
    tuned = set(table.entry_ops(new.entries)) | set(new.kernel_hash)
    others = tuple(e for e in existing.entries if e.stage not in tuned)
    if not others:
        return None
    kernel_hash = dict(new.kernel_hash)
    for op in table.entry_ops(others):
        kernel_hash[op] = f"{existing.kernel_hash.get(op, '')}@triton{existing.triton_version}"
    return dataclasses.replace(new, kernel_hash=kernel_hash, entries=new.entries + others)


def _git_commit() -> str:
    """The checkout's commit (with "+dirty" for uncommitted changes), "" outside a git checkout."""
    try:
        run = functools.partial(subprocess.run, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        head = run(["git", "rev-parse", "HEAD"])
        if head.returncode != 0:
            return ""
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return "missing"


def _child_main(argv: Sequence[str]) -> int:
    """``python -m gdn2_tune.tuner.run OPTIONS.json INDEX``: a per-GPU search process of a multi-GPU run."""
    options = TuneOptions.from_json(Path(argv[0]).read_text())
    tune(options, worker_index=int(argv[1]) + 1)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
