"""Every config the dispatcher knows for a shape: where a study starts, and what it must beat.

Tuning a new GPU must never make it slower (issue 12: an H200, served the H100 table through the sm90 family
fallback, came out 11-34% slower after tuning, because the study never tried the configs the H100 table serves).
So each study

- starts from every config known for its shape (:func:`warm_start`): what the dispatcher serves there now, the
  built-in default, then the entries of every table on disk of the device's family, of the ``GDN2_PROFILE`` table
  and of the output table, each fitted to the shape, the shape's own key and the nearest buckets first;
- ends with what the dispatcher served before tuning (the *incumbent*, :class:`Served`) timed in the final
  interleaved re-time next to the candidates (tuner/run.py); a candidate replaces it only when
  :func:`beats` says so.

What the dispatcher serves is asked of the dispatcher itself (``profiles.dispatch.explain``) inside a worker
process: there the environment (``GDN2_CONFIG``, ``GDN2_PROFILE``), the visible GPU and interpreter mode are those
of the device being tuned, which the study process, with every GPU visible and no CUDA context, does not have.
"""

from __future__ import annotations

import enum
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.spec import DEFAULT_DEVICE, DEFAULT_OP, DeviceLimits, get_spec
from gdn2_tune.profiles import table
from gdn2_tune.tuner.space import freeze

# Table-derived warm starts beyond the incumbent and the default: at most this share of a study's trials, so that
# a directory of many tables cannot turn the search into a replay of them. The nearest entries come first.
WARM_SHARE = 0.5
MIN_WARM_FROM_TABLES = 4


@dataclass(frozen=True)
class Served:
    """The config the dispatcher serves at a shape before tuning, and where it found it."""

    config: Any  # the op's config type
    source: table.ServedFrom
    table: str | None  # file name of the table
    key: str | None  # its entry: the shape's own key or the nearest bucket's

    def timed(self, timing: table.Timing) -> table.Incumbent:
        return table.Incumbent(self.config, timing, self.source, self.table, self.key)

    def describe(self) -> str:
        return self.timed(table.Timing(1.0, 1.0, 1.0, 0.0)).describe()

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "source": self.source.value, "table": self.table, "key": self.key}

    @staticmethod
    def from_dict(data: Mapping[str, Any], op: str = DEFAULT_OP) -> Served:
        return Served(table.parse_config(data["config"], op=op), table.ServedFrom(data["source"]), data.get("table"),
                      data.get("key"))


def served_now(shapes: Sequence[Mapping[str, Any]], op: str = DEFAULT_OP) -> list[dict[str, Any]]:
    """What this process's dispatcher serves op ``op`` with at each shape (run in a worker: see the module
    docstring)."""
    from gdn2_tune.profiles import dispatch

    out = []
    for shape_d in shapes:
        choice = dispatch.explain(Shape(**shape_d), op)
        out.append(Served(
            choice.config, table.ServedFrom(choice.source), None if choice.path is None else Path(choice.path).name,
            choice.key,
        ).to_dict())
    return out


@dataclass(frozen=True)
class KnownTable:
    """A table a warm start draws on, and why it was read."""

    path: Path
    profile: table.Profile
    role: str  # "output", "user" (GDN2_PROFILE), "own" (the device's shipped table) or "family"


def known_tables(
    device: table.DeviceInfo, output: Path, existing: table.Profile | None, shipped_dir: Path | None = None
) -> tuple[list[KnownTable], list[str]]:
    """The output table, the ``GDN2_PROFILE`` table and every table in ``shipped_dir`` (default: the dispatcher's)
    of ``device``'s family, each once. Stale tables are read too: their configs still pass today's constraints
    (the loader drops those that do not) and are often near the best. Returns (tables, warnings)."""
    from gdn2_tune.profiles import dispatch

    shipped = Path(dispatch.SHIPPED_DIR if shipped_dir is None else shipped_dir)
    found: list[KnownTable] = []
    warnings: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, role: str, profile: table.Profile | None = None) -> None:
        resolved = path.resolve()
        if resolved in seen:
            return
        seen.add(resolved)
        if profile is None:
            profile, problems = table.load_profile(path)
            warnings.extend(problems)
        if profile is None or (role == "family" and profile.device.family != device.family):
            return
        own = role == "family" and profile.device.device_id == device.device_id
        found.append(KnownTable(path, profile, "own" if own else role))

    if existing is not None:
        add(Path(output), "output", existing)
    user = os.environ.get(dispatch.ENV_PROFILE, "").strip()
    if user and Path(user).is_file():
        add(Path(user), "user")
    if shipped.is_dir():
        for path in sorted(shipped.glob("*.json")):
            add(path, "family")
    return found, warnings


def _relevance(entry: table.Entry, shape: Shape, stage: str) -> tuple[bool, bool, float]:
    """The dispatcher's order within a table: the exact key, then the nearest bucket of the same K, V and dtype;
    entries of other head dims come last (fitted to the shape, they are still legal and sometimes good)."""
    from gdn2_tune.profiles.dispatch import bucket_distance

    same_dims = (entry.stage, entry.shape.K, entry.shape.V, entry.shape.dtype) == (stage, shape.K, shape.V, shape.dtype)
    return entry.key != table.entry_key(stage, shape), not same_dims, bucket_distance(entry.shape, shape)


def warm_start(
    shape: Shape, stage: str, tables: Sequence[KnownTable], served: Served | None, trials: int,
    device: DeviceLimits = DEFAULT_DEVICE,
) -> list[dict[str, Any]]:
    """Flat points to enqueue, in order: the incumbent, the default, then table entries fitted to ``shape``, most
    relevant first (see :func:`_relevance`; ties keep the table order), each point once, none that the op's search
    rules refuse (``KernelSpec.search_refusal``). The default and the fits are those of ``device``, the tuned GPU's
    limits."""
    spec = get_spec(stage)
    points: list[dict[str, Any]] = []
    seen: set[Any] = set()

    def add(config: Any) -> bool:
        # None: an entry the op cannot fit to this shape. A config the op's search rules refuse (less accurate than
        # the gate can see) would only be pruned by the study: its run reports a refused incumbent instead.
        if config is None or spec.search_refusal(config, shape, device) is not None:
            return False
        point = config.flat()
        if freeze(point) in seen:
            return False
        seen.add(freeze(point))
        points.append(point)
        return True

    if served is not None:
        add(served.config)
    add(spec.default_config(shape, device))
    ranked = sorted(
        ((entry, i) for i, t in enumerate(tables) for entry in t.profile.entries if entry.stage == stage),
        key=lambda item: (*_relevance(item[0], shape, stage), item[1]),
    )
    budget = max(MIN_WARM_FROM_TABLES, int(WARM_SHARE * trials))
    for entry, _ in ranked:
        if budget <= 0:
            break
        budget -= add(spec.fit_to_shape(entry.config, shape, device))
    return points


class Verdict(enum.StrEnum):
    """How the final re-time chose the entry."""

    NEW = "new"  # a candidate beat the incumbent by more than the spread, or in every interleaved round
    KEPT = "kept"  # the incumbent was fastest, or nothing beat it beyond the spread or in every round
    UNCHECKED = "unchecked"  # the incumbent could not be timed (it failed its gate here): the best candidate won


@dataclass(frozen=True)
class Decision:
    chosen: int  # index of the config the entry gets
    best: int  # index of the fastest median
    verdict: Verdict
    paired: bool = False  # NEW by the paired rounds alone (faster in every round), not beyond the spread


# The paired test of :func:`beats_in_every_round`: a candidate faster than the incumbent in each of at least this
# many interleaved rounds (by chance, for two equally fast configs, 1 in 2^5 = 32) and by at least this fraction in
# the median round. Why: a gain smaller than the sample-to-sample noise never passes :func:`beats_beyond_spread`,
# however consistent. At K=V=256, B=8 decode (H200, 2026-12-01) BV32-w4-r128 without static dims was faster than
# the baseline in 22 of 22 paired rounds of benchmarks/exp_decode_b8.py and 2.6-3.0% faster than the table's config
# in their medians, while the tuner's single timings' p20-p80 ranges overlapped (it kept the incumbent: "1.4%
# faster, within the spread").
MIN_PAIRED_ROUNDS = 5
MIN_PAIRED_GAIN = 0.005


def beats_beyond_spread(candidate: table.Timing, incumbent: table.Timing) -> bool:
    """Whether ``candidate`` is faster than ``incumbent`` by more than the measured spread: its p20-p80 range lies
    wholly below the incumbent's, and its median is lower by more than either one's round-to-round spread (the
    re-time interleaves rounds, so a drift of clocks between rounds shows there, not in the quantiles)."""
    gain = incumbent.p50_ms - candidate.p50_ms
    return candidate.p80_ms < incumbent.p20_ms and gain > max(candidate.spread, incumbent.spread) * incumbent.p50_ms


def beats_in_every_round(candidate_rounds: Sequence[float], incumbent_rounds: Sequence[float]) -> bool:
    """Whether the candidate's median was below the incumbent's in every one of at least MIN_PAIRED_ROUNDS
    interleaved rounds (the r-th of each list timed in the same round), with a median per-round gain of at least
    MIN_PAIRED_GAIN: a sign test on pairs, which a drift between rounds cannot fake."""
    pairs = list(zip(candidate_rounds, incumbent_rounds, strict=True))
    if len(pairs) < MIN_PAIRED_ROUNDS or any(c >= i for c, i in pairs):
        return False
    return statistics.median(1 - c / i for c, i in pairs) >= MIN_PAIRED_GAIN


def decide(
    timings: Sequence[table.Timing], incumbent: int | None, eligible: Sequence[int] | None = None,
    rounds: Sequence[Sequence[float] | None] | None = None,
) -> Decision:
    """The entry's config among re-timed candidates: the fastest median, unless it beats the incumbent neither
    beyond the spread (:func:`beats_beyond_spread`) nor in every round (:func:`beats_in_every_round`); then the
    incumbent stays. ``eligible``: the indices that may be chosen (default: all); the others were
    timed only to compare with (a built-in default the op's search rules refuse). ``rounds``: each candidate's
    per-round medians from the same interleaved re-time (measure.retime's ``round_p50_ms``), for the paired test."""
    pool = range(len(timings)) if eligible is None else eligible
    best = min(pool, key=lambda i: timings[i].p50_ms)
    if incumbent is None:
        return Decision(best, best, Verdict.UNCHECKED)
    if best != incumbent:
        if beats_beyond_spread(timings[best], timings[incumbent]):
            return Decision(best, best, Verdict.NEW)
        pair = None if rounds is None else (rounds[best], rounds[incumbent])
        if pair is not None and pair[0] is not None and pair[1] is not None and beats_in_every_round(*pair):
            return Decision(best, best, Verdict.NEW, paired=True)
    return Decision(incumbent, best, Verdict.KEPT)
