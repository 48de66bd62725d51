"""Pick the launch config of the GDN-2 chunk forward for a shape, from the tuned tables, without tuning.

Lookup order (first that yields a config wins; see :func:`_resolve`):

1. ``GDN2_CONFIG`` (the forward) or ``GDN2_CONFIG_<OP>`` (another op, e.g. ``GDN2_CONFIG_BWD``,
   ``GDN2_CONFIG_DECODE``): one config forced for every shape of that op, as the JSON of its ``config.to_dict()``.
   Ignored, with a warning, where it is invalid or cannot run at the shape. One variable per op, so that forcing
   the forward's config does not make every other op warn that it cannot parse it.
2. ``GDN2_PROFILE``: the path of a user table, consulted before the shipped one.
3. The shipped table of the running GPU (``profiles/<device id>.json``); none on the CPU or the interpreter.
4. Shipped tables of other GPUs of the same architecture family (e.g. sm90).
5. The op's built-in default (``KernelSpec.default_config(shape, device)``).

Every function takes the op by name (``op="fwd"``, the table key's first part) and reads its
:class:`~gdn2_tune.kernels.spec.KernelSpec`; nothing here depends on an op's config type.

Within a table: the exact key, else the nearest shape bucket of the same stage, K, V, dtype and regime (for the
chunk ops, whether the sequence split is the built-in choice: a bucket of the other regime is not served, the next
table or the shape-aware default is). :func:`explain` says
which source, table and entry served a shape (a :class:`Choice`), for reports.

A table that is missing, corrupt or hand-mangled warns once, naming the file and the field, and is skipped.
Freshness is per op: the entries of an op tuned against another kernel fingerprint (or of a table tuned with
another Triton) keep serving where today's space and constraints accept them (the rest were dropped on load, each
with a warning), with one warning per table and op, given when that op is first served from it. Every
config returned passes the op's constraints at the shape. Tables are read once per process and the
answer is memoised per shape, so a repeated lookup is one dict access. The environment variables and the GPU
are read at the first lookup; :func:`clear_cache` forgets all of it (tests, or after changing them).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.spec import DEFAULT_OP, DeviceLimits, KernelSpec, device_limits, family_from_capability, get_spec
from gdn2_tune.profiles.table import (
    PROFILES_DIR,
    Entry,
    Profile,
    TableFieldError,
    device_id_from_name,
    entry_key,
    load_profile,
    parse_config,
    profile_path,
    staleness,
)

ENV_CONFIG = "GDN2_CONFIG"


def env_config_name(op: str) -> str:
    """The variable that forces op ``op``'s config: GDN2_CONFIG for the forward, GDN2_CONFIG_<OP> for the others."""
    return ENV_CONFIG if op == DEFAULT_OP else f"{ENV_CONFIG}_{op.upper()}"
ENV_PROFILE = "GDN2_PROFILE"
# The op served when none is named (the forward; its entries' stage is "fwd").
STAGE = DEFAULT_OP
# Where shipped tables live; a module attribute so that tests can point it at a temporary directory.
SHIPPED_DIR = PROFILES_DIR
# A packed batch and a padded one of the same sequences run the same programs but index them differently, so a
# bucket of the other kind counts as one doubling of T further away: it wins only when clearly closer.
OTHER_KIND_PENALTY = 1.0
_TRUTHY = ("1", "true", "yes", "on")


class TableWarning(UserWarning):
    """A config table (or GDN2_CONFIG) could not be used as it is; the dispatcher fell back."""


@dataclass(frozen=True)
class Device:
    """The GPU kernels launch on: which shipped table is its own and which ones share its architecture."""

    device_id: str
    family: str


@dataclass(frozen=True)
class _Table:
    path: Path
    profile: Profile
    by_key: dict[str, Entry]


@dataclass(frozen=True)
class _Session:
    """What the first lookup read from the environment; fixed until clear_cache()."""

    forced_text: str  # GDN2_CONFIG as set ("" when unset), parsed per op on first use
    user_table: Path | None
    device: Device | None

    @property
    def limits(self) -> DeviceLimits:
        """What the constraints check against: this GPU's family's limits (sm90's without a GPU)."""
        return device_limits(None if self.device is None else self.device.family)


# Where a served config can come from, in lookup order (see Choice.source).
SOURCES = ("forced", "user", "own", "family", "default")


@dataclass(frozen=True)
class Choice:
    """Where the config served at a shape came from: what ``tune.py report`` tells a user whose GPU has no table.

    ``source`` is one of :data:`SOURCES`; ``path`` and ``key`` name the table and the entry when one served it,
    and ``exact`` says whether that entry's key is the shape's own or the nearest bucket's.
    """

    config: Any  # the op's config type
    source: str
    path: Path | None = None
    key: str | None = None
    exact: bool = False
    device: Device | None = None
    op: str = DEFAULT_OP

    def describe(self) -> str:
        """One sentence: which table and entry, and why that one."""
        if self.source == "forced":
            return f"the config forced by {env_config_name(self.op)}"
        if self.source == "default":
            why = "no GPU here" if self.device is None else f"no table of {self.device.family} has a usable entry"
            return f"the built-in default config ({why})"
        how = "its own key" if self.exact else f"the nearest bucket, {self.key}"
        table = {
            "user": f"{ENV_PROFILE}={self.path}",
            "own": f"{self.path}, this GPU's own table",
            "family": f"{self.path}, tuned on another {self.device.family if self.device else ''} GPU "
            "(same-family fallback: this GPU has no table of its own)",
        }[self.source]
        return f"{table}; entry: {how}"


_MEMO: dict[tuple[str, Shape], Any] = {}
_FORCED: dict[str, Any] = {}  # op -> its parsed GDN2_CONFIG (None where unset or invalid)
_TABLES: dict[Path, _Table | None] = {}
_FAMILY: dict[str, tuple[_Table, ...]] = {}
_WARNED: set[tuple[str, str]] = set()
_SESSION: list[_Session] = []  # zero or one element: a mutable cell without a `global` statement


def select_config(shape: Shape, op: str = STAGE) -> Any:
    """The config to launch op ``op`` with at ``shape``; never tunes, never raises on table content."""
    config = _MEMO.get((op, shape))
    if config is None:
        config = _MEMO[(op, shape)] = _resolve(shape, op)
    return config


def clear_cache() -> None:
    """Forget memoised answers, loaded tables, the environment snapshot and which warnings were shown."""
    _MEMO.clear()
    _FORCED.clear()
    _TABLES.clear()
    _FAMILY.clear()
    _WARNED.clear()
    _SESSION.clear()


def _resolve(shape: Shape, op: str) -> Any:
    return explain(shape, op).config


def serving_tables() -> tuple[tuple[str, Path], ...]:
    """(source, path) of each usable table in lookup order for this process, e.g. ``(("family", h100.json),)`` on
    an H200 with no table of its own: what ``tune.py report`` renders by default, and how it was chosen."""
    return tuple((source, table.path) for source, table in _tables(_session()))


def running_device() -> Device | None:
    """The GPU the dispatcher serves (None on the CPU or the interpreter), as read at the first lookup."""
    return _session().device


def explain(shape: Shape, op: str = STAGE) -> Choice:
    """The config of op ``op`` for ``shape`` and where it came from, in the lookup order of the module docstring.

    Not memoised (``select_config`` is); tables are still read once per process.
    """
    spec = get_spec(op)
    session = _session()
    limits = session.limits
    # (1) A forced config is the user's explicit choice; it still must be launchable at this shape.
    forced = _forced_config(session, spec)
    if forced is not None:
        reason = spec.infeasibility(forced, shape, limits)
        if reason is None:
            return Choice(forced, "forced", device=session.device, op=spec.name)
        name = env_config_name(spec.name)
        _warn(
            name,
            reason,
            f"{name}: {forced.label()} cannot run at {shape.label()}: {reason}; ignored for this "
            "shape (set a config that fits, or unset the variable)",
        )
    # (2) to (4): the tables, in order; within each, the exact key, else the nearest bucket.
    for source, table in _tables(session):
        entry = _lookup(table, shape, spec, limits)
        if entry is not None:
            _warn_if_stale(table, spec.name)
            return Choice(entry.config, source, table.path, entry.key, entry.key == entry_key(spec.name, shape),
                          session.device)
    # (5)
    return Choice(spec.default_config(shape, limits), "default", device=session.device)


def _tables(session: _Session) -> Iterator[tuple[str, _Table]]:
    """The usable tables in lookup order, each opened only when the ones before it gave no config."""
    # (2) The user's table comes before the shipped one: it is how a user overrides what we ship.
    user = _user_table(session)
    if user is not None:
        yield "user", user
    if session.device is None:
        return
    # (3) The shipped table of this GPU.
    own = _own_table(session.device)
    if own is not None:
        yield "own", own
    # (4) Tables of other GPUs of the same architecture: tuned for other clocks and SM counts, but their configs
    # are legal here and usually closer to the best than the default.
    for table in _family_tables(session.device):
        yield "family", table


def _lookup(table: _Table, shape: Shape, spec: KernelSpec, limits: DeviceLimits) -> Entry | None:
    """The exact key's entry, else the nearest bucket's of the same op, K, V, dtype and regime (KernelSpec.regime);
    None if none fits."""
    exact = table.by_key.get(entry_key(spec.name, shape))
    regime = spec.regime(shape) if spec.regime is not None else None
    candidates = [
        e
        for e in table.profile.entries
        if e.stage == spec.name
        and (e.shape.K, e.shape.V, e.shape.dtype) == (shape.K, shape.V, shape.dtype)
        and (e is exact or spec.regime is None or spec.regime(e.shape) == regime)
    ]
    candidates.sort(key=lambda e: (e is not exact, bucket_distance(e.shape, shape), e.key))
    for entry in candidates:
        reason = spec.infeasibility(entry.config, shape, limits)
        if reason is None:
            return entry
        # Today the constraints depend only on K, V and dtype, which every candidate shares; a future constraint
        # on T could make a validated entry illegal at a neighbouring shape.
        _warn(
            str(table.path),
            f"{entry.key}: {reason}",
            f"{table.path}: {entry.key}: config {entry.config.label()} cannot run at {shape.label()} ({reason}); "
            "trying the next bucket",
        )
    return None


def _coordinates(shape: Shape) -> tuple[float, float]:
    """Tokens per sequence and (sequence, head) pairs: the sequential length and the parallelism of a launch.

    For a padded batch these are the key's T and B·H. A packed batch's key holds the total tokens and H; dividing
    by the number of sequences makes it comparable with the padded batch of the same sequences.
    """
    if shape.num_seqs:
        return shape.T / shape.num_seqs, float(shape.num_seqs * shape.H)
    return float(shape.T), float(shape.B * shape.H)


def bucket_distance(a: Shape, b: Shape) -> float:
    """Distance between two shape buckets in log2 of T and of B·H (L1), plus a penalty across packed/padded."""
    (t_a, bh_a), (t_b, bh_b) = _coordinates(a), _coordinates(b)
    distance = abs(math.log2(t_a / t_b)) + abs(math.log2(bh_a / bh_b))
    if (a.num_seqs is None) != (b.num_seqs is None):
        distance += OTHER_KIND_PENALTY
    return distance


# ---------------------------------------------------------------------------------------------------------------
# Sources


def _session() -> _Session:
    if not _SESSION:
        user = os.environ.get(ENV_PROFILE, "").strip()
        _SESSION.append(
            _Session(
                forced_text=os.environ.get(ENV_CONFIG, "").strip(),
                user_table=Path(user) if user else None,
                device=_running_device(),
            )
        )
    return _SESSION[0]


def _forced_config(session: _Session, spec: KernelSpec) -> Any:
    """GDN2_CONFIG parsed as op ``spec``'s config, once per op and session; None where unset or invalid."""
    if spec.name not in _FORCED:
        text = (session.forced_text if spec.name == DEFAULT_OP
                else os.environ.get(env_config_name(spec.name), "").strip())
        _FORCED[spec.name] = _parse_forced(text, spec) if text else None
    return _FORCED[spec.name]


def _parse_forced(text: str, spec: KernelSpec) -> Any:
    name = env_config_name(spec.name)
    try:
        return parse_config(json.loads(text), name, spec.name)
    except json.JSONDecodeError as err:
        problem = (f"expected the JSON of a {spec.name} config's to_dict(), received invalid JSON ({err.msg} at "
                   f"column {err.colno})")
    except TableFieldError as err:
        problem = f"{err.field}: {err.problem}"
    except RecursionError:
        problem = "JSON nested too deeply"
    _warn(name, "parse", f"{name}: {problem}; ignored (fix or unset the variable)")
    return None


def _running_device() -> Device | None:
    """The GPU kernels launch on, or None on the CPU and under the Triton interpreter (no shipped table applies)."""
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY:
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        return Device(device_id_from_name(name), family_from_capability(torch.cuda.get_device_capability(index)))
    except (RuntimeError, AssertionError, ValueError) as err:
        # A broken driver should cost the tuned configs, not the caller's run.
        _warn("device", "detect", f"could not identify the GPU ({err}); using the built-in default config")
        return None


def _user_table(session: _Session) -> _Table | None:
    if session.user_table is None:
        return None
    table = _load(session.user_table)
    if table is not None and session.device is not None and table.profile.device.device_id != session.device.device_id:
        # Still used: the user asked for it, and every config is checked for feasibility before it is returned.
        _warn(
            str(table.path),
            "device",
            f"{table.path}: device.device_id: tuned on {table.profile.device.device_id!r}, running on "
            f"{session.device.device_id!r}; using it as {ENV_PROFILE} asks, but its timings may not carry over",
        )
    return table


def _own_table(device: Device | None) -> _Table | None:
    if device is None:
        return None
    path = profile_path(device.device_id, SHIPPED_DIR)
    if not path.is_file():
        _warn(
            str(path),
            "missing",
            f"{path}: no tuned table for this GPU ({device.device_id}); falling back to {device.family} tables or "
            f"the built-in default (run `python tune.py tune` to tune it)",
        )
        return None
    table = _load(path)
    if table is not None and table.profile.device.device_id != device.device_id:
        _warn(
            str(path),
            "device",
            f"{path}: device.device_id: expected {device.device_id!r} (the file name), received "
            f"{table.profile.device.device_id!r}; table not used (regenerate it with `python tune.py tune`)",
        )
        return None
    return table


def _family_tables(device: Device) -> tuple[_Table, ...]:
    if device.family not in _FAMILY:
        own = profile_path(device.device_id, SHIPPED_DIR)
        tables = []
        for path in sorted(Path(SHIPPED_DIR).glob("*.json")):
            if path == own:
                continue
            table = _load(path)
            if table is not None and table.profile.device.family == device.family:
                tables.append(table)
        _FAMILY[device.family] = tuple(tables)
    return _FAMILY[device.family]


def _load(path: Path) -> _Table | None:
    """Read, validate and index a table once per process; None (after warnings) where it is unusable."""
    if path in _TABLES:
        return _TABLES[path]
    table = None
    profile, problems = load_profile(path)
    for problem in problems:
        _warn(str(path), problem, problem)
    if profile is not None:
        table = _Table(path, profile, {e.key: e for e in profile.entries})
    _TABLES[path] = table
    return table


def _warn_if_stale(table: _Table, op: str) -> None:
    """Warn once per table and op when op's entries there are stale: a user of the forward hears nothing of a
    stale decode entry it is never served."""
    stale = staleness(table.profile, op)
    if stale:
        # Still served: every entry left passed today's constraints on load; only its speed is in doubt.
        _warn(
            str(table.path),
            f"stale {op}",
            f"{table.path}: {op} entries stale ({'; '.join(stale)}); serving those that today's constraints "
            f"accept. Re-tune with `python tune.py tune --op {op}` for best speed",
        )


def _warn(source: str, problem: str, message: str) -> None:
    """Warn once per (source, problem) and process, however many shapes hit it."""
    if (source, problem) in _WARNED:
        return
    _WARNED.add((source, problem))
    warnings.warn(message, TableWarning, stacklevel=3)
