"""Search efficiency without a GPU: replay a sampler against the recorded values of an exhaustive grid.

Run the grid once on the GPU (``tune.py tune --sampler grid --param ...`` over a space narrow enough to finish),
then ask here how many evaluated trials TPE (or another sampler) needs, over several seeds, to come within
``tolerance`` of the grid's best. The replay goes through the same study loop as a real run
(:func:`tuner.study.run_study`, the feasible-only sampler, duplicates, warm start with the default config), with an
evaluator that looks values up instead of measuring them; it is also how the search logic is tested on a CPU.

    python -m gdn2_tune.tuner.replay profiles/h100-80gb-hbm3.json --key fwd/K128-V128-bf16/T4096-BH128 --seeds 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from gdn2_tune.kernels.config import Param, Shape
from gdn2_tune.kernels.spec import DEFAULT_OP, get_spec
from gdn2_tune.tuner import study as study_mod
from gdn2_tune.tuner.outcome import Outcome, Status, failed, ok
from gdn2_tune.tuner.space import SearchSpace

Point = tuple[tuple[str, Any], ...]


def freeze(params: Mapping[str, Any]) -> Point:
    return tuple(sorted(params.items()))


@dataclass(frozen=True)
class RecordedGrid:
    """Measured points of one shape: value in ms, or None for a point that failed its gate."""

    shape: Shape
    values: Mapping[Point, float | None]
    op: str = DEFAULT_OP  # whose space the points are of

    @property
    def best(self) -> float:
        ok = [v for v in self.values.values() if v is not None]
        if not ok:
            raise ValueError("recorded grid: expected at least one measured point, received none")
        return min(ok)

    def space(self) -> SearchSpace:
        """The op's space narrowed to the values the grid covers (a grid is usually run over a narrowed space)."""
        full = get_spec(self.op).space
        seen: dict[str, set[Any]] = {p.name: set() for p in full}
        for point in self.values:
            for name, value in point:
                seen[name].add(value)
        return SearchSpace(tuple(Param(p.name, tuple(v for v in p.values if v in seen[p.name]), p.doc) for p in full),
                           self.op)

    @staticmethod
    def from_records(
        shape: Shape, records: Sequence[tuple[Mapping[str, Any], float | None]], op: str = DEFAULT_OP
    ) -> RecordedGrid:
        values: dict[Point, float | None] = {}
        for params, value in records:
            key = freeze(params)
            # A point measured more than once (retries, duplicates) keeps its best measurement.
            if value is not None and (values.get(key) is None or value < values[key]):  # type: ignore[operator]
                values[key] = value
            else:
                values.setdefault(key, value)
        return RecordedGrid(shape, values, op)


class LookupEvaluator:
    """A :class:`tuner.study.Evaluator` that answers from a recorded grid, immediately."""

    def __init__(self, grid: RecordedGrid, parallel: int = 1) -> None:
        self.grid = grid
        self.parallel = parallel
        self.gates = 0
        self.times = 0

    def _done(self, out: Outcome) -> Future[Outcome]:
        fut: Future[Outcome] = Future()
        fut.set_result(out)
        return fut

    def gate(self, shape: Shape, gate_shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        self.gates += 1
        key = freeze(params)
        if key not in self.grid.values:
            return self._done(failed(Status.CRASH, "point not in the recorded grid"))
        if self.grid.values[key] is None:
            return self._done(failed(Status.WRONG_ANSWER, "recorded as failed"))
        return self._done(ok())

    def time(self, shape: Shape, params: Mapping[str, Any]) -> Future[Outcome]:
        self.times += 1
        value = self.grid.values[freeze(params)]
        return self._done(ok(p50_ms=value, p20_ms=value, p80_ms=value))

    def abandon(self) -> None:
        pass


@dataclass(frozen=True)
class ReplayResult:
    sampler: str
    grid_points: int
    grid_best_ms: float
    tolerance: float
    max_trials: int
    trials_to_target: tuple[int | None, ...]  # per seed; None: not reached within max_trials

    @property
    def median(self) -> float | None:
        reached = [n for n in self.trials_to_target if n is not None]
        if len(reached) < len(self.trials_to_target):
            return None  # a seed that never got there makes the median undefined, not small
        return statistics.median(reached)

    def summary(self) -> str:
        per_seed = ", ".join("-" if n is None else str(n) for n in self.trials_to_target)
        med = self.median
        return (
            f"{self.sampler}: trials to within {self.tolerance:.0%} of the grid best ({self.grid_best_ms:.4f} ms over "
            f"{self.grid_points} points): median {'>' + str(self.max_trials) if med is None else f'{med:g}'} "
            f"(per seed: {per_seed})"
        )


def trials_to_target(study: optuna.Study, target_ms: float) -> int | None:
    """Evaluated trials, in order, until the best so far is at most ``target_ms``."""
    n = 0
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not study_mod.is_evaluated(t):
            continue
        n += 1
        if t.state == TrialState.COMPLETE and t.value is not None and t.value <= target_ms:
            return n
    return None


def replay(
    grid: RecordedGrid,
    *,
    sampler: str = "tpe",
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    max_trials: int = 100,
    tolerance: float = 0.02,
    parallel: int = 1,
    warm_start_default: bool = True,
    feasible_only: bool = True,
) -> ReplayResult:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = grid.best * (1 + tolerance)
    space = grid.space()
    results = []
    warm = (get_spec(grid.op).default_config(grid.shape).flat(),) if warm_start_default else ()
    for seed in seeds:
        spec = study_mod.StudySpec(
            key="replay", stage=grid.op, shape=grid.shape, gate_shape=grid.shape, space=space, sampler=sampler,
            seed=seed, trials=min(max_trials, len(grid.values)), timeout_s=None,
            warm_start=tuple(w for w in warm if freeze(w) in grid.values),
        )
        n_startup = study_mod.startup_trials(spec.trials)
        # The sampler of a real run (tuner.run.load_study): it proposes only feasible points not yet tried.
        study = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(), direction="minimize",
            sampler=study_mod.make_sampler(sampler, seed, n_startup,
                                           feasible=study_mod.Feasible.of(space, grid.shape) if feasible_only else None),
        )
        study_mod.run_study(study, spec, LookupEvaluator(grid, parallel))
        results.append(trials_to_target(study, target))
    return ReplayResult(sampler, len(grid.values), grid.best, tolerance, max_trials, tuple(results))


def grid_from_profile(path: Path, key: str | None) -> RecordedGrid:
    from gdn2_tune.profiles.table import load_profile

    profile, warnings = load_profile(path)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if profile is None:
        raise ValueError(f"table: {path} could not be loaded")
    keys = sorted({t.key for t in profile.trials})
    if key is None:
        if len(keys) != 1:
            raise ValueError(f"--key: expected one of {keys} (the table has several studies), received none")
        key = keys[0]
    entry = next((e for e in profile.entries if e.key == key), None)
    if entry is None:
        raise ValueError(f"--key: expected a key with an entry (for its shape), one of "
                         f"{[e.key for e in profile.entries]}, received {key!r}")
    records = [
        (t.params, t.value_ms if t.state == "COMPLETE" else None)
        for t in profile.trials
        if t.key == key and t.params and t.state in ("COMPLETE", "PRUNED")
    ]
    return RecordedGrid.from_records(entry.shape, records, entry.stage)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gdn2_tune.tuner.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("table", type=Path, help="a table holding the trials of an exhaustive grid study")
    p.add_argument("--key", default=None, help="the study (entry key) to replay")
    p.add_argument("--sampler", choices=study_mod.SAMPLERS, default="tpe")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--max-trials", type=int, default=200)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--parallel", type=int, default=1, help="points in flight at once (as a real run's gate workers)")
    args = p.parse_args(argv)
    grid = grid_from_profile(args.table, args.key)
    result = replay(grid, sampler=args.sampler, seeds=range(args.seeds), max_trials=args.max_trials,
                    tolerance=args.tolerance, parallel=args.parallel)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
