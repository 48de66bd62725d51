"""The search space of a study: an op's space (``KernelSpec.space``) as Optuna distributions, and its feasible grid.

Every parameter is categorical (its values are a handful of powers of two or names; ordering them numerically
would assume a smoothness the hardware does not have). Most points of the box violate a constraint of
the op's constraints (for the forward at the anchor about 4 in 5); :class:`FeasibleSet` holds the feasible ones in a
factored form, so that the study's sampler proposes only those (``tuner.study.FeasibleSampler``). A point that
still violates one is never compiled: the study records it as pruned with the constraint's reason.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import optuna

from gdn2_tune.kernels.config import Param, Shape
from gdn2_tune.kernels.spec import DEFAULT_DEVICE, DEFAULT_OP, DeviceLimits, KernelSpec, get_spec


@dataclass(frozen=True)
class SearchSpace:
    """The parameters a study of op ``op`` searches: its spec's space, optionally narrowed (``--param chunk=64``).

    The op is held by name (a table key's prefix), so that the space stays hashable and picklable. ``device``: the
    limits of the GPU the study tunes (tuner.run takes them from the detected device's family), which every
    feasibility check here reads.
    """

    params: tuple[Param, ...] = ()
    op: str = DEFAULT_OP
    device: DeviceLimits = DEFAULT_DEVICE

    def __post_init__(self) -> None:
        if not self.params:
            object.__setattr__(self, "params", get_spec(self.op).space)

    @property
    def spec(self) -> KernelSpec:
        return get_spec(self.op)

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {p.name: optuna.distributions.CategoricalDistribution(p.values) for p in self.params}

    def size(self) -> int:
        n = 1
        for p in self.params:
            n *= len(p.values)
        return n

    def contains(self, params: Mapping[str, Any]) -> bool:
        return set(params) == {p.name for p in self.params} and all(
            params[p.name] in p.values for p in self.params
        )

    def config(self, params: Mapping[str, Any]) -> Any:
        return self.spec.from_flat(params)

    def check(self, params: Mapping[str, Any], shape: Shape) -> tuple[Any | None, str | None]:
        """``(config, None)`` for a launchable point, ``(None, reason)`` for one that must not be compiled."""
        try:
            cfg = self.config(params)
        except (KeyError, ValueError, TypeError) as err:
            return None, f"not a config: {err}"
        reason = self.spec.search_infeasibility(cfg, shape, self.device)
        return (None, reason) if reason else (cfg, None)

    def narrowed(self, choices: Mapping[str, Sequence[Any]]) -> SearchSpace:
        """Keep only ``choices[name]`` for the named parameters; each must be a legal value of that parameter."""
        by_name = {p.name: p for p in self.params}
        for name, values in choices.items():
            if name not in by_name:
                raise ValueError(f"--param: expected one of {sorted(by_name)}, received {name!r}")
            bad = [v for v in values if v not in by_name[name].values]
            if bad or not values:
                raise ValueError(
                    f"--param {name}: expected values among {list(by_name[name].values)}, received {list(values)}"
                )
        return SearchSpace(
            tuple(
                Param(p.name, tuple(v for v in p.values if v in choices[p.name]), p.doc) if p.name in choices else p
                for p in self.params
            ),
            self.op,
            self.device,
        )

    def for_shape(self, shape: Shape) -> SearchSpace:
        """Drop the values that no feasible point at ``shape`` takes (a 128-wide tile when K is 32, ...).

        Exact, from :meth:`feasible` (so computed once per process and shape). Points that mix kept values may
        still be infeasible; the study's sampler proposes only feasible ones.
        """
        seen: dict[str, set[Any]] = {p.name: set() for p in self.params}
        for head, groups in self.feasible(shape).blocks:
            for part in (head, *(part for group in groups for part in group)):
                for name, value in part:
                    seen[name].add(value)
        return SearchSpace(
            tuple(Param(p.name, tuple(v for v in p.values if v in seen[p.name]) or p.values, p.doc) for p in self.params),
            self.op,
            self.device,
        )

    def stage_parts(self, shape: Shape) -> Iterator[tuple[dict[str, Any], list[list[dict[str, Any]]]]]:
        """Per value of the coupling parameter (``{}`` where there is none): each group's feasible parts (dicts of
        flat names), in the order of :meth:`_factors`.

        No constraint reads two groups' parameters (it may read the coupling one), so at a fixed coupling value a
        point is feasible exactly when each of its parts is. Each part is tested against one feasible part of
        every other group, found first by :meth:`_anchor`. The checks grow with the sum of the groups' sizes, not
        their product: the backward's five groups hold 4 + 2592 + 72 + 27 + 1296 parts per store.
        """
        coupling, groups = self._factors()
        every = [_parts(g) for g in groups]
        for value in coupling.values if coupling else (None,):
            head = {coupling.name: value} if coupling else {}
            anchor = self._anchor(shape, head, every)
            if anchor is None:
                continue
            feasible = []
            for i, parts in enumerate(every):
                others = {k: v for j, part in enumerate(anchor) if j != i for k, v in part.items()}
                feasible.append([p for p in parts if self._admissible({**head, **others, **p}, shape)])
            yield head, feasible

    def _factors(self) -> tuple[Param | None, list[list[Param]]]:
        """(coupling parameter or None, groups): a first parameter without a ``group.`` prefix couples the groups
        (the forward's chunk); the others are grouped by their prefix, in order of first appearance, and unprefixed
        ones after the first form one group of their own (the decode's: its space has no prefixes)."""
        coupling = None if "." in self.params[0].name else self.params[0]
        rest = self.params[1:] if coupling else self.params

        def group(p: Param) -> str:
            return p.name.split(".", 1)[0] if "." in p.name else ""

        names = list(dict.fromkeys(group(p) for p in rest))
        return coupling, [[p for p in rest if group(p) == name] for name in names] or [[]]

    def _anchor(
        self, shape: Shape, head: dict[str, Any], every: list[list[dict[str, Any]]]
    ) -> list[dict[str, Any]] | None:
        """One part per group that together with ``head`` is feasible, or None when ``head`` admits no point.

        First the op's built-in config at ``shape`` with ``head`` set, as it is and fitted to the shape (where the
        space holds its values); then, from the fitted one (or each group's first part), one group at a time
        through all its parts with the others held, giving up after :data:`ANCHOR_SEARCH_LIMIT` checks.
        """
        starts = list(self._default_parts(shape, head, every))
        start = starts[-1] if starts else tuple(parts[0] for parts in every)

        def swaps() -> Iterator[tuple[dict[str, Any], ...]]:
            for i, parts in enumerate(every):
                for p in parts:
                    yield (*start[:i], p, *start[i + 1 :])

        for parts in itertools.islice(itertools.chain(starts, swaps()), ANCHOR_SEARCH_LIMIT):
            if self._admissible({**head, **{k: v for part in parts for k, v in part.items()}}, shape):
                return list(parts)
        return None

    def _default_parts(
        self, shape: Shape, head: dict[str, Any], every: list[list[dict[str, Any]]]
    ) -> Iterator[tuple[dict[str, Any], ...]]:
        """The op's built-in config at ``shape`` with ``head`` set, then the same fitted to ``shape`` (the op's
        ``fit``), each as one part per group where each part is one of the space's."""
        spec = self.spec
        default = {**spec.default_config(shape, self.device).flat(), **head}
        fitted = spec.fit_to_shape(spec.from_flat(default), shape, self.device)
        for flat in (default, None if fitted is None else fitted.flat()):
            if flat is None:
                continue
            parts = tuple({k: flat[k] for k in group[0]} for group in every)
            if all(part in group for part, group in zip(parts, every)):
                yield parts

    def crossovers(
        self, best: Mapping[str, Any], donors: Sequence[Mapping[str, Any]], shape: Shape
    ) -> list[dict[str, Any]]:
        """``best`` with one group's parameters taken from a donor, for each donor and then each group in order:
        the feasible points of the space that differ from ``best`` in one group only, new ones only.

        The groups of an op's space are its stages' parameters (the backward's recompute, entering states, reverse
        pass, pair backward and value side), and a stage's time depends mostly on its own group, so a donor that
        is slower overall may still hold the faster entering states. A sampler rarely finds such a combination
        by itself: at K = V = 256 the session-10 tune's best (9.96 ms) kept entering states 0.2 ms slower than
        the built-in config's. The coupling parameter stays ``best``'s; a space of one group has none."""
        _, groups = self._factors()
        if len(groups) < 2:
            return []
        out: list[dict[str, Any]] = []
        seen = {freeze(best)}
        for donor in donors:
            for group in groups:
                point = {**best, **{p.name: donor[p.name] for p in group if p.name in donor}}
                key = freeze(point)
                if key in seen:
                    continue
                seen.add(key)
                if self.contains(point) and self.check(point, shape)[0] is not None:
                    out.append(point)
        return out

    def grid(self, shape: Shape) -> Iterator[dict[str, Any]]:
        """Every feasible point at ``shape``, per coupling value as the product of the groups' feasible parts."""
        for head, groups in self.stage_parts(shape):
            for parts in itertools.product(*groups):
                point = {**head, **{k: v for part in parts for k, v in part.items()}}
                # The separability argument of stage_parts is checked, not assumed: a constraint added later that
                # reads two groups must not let an infeasible point into the grid.
                if self.check(point, shape)[0] is not None:
                    yield point

    def _admissible(self, params: dict[str, Any], shape: Shape) -> bool:
        """:meth:`check` for points built from the space's own values, minus the op's legality constraint (named
        ``legal_values`` or ``<op>_legal_values``): every value of a SearchSpace is legal by construction
        (``narrowed`` rejects others), and the forward's re-flattens the config per parameter, 95% of the time of
        :meth:`stage_parts` (14 s of 15 at the anchor)."""
        spec = self.spec
        cfg = spec.from_flat(params)
        return all(
            rule(cfg, shape, self.device) is None for rule in spec.constraints if not rule.__name__.endswith("legal_values")
        )

    def feasible(self, shape: Shape) -> FeasibleSet:
        """The feasible points at ``shape`` in the factored form of :meth:`stage_parts`. Computed once per process,
        space and shape (0.4-2 s at a suite shape on this repo's CPU), and the same for a space and its
        :meth:`for_shape`, which drops only values no feasible point takes."""
        return _feasible(self, shape)


ANCHOR_SEARCH_LIMIT = 4_000  # ~0.5 s: a chunk length with no feasible point must not stall a study
# Below this many feasible points a sampler that wants an unseen one gets it by listing them all; above, by drawing
# (with at most a few thousand trials per study, a draw from a larger set is almost never a seen point).
LIST_BELOW = 4_096
DRAWS_FOR_UNSEEN = 256


Point = tuple[tuple[str, Any], ...]


def freeze(params: Mapping[str, Any]) -> Point:
    """A point as a hashable, order-independent key."""
    return tuple(sorted(params.items()))


@dataclass(frozen=True)
class FeasibleSet:
    """Every feasible point of a space at one shape, kept factored: per block, the coupling value (``head``) and
    each group's feasible parts, whose every combination is feasible (see :meth:`SearchSpace.stage_parts`). Sized
    and sampled uniformly without listing its (up to ~10^8) points."""

    shape: Shape
    blocks: tuple[tuple[Point, tuple[tuple[Point, ...], ...]], ...]  # (head, each group's parts)

    @property
    def size(self) -> int:
        return sum(math.prod(len(parts) for parts in groups) for _, groups in self.blocks)

    def _at(self, index: int) -> dict[str, Any]:
        for head, groups in self.blocks:
            n = math.prod(len(parts) for parts in groups)
            if index < n:
                point = dict(head)
                for parts in reversed(groups):
                    index, i = divmod(index, len(parts))
                    point.update(parts[i])
                return point
            index -= n
        raise IndexError(index)

    def sample(self, rng: random.Random, seen: AbstractSet[Point] = frozenset()) -> dict[str, Any] | None:
        """A uniformly drawn feasible point not in ``seen``; None when every feasible point is seen."""
        size = self.size
        if size <= LIST_BELOW:
            unseen = [i for i in range(size) if freeze(self._at(i)) not in seen]
            return self._at(rng.choice(unseen)) if unseen else None
        for _ in range(DRAWS_FOR_UNSEEN):
            point = self._at(rng.randrange(size))
            if freeze(point) not in seen:
                return point
        return None


@functools.lru_cache(maxsize=64)
def _feasible(space: SearchSpace, shape: Shape) -> FeasibleSet:
    blocks = tuple(
        block
        for head, groups in space.stage_parts(shape)
        if all(groups)
        for block in _split_by_search_rules(space, shape, head, groups)
    )
    return FeasibleSet(shape, blocks)


def _split_by_search_rules(
    space: SearchSpace, shape: Shape, head: dict[str, Any], groups: list[list[dict[str, Any]]]
) -> Iterator[tuple[Point, tuple[tuple[Point, ...], ...]]]:
    """One block of feasible parts as the blocks whose every combination the op's search rules also accept.

    A search rule may read several groups (the forward's refuses some pairs of intra and state precisions), so
    each group's parts are split by the values of the parameters the rules read (``SearchRule.reads``) and each
    combination of splits is kept or dropped whole, checked once on one point of it.
    """
    rules = space.spec.search_rules
    reads = sorted({name for rule in rules for name in rule.reads})

    def split(parts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for p in parts:
            out.setdefault(tuple(p.get(name) for name in reads), []).append(p)
        return list(out.values())

    for combo in itertools.product(*(split(parts) for parts in groups)):
        cfg = space.spec.from_flat({**head, **{k: v for parts in combo for k, v in parts[0].items()}})
        if not rules or space.spec.search_refusal(cfg, shape, space.device) is None:
            yield freeze(head), tuple(tuple(freeze(p) for p in parts) for parts in combo)


def _parts(params: list[Param]) -> list[dict[str, Any]]:
    """Every combination of one stage's parameters, cheapest first: small tiles, many warps, shallow pipelines."""

    def order(p: Param) -> tuple[Any, ...]:
        field = p.name.rsplit(".", 1)[-1]
        return tuple(sorted(p.values, reverse=True)) if field == "num_warps" else p.values

    names = [p.name for p in params]
    return [dict(zip(names, values)) for values in itertools.product(*(order(p) for p in params))]


_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}


def _parse_value(name: str, legal: Sequence[Any], text: str) -> Any:
    """One ``--param`` value as the type of the parameter's legal values (bool before int: bool is an int)."""
    if all(isinstance(v, bool) for v in legal):
        value = _BOOL_WORDS.get(text.lower())
        if value is None:
            raise ValueError(f"--param {name}: expected true, false, 1 or 0, received {text!r}")
        return value
    if all(isinstance(v, int) for v in legal):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--param {name}: expected an integer among {list(legal)}, received {text!r}") from None
    return text


def parse_param_choices(items: Sequence[str], op: str = DEFAULT_OP) -> dict[str, list[Any]]:
    """``["chunk=64,128", "state.precision=input"]`` -> ``{"chunk": [64, 128], "state.precision": ["input"]}``;
    a boolean parameter takes true/false/1/0 (``"stream_state=true,0"`` -> ``[True, False]``)."""
    by_name = {p.name: p for p in get_spec(op).space}
    out: dict[str, list[Any]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or name not in by_name:
            raise ValueError(f"--param: expected NAME=V1,V2 with NAME one of {sorted(by_name)}, received {item!r}")
        out[name] = [_parse_value(name, by_name[name].values, v.strip()) for v in rest.split(",") if v.strip()]
    return out
