"""One Optuna study per (stage, shape bucket): the search loop, its storage, and resuming it after a kill.

The loop asks the sampler for points, sends them to an :class:`Evaluator` (worker processes that gate and
compile in parallel, then time one at a time on the GPU) and tells the study each outcome (a
:class:`tuner.outcome.Outcome`). Everything a trial learns is stored as user attributes: ``status`` (a
:class:`tuner.outcome.Status`, stored as its string), ``reason``, the timing quantiles and the NVML telemetry of its
measurement.

The sampler proposes only feasible points no trial has yet (:class:`FeasibleSampler`), so the budget goes to
timed trials: the infeasible draws it rejects are counted (``FeasibleSampler.rejected``) but never stored. A point
that reaches the loop infeasible anyway (a sampler that is not wrapped) is pruned at once with the constraint's
reason, and one measured already (two processes asking at the same instant) is stored as a FAIL with status
``duplicate``: never as a COMPLETE trial, so the trial counts stay honest. Besides the sampler's points the study
measures its warm starts first (:func:`enqueue_warm_start`) and, halfway, crossovers of its best point so far with
them and the next best trials, one group of parameters at a time (:func:`enqueue_crossovers`).

Budget: ``trials`` counts evaluated trials (those that reached a worker), summed over every process working on
the study, so a resumed or shared study stops at the same total. Infeasible and duplicate points cost nothing and
do not count. A study that several processes may share (``StudySpec.sharers``) is handed out progressively: each
keeps at most its share of the trials left in flight and asks the next as one finishes, so that a process that
joins late still has trials to take. The loop asks only while some feasible point is open (no process has finished
or is measuring it, :func:`survey`): otherwise it waits for the trials in flight, and stops once every feasible
point has a verdict. A cap on asks and one on duplicates in a row (:data:`MAX_DUPLICATE_STREAK`) keep a sampler
that proposes nothing new from looping; duplicates are counted, and left out of the table's trial history
(tuner.run.trial_records).

Outcome → Optuna state: ok → COMPLETE (value: median ms). A property of the config (infeasible, compile error,
out of resources, wrong answer) → PRUNED, which TPE reads as "bad region". An event (timeout, crash, fault,
interruption, duplicate) → FAIL, which samplers ignore.

Resume: a trial left RUNNING by a process that no longer exists (killed, machine lost) is failed with status
"interrupted" and its point enqueued again, so it is measured exactly once more and never counted twice.
A trial's ``owner`` is ``host:pid:start-time`` of its process; on this host a dead pid identifies it at once,
on another host a heartbeat older than :data:`STALE_AFTER_S` does.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.spec import get_spec
from gdn2_tune.tuner.outcome import Outcome, Status
from gdn2_tune.tuner.space import FeasibleSet, Point, SearchSpace, freeze

STALE_AFTER_S = 600.0  # no heartbeat for this long: the owner on another host is gone
HEARTBEAT_EVERY_S = 60.0
# study.ask() creates a RUNNING trial and the owner token is written right after, in a second storage call: a
# process killed between the two leaves a trial with no owner. A live process closes that window within
# milliseconds, so an ownerless trial this old, with a later trial already owned, was abandoned.
OWNERLESS_GRACE_S = 2.0


# Outcomes that describe the config (deterministic: measuring again gives the same answer).
CONFIG_OUTCOMES = frozenset({Status.INFEASIBLE, Status.COMPILE_ERROR, Status.OUT_OF_RESOURCES, Status.WRONG_ANSWER,
                             Status.OUT_OF_MEMORY, Status.ERROR})
# FAIL outcomes that say nothing about the config and are not counted as failures of the study.
NOT_FAILURES = frozenset({Status.INTERRUPTED, Status.DUPLICATE})
# Asks per evaluated trial before the loop concludes the sampler only proposes infeasible or known points.
MAX_ASKS_PER_TRIAL = 40
# Duplicate proposals in a row after which a process stops asking in a study. The loop asks only while some feasible
# point is open (tuner.study.survey), so a duplicate means another process took the point in the same instant, or an
# unwrapped sampler; a few in a row mean the sampler proposes nothing new.
MAX_DUPLICATE_STREAK = 8
# Draws of the wrapped sampler per proposal before FeasibleSampler takes a uniformly random unseen feasible point.
# At the suite shapes ~40% of the shape-pruned box is feasible, so 16 draws all fail about once in 3500 proposals
# while TPE explores; more often once it has converged on measured points, where a random point is the useful answer.
MAX_DRAWS = 16
# After the study's deadline, in-flight evaluations get this long to finish before they are abandoned.
DRAIN_S = 15.0
SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid")
# Study user attribute prefix: infeasible draws a FeasibleSampler rejected, one attribute per process and run.
REJECTED_ATTR = "rejected_draws/"
# Crossovers (SearchSpace.crossovers): once half the trials are evaluated or half the study's time is spent, the
# best point so far with one group taken from each completed warm start (the incumbent, the built-in config, the
# other entries), then from the next best trials, at most 1/CROSSOVER_SHARE of the trials, enqueued once per
# process (tuner.study.enqueue_crossovers). Compiles are shared with the donors, so these trials cost little.
CROSSOVER_AT = 0.5
CROSSOVER_DONORS = 3
CROSSOVER_SHARE = 3
GRID_MAX_POINTS = 20000
RDB_INIT_ATTEMPTS = 5  # beyond this an exhaustive study does not fit any budget: narrow it with --param


class Evaluator(Protocol):
    """Where points are measured: gate (compile + correctness) in parallel, time serially."""

    parallel: int

    def gate(self, shape: Shape, gate_shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]: ...

    def time(self, shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]: ...

    def abandon(self) -> None:
        """Give up the gates in flight (kill those workers); their futures may then resolve to anything."""


@dataclass(frozen=True)
class StudySpec:
    key: str  # profiles.table.entry_key(stage, shape)
    stage: str
    shape: Shape
    gate_shape: Shape
    space: SearchSpace
    sampler: str
    seed: int
    trials: int  # evaluated trials the study should reach, over all processes
    timeout_s: float | None  # for this process's search on this study
    warm_start: tuple[Mapping[str, Any], ...] = ()
    # Search processes that may work on the study at once (a --gpus run's GPUs, for its last studies): each keeps
    # at most its share of the trials left in flight, so that one that joins later still finds trials to take.
    sharers: int = 1


@dataclass(frozen=True)
class TrialEvent:
    """One finished trial, as ``--no-progress`` logs it (:meth:`line`)."""

    key: str
    number: int
    status: Status
    value_ms: float | None
    config: str  # the op config's label(), or the raw parameters where they are not a config
    reason: str | None
    evaluated: int  # evaluated trials of the study so far, over every process
    target: int
    best_ms: float | None
    origin: str = ""  # "warm start", "crossover of #N" (the best trial it was built from), "" for the sampler's

    @staticmethod
    def of(key: str, trial: FrozenTrial, counts: Counts, target: int) -> TrialEvent:
        status = Status.of(trial.user_attrs.get("status"))
        try:
            # A table key starts with its op's name (``fwd/K128-...``).
            label = get_spec(key.split("/", 1)[0]).from_flat(trial.params).label()
        except (KeyError, TypeError, ValueError):
            label = str(dict(trial.params))
        reason = trial.user_attrs.get("reason")
        attrs = trial.user_attrs
        origin = ("warm start" if attrs.get("warm_start")
                  else f"crossover of #{attrs.get('crossover_of')}" if attrs.get("crossover") else "")
        return TrialEvent(key, trial.number, status, trial.value if trial.state == TrialState.COMPLETE else None,
                          label, None if reason is None else str(reason), counts.evaluated, target, counts.best_ms,
                          origin)

    def line(self) -> str:
        what = f"{self.value_ms:.4f} ms" if self.value_ms is not None else self.status.value
        best = "-" if self.best_ms is None else f"{self.best_ms:.4f}"
        why = f" ({self.reason})" if self.reason and self.status != Status.OK else ""
        why += f" <{self.origin}>" if self.origin else ""
        return (f"{self.key} #{self.number}: {what}  {self.config}{why}  "
                f"[{self.evaluated}/{self.target} evaluated, best {best} ms]")


@dataclass
class StudyProgress:
    """What the progress display shows for one study; mutated by the loop, read by the display."""

    key: str
    target: int
    done: int = 0
    pruned: int = 0
    failed: int = 0
    rejected: int = 0  # infeasible draws the sampler rejected (never stored as trials)
    best_ms: float | None = None
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    clocks: str = "-"
    phase: str = "search"
    roof: str = "-"  # each finished stage's percent of its binding roof, once the study's winner is timed

    def eta_s(self) -> float | None:
        if self.done <= 0:
            return None
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * max(0, self.target - self.done)
        if self.deadline is not None:
            eta = min(eta, max(0.0, self.deadline - time.monotonic()))
        return eta


# ---------------------------------------------------------------------------------------------------------------
# Storage and samplers


def study_name(spec_key: str, kernel_hash: str, space: SearchSpace) -> str:
    """Trials of other kernel sources or another (narrowed) space are not comparable: they get another study."""
    name = f"{spec_key}@{kernel_hash}"
    if space.params != space.spec.space:
        narrowed = ";".join(f"{p.name}={','.join(map(str, p.values))}" for p in space.params)
        name += f"#{narrowed}"
    return name


def open_storage(url: str | None, run_dir: Path) -> optuna.storages.BaseStorage:
    """``None`` → a journal file under ``run_dir``; ``postgresql://...``/``sqlite:///...`` → RDB storage.

    The journal backend appends one record per storage operation under a file lock, so a ``kill -9`` loses at
    most the operation in progress and a rerun replays the rest.
    """
    if url is None or url.startswith("journal:") or url.endswith(".log"):
        path = Path(url.removeprefix("journal:")) if url else Path(run_dir) / "studies.journal.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        # A lock file left by a killed process is broken after grace_period seconds (Optuna's default is 30).
        lock = optuna.storages.journal.JournalFileOpenLock(str(path), grace_period=10)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock))
    if "://" not in url:
        raise ValueError(
            f"--storage: expected postgresql://user@host/db, sqlite:///path or journal:PATH, received {url!r}"
        )
    # Processes started together race to create Optuna's schema (one fails on "type studydirection already
    # exists"); the loser retries once the winner's tables are committed.
    for attempt in range(RDB_INIT_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(postgres_driver(url), engine_kwargs={"pool_pre_ping": True})
        except Exception as err:
            if attempt == RDB_INIT_ATTEMPTS - 1 or not any(w in str(err).lower() for w in ("exist", "duplicate")):
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def postgres_driver(url: str) -> str:
    """Name the driver explicitly: SQLAlchemy 2.1 picks psycopg (3) for ``postgresql://``, while the GPU image and
    CI install psycopg2-binary; whichever is importable is used."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, dialect in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return dialect + url.removeprefix("postgresql")
    raise ValueError(f"--storage {url}: needs a PostgreSQL driver; install psycopg2-binary or psycopg")


def startup_trials(trials: int) -> int:
    """Random trials before a model-based sampler takes over; the warm starts come on top.

    Few: with only feasible points proposed, every startup trial costs a measurement (infeasible ones used to count
    toward TPE's startup for free). Replaying the recorded 36-point anchor grid (10 seeds) took a median of 7 trials
    to come within 2% of its best with 3, 8 with 5 and 15 with the earlier 10; a synthetic 1824-point grid, 21 with 3
    and 24 with 7.
    """
    return max(3, min(5, trials // 10))


def make_sampler(
    name: str, seed: int, n_startup: int, *, feasible: Feasible | None = None
) -> optuna.samplers.BaseSampler:
    """The named sampler; with ``feasible``, wrapped so that it proposes only feasible points not yet tried."""
    base = _base_sampler(name, seed, n_startup)
    return base if feasible is None else FeasibleSampler(base, feasible, seed)


def _base_sampler(name: str, seed: int, n_startup: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate: tiles, warps and stages interact (a tile that is good with 8 warps is bad with 2);
        # constant_liar: several points are in flight at once, and each should avoid the others.
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constant_liar=True, n_startup_trials=n_startup,
        )
    if name == "gp":
        try:
            import scipy  # noqa: F401 - GPSampler's acquisition optimiser needs it
        except ImportError as err:
            raise ValueError("--sampler gp: needs scipy (pip install scipy); use --sampler tpe without it") from err
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as err:
            raise ValueError("--sampler cmaes: needs the cmaes package (pip install cmaes)") from err
        # Every parameter here is categorical, which CMA-ES cannot model: Optuna samples those with the
        # independent sampler given here, so this is TPE per parameter in practice.
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=n_startup, independent_sampler=optuna.samplers.TPESampler(seed=seed),
        )
    if name in ("random", "grid"):
        # grid: every feasible point is enqueued; the sampler only runs if the queue is somehow empty.
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"--sampler: expected one of {list(SAMPLERS)}, received {name!r}")


@dataclass(frozen=True)
class Feasible:
    """What :class:`FeasibleSampler` needs of a study: its distributions (the space fitted to the shape), the
    constraints at the shape, and the feasible set to fall back on."""

    space: SearchSpace  # as fitted to the shape: its distributions are the ones the study asks with
    shape: Shape
    points: FeasibleSet

    @staticmethod
    def of(space: SearchSpace, shape: Shape) -> Feasible:
        return Feasible(space.for_shape(shape), shape, space.feasible(shape))

    def check(self, params: Mapping[str, Any]) -> bool:
        return self.space.contains(params) and self.space.check(params, self.shape)[0] is not None


class FeasibleSampler(optuna.samplers.BaseSampler):
    """Proposes only feasible points that no trial of the study has (finished or running), so that every proposal
    costs a compile and a measurement, and none is stored as pruned or as a duplicate.

    The wrapped sampler (TPE, GP, ...) draws whole points through Optuna's relative-sampling hook; a draw that
    violates a constraint or repeats a known point is rejected and drawn again, up to :data:`MAX_DRAWS` times, then
    a uniformly random unseen feasible point is taken. Optuna's own ``constraints_func`` is not enough here: it
    teaches TPE the infeasible region from infeasible *trials*, each of which is still proposed and stored (at the
    anchor on an H200, 111 of 140 proposals, issue 12). Enqueued trials (warm starts, retries) never reach this:
    Optuna gives them their fixed values without sampling.
    """

    def __init__(self, base: optuna.samplers.BaseSampler, feasible: Feasible, seed: int) -> None:
        self.base = base
        self.feasible = feasible
        self._dists = feasible.space.distributions()
        self._rng = random.Random(seed)
        self.rejected = 0  # infeasible draws
        self.repeats = 0  # draws of a known point
        self.fallbacks = 0  # proposals that came from the feasible set instead of the wrapped sampler

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return dict(self._dists)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: Mapping[str, Any]
    ) -> dict[str, Any]:
        if set(search_space) != set(self._dists):
            return {}  # asked with other distributions: leave every parameter to sample_independent
        known = set()
        for t in study.get_trials(deepcopy=False):
            # Enqueued points count as known: proposing one would measure it twice once its turn comes.
            params = t.params or t.system_attrs.get("fixed_params")
            if t.number != trial.number and params:
                known.add(freeze(params))
        own = self.base.infer_relative_search_space(study, trial)
        for _ in range(MAX_DRAWS):
            point = dict(self.base.sample_relative(study, trial, own)) if own else {}
            for name, dist in self._dists.items():
                if name not in point:
                    point[name] = self.base.sample_independent(study, trial, name, dist)
            if not self.feasible.check(point):
                self.rejected += 1
            elif freeze(point) in known:
                # The sampler's favourite is measured already; drawing again mostly returns it again (TPE picks the
                # best of its candidates by the same model), so step to an unseen feasible neighbour of it instead.
                self.repeats += 1
                near = self._neighbour(point, known)
                if near is not None:
                    return near
            else:
                return point
        self.fallbacks += 1
        # None: every feasible point is known; the last draw is returned and the loop records it as a duplicate.
        return self.feasible.points.sample(self._rng, known) or point

    def _neighbour(self, point: Mapping[str, Any], known: set[Any]) -> dict[str, Any] | None:
        """A random unseen feasible point that differs from ``point`` in one parameter, else None."""
        options = [
            {**point, name: value}
            for name, dist in self._dists.items()
            for value in dist.choices  # type: ignore[attr-defined]
            if value != point[name]
        ]
        self._rng.shuffle(options)
        return next((p for p in options if freeze(p) not in known and self.feasible.check(p)), None)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self._rng = random.Random()


# ---------------------------------------------------------------------------------------------------------------
# Trial ownership and staleness


def _proc_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot: with the pid, it names a process uniquely."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_token() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_proc_start(pid)}"


def owner_alive(token: str) -> bool | None:
    """True/False for an owner on this host; None when it is on another host (only the heartbeat can tell)."""
    try:
        host, pid_s, start = token.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    return Path(f"/proc/{pid}").exists() and _proc_start(pid) == start


def is_stale(trial: FrozenTrial, now: float | None = None, newest_owned: int = -1) -> bool:
    """Whether a RUNNING trial's process is gone. ``newest_owned``: the highest trial number that has an owner."""
    if trial.state != TrialState.RUNNING:
        return False
    now = now or time.time()
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    if "owner" not in trial.user_attrs:
        age = now - started
        return age > STALE_AFTER_S or (age > OWNERLESS_GRACE_S and newest_owned > trial.number)
    alive = owner_alive(str(trial.user_attrs["owner"]))
    if alive is not None:
        return not alive
    beat = trial.user_attrs.get("heartbeat", started)
    return now - float(beat) > STALE_AFTER_S


def recover_stale(study: optuna.Study) -> list[int]:
    """Fail every stale RUNNING trial (status "interrupted") and enqueue its point again. Returns their numbers."""
    recovered = []
    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    newest_owned = max((t.number for t in trials if "owner" in t.user_attrs), default=-1)
    for t in trials:
        if not is_stale(t, newest_owned=newest_owned):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "status", Status.INTERRUPTED.value)
            storage.set_trial_user_attr(t._trial_id, "reason", "its process ended before the trial finished")
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process recovered it first; it also re-enqueued it
        if t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        recovered.append(t.number)
    return recovered


# ---------------------------------------------------------------------------------------------------------------
# Counting


def is_evaluated(t: FrozenTrial) -> bool:
    """Reached a worker and finished with a verdict: what ``--trials`` counts."""
    return t.state.is_finished() and bool(t.user_attrs.get("evaluated")) and t.user_attrs.get("status") != Status.INTERRUPTED


@dataclass(frozen=True)
class Counts:
    evaluated: int
    running: int
    pruned: int  # the config failed: infeasible, compile error, out of resources, wrong answer
    failed: int  # an event: timeout, crash, fault (not interruptions or duplicates)
    best_ms: float | None
    duplicates: int = 0
    waiting: int = 0  # enqueued, not yet asked (warm starts, retries)

    def summary(self) -> str:
        best = "-" if self.best_ms is None else f"{self.best_ms:.4f} ms"
        return (f"{self.evaluated} evaluated, {self.pruned} pruned, {self.failed} failed, {self.duplicates} "
                f"duplicates, {self.waiting} queued; best {best}")


@dataclass(frozen=True)
class Survey:
    """Where a study's points stand, over every process sharing it: what the loop asks against."""

    finished: dict[Point, FrozenTrial]  # points with a verdict (not interrupted, not a duplicate): the first trial
    finished_feasible: frozenset[Point]  # of those, the ones that were not infeasible
    running: frozenset[Point]  # points a worker of some process is measuring now
    waiting: int  # enqueued trials not yet asked (warm starts, retries)

    @property
    def taken(self) -> frozenset[Point]:
        """Feasible points a new ask must not repeat."""
        return self.finished_feasible | self.running


def survey(study: optuna.Study) -> Survey:
    """The :class:`Survey` of ``study``."""
    finished: dict[Point, FrozenTrial] = {}
    running: set[Point] = set()
    waiting = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            waiting += 1
        elif not t.params:
            continue
        elif t.state == TrialState.RUNNING:
            if t.user_attrs.get("evaluated"):
                running.add(_freeze(t.params))
        elif t.user_attrs.get("status") not in NOT_FAILURES:
            finished.setdefault(_freeze(t.params), t)
    feasible = frozenset(k for k, t in finished.items() if t.user_attrs.get("status") != Status.INFEASIBLE)
    return Survey(finished, feasible, frozenset(running), waiting)


def count(trials: Sequence[FrozenTrial]) -> Counts:
    evaluated = [t for t in trials if is_evaluated(t)]
    complete = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return Counts(
        evaluated=len(evaluated),
        running=sum(1 for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("evaluated")),
        pruned=sum(1 for t in trials if t.state == TrialState.PRUNED),
        failed=sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("status") not in NOT_FAILURES),
        best_ms=min(complete) if complete else None,
        duplicates=sum(1 for t in trials if t.user_attrs.get("status") == Status.DUPLICATE),
        waiting=sum(1 for t in trials if t.state == TrialState.WAITING),
    )


_freeze = freeze


# ---------------------------------------------------------------------------------------------------------------
# The loop


def enqueue_points(study: optuna.Study, points: Sequence[Mapping[str, Any]], attrs: Mapping[str, Any]) -> int:
    """Enqueue the points no trial of the study has yet (of any state). Returns how many were enqueued."""
    known = {_freeze(t.params) for t in study.get_trials(deepcopy=False)}
    known |= {_freeze(t.system_attrs.get("fixed_params", {})) for t in study.get_trials(deepcopy=False)}
    n = 0
    for p in points:
        if _freeze(p) not in known:
            study.enqueue_trial(dict(p), user_attrs=dict(attrs))
            known.add(_freeze(p))
            n += 1
    return n


def enqueue_warm_start(study: optuna.Study, spec: StudySpec) -> int:
    """Enqueue the spec's warm-start points that lie in its space at its shape (a ``--param``-narrowed space drops
    table entries outside it: Optuna refuses to ask for an enqueued value outside a distribution's choices, which
    ended a per-GPU search process of a narrowed grid run on two H100s, 2026-11-26). Returns how many."""
    space = spec.space.for_shape(spec.shape)
    return enqueue_points(study, [p for p in spec.warm_start if space.contains(p)], {"warm_start": True})


def enqueue_crossovers(study: optuna.Study, spec: StudySpec, room: int) -> int:
    """Enqueue the crossovers of the study's best completed point (see :data:`CROSSOVER_AT`), marked
    ``crossover``, no more than ``room`` (the trials the budget has left, over every process: an enqueued point
    the budget cannot run would wait in the study). Returns how many were enqueued (none before two trials are
    complete)."""
    done = sorted((t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.params),
                  key=lambda t: t.value)
    if len(done) < 2:
        return 0
    best, rest = done[0], done[1:]
    warm = [t for t in rest if t.user_attrs.get("warm_start")]
    top = [t for t in rest if not t.user_attrs.get("warm_start")][:CROSSOVER_DONORS]
    points = spec.space.crossovers(best.params, [t.params for t in (*warm, *top)], spec.shape)
    cap = min(max(1, spec.trials // CROSSOVER_SHARE), room)
    return enqueue_points(study, points[:cap], {"crossover": True, "crossover_of": best.number})


def run_study(
    study: optuna.Study,
    spec: StudySpec,
    evaluator: Evaluator,
    *,
    progress: StudyProgress | None = None,
    on_update: Callable[[], None] | None = None,
    on_trial: Callable[[TrialEvent], None] | None = None,
    timeouts: tuple[float, float] = (300.0, 120.0),
) -> Counts:
    """Search until ``spec.trials`` evaluated trials exist, the deadline passes or the space is exhausted.

    ``on_trial`` hears of every trial this process finishes (what ``--no-progress`` logs, one line each).
    ``timeouts`` = (gate, time) seconds are enforced by the evaluator's workers; they are passed here only so
    that the deadline drain knows what "stuck" means.
    """
    del timeouts
    token = owner_token()
    progress = progress or StudyProgress(spec.key, spec.trials)
    t_start = time.monotonic()
    deadline = None if spec.timeout_s is None else t_start + spec.timeout_s
    progress.deadline = deadline
    recover_stale(study)
    space = spec.space.for_shape(spec.shape)
    enqueue_warm_start(study, spec)
    dists = space.distributions()
    n_feasible = spec.space.feasible(spec.shape).size

    gating: dict[Future[Outcome], optuna.trial.Trial] = {}
    queued: list[optuna.trial.Trial] = []  # passed the gate, waiting for the (single) timing worker
    timing: dict[Future[Outcome], optuna.trial.Trial] = {}
    inflight_params: set[tuple[tuple[str, Any], ...]] = set()
    asks = 0
    duplicate_streak = 0  # proposals in a row that were duplicates: past MAX_DUPLICATE_STREAK, no more asking
    last_beat = time.time()
    crossed = False  # this process enqueued its crossovers

    def refresh() -> Counts:
        c = count(study.get_trials(deepcopy=False))
        progress.done, progress.pruned, progress.failed, progress.best_ms = c.evaluated, c.pruned, c.failed, c.best_ms
        if on_update is not None:
            on_update()
        return c

    def finish(trial: optuna.trial.Trial, out: Outcome, evaluated: bool = True) -> None:
        status = out.status
        trial.set_user_attr("status", status.value)  # the string: the storage stays readable without this code
        trial.set_user_attr("reason", out.reason)
        trial.set_user_attr("evaluated", evaluated)
        # err_<output> come from the gate (tuner.measure.gate), one per output the op's spec names.
        errors = tuple(name for name in out.data if name.startswith("err_"))
        for name in ("p20_ms", "p80_ms", "reps", "launch", *errors, "telemetry", "elapsed_s", "wall_s"):
            if out.get(name) is not None:
                value = out[name]
                trial.set_user_attr(name, None if isinstance(value, float) and not math.isfinite(value) else value)
        if out.get("telemetry"):
            from gdn2_tune.tuner.device import Telemetry

            progress.clocks = Telemetry.from_dict(out["telemetry"]).short()
        if status == Status.OK:
            frozen = study.tell(trial, float(out["p50_ms"]))
        elif status in CONFIG_OUTCOMES:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        else:
            frozen = study.tell(trial, state=TrialState.FAIL)
        inflight_params.discard(_freeze(trial.params))
        report(frozen)

    def duplicate(trial: optuna.trial.Trial, of: FrozenTrial | None) -> None:
        # FAIL, whatever the original's outcome: a COMPLETE copy would count as a second measurement (issue 9:
        # `--trials 120` ended with 179 complete trials) and weigh the point twice in the sampler's model.
        trial.set_user_attr("duplicate_of", None if of is None else of.number)
        trial.set_user_attr("status", Status.DUPLICATE.value)
        trial.set_user_attr("evaluated", False)
        reason = "duplicate of a point being measured" if of is None else f"duplicate of trial {of.number}"
        trial.set_user_attr("reason", reason)
        report(study.tell(trial, state=TrialState.FAIL))

    def report(frozen: FrozenTrial) -> None:
        if on_trial is not None:
            on_trial(TrialEvent.of(spec.key, frozen, count(study.get_trials(deepcopy=False)), spec.trials))

    def can_ask() -> bool:
        """Whether the budget, the ask cap and the duplicate streak allow another ask and the study has a point to
        give: an enqueued one, or a feasible point no trial of any process has finished or is measuring. On a
        2-point space with both in flight the loop used to ask on, and stored 5346 duplicates in 80 s (2026-11-30)."""
        if (c.evaluated + c.running >= spec.trials or asks >= MAX_ASKS_PER_TRIAL * max(1, spec.trials)
                or duplicate_streak >= MAX_DUPLICATE_STREAK):
            return False
        trials = study.get_trials(deepcopy=False)
        # Cheap answers first: this runs before every ask, and a grid study holds thousands of trials.
        if sum(1 for t in trials if t.params) < n_feasible or any(t.state == TrialState.WAITING for t in trials):
            return True
        return len(survey(study).taken | inflight_params) < n_feasible

    def share() -> int:
        """Trials this process may have in flight: its share of those the budget has left (over every process).
        With as many gate workers as trials, one process used to ask for a whole study at once, and a GPU that
        joined it found nothing to take (2026-11-30, two H200s: one GPU idle for 38 of 86 s)."""
        return -(-(spec.trials - c.evaluated) // max(1, spec.sharers))

    c = refresh()
    while True:
        now = time.monotonic()
        past_deadline = deadline is not None and now >= deadline
        room = spec.trials - c.evaluated - c.running
        if not crossed and room > 0 and (c.evaluated >= CROSSOVER_AT * spec.trials or (
                deadline is not None and now >= t_start + CROSSOVER_AT * (deadline - t_start))):
            crossed = True
            enqueue_crossovers(study, spec, room)
        # Ask ahead: keep every gate worker busy, but no more than that queued for timing, so that the sampler
        # hears back about points before proposing many more; and no more than this process's share.
        while (
            not past_deadline
            and len(gating) < evaluator.parallel
            and len(queued) < max(1, evaluator.parallel // 2)
            and len(gating) + len(queued) + len(timing) < share()
            and can_ask()
        ):
            asks += 1
            trial = study.ask(dists)
            trial.set_user_attr("owner", token)
            params = dict(trial.params)
            key = _freeze(params)
            # Another process may have asked for the same point since the survey: a duplicate, stored as a FAIL
            # (of the finished trial when there is one), at most MAX_DUPLICATE_STREAK in a row.
            same = [t for t in study.get_trials(deepcopy=False) if t.params == params and t.number != trial.number]
            done = next((t for t in same if t.state.is_finished() and t.user_attrs.get("status") not in NOT_FAILURES),
                        None)
            if (done is not None or key in inflight_params
                    or any(t.state == TrialState.RUNNING and t.user_attrs.get("evaluated") for t in same)):
                duplicate_streak += 1
                duplicate(trial, done)
                continue
            cfg, reason = spec.space.check(params, spec.shape)
            if cfg is None:
                finish(trial, Outcome(Status.INFEASIBLE, reason), evaluated=False)
                continue
            duplicate_streak = 0
            trial.set_user_attr("evaluated", True)  # counted as running by other processes sharing the study
            trial.set_user_attr("heartbeat", time.time())
            inflight_params.add(key)
            gating[evaluator.gate(spec.shape, spec.gate_shape, params)] = trial
            c = Counts(c.evaluated, c.running + 1, c.pruned, c.failed, c.best_ms)
        if not timing and queued:
            trial = queued.pop(0)
            timing[evaluator.time(spec.shape, trial.params)] = trial
        in_flight = len(gating) + len(queued) + len(timing)
        if in_flight == 0:
            c = refresh()
            pts = survey(study)
            # Every feasible point has a verdict (over every process), or the budget is met, or asking is pointless.
            exhausted = pts.waiting == 0 and len(pts.finished_feasible) >= n_feasible
            if (past_deadline or exhausted or c.evaluated >= spec.trials
                    or asks >= MAX_ASKS_PER_TRIAL * max(1, spec.trials) or duplicate_streak >= MAX_DUPLICATE_STREAK):
                break
            if not can_ask():
                # The budget is met by, or every open point is, running trials of other processes: wait for them
                # (one that fails or whose process dies frees its point or its budget again).
                time.sleep(0.5)
                recover_stale(study)
                c = refresh()
            continue
        if past_deadline and gating and now >= deadline + DRAIN_S:  # type: ignore[operator]
            # Compiles still running after the drain are given up (their workers killed); points already
            # compiled and gated are still timed below, which takes well under a second each.
            evaluator.abandon()
            for trial in gating.values():
                # Not the config's fault: mark it interrupted (not counted) and enqueue it for the next run.
                finish(trial, Outcome(Status.INTERRUPTED, "study deadline passed while it compiled"), False)
                study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
            gating.clear()
            continue
        done, _ = wait([*gating, *timing], timeout=1.0, return_when=FIRST_COMPLETED)
        for fut in done:
            out = fut.result()
            if fut in gating:
                trial = gating.pop(fut)
                if out.ok:
                    for name in out.data:
                        if name.startswith("err_"):
                            trial.set_user_attr(name, out[name])
                    queued.append(trial)
                else:
                    finish(trial, out)
            else:
                finish(timing.pop(fut), out)
        if time.time() - last_beat > HEARTBEAT_EVERY_S:
            last_beat = time.time()
            for trial in [*gating.values(), *queued, *timing.values()]:
                trial.set_user_attr("heartbeat", last_beat)
            recover_stale(study)
        c = refresh()
    recover_stale(study)  # trials a killed run left behind, now that this run's own trials are owned
    if isinstance(study.sampler, FeasibleSampler):
        progress.rejected = study.sampler.rejected
        # Per process (and run), so that processes sharing the study never overwrite each other's count.
        study.set_user_attr(f"{REJECTED_ATTR}{token}", study.sampler.rejected)
    return refresh()
