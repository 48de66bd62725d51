"""A study that several per-GPU processes may share is handed out a share at a time (issue 12: with as many gate
workers as trials, the first process used to ask for the whole study at once, so a GPU that joined it had nothing
to take). Two search processes are played by two threads, each with its own Optuna study object on one journal
file, as two per-GPU processes share a study; their evaluators answer without a GPU."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from gdn2_tune.kernels.config import Shape
from gdn2_tune.profiles import table
from gdn2_tune.tuner import study as study_mod
from gdn2_tune.tuner.outcome import Outcome, Status, failed, ok
from gdn2_tune.tuner.run import StudyQueue, TuneOptions, study_sharers
from gdn2_tune.tuner.space import SearchSpace, parse_param_choices
from gdn2_tune.tuner.suite import INTERPRET_SHAPE

# A few dozen feasible points at the interpreter shape: more than the study's trials, so the space never runs out.
SMALL_SPACE = [
    "chunk=32,64", "intra.BC=16", "intra.BK=16,32", "intra.BV=32", "intra.num_warps=4", "intra.num_stages=1",
    "intra.precision=tf32x3,ieee", "state.BV=16,32", "state.num_warps=4", "state.num_stages=1,2",
    "state.precision=input", "state.k_parts=1",
]
TRIALS = 8
GATE_WORKERS = 8  # as many gate workers as trials: the case where one process used to ask for the whole study


class HeldEvaluator:
    """Gates finish once ``release`` is set (the owner's compiles are still running when the other GPU joins);
    points with chunk = 64 fail their gate as a compile error (pruned), the others time at 1 ms."""

    parallel = GATE_WORKERS

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.gated: list[dict[str, Any]] = []

    def gate(self, shape: Shape, gate_shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        self.gated.append(dict(params))
        out = failed(Status.COMPILE_ERROR, "no kernel at chunk 64") if params["chunk"] == 64 else ok()
        f: Future[Outcome] = Future()
        threading.Thread(target=lambda: (self.release.wait(30), f.set_result(out)), daemon=True).start()
        return f

    def time(self, shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        f: Future[Outcome] = Future()
        f.set_result(ok(p50_ms=1.0))
        return f

    def abandon(self) -> None:
        pass


def search(run_dir: Path, spec: study_mod.StudySpec, index: int, evaluator: HeldEvaluator) -> optuna.Study:
    """One per-GPU process's view of the study: its own storage object and its own sampler seed."""
    sampler = study_mod.make_sampler("random", spec.seed + 1000 * index, 3,
                                     feasible=study_mod.Feasible.of(spec.space, spec.shape))
    study = optuna.create_study(study_name="shared", storage=study_mod.open_storage(None, run_dir), sampler=sampler,
                                load_if_exists=True)
    study_mod.run_study(study, spec, evaluator)
    return study


def settle(evaluator: HeldEvaluator) -> int:
    """How many points ``evaluator`` was given once its process has stopped asking: none new for a second after
    the first (or for 3 s when none comes)."""
    start = changed = time.monotonic()
    n = 0
    while time.monotonic() - start < 20:
        time.sleep(0.1)
        now = time.monotonic()
        if len(evaluator.gated) != n:
            n, changed = len(evaluator.gated), now
        elif now - changed >= 1.0 and (n > 0 or now - start >= 3.0):
            break
    return n


@pytest.mark.parametrize(
    "sharers, first_asks, joiner_asks",
    [
        pytest.param(2, TRIALS // 2, TRIALS // 2, id="shared-by-2-each-asks-its-half"),
        pytest.param(1, TRIALS, 0, id="alone-asks-the-whole-study"),
    ],
)
def test_a_gpu_that_joins_a_study_takes_the_trials_its_owner_left_and_the_study_ends_at_its_budget(
    tmp_path: Path, sharers: int, first_asks: int, joiner_asks: int
) -> None:
    shape = INTERPRET_SHAPE
    space = SearchSpace().narrowed(parse_param_choices(SMALL_SPACE))
    assert space.feasible(shape).size > 2 * TRIALS
    warm = next(iter(space.grid(shape)))  # a known config, enqueued: the first point asked
    spec = study_mod.StudySpec(
        key=table.entry_key("fwd", shape), stage="fwd", shape=shape, gate_shape=shape, space=space, sampler="random",
        seed=0, trials=TRIALS, timeout_s=60.0, warm_start=(warm,), sharers=sharers,
    )
    release = threading.Event()
    owner, joiner = HeldEvaluator(release), HeldEvaluator(threading.Event())
    joiner.release.set()  # the joining GPU's compiles finish at once
    studies: list[optuna.Study] = []
    threads = [threading.Thread(target=lambda i=i, ev=ev: studies.append(search(tmp_path, spec, i, ev)))
               for i, ev in enumerate((owner, joiner))]
    threads[0].start()
    assert settle(owner) == first_asks  # no more than its share while none of its trials has finished
    threads[1].start()  # the other GPU, done with its own study, joins while every owner's trial still compiles
    assert settle(joiner) == joiner_asks
    release.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert len(studies) == 2
    assert len(owner.gated) + len(joiner.gated) == TRIALS
    trials = studies[0].get_trials(deepcopy=False)
    # Every asked trial was told, and the study ends with exactly its budget, complete or pruned, no point twice.
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    evaluated = [t for t in trials if study_mod.is_evaluated(t)]
    assert len(evaluated) == TRIALS and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in evaluated)
    assert len({study_mod.freeze(t.params) for t in evaluated}) == TRIALS
    assert trials[0].params == warm, "the warm start is the first trial"


def test_only_the_last_studies_of_a_run_are_shared_out(tmp_path: Path) -> None:
    # While studies are left to start, a GPU that finishes takes one of those rather than joining: a study taken
    # then is searched alone, every gate worker busy. One of the last N on N GPUs may be joined: shared out.
    assert [study_sharers(2, unstarted) for unstarted in (3, 2, 1, 0)] == [1, 1, 2, 2]
    assert [study_sharers(1, unstarted) for unstarted in (1, 0)] == [1, 1]
    child = TuneOptions(budget_minutes=None, timeout_s=None, gpus=(0,), search_only=True, finalizers=2)
    queue = StudyQueue(tmp_path / "studies.json")
    queue.create(["a", "b", "c", "d"])
    taken = [queue.take(child, time.monotonic()) for _ in range(4)]
    assert [(t.key, t.joined, t.sharers) for t in taken if t is not None] == [
        ("a", False, 1), ("b", False, 1), ("c", False, 2), ("d", False, 2)]
    joined = queue.take(child, time.monotonic(), frozenset({"a", "b", "c"}))
    assert joined is not None and (joined.key, joined.joined, joined.sharers) == ("d", True, 2)
    alone = TuneOptions(budget_minutes=None, timeout_s=None, gpus=(0,), search_only=True, finalizers=1)
    solo = StudyQueue(tmp_path / "solo.json")
    solo.create(["a"])
    only = solo.take(alone, time.monotonic())
    assert only is not None and only.sharers == 1
