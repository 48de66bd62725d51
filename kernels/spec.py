"""The specification of a tunable op, and the registry the tuner, the tables, the dispatcher and the reports read.

Each op (the chunk forward today; the backward and decode next) declares in one :class:`KernelSpec` everything
the generic code needs: its config type, search space, constraints (which take the GPU, see
:class:`DeviceLimits`), default config per architecture family, how to run and time its stages, its cost model,
its float64 reference, its suite shapes and the files whose ``@triton.jit`` sources decide its speed. Adding an op
is its own files plus one :func:`register` call; tuner/, profiles/ and reports/ look the spec up by the op name
that table keys already carry (``fwd/K128-V128-bf16/...``) and never name an op's config type.

This module imports nothing from the ops, so that an op's module can import it to register itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

if TYPE_CHECKING:
    import torch

    from gdn2_tune.kernels.config import Param, Shape
    from gdn2_tune.kernels.cost import Cost


@dataclass(frozen=True)
class DeviceLimits:
    """What a constraint may need to know about the GPU: what varies between architectures.

    The values of :data:`SM90` are the constants every constraint used before constraints took a device.
    """

    family: str  # e.g. "sm90" (family_from_capability)
    shared_memory_per_block: int  # bytes one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin)


# Hopper (sm_90) gives one block at most 227 KiB of shared memory.
SM90 = DeviceLimits(family="sm90", shared_memory_per_block=227 * 1024)
# Without a GPU (the interpreter, a laptop drawing a report) nothing says which limits apply: the ones of the GPU
# every shipped table was tuned on, so that a config admitted here launches there.
DEFAULT_DEVICE = SM90
_KNOWN_DEVICES: dict[str, DeviceLimits] = {SM90.family: SM90}


def family_from_capability(capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``"sm90"``: the architecture family whose tables may serve a GPU with no table of its own."""
    major, minor = capability
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (major, minor)):
        raise ValueError(f"compute capability: expected two non-negative integers, received {capability!r}")
    return f"sm{major}{minor}"


def family_of(family: str | None, compute_capability: object = None) -> str | None:
    """The one spelling of a family: "sm_90", "sm90a", "SM90", or a compute capability "9.0" / (9, 0) -> "sm90".

    ``family`` wins where it reads as one; None when neither argument does (a CPU device, an old table).
    """
    if family:
        m = re.fullmatch(r"sm_?(\d+)[a-z]?", str(family).strip().lower())
        if m:
            return f"sm{m.group(1)}"
    cc = compute_capability
    if isinstance(cc, (tuple, list)) and len(cc) == 2:
        return f"sm{int(cc[0])}{int(cc[1])}"
    if isinstance(cc, str):
        m = re.fullmatch(r"(\d+)\.(\d+)", cc.strip())
        if m:
            return f"sm{m.group(1)}{m.group(2)}"
    return None


def device_limits(family: str | None) -> DeviceLimits:
    """The limits of an architecture family (any spelling :func:`family_of` reads); an unknown family gets
    :data:`DEFAULT_DEVICE`'s limits under its own name (so that a default per family can still tell it apart), no
    family (no GPU) gets DEFAULT_DEVICE's."""
    fallback = _KNOWN_DEVICES[DEFAULT_DEVICE.family]
    if family is None:
        return fallback
    family = family_of(family) or family
    known = _KNOWN_DEVICES.get(family)
    return known if known is not None else DeviceLimits(family, fallback.shared_memory_per_block)


def known_devices() -> tuple[DeviceLimits, ...]:
    """Every family's limits, in name order: part of each op's fingerprint, since they decide legality."""
    return tuple(_KNOWN_DEVICES[name] for name in sorted(_KNOWN_DEVICES))


class OpConfig(Protocol):
    """What the generic code does with an op's config: serialise it, flatten it to the space's names, label it."""

    def to_dict(self) -> dict[str, Any]: ...

    def flat(self) -> dict[str, Any]: ...

    def label(self) -> str: ...

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self: ...

    @classmethod
    def from_flat(cls, params: dict[str, Any]) -> Self: ...


class OpRun(Protocol):
    """An op's inputs at one shape on one device, built once and reused for every config of a study.

    ``forward`` is the whole op as the public op launches it (the tuner times it); ``stage_fns`` each stage's
    launch alone (for the per-stage times a report draws); ``reference`` the float64 results ``forward``'s
    outputs are compared with, in the same order. A run may also define ``timed_parts(cfg)``, callables that
    together do what ``forward`` does, for the tuner to time each alone with L2 flushed before each and sum
    (tuner.measure.Bench.timed_parts; decode's launch per index dtype).
    """

    def forward(self, cfg: Any) -> tuple[torch.Tensor, ...]: ...

    def stage_fns(self, cfg: Any) -> dict[str, Callable[[], object]]: ...

    def reference(self) -> tuple[torch.Tensor, ...]: ...


Constraint = Callable[[Any, "Shape", DeviceLimits], "str | None"]


@dataclass(frozen=True)
class SearchRule:
    """A rule the tuner applies on top of an op's constraints: the op runs such a config (an explicit
    ``config=`` is accepted), but no study may select it, e.g. a precision measured less accurate than the
    correctness gate's small shape can tell.

    ``reads`` names the flat parameters ``check`` reads besides the shape (a rule may couple stages, which the
    op's constraints never do): the tuner's feasible set is split on their values and ``check`` runs once per
    combination, so it must read nothing else of the config.
    """

    check: Constraint  # None when a study may select the config, else why not
    reads: tuple[str, ...]


@dataclass(frozen=True)
class KernelSpec:
    """One tunable op. See the module docstring; the fields are in the order an op's author fills them in."""

    name: str  # the table key prefix and stage name, e.g. "fwd"
    config_type: type  # implements OpConfig
    space: tuple[Param, ...]  # flat parameter names (config.flat()) and their legal values, in grid order
    constraints: tuple[Constraint, ...]  # each: None when admissible, else a reason a person can read
    default: Callable[[Shape, DeviceLimits], Any]  # the built-in config fitted to the shape, per family
    stages: tuple[str, ...]  # the keys of OpRun.stage_fns and of the cost model, in pipeline order
    prepare: Callable[..., OpRun]  # (shape, device, *, seed, strong_decay) -> OpRun
    cost: Callable[[Shape, Any], Mapping[str, Cost]]  # FLOPs and bytes of each stage and of "total", as timed
    minimum_bytes: Callable[[Shape], float]  # each input read and each output written once: the op's floor
    gate_tolerance: Mapping[str, float]  # relative error the correctness gate allows, per dtype
    suite: tuple[Shape, ...]  # what `tune.py tune` tunes by default
    interpret_shape: Shape  # what `tune.py tune --interpret` tunes: the interpreter only fits a toy
    jit_files: tuple[Path, ...]  # the files whose @triton.jit functions the fingerprint covers
    gate_shape: Callable[[Shape], Shape] = lambda shape: shape  # the small shape the correctness gate runs
    # The nearest admissible config to one tuned at another shape (a warm start from a neighbouring entry); None:
    # such a config is used as it is where it is admissible, and skipped where not.
    fit: Callable[[Any, Shape, DeviceLimits], Any] | None = None
    output_names: tuple[str, ...] = ("out",)  # names of forward()'s outputs in the gate's error record
    search_rules: tuple[SearchRule, ...] = ()  # what the tuner refuses on top of ``constraints``
    # At most this many gate workers per GPU (None: one per spare CPU core). Each gate worker keeps the tuned
    # shape's inputs and runs the op there on the GPU, so an op with a large working set runs a GPU out of memory
    # when a core-count of workers gate at once.
    max_gate_workers: int | None = None
    # What a table's nearest bucket must share with the shape it serves, besides K, V and dtype (for the chunk ops,
    # whether the sequence split is the built-in choice: kernels/config.py's sequence_split_regime); None: nothing.
    # A tuned entry's structural choices hold only within its regime; across it, the shape-aware default serves.
    regime: Callable[[Shape], Hashable] | None = None

    def __post_init__(self) -> None:
        names = [p.name for p in self.space]
        if len(set(names)) != len(names):
            raise ValueError(f"KernelSpec {self.name!r}: space: expected unique parameter names, received {names}")
        unknown = [n for r in self.search_rules for n in r.reads if n not in names]
        if unknown:
            raise ValueError(f"KernelSpec {self.name!r}: search_rules read {unknown}, expected names of {names}")

    def infeasibility(self, cfg: Any, shape: Shape, device: DeviceLimits = DEFAULT_DEVICE) -> str | None:
        """The first constraint ``cfg`` violates at ``shape`` on ``device``, or None when it may be launched."""
        for rule in self.constraints:
            reason = rule(cfg, shape, device)
            if reason is not None:
                return reason
        return None

    def search_refusal(self, cfg: Any, shape: Shape, device: DeviceLimits = DEFAULT_DEVICE) -> str | None:
        """Why no study may select ``cfg`` at ``shape`` although the op runs it (``search_rules``), or None."""
        for rule in self.search_rules:
            reason = rule.check(cfg, shape, device)
            if reason is not None:
                return f"refused for tuning: {reason}"
        return None

    def search_infeasibility(self, cfg: Any, shape: Shape, device: DeviceLimits = DEFAULT_DEVICE) -> str | None:
        """What a study checks: :meth:`infeasibility`, then :meth:`search_refusal`."""
        return self.infeasibility(cfg, shape, device) or self.search_refusal(cfg, shape, device)

    @property
    def fingerprinted_rules(self) -> tuple[Constraint, ...]:
        """The constraints and the search rules: both decide what a study may select, so both are fingerprinted."""
        return (*self.constraints, *(r.check for r in self.search_rules))

    def default_config(self, shape: Shape, device: DeviceLimits = DEFAULT_DEVICE) -> Any:
        return self.default(shape, device)

    def fit_to_shape(self, cfg: Any, shape: Shape, device: DeviceLimits = DEFAULT_DEVICE) -> Any | None:
        """``cfg`` made admissible at ``shape`` (KernelSpec.fit), or None where it cannot be."""
        if self.fit is not None:
            return self.fit(cfg, shape, device)
        return cfg if self.infeasibility(cfg, shape, device) is None else None

    def from_flat(self, params: Mapping[str, Any]) -> Any:
        return self.config_type.from_flat(dict(params))

    def from_dict(self, data: dict[str, Any]) -> Any:
        return self.config_type.from_dict(data)

    def param(self, name: str) -> Param:
        for p in self.space:
            if p.name == name:
                return p
        raise KeyError(f"{self.name}: no parameter {name!r}; expected one of {[p.name for p in self.space]}")

    @property
    def module(self) -> str:
        """The module whose import registers this spec (the one defining ``prepare``, by convention): what a worker
        process imports to know an op registered outside this package."""
        return self.prepare.__module__

    def fingerprint(self) -> str:
        """What decides legality and speed (kernels.fingerprint): jit sources, the space, the constraints, the device records."""
        from gdn2_tune.kernels.fingerprint import fingerprint

        return fingerprint(
            self.jit_files, [(p.name, p.values) for p in self.space], self.fingerprinted_rules, known_devices()
        )


# The op `tune.py` tunes and the dispatcher serves when none is named: the first op registered.
DEFAULT_OP = "fwd"
_REGISTRY: dict[str, KernelSpec] = {}


def register(spec: KernelSpec, *, replace: bool = False) -> KernelSpec:
    """Make ``spec`` known to the tuner, the tables, the dispatcher and the reports under ``spec.name``.

    Registering a second spec under a taken name is an error unless ``replace`` is set (tests re-register).
    """
    if not replace and spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"register: op name {spec.name!r} is taken; expected a new name, or replace=True")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_spec(name: str) -> KernelSpec:
    """The registered spec of op ``name`` (a table key's first part)."""
    _load_builtin_ops()
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"op: expected one of {sorted(_REGISTRY)}, received {name!r}")
    return spec


def registered() -> tuple[KernelSpec, ...]:
    _load_builtin_ops()
    return tuple(_REGISTRY.values())


def _load_builtin_ops() -> None:
    # The package's own ops register on import; importing them here makes a lookup work whatever was imported
    # first, without this module importing them at its top (they import it).
    from gdn2_tune.kernels import bwd_spec, decode_spec, fwd_spec  # noqa: F401
