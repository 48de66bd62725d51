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

from kernels.config import SPACE, FwdConfig, Param, Shape, infeasibility


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
        """Drop the values that no feasible point at ``shape`` can take (a 128-wide tile when K is 32, ...).

        A value is kept when the cheapest completion of it (smallest other tiles, most warps, fewest stages) is
        feasible for some chunk length; points that mix kept values may still be infeasible and are pruned one
        by one. Without this a sampler spends most asks on points that can never run at small head dims.
        """
        chunks = next(p for p in self.params if p.name == "chunk").values
        intra_p = [p for p in self.params if p.name.startswith("intra.")]
        state_p = [p for p in self.params if p.name.startswith("state.")]
        base = FwdConfig().flat()

        def possible(name: str, value: Any) -> bool:
            for chunk in chunks if name != "chunk" else (value,):
                point = {**base, **_smallest(intra_p, chunk), **_smallest(state_p), "chunk": chunk, name: value}
                if self.check(point, shape)[0] is not None:
                    return True
            return False

        kept = []
        for p in self.params:
            values = tuple(v for v in p.values if possible(p.name, v))
            kept.append(Param(p.name, values or p.values, p.doc))
        return SearchSpace(tuple(kept))

    def grid(self, shape: Shape) -> Iterator[dict[str, Any]]:
        """Every feasible point at ``shape``, in SPACE's order.

        The full product is ~370k points, so it is walked per chunk length as (feasible intra part) x (feasible
        state part): the constraints of one stage never read the other stage's parameters, so a part that fails
        alone fails with any partner and is dropped before the product.
        """
        chunk_p = next(p for p in self.params if p.name == "chunk")
        intra_p = [p for p in self.params if p.name.startswith("intra.")]
        state_p = [p for p in self.params if p.name.startswith("state.")]
        base = FwdConfig().flat()

        def feasible_parts(chunk: int, params: list[Param], partner: dict[str, Any]) -> list[dict[str, Any]]:
            out = []
            for values in itertools.product(*(p.values for p in params)):
                part = dict(zip((p.name for p in params), values))
                cfg, _ = self.check({**base, **partner, "chunk": chunk, **part}, shape)
                if cfg is not None:
                    out.append(part)
            return out

        for chunk in chunk_p.values:
            # The partner of each half is a point known to pass its own stage's constraints, so that a failure
            # is due to the half being enumerated: the smallest tiles and most warps of the other stage.
            intra_parts = feasible_parts(chunk, intra_p, _smallest(state_p))
            state_parts = feasible_parts(chunk, state_p, _smallest(intra_p, chunk)) if intra_parts else []
            for a, b in itertools.product(intra_parts, state_parts):
                point = {"chunk": chunk, **a, **b}
                # The separability argument above is checked, not assumed: a constraint added later that couples
                # the stages must not let an infeasible point into the grid.
                if self.check(point, shape)[0] is not None:
                    yield point


def _smallest(params: list[Param], chunk: int | None = None) -> dict[str, Any]:
    """The cheapest point of one stage (smallest tiles, most warps, fewest stages): it passes whenever anything does."""
    out: dict[str, Any] = {}
    for p in params:
        field = p.name.split(".", 1)[1]
        if field == "num_warps":
            out[p.name] = max(p.values)
        elif field == "BC" and chunk is not None:
            out[p.name] = min((v for v in p.values if v <= chunk and chunk % v == 0), default=min(p.values))
        elif all(isinstance(v, int) for v in p.values):
            out[p.name] = min(p.values)
        else:
            out[p.name] = p.values[0]
    return out


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
