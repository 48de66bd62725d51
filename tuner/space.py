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
        coupling = self.params[0].name
        for chunk, intra_parts, state_parts in self.feasible(shape).blocks:
            seen[coupling].add(chunk)
            for part in (*intra_parts, *state_parts):
                for name, value in part:
                    seen[name].add(value)
        return SearchSpace(
            tuple(Param(p.name, tuple(v for v in p.values if v in seen[p.name]) or p.values, p.doc) for p in self.params),
            self.op,
            self.device,
        )

    def stage_parts(self, shape: Shape) -> Iterator[tuple[int, list[dict[str, Any]], list[dict[str, Any]]]]:
        """Per chunk length: the feasible intra parts and the feasible state parts (each a dict of flat names).

        Every constraint reads the chunk and one stage's parameters, never both stages, so at a fixed chunk a point
        is feasible exactly when its intra part and its state part each are. Each part is tested against one
        feasible partner of the other stage, found first by a short search.
        """
        chunk_p, intra_p, state_p = self._factors()
        intra_all = _parts(intra_p)
        state_all = _parts(state_p)
        for chunk in chunk_p.values:
            anchor = self._anchor(shape, chunk, intra_all, state_all)
            if anchor is None:
                continue
            a_intra, a_state = anchor
            intra_ok = [p for p in intra_all if self._admissible({chunk_p.name: chunk, **p, **a_state}, shape)]
            state_ok = [p for p in state_all if self._admissible({chunk_p.name: chunk, **a_intra, **p}, shape)]
            yield chunk, intra_ok, state_ok

    def _factors(self) -> tuple[Param, list[Param], list[Param]]:
        """(coupling parameter, first stage's, second stage's): the space's first parameter couples the stages
        (the forward's chunk); the others are grouped by their ``stage.`` prefix, in order. A space with one stage
        (or none) gets an empty second group, which pairs with one empty part."""
        coupling, rest = self.params[0], list(self.params[1:])
        prefixes = list(dict.fromkeys(p.name.split(".", 1)[0] for p in rest if "." in p.name))
        if len(prefixes) > 2 or any("." not in p.name for p in rest) and prefixes:
            raise ValueError(
                f"{self.op}: space: expected a coupling parameter then at most two stage.-prefixed groups, "
                f"received {[p.name for p in self.params]}"
            )
        first = [p for p in rest if not prefixes or p.name.startswith(prefixes[0] + ".")]
        second = [p for p in rest if len(prefixes) == 2 and p.name.startswith(prefixes[1] + ".")]
        return coupling, first, second

    def _anchor(
        self, shape: Shape, chunk: int, intra_all: list[dict[str, Any]], state_all: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """One feasible (intra part, state part) at ``chunk``, or None when the chunk admits no point.

        Parts are ordered cheapest first (small tiles, many warps), so a feasible pair is usually among the
        first few; the search gives up after :data:`ANCHOR_SEARCH_LIMIT` checks.
        """
        n = 0
        for i_head in (intra_all[:ANCHOR_HEAD], intra_all):
            for s in state_all:
                for p in i_head:
                    n += 1
                    if n > ANCHOR_SEARCH_LIMIT:
                        return None
                    if self._admissible({self.params[0].name: chunk, **p, **s}, shape):
                        return p, s
        return None

    def grid(self, shape: Shape) -> Iterator[dict[str, Any]]:
        """Every feasible point at ``shape``, per chunk length as (feasible intra part) x (feasible state part)."""
        for chunk, intra_parts, state_parts in self.stage_parts(shape):
            for a, b in itertools.product(intra_parts, state_parts):
                point = {self.params[0].name: chunk, **a, **b}
                # The separability argument of stage_parts is checked, not assumed: a constraint added later that
                # couples the stages must not let an infeasible point into the grid.
                if self.check(point, shape)[0] is not None:
                    yield point


    def _admissible(self, params: dict[str, Any], shape: Shape) -> bool:
        """:meth:`check` for points built from the space's own values, minus a constraint named ``legal_values``:
        every value of a SearchSpace is legal by construction (``narrowed`` rejects others), and the forward's
        re-flattens the config per parameter, 95% of the time of :meth:`stage_parts` (14 s of 15 at the anchor)."""
        spec = self.spec
        cfg = spec.from_flat(params)
        return all(rule(cfg, shape, self.device) is None for rule in spec.constraints if rule.__name__ != "legal_values")

    def feasible(self, shape: Shape) -> FeasibleSet:
        """The feasible points at ``shape`` in the factored form of :meth:`stage_parts`. Computed once per process,
        space and shape (~2.5 s at a suite shape on this repo's CPU), and the same for a space and its
        :meth:`for_shape`, which drops only values no feasible point takes."""
        return _feasible(self, shape)




ANCHOR_HEAD = 24
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
    """Every feasible point of a space at one shape, kept factored: per chunk length, the feasible intra parts and
    the feasible state parts, whose every pairing is feasible (see :meth:`SearchSpace.stage_parts`). Sized and
    sampled uniformly without listing its (up to ~10^5) points."""

    shape: Shape
    blocks: tuple[tuple[Any, tuple[Point, ...], tuple[Point, ...]], ...]  # (chunk, intra parts, state parts)
    coupling: str = "chunk"  # the name of the parameter the blocks are keyed on (the space's first)

    @property
    def size(self) -> int:
        return sum(len(intra) * len(state) for _, intra, state in self.blocks)

    def _at(self, index: int) -> dict[str, Any]:
        for chunk, intra, state in self.blocks:
            n = len(intra) * len(state)
            if index < n:
                return {self.coupling: chunk, **dict(intra[index // len(state)]), **dict(state[index % len(state)])}
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
        for chunk, intra, state in space.stage_parts(shape)
        if intra and state
        for block in _split_by_search_rules(space, shape, chunk, intra, state)
    )
    return FeasibleSet(shape, blocks, space.params[0].name)


def _split_by_search_rules(
    space: SearchSpace, shape: Shape, chunk: Any, intra: list[dict[str, Any]], state: list[dict[str, Any]]
) -> Iterator[tuple[Any, tuple[Point, ...], tuple[Point, ...]]]:
    """One block of feasible parts as the blocks whose every pairing the op's search rules also accept.

    A search rule may couple the stages (the forward's refuses some pairs of intra and state precisions), so the
    parts are grouped by the values of the parameters the rules read (``SearchRule.reads``) and each pair of
    groups is kept or dropped whole, checked once on one point of it.
    """
    rules = space.spec.search_rules
    if not rules:
        yield chunk, tuple(freeze(p) for p in intra), tuple(freeze(p) for p in state)
        return
    reads = sorted({name for rule in rules for name in rule.reads})

    def groups(parts: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
        out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for p in parts:
            out.setdefault(tuple(p.get(name) for name in reads), []).append(p)
        return out

    coupling = space.params[0].name
    for a in groups(intra).values():
        for b in groups(state).values():
            cfg = space.spec.from_flat({coupling: chunk, **a[0], **b[0]})
            if space.spec.search_refusal(cfg, shape, space.device) is None:
                yield chunk, tuple(freeze(p) for p in a), tuple(freeze(p) for p in b)


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
