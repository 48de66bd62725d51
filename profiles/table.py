"""The config table format: one versioned JSON file per GPU, written by the tuner and read by the dispatcher.

This module is the only place that knows the layout of ``profiles/*.json``. Both sides go through the frozen
records below: the tuner builds a :class:`Profile` and calls :func:`save_profile`; the dispatcher calls
:func:`load_profile`, which validates every field and never raises on bad content. A table is hand-editable
JSON, so it is treated as untrusted input: a bad entry is skipped with one warning naming the file and the
field, a bad header makes the whole table unusable (with a warning), and no value reaches a kernel launch
unless its op's constraints (``KernelSpec.infeasibility``) accept it at the entry's shape.

Keys are readable (``"fwd/K128-V128-bf16/T4096-BH128"``): stage, head dims, dtype and the shape bucket
(T and B·H; a packed varlen batch uses the total token count and H, and ends in ``-varlen``).

Freshness is per op: ``kernel_hash`` maps each op to the fingerprint its entries were tuned against
(``{"fwd": "54387db3e408d63d", "decode": ...}``), so a table holding several ops says which of them is stale, and
merging a tune of one op leaves the others' entries and fingerprints alone. Schema 1 (one fingerprint string, that
of the table's entries' op) is still read: :func:`_read_kernel_hash` migrates it on load.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdn2_tune.kernels.config import DTYPES, Shape
from gdn2_tune.kernels.fingerprint import fingerprint
from gdn2_tune.kernels.spec import DEFAULT_OP, KernelSpec, get_spec, known_devices

SCHEMA_VERSION = 2
# Schema 1 differs only in `kernel_hash`: one string, the fingerprint of the op of the table's entries.
READABLE_SCHEMA_VERSIONS = (1, SCHEMA_VERSION)
PROFILES_DIR = Path(__file__).resolve().parent
KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
# The file names of the first op's kernels (KernelSpec.jit_files), for tests that copy them.
FWD_JIT_FILES = tuple(path.name for path in get_spec(DEFAULT_OP).jit_files)

# A table is a few MB at most (entries plus every trial of every study); refusing anything far larger keeps a
# stray or hostile file from costing the caller memory and time at import.
MAX_TABLE_BYTES = 64 * 1024 * 1024
# Device ids become file names; a bound keeps them well inside every file system's name limit.
MAX_DEVICE_ID_CHARS = 64
_SAFE_ID = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# Stage names appear in keys ("fwd/..."); the backward and decode kernels add their own.
_STAGE = re.compile(r"[a-z][a-z0-9_]*")
# A fingerprint is FINGERPRINT_CHARS hex digits; anything far longer was not written by the tuner.
_MAX_FINGERPRINT_CHARS = 64
# Received values are echoed in warnings; a hostile table must not flood the terminal.
_MAX_ECHO_CHARS = 60
_REGENERATE = "regenerate the table with `python tune.py tune` or delete it"


class TableFieldError(ValueError):
    """A table field that does not hold what the schema expects. ``field`` is its dotted path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# ---------------------------------------------------------------------------------------------------------------
# Field readers: each returns the typed value or raises TableFieldError naming the field.


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_ECHO_CHARS else text[: _MAX_ECHO_CHARS - 3] + "..."


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _field(data: dict[str, Any], name: str, path: str) -> Any:
    if name not in data:
        raise TableFieldError(_join(path, name), "missing")
    return data[name]


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TableFieldError(path, f"expected an object, received {_kind(value)} {_echo(value)}")
    return value


def _int(data: dict[str, Any], name: str, path: str, minimum: int | None = None) -> int:
    value = _field(data, name, path)
    # bool is an int subclass in Python; `true` in a table is a typo, not a count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TableFieldError(_join(path, name), f"expected an integer, received {_kind(value)} {_echo(value)}")
    if minimum is not None and value < minimum:
        raise TableFieldError(_join(path, name), f"expected an integer >= {minimum}, received {value}")
    return value


def _opt_int(data: dict[str, Any], name: str, path: str, minimum: int | None = None) -> int | None:
    return None if _field(data, name, path) is None else _int(data, name, path, minimum)


def _number(value: Any, path: str, positive: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TableFieldError(path, f"expected a number, received {_kind(value)} {_echo(value)}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise TableFieldError(path, f"expected a finite number {bound}, received {value!r}")
    return float(value)


def _float(data: dict[str, Any], name: str, path: str, positive: bool = False) -> float:
    return _number(_field(data, name, path), _join(path, name), positive)


def _opt_float(data: dict[str, Any], name: str, path: str, positive: bool = False) -> float | None:
    value = _field(data, name, path)
    return None if value is None else _number(value, _join(path, name), positive)


def _str(data: dict[str, Any], name: str, path: str) -> str:
    value = _field(data, name, path)
    if not isinstance(value, str):
        raise TableFieldError(_join(path, name), f"expected a string, received {_kind(value)} {_echo(value)}")
    return value


def _opt_str(data: dict[str, Any], name: str, path: str) -> str | None:
    return None if _field(data, name, path) is None else _str(data, name, path)


def _bool(data: dict[str, Any], name: str, path: str) -> bool:
    value = _field(data, name, path)
    if not isinstance(value, bool):
        raise TableFieldError(_join(path, name), f"expected true or false, received {_kind(value)} {_echo(value)}")
    return value


def _list(data: dict[str, Any], name: str, path: str) -> list[Any]:
    value = _field(data, name, path)
    if not isinstance(value, list):
        raise TableFieldError(_join(path, name), f"expected a list, received {_kind(value)} {_echo(value)}")
    return value


def _ms_dict(data: dict[str, Any], name: str, path: str) -> dict[str, float]:
    value = _object(_field(data, name, path), _join(path, name))
    return {key: _number(ms, f"{_join(path, name)}.{key}") for key, ms in value.items()}


def _scalar_dict(data: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    """A flat object of JSON scalars (a search budget, a trial's parameters)."""
    value = _object(_field(data, name, path), _join(path, name))
    for key, item in value.items():
        if item is not None and not isinstance(item, (bool, int, float, str)):
            raise TableFieldError(f"{_join(path, name)}.{key}", f"expected a scalar, received {_kind(item)}")
        if isinstance(item, float) and not math.isfinite(item):
            raise TableFieldError(f"{_join(path, name)}.{key}", f"expected a finite number, received {item!r}")
    return dict(value)


def _safe_id(data: dict[str, Any], name: str, path: str) -> str:
    value = _str(data, name, path)
    if not is_safe_id(value):
        raise TableFieldError(
            _join(path, name),
            f"expected a file-safe id ([a-z0-9-], at most {MAX_DEVICE_ID_CHARS} characters), received {_echo(value)}",
        )
    return value


# ---------------------------------------------------------------------------------------------------------------
# Device ids and keys


def is_safe_id(value: str) -> bool:
    """True for ids that are safe as a file stem: lowercase words of [a-z0-9] joined by single dashes."""
    return len(value) <= MAX_DEVICE_ID_CHARS and _SAFE_ID.fullmatch(value) is not None


def device_id_from_name(name: str) -> str:
    """Normalise a GPU name into a stable, file-safe stem: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``.

    The vendor word is dropped because drivers and tools disagree on including it; every other run of characters
    outside [a-z0-9] becomes one dash, so ``"../../etc"`` comes out as ``"etc"``. Never raises: a name with
    nothing usable in it maps to ``"unknown"``.
    """
    words = [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w and w != "nvidia"]
    stem = "-".join(words)[:MAX_DEVICE_ID_CHARS].strip("-")
    return stem or "unknown"


def bucket_of(shape: Shape) -> tuple[int, int, bool]:
    """(T, BH, varlen) of a key. A packed batch has B == 1 and T = total tokens, so its BH is H."""
    varlen = shape.num_seqs is not None
    return shape.T, (shape.H if varlen else shape.B * shape.H), varlen


def entry_key(stage: str, shape: Shape) -> str:
    """``"fwd/K128-V128-bf16/T4096-BH128"``; a packed varlen batch ends in ``-varlen``."""
    T, BH, varlen = bucket_of(shape)
    return f"{stage}/K{shape.K}-V{shape.V}-{shape.dtype}/T{T}-BH{BH}" + ("-varlen" if varlen else "")


def profile_path(device_id: str, root: Path = PROFILES_DIR) -> Path:
    """The table file of a device: ``<root>/<device_id>.json``."""
    if not is_safe_id(device_id):
        raise ValueError(
            f"device_id: expected a file-safe id ([a-z0-9-]), received {_echo(device_id)}; "
            "build it with profiles.table.device_id_from_name(gpu_name)"
        )
    return Path(root) / f"{device_id}.json"


@functools.cache
def kernel_source_hash(root: Path = KERNELS_DIR, op: str = DEFAULT_OP) -> str:
    """An op's fingerprint: its jit sources without comments or docstrings, its search space and its constraints
    (:func:`kernels.fingerprint.fingerprint`), with the jit files read from ``root`` (tests point it at a copy).
    A table records it; a table whose fingerprint differs still serves its entries that today's constraints
    accept, and is marked stale."""
    spec = get_spec(op)
    if Path(root) == KERNELS_DIR:
        return spec.fingerprint()
    return fingerprint(
        [Path(root) / path.name for path in spec.jit_files],
        [(param.name, param.values) for param in spec.space],
        spec.fingerprinted_rules,
        known_devices(),
    )


def table_op(entries: Sequence[Entry]) -> str:
    """The op of a table's entries when they are all of one op, else the first op (``DEFAULT_OP``): whose
    fingerprint a schema-1 table's single ``kernel_hash`` string is."""
    ops = sorted({e.stage for e in entries})
    return ops[0] if len(ops) == 1 else DEFAULT_OP


def entry_ops(entries: Sequence[Entry]) -> tuple[str, ...]:
    """The ops a table holds entries of, sorted: the ones whose freshness matters."""
    return tuple(sorted({e.stage for e in entries}))


def current_fingerprints(ops: Sequence[str]) -> dict[str, str]:
    """Today's fingerprint of each op: what a table records for the ops it was tuned or re-measured for."""
    return {op: kernel_source_hash(op=op) for op in ops}


def stale_ops(profile: Profile) -> dict[str, str]:
    """op -> why its entries may be slower than a re-tune would make them, for each op of ``profile.entries``
    whose recorded fingerprint is not today's (or is missing), or that holds entries carried over not re-tuned
    (``Entry.tuned_against``). Ops with a recorded fingerprint but no entries
    serve nothing and are not listed."""
    out = {}
    for op in entry_ops(profile.entries):
        recorded = profile.kernel_hash.get(op)
        running = kernel_source_hash(op=op)
        if recorded is None:
            out[op] = f"{op}: kernel_hash: no fingerprint recorded for its entries, running {running}"
        elif recorded != running:
            out[op] = f"{op}: kernel_hash: tuned against kernel fingerprint {_echo(recorded)}, running {running}"
        carried = [e for e in profile.entries if e.stage == op and e.tuned_against is not None]
        if carried:
            why = (f"{op}: {len(carried)} entries not re-tuned (the run that wrote the table got no result for them), "
                   f"tuned against {', '.join(sorted({_echo(e.tuned_against) for e in carried}))}: "
                   f"{', '.join(e.key for e in carried)}")
            out[op] = f"{out[op]}; {why}" if op in out else why
    return out


def staleness(profile: Profile, op: str | None = None) -> tuple[str, ...]:
    """Why a table (or, with ``op``, that op's entries) may be slower than a re-tune would make it; empty when
    fresh. Each kernel reason names its op (``"decode: kernel_hash: ..."``); the Triton version is the table's.

    A stale table keeps serving: :func:`load_profile` has already dropped every entry that today's space and
    constraints reject, so what remains is legal, only possibly not the fastest for today's kernels or Triton.
    """
    import triton

    reasons = [reason for name, reason in stale_ops(profile).items() if op is None or name == op]
    if profile.triton_version != triton.__version__:
        reasons.append(f"triton_version: tuned with Triton {_echo(profile.triton_version)}, running {triton.__version__}")
    return tuple(reasons)


def _read_kernel_hash(data: dict[str, Any], version: int) -> str | dict[str, str]:
    """The header's op -> fingerprint mapping; schema 1's one string, which :class:`Profile` assigns to the op of
    the entries (``table_op``: the forward for the shipped tables)."""
    if version == 1:
        return _str(data, "kernel_hash", "")
    value = _object(_field(data, "kernel_hash", ""), "kernel_hash")
    out = {}
    for op, fp in value.items():
        path = f"kernel_hash.{op}"
        if not _STAGE.fullmatch(op):
            raise TableFieldError(path, f"expected an op name such as 'fwd' as the key, received {_echo(op)}")
        if not isinstance(fp, str) or not 0 < len(fp) <= _MAX_FINGERPRINT_CHARS:
            raise TableFieldError(
                path, f"expected a fingerprint string of 1 to {_MAX_FINGERPRINT_CHARS} characters, received {_echo(fp)}"
            )
        out[op] = fp
    return out


def _fingerprint(data: dict[str, Any], name: str, path: str) -> str:
    value = _field(data, name, path)
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_FINGERPRINT_CHARS:
        raise TableFieldError(
            _join(path, name),
            f"expected a fingerprint string of 1 to {_MAX_FINGERPRINT_CHARS} characters, received {_echo(value)}",
        )
    return value


def parse_config(data: Any, path: str = "config", op: str = DEFAULT_OP) -> Any:
    """Op ``op``'s config from its ``to_dict()`` form, with every value of the type and set its space declares.

    The config type's ``from_dict`` checks the keys; this also rejects ``64.0`` for 64 or ``true`` for 1, which
    compare equal to legal values but would reach Triton as the wrong constexpr type.
    """
    spec = get_spec(op)
    try:
        config = spec.from_dict(data)
    except (TypeError, ValueError) as err:
        raise TableFieldError(path, str(err).removeprefix("config").lstrip(".: ")) from None
    flat = config.flat()
    for param in spec.space:
        value = flat[param.name]
        if type(value) is not type(param.values[0]) or value not in param.values:
            raise TableFieldError(
                f"{path}.{param.name}", f"expected one of {list(param.values)}, received {_echo(value)}"
            )
    return config


# ---------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU a table was measured on. ``device_id`` names the file; ``family`` (e.g. "sm90") picks fallbacks."""

    device_id: str
    name: str
    family: str
    compute_capability: tuple[int, int] | None
    sm_count: int | None
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    bus_width_bits: int | None
    driver: str | None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["compute_capability"] = None if self.compute_capability is None else list(self.compute_capability)
        return out

    @staticmethod
    def from_dict(data: Any, path: str = "device") -> DeviceInfo:
        data = _object(data, path)
        cc = _field(data, "compute_capability", path)
        if cc is not None and not (
            isinstance(cc, list) and len(cc) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in cc)
        ):
            raise TableFieldError(f"{path}.compute_capability", f"expected [major, minor], received {_echo(cc)}")
        return DeviceInfo(
            device_id=_safe_id(data, "device_id", path),
            name=_str(data, "name", path),
            family=_safe_id(data, "family", path),
            compute_capability=None if cc is None else (cc[0], cc[1]),
            sm_count=_opt_int(data, "sm_count", path, minimum=1),
            sm_clock_mhz=_opt_int(data, "sm_clock_mhz", path, minimum=0),
            mem_clock_mhz=_opt_int(data, "mem_clock_mhz", path, minimum=0),
            bus_width_bits=_opt_int(data, "bus_width_bits", path, minimum=0),
            driver=_opt_str(data, "driver", path),
        )


@dataclass(frozen=True)
class Roofs:
    """Measured ceilings of the device (None where not measured): what the roofline report draws against."""

    copy_gbps: float | None
    bf16_tflops: float | None
    tf32_tflops: float | None
    fp32_tflops: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: Any, path: str = "roofs") -> Roofs:
        data = _object(data, path)
        return Roofs(**{f.name: _opt_float(data, f.name, path, positive=True) for f in dataclasses.fields(Roofs)})


@dataclass(frozen=True)
class Timing:
    """Quantiles of one config's time; ``spread`` = (max - min) / median of the repeat medians."""

    p20_ms: float
    p50_ms: float
    p80_ms: float
    spread: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: Any, path: str = "timing") -> Timing:
        data = _object(data, path)
        timing = Timing(
            p20_ms=_float(data, "p20_ms", path, positive=True),
            p50_ms=_float(data, "p50_ms", path, positive=True),
            p80_ms=_float(data, "p80_ms", path, positive=True),
            spread=_float(data, "spread", path),
        )
        # Quantiles of one sample are ordered; anything else was edited by hand or computed wrongly.
        if not timing.p20_ms <= timing.p50_ms <= timing.p80_ms:
            raise TableFieldError(
                path, f"expected p20_ms <= p50_ms <= p80_ms, received {timing.p20_ms}, {timing.p50_ms}, {timing.p80_ms}"
            )
        return timing


def _shape_to_dict(shape: Shape) -> dict[str, Any]:
    return dataclasses.asdict(shape)


def _shape_from_dict(data: Any, path: str = "shape") -> Shape:
    data = _object(data, path)
    dtype = _str(data, "dtype", path)
    if dtype not in DTYPES:
        raise TableFieldError(f"{path}.dtype", f"expected one of {sorted(DTYPES)}, received {_echo(dtype)}")
    shape = Shape(
        B=_int(data, "B", path, minimum=1),
        T=_int(data, "T", path, minimum=1),
        H=_int(data, "H", path, minimum=1),
        K=_int(data, "K", path, minimum=1),
        V=_int(data, "V", path, minimum=1),
        dtype=dtype,
        num_seqs=_opt_int(data, "num_seqs", path, minimum=1),
    )
    if shape.num_seqs is not None and shape.B != 1:
        raise TableFieldError(f"{path}.B", f"expected 1 for a packed batch (num_seqs set), received {shape.B}")
    return shape


class ServedFrom(enum.StrEnum):
    """Where the dispatcher found the config it served at a shape: the ``source`` of ``profiles.dispatch.Choice``
    (this module cannot import the dispatcher, which imports it)."""

    FORCED = "forced"  # GDN2_CONFIG
    USER = "user"  # the GDN2_PROFILE table
    OWN = "own"  # the shipped table of the GPU itself
    FAMILY = "family"  # a shipped table of another GPU of the same architecture family
    DEFAULT = "default"  # kernels.config.default_config


# Table file names and entry keys are echoed by `show` and `report`; anything longer was not written by the tuner.
_MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class Incumbent:
    """What the dispatcher served at an entry's shape before the run that wrote the entry, timed in that run's
    final interleaved re-time next to the candidates: the "before tuning" of `show` and `report`.

    The run writes a new config only when it beats this one by more than the measured spread, or in every round
    of the interleaved re-time (tuner.known.decide); otherwise the entry
    holds this config (``Entry.kept_incumbent``), so tuning never makes a shape slower than it was served before.
    """

    config: Any  # the op's config type (KernelSpec.config_type)
    timing: Timing
    source: ServedFrom
    table: str | None  # file name of the table that served it; None for a forced or the default config
    key: str | None  # the entry of that table: the shape's own key, or the nearest bucket's

    def describe(self) -> str:
        """``"h100-80gb-hbm3.json fwd/K128-V128-bf16/T4096-BH128 (family)"``, ``"default"``, ..."""
        if self.source in (ServedFrom.FORCED, ServedFrom.DEFAULT):
            return self.source.value
        return f"{self.table} {self.key} ({self.source.value})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "timing": self.timing.to_dict(),
            "source": self.source.value,
            "table": self.table,
            "key": self.key,
        }

    @staticmethod
    def from_dict(data: Any, shape: Shape, path: str = "incumbent", op: str = DEFAULT_OP) -> Incumbent:
        data = _object(data, path)
        config = parse_config(_field(data, "config", path), f"{path}.config", op)
        # It was served at this shape, so today's constraints must accept it there; otherwise the file was edited
        # or the constraints changed, and "before tuning" would name a config nobody can run.
        reason = get_spec(op).infeasibility(config, shape)
        if reason is not None:
            raise TableFieldError(f"{path}.config", f"{config.label()} cannot run at {shape.label()}: {reason}")
        source = _str(data, "source", path)
        if source not in {s.value for s in ServedFrom}:
            raise TableFieldError(
                f"{path}.source", f"expected one of {[s.value for s in ServedFrom]}, received {_echo(source)}"
            )
        names = {}
        for name in ("table", "key"):
            value = _opt_str(data, name, path)
            if value is not None and not 0 < len(value) <= _MAX_NAME_CHARS:
                raise TableFieldError(
                    _join(path, name), f"expected 1 to {_MAX_NAME_CHARS} characters, received {len(value)}"
                )
            names[name] = value
        return Incumbent(
            config=config,
            timing=Timing.from_dict(_field(data, "timing", path), f"{path}.timing"),
            source=ServedFrom(source),
            **names,
        )


@dataclass(frozen=True)
class Entry:
    """The tuned config of one (stage, shape bucket) and what it was measured against."""

    key: str
    stage: str
    shape: Shape
    config: Any  # the config type of the op named by ``stage`` (KernelSpec.config_type)
    timing: Timing
    default_timing: Timing
    speedup: float  # default_timing.p50_ms / timing.p50_ms
    stage_ms: dict[str, float]  # median per kernel launch of the chosen config ("intra", "state")
    default_stage_ms: dict[str, float]
    baseline_ms: float | None  # flash-linear-attention (or another reference op) where it was measured
    trials: int
    failed: int
    pruned: int
    # What was served before tuning, timed in the same re-time; None in tables written before it was recorded.
    incumbent: Incumbent | None = None
    # None: tuned against the table's kernel_hash of its op. Else the fingerprint (with "@triton<version>" where
    # the Triton differed) of the kernels it was tuned against: a run that studied its key got no result, so it
    # carried the earlier table's entry over, not re-tuned, instead of dropping it (tuner.run.carry_untuned).
    tuned_against: str | None = None

    @property
    def kept_incumbent(self) -> bool:
        """The run found nothing faster than what was served before (beyond the spread, or in every round) and
        kept it."""
        return self.incumbent is not None and self.incumbent.config == self.config

    @property
    def vs_before(self) -> float | None:
        """Incumbent median / this entry's median: above 1 when tuning made the shape faster; None if unknown."""
        return None if self.incumbent is None else self.incumbent.timing.p50_ms / self.timing.p50_ms

    def to_dict(self) -> dict[str, Any]:
        # Written only when known, so that re-saving an older table leaves its entries byte-identical.
        extra: dict[str, Any] = {} if self.incumbent is None else {"incumbent": self.incumbent.to_dict()}
        if self.tuned_against is not None:
            extra["tuned_against"] = self.tuned_against
        return {
            **extra,
            "key": self.key,
            "stage": self.stage,
            "shape": _shape_to_dict(self.shape),
            "config": self.config.to_dict(),
            "timing": self.timing.to_dict(),
            "default_timing": self.default_timing.to_dict(),
            "speedup": self.speedup,
            "stage_ms": dict(self.stage_ms),
            "default_stage_ms": dict(self.default_stage_ms),
            "baseline_ms": self.baseline_ms,
            "trials": self.trials,
            "failed": self.failed,
            "pruned": self.pruned,
        }

    @staticmethod
    def from_dict(data: Any, path: str = "entry") -> Entry:
        data = _object(data, path)
        key = _str(data, "key", path)
        stage = _str(data, "stage", path)
        if not _STAGE.fullmatch(stage):
            raise TableFieldError(f"{path}.stage", f"expected a stage name such as 'fwd', received {_echo(stage)}")
        spec = _spec_of(stage, f"{path}.stage")
        shape = _shape_from_dict(_field(data, "shape", path), f"{path}.shape")
        config = parse_config(_field(data, "config", path), f"{path}.config", spec.name)
        reason = spec.infeasibility(config, shape)
        if reason is not None:
            raise TableFieldError(f"{path}.config", f"{config.label()} cannot run at {shape.label()}: {reason}")
        # The key is derived data; a mismatch means the file was edited and the entry would serve the wrong shapes.
        if key != entry_key(stage, shape):
            raise TableFieldError(
                f"{path}.key", f"expected {entry_key(stage, shape)!r} for its shape, received {_echo(key)}"
            )
        return Entry(
            key=key,
            stage=stage,
            shape=shape,
            config=config,
            timing=Timing.from_dict(_field(data, "timing", path), f"{path}.timing"),
            default_timing=Timing.from_dict(_field(data, "default_timing", path), f"{path}.default_timing"),
            speedup=_float(data, "speedup", path, positive=True),
            stage_ms=_ms_dict(data, "stage_ms", path),
            default_stage_ms=_ms_dict(data, "default_stage_ms", path),
            baseline_ms=_opt_float(data, "baseline_ms", path, positive=True),
            trials=_int(data, "trials", path, minimum=0),
            failed=_int(data, "failed", path, minimum=0),
            pruned=_int(data, "pruned", path, minimum=0),
            # Optional: tables written before it existed load with None.
            incumbent=None
            if data.get("incumbent") is None
            else Incumbent.from_dict(data["incumbent"], shape, f"{path}.incumbent", spec.name),
            tuned_against=_fingerprint(data, "tuned_against", path) if data.get("tuned_against") is not None else None,
        )


def _spec_of(stage: str, path: str) -> KernelSpec:
    """The registered op a table entry belongs to (its stage, the key's first part)."""
    try:
        return get_spec(stage)
    except ValueError as err:
        raise TableFieldError(path, str(err).removeprefix("op: ")) from None


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a study, kept for convergence reports. ``state`` is Optuna's ("COMPLETE", "PRUNED", "FAIL")."""

    key: str
    number: int
    state: str
    value_ms: float | None
    params: dict[str, Any]  # flat names of the op's space (KernelSpec.space)
    reason: str | None  # why a trial was pruned or failed

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "params": dict(self.params)}

    @staticmethod
    def from_dict(data: Any, path: str = "trial") -> TrialRecord:
        data = _object(data, path)
        return TrialRecord(
            key=_str(data, "key", path),
            number=_int(data, "number", path, minimum=0),
            state=_str(data, "state", path),
            value_ms=_opt_float(data, "value_ms", path),
            params=_scalar_dict(data, "params", path),
            reason=_opt_str(data, "reason", path),
        )


@dataclass(frozen=True)
class Profile:
    """One table file: the device and software it was tuned on, the chosen entries and the trial history."""

    schema_version: int
    device: DeviceInfo
    torch_version: str
    triton_version: str
    # op -> kernel_source_hash(op) when its entries were tuned: what decides each op's freshness. A string is
    # taken as the fingerprint of the entries' op (table_op), as schema 1 stored it.
    kernel_hash: dict[str, str]
    created: str  # ISO-8601 time of the run
    sampler: str
    budget: dict[str, Any]  # e.g. {"trials": 200, "timeout_s": 3600}
    interpret: bool  # tuned through the Triton interpreter: its timings mean nothing
    roofs: Roofs | None
    entries: tuple[Entry, ...]
    trials: tuple[TrialRecord, ...]
    # Provenance only (freshness is kernel_hash's): the commit the tuner ran at, "" when unknown.
    git_commit: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.kernel_hash, str):
            object.__setattr__(self, "kernel_hash", {table_op(self.entries): self.kernel_hash})

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "device": self.device.to_dict(),
            "torch_version": self.torch_version,
            "triton_version": self.triton_version,
            "kernel_hash": dict(sorted(self.kernel_hash.items())),
            "git_commit": self.git_commit,
            "created": self.created,
            "sampler": self.sampler,
            "budget": dict(self.budget),
            "interpret": self.interpret,
            "roofs": None if self.roofs is None else self.roofs.to_dict(),
            "entries": [e.to_dict() for e in self.entries],
            "trials": [t.to_dict() for t in self.trials],
        }

    @staticmethod
    def from_dict(data: Any, on_bad_item: Callable[[TableFieldError], None] | None = None) -> Profile:
        """Parse and validate a table. A bad header raises :class:`TableFieldError`.

        A bad entry or trial raises too, unless ``on_bad_item`` is given: then it is reported there and skipped
        (what :func:`load_profile` does, so that one mangled entry does not cost the whole table).
        """
        data = _object(data, "top level")
        # The version comes first: a future layout may differ in every other field.
        version = _field(data, "schema_version", "")
        # `type is int`: true and 1.0 compare equal to 1 but are not what any writer of this format produces.
        if type(version) is not int or version not in READABLE_SCHEMA_VERSIONS:
            raise TableFieldError(
                "schema_version",
                f"expected one of {list(READABLE_SCHEMA_VERSIONS)}, received {_echo(version)} "
                "(a table from another gdn2-tune version)",
            )
        roofs = _field(data, "roofs", "")
        header = {
            "device": DeviceInfo.from_dict(_field(data, "device", ""), "device"),
            "torch_version": _str(data, "torch_version", ""),
            "triton_version": _str(data, "triton_version", ""),
            "kernel_hash": _read_kernel_hash(data, version),
            "git_commit": _str(data, "git_commit", "") if "git_commit" in data else "",
            "created": _str(data, "created", ""),
            "sampler": _str(data, "sampler", ""),
            "budget": _scalar_dict(data, "budget", ""),
            "interpret": _bool(data, "interpret", ""),
            "roofs": None if roofs is None else Roofs.from_dict(roofs, "roofs"),
        }
        entries: list[Entry] = []
        seen: set[str] = set()
        for i, item in enumerate(_list(data, "entries", "")):
            try:
                entry = Entry.from_dict(item, f"entries[{i}]")
                if entry.key in seen:
                    raise TableFieldError(f"entries[{i}].key", f"duplicate key {entry.key!r}; the first one is kept")
            except TableFieldError as err:
                if on_bad_item is None:
                    raise
                on_bad_item(err)
                continue
            seen.add(entry.key)
            entries.append(entry)
        trials: list[TrialRecord] = []
        for i, item in enumerate(_list(data, "trials", "")):
            try:
                trials.append(TrialRecord.from_dict(item, f"trials[{i}]"))
            except TableFieldError as err:
                if on_bad_item is None:
                    raise
                on_bad_item(err)
        # Migrated (a schema-1 fingerprint string becomes {its entries' op: it}), the record is this schema's.
        return Profile(schema_version=SCHEMA_VERSION, entries=tuple(entries), trials=tuple(trials), **header)


# ---------------------------------------------------------------------------------------------------------------
# Files


def save_profile(profile: Profile, path: Path | str) -> None:
    """Write ``profile`` as sorted, indented JSON, atomically: readers see the old file or the new one, never half.

    The profile is validated first with the loader's own rules (``ValueError`` naming the field), so the tuner
    cannot ship a table that the dispatcher would reject.
    """
    path = Path(path)
    data = profile.to_dict()
    Profile.from_dict(data)
    # allow_nan=False: NaN/Infinity are not JSON and other readers of the table would choke on them.
    text = json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file must be in the same directory: os.replace is atomic only within one file system.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: a stray temporary would otherwise sit next to the shipped tables.
        Path(tmp).unlink(missing_ok=True)
        raise


def load_profile(path: Path | str) -> tuple[Profile | None, list[str]]:
    """Read and validate a table. Returns ``(profile or None, warnings)``; never raises on the file's content.

    Each warning names the file and the field. A bad entry or trial is skipped; a bad header (schema version,
    device, versions, ...) or unreadable JSON gives ``None``.
    """
    path = Path(path)
    warnings: list[str] = []
    try:
        size = path.stat().st_size
        if size > MAX_TABLE_BYTES:
            return None, [f"{path}: {size} bytes, expected at most {MAX_TABLE_BYTES}; table ignored ({_REGENERATE})"]
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        return None, [f"{path}: cannot be read ({err.strerror or err}); table ignored"]
    except UnicodeDecodeError as err:
        return None, [f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); table ignored ({_REGENERATE})"]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return None, [
            f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); table ignored ({_REGENERATE})"
        ]
    except RecursionError:
        return None, [f"{path}: JSON nested too deeply; table ignored ({_REGENERATE})"]

    def skip(err: TableFieldError) -> None:
        warnings.append(f"{path}: {err.field}: {err.problem}; skipped")

    try:
        profile = Profile.from_dict(data, on_bad_item=skip)
    except TableFieldError as err:
        return None, [*warnings, f"{path}: {err.field or 'top level'}: {err.problem}; table ignored ({_REGENERATE})"]
    except RecursionError:
        return None, [*warnings, f"{path}: a field is nested too deeply; table ignored ({_REGENERATE})"]
    return profile, warnings


def _retimed_next_to(entry: Entry, earlier: Entry) -> bool:
    """Whether ``entry``'s run re-timed ``earlier`` (the same config, served from the same key) as its incumbent."""
    inc = entry.incumbent
    return inc is not None and inc.config == earlier.config and inc.key == earlier.key


def merge_profiles(profiles: Sequence[Profile], names: Sequence[str] | None = None) -> tuple[Profile, list[str]]:
    """Combine tables of one device, keeping per key the later table's entry where its run re-timed the earlier
    entry's config as its incumbent (the choice made in that same-run comparison stands), else the faster entry
    (lower ``timing.p50_ms``).

    Returns the merged profile and notes saying, for each key more than one table has, which one was kept and
    why. ``names`` (e.g. the file names) label the tables in the notes; by default "#1", "#2", ...
    Freshness is per op, and so is merging: an op whose entries were tuned against different fingerprints in
    different tables takes its entries (and trials) from the last table holding it only, since times measured on
    other kernels do not compare; give the tables oldest first. The other ops' entries and fingerprints are kept
    as they are. Tables of different devices, Triton versions or modes (interpreter or GPU) are not comparable;
    merging them raises ``ValueError`` naming the field.
    """
    if not profiles:
        raise ValueError("merge_profiles: expected at least one profile, received none")
    labels = list(names) if names is not None else [f"#{i + 1}" for i in range(len(profiles))]
    if len(labels) != len(profiles):
        raise ValueError(f"merge_profiles: expected {len(profiles)} names, received {len(labels)}")
    first = profiles[0]
    fields: dict[str, Callable[[Profile], Any]] = {
        "device.device_id": lambda p: p.device.device_id,
        "triton_version": lambda p: p.triton_version,
        "interpret": lambda p: p.interpret,
    }
    for label, other in zip(labels[1:], profiles[1:], strict=True):
        for field, get in fields.items():
            if get(other) != get(first):
                raise ValueError(
                    f"merge_profiles: {field} differs: {labels[0]} has {get(first)!r}, {label} has {get(other)!r}; "
                    "only tables of one device tuned with the same Triton can be merged (re-tune the older one)"
                )

    notes: list[str] = []
    kernel_hash = {op: fp for p in profiles for op, fp in p.kernel_hash.items()}  # the last table's wins
    dropped: set[tuple[int, str]] = set()  # (table index, op) whose entries and trials are left out
    for op in entry_ops([e for p in profiles for e in p.entries]):
        holders = [i for i, p in enumerate(profiles) if op in entry_ops(p.entries)]
        newest = profiles[holders[-1]].kernel_hash.get(op)
        for i in holders:
            if profiles[i].kernel_hash.get(op) != newest:
                dropped.add((i, op))
                notes.append(
                    f"{op}: {labels[i]} was tuned against kernel fingerprint {profiles[i].kernel_hash.get(op)!r}, "
                    f"{labels[holders[-1]]} against {newest!r}; kept {labels[holders[-1]]}'s {op} entries only"
                )
        if newest is None:
            kernel_hash.pop(op, None)
        else:
            kernel_hash[op] = newest

    kept: dict[str, tuple[Entry, str]] = {}
    for i, (label, profile) in enumerate(zip(labels, profiles, strict=True)):
        for entry in profile.entries:
            if (i, entry.stage) in dropped:
                continue
            if entry.key not in kept:
                kept[entry.key] = (entry, label)
                continue
            best, best_label = kept[entry.key]
            if _retimed_next_to(entry, best):
                # This run timed the earlier entry's config next to its own candidates (the incumbent) and chose in
                # that same-run comparison; the earlier median is from another run, on another day.
                kept[entry.key] = (entry, label)
                what = "kept it" if entry.kept_incumbent else f"chose {entry.config.label()} over it"
                notes.append(
                    f"{entry.key}: kept {label} ({entry.timing.p50_ms:.4g} ms) over {best_label} "
                    f"({best.timing.p50_ms:.4g} ms): {label} re-timed {best_label}'s config "
                    f"({entry.incumbent.timing.p50_ms:.4g} ms) next to its candidates and {what}"
                )
                continue
            # Strictly faster wins, so that on a tie the earlier table (the caller's order) stays.
            if entry.timing.p50_ms < best.timing.p50_ms:
                kept[entry.key] = (entry, label)
                notes.append(
                    f"{entry.key}: kept {label} ({entry.timing.p50_ms:.4g} ms) over {best_label} "
                    f"({best.timing.p50_ms:.4g} ms): faster median"
                )
            else:
                why = (
                    "same median, earlier table kept" if entry.timing.p50_ms == best.timing.p50_ms else "faster median"
                )
                notes.append(
                    f"{entry.key}: kept {best_label} ({best.timing.p50_ms:.4g} ms) over {label} "
                    f"({entry.timing.p50_ms:.4g} ms): {why}"
                )
    samplers = sorted({p.sampler for p in profiles})
    # The run's own record (budget, git commit, versions, roofs) is the newest table's: a merge into an existing
    # file kept the oldest run's budget and commit, so an H200 table re-tuned on 2026-11-30 described another run.
    latest = profiles[-1]
    merged = dataclasses.replace(
        latest,
        kernel_hash=kernel_hash,
        created=max(p.created for p in profiles),
        sampler="+".join(samplers),
        roofs=next((p.roofs for p in reversed(profiles) if p.roofs is not None), None),
        entries=tuple(kept[key][0] for key in sorted(kept)),
        # Every study's history stays (the convergence report reads trials per key and number), except that of
        # entries left out for another fingerprint.
        trials=tuple(
            t for i, p in enumerate(profiles) for t in p.trials if (i, t.key.partition("/")[0]) not in dropped
        ),
    )
    return merged, notes
