"""The search space of a study: ``kernels.config.SPACE`` as Optuna distributions, and its feasible grid.

Every parameter is categorical (its values are a handful of powers of two or names; ordering them numerically
would assume a smoothness the hardware does not have). A sampled point that violates a constraint of
``kernels.config.CONSTRAINTS`` is never compiled: the study records it as pruned with the constraint's reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from gdn2_tune.kernels.config import SPACE, FwdConfig, Param, Shape, infeasibility


@dataclass(frozen=True)
class SearchSpace:
    """The parameters a study searches: SPACE, optionally narrowed (``--param chunk=64,128``)."""

    params: tuple[Param, ...] = SPACE

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

    def config(self, params: Mapping[str, Any]) -> FwdConfig:
        return FwdConfig.from_flat(dict(params))

    def check(self, params: Mapping[str, Any], shape: Shape) -> tuple[FwdConfig | None, str | None]:
        """``(config, None)`` for a launchable point, ``(None, reason)`` for one that must not be compiled."""
        try:
            cfg = self.config(params)
        except (KeyError, ValueError, TypeError) as err:
            return None, f"not a config: {err}"
        return (None, reason) if (reason := infeasibility(cfg, shape)) else (cfg, None)

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
            )
        )

    def for_shape(self, shape: Shape) -> SearchSpace:
        """Drop the values that no feasible point at ``shape`` takes (a 128-wide tile when K is 32, ...).

        Exact, from :meth:`stage_parts`. Points that mix kept values may still be infeasible and are pruned one by
        one; without this a sampler spends most asks on points that can never run at small head dims.
        """
        seen: dict[str, set[Any]] = {p.name: set() for p in self.params}
        for chunk, intra_parts, state_parts in self.stage_parts(shape):
            seen["chunk"].add(chunk)
            for part in (*intra_parts, *state_parts):
                for name, value in part.items():
                    seen[name].add(value)
        return SearchSpace(
            tuple(Param(p.name, tuple(v for v in p.values if v in seen[p.name]) or p.values, p.doc) for p in self.params)
        )

    def stage_parts(self, shape: Shape) -> Iterator[tuple[int, list[dict[str, Any]], list[dict[str, Any]]]]:
        """Per chunk length: the feasible intra parts and the feasible state parts (each a dict of flat names).

        Every constraint reads the chunk and one stage's parameters, never both stages, so at a fixed chunk a point
        is feasible exactly when its intra part and its state part each are. Each part is tested against one
        feasible partner of the other stage, found first by a short search.
        """
        chunk_p = next(p for p in self.params if p.name == "chunk")
        intra_p = [p for p in self.params if p.name.startswith("intra.")]
        state_p = [p for p in self.params if p.name.startswith("state.")]
        intra_all = _parts(intra_p)
        state_all = _parts(state_p)
        for chunk in chunk_p.values:
            anchor = self._anchor(shape, chunk, intra_all, state_all)
            if anchor is None:
                continue
            a_intra, a_state = anchor
            intra_ok = [p for p in intra_all if self.check({"chunk": chunk, **p, **a_state}, shape)[0] is not None]
            state_ok = [p for p in state_all if self.check({"chunk": chunk, **a_intra, **p}, shape)[0] is not None]
            yield chunk, intra_ok, state_ok

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
                    if self.check({"chunk": chunk, **p, **s}, shape)[0] is not None:
                        return p, s
        return None

    def grid(self, shape: Shape) -> Iterator[dict[str, Any]]:
        """Every feasible point at ``shape``, per chunk length as (feasible intra part) x (feasible state part)."""
        for chunk, intra_parts, state_parts in self.stage_parts(shape):
            for a, b in itertools.product(intra_parts, state_parts):
                point = {"chunk": chunk, **a, **b}
                # The separability argument of stage_parts is checked, not assumed: a constraint added later that
                # couples the stages must not let an infeasible point into the grid.
                if self.check(point, shape)[0] is not None:
                    yield point


ANCHOR_HEAD = 24
ANCHOR_SEARCH_LIMIT = 4_000  # ~0.5 s: a chunk length with no feasible point must not stall a study


def _parts(params: list[Param]) -> list[dict[str, Any]]:
    """Every combination of one stage's parameters, cheapest first: small tiles, many warps, shallow pipelines."""

    def order(p: Param) -> tuple[Any, ...]:
        field = p.name.split(".", 1)[1]
        return tuple(sorted(p.values, reverse=True)) if field == "num_warps" else p.values

    names = [p.name for p in params]
    return [dict(zip(names, values)) for values in itertools.product(*(order(p) for p in params))]


def parse_param_choices(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["chunk=64,128", "state.precision=input"]`` -> ``{"chunk": [64, 128], "state.precision": ["input"]}``."""
    by_name = {p.name: p for p in SPACE}
    out: dict[str, list[Any]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or name not in by_name:
            raise ValueError(f"--param: expected NAME=V1,V2 with NAME one of {sorted(by_name)}, received {item!r}")
        as_int = all(isinstance(v, int) for v in by_name[name].values)
        try:
            out[name] = [int(v) if as_int else v.strip() for v in rest.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--param {name}: expected integers, received {rest!r}") from None
    return out
