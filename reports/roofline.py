"""The roofline model: stored times + analytic costs + roofs ─► one typed record per stage, per entry.

For each entry of a profile and each stage ("intra", "state") and the whole call ("total"):

    achieved GB/s      = bytes_min / time              achieved TFLOP/s = flops_tc / time
    intensity          = flops_tc / bytes_min          (FLOP per DRAM byte)
    memory floor       = bytes_min / memory roof
    compute floor      = Σ_precision executed dot FLOPs / that precision's roof   (kernels.cost.Cost.dot_mix)
    floor              = max(memory floor, compute floor)    binding roof = whichever is larger
    percent of roof    = floor / time                  (= achieved / attainable at this intensity)

The roofs are the measured ones of ``Profile.roofs`` where present, the theoretical ones (reports/hardware.py)
otherwise, field by field; the percent of the theoretical roofs is kept beside. Nothing here launches a kernel:
a report can be redrawn on any machine from the stored profile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.cost import Cost
from gdn2_tune.kernels.spec import DEFAULT_OP, get_spec
from gdn2_tune.profiles.table import DeviceInfo, Entry, Profile, Roofs
from gdn2_tune.reports.hardware import Peaks, theoretical_peaks

TOTAL = "total"
UNIT_NAMES = {
    "bf16": "bf16 tensor core",
    "fp16": "fp16 tensor core",
    "tf32": "tf32 tensor core",
    "fp32": "fp32 CUDA cores",
}
MEMORY = "memory"


@dataclass(frozen=True)
class RoofSet:
    """Ceilings the model divides by: GB/s for memory and TFLOP/s per dot precision."""

    source: str  # "measured", "theoretical" or "measured + theoretical" (filled field by field)
    memory_gbps: float | None
    bf16_tflops: float | None
    fp16_tflops: float | None
    tf32_tflops: float | None
    fp32_tflops: float | None

    def tflops(self, unit: str) -> float | None:
        return getattr(self, f"{unit}_tflops", None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RoofSet:
        return RoofSet(**data)


def measured_roofs(roofs: Roofs | None) -> RoofSet | None:
    if roofs is None:
        return None
    # The bf16 matmul probe stands for fp16 too: the two share the tensor-core rate on every supported family.
    return RoofSet("measured", roofs.copy_gbps, roofs.bf16_tflops, roofs.bf16_tflops, roofs.tf32_tflops,
                   roofs.fp32_tflops)


def theoretical_roofs(peaks: Peaks) -> RoofSet:
    return RoofSet("theoretical", peaks.memory_gbps, peaks.bf16_tflops, peaks.fp16_tflops, peaks.tf32_tflops,
                   peaks.fp32_tflops)


def combine(measured: RoofSet | None, theoretical: RoofSet) -> RoofSet:
    """Measured roofs where measured, theoretical for the rest."""
    if measured is None:
        return theoretical
    names = [f.name for f in dataclasses.fields(RoofSet) if f.name != "source"]
    values = {n: getattr(measured, n) if getattr(measured, n) is not None else getattr(theoretical, n) for n in names}
    filled = any(getattr(measured, n) is None and getattr(theoretical, n) is not None for n in names)
    return RoofSet("measured + theoretical" if filled else "measured", **values)


@dataclass(frozen=True)
class Floors:
    memory_ms: float | None
    compute_ms: float | None
    floor_ms: float | None
    bound: str | None  # "memory", "tf32 tensor core", ...; None when a roof it needs is unknown


def floors(cost: Cost, roofs: RoofSet) -> Floors:
    memory_ms = cost.bytes_min / (roofs.memory_gbps * 1e9) * 1e3 if roofs.memory_gbps else None
    mix = cost.dot_mix or (("bf16", cost.flops_tc),)
    parts: dict[str, float] = {}
    for unit, flops in mix:
        rate = roofs.tflops(unit)
        if not rate:
            parts = {}
            break
        parts[unit] = flops / (rate * 1e12) * 1e3
    compute_ms = sum(parts.values()) if parts else None
    if memory_ms is None or compute_ms is None:
        return Floors(memory_ms, compute_ms, None, None)
    if memory_ms >= compute_ms:
        return Floors(memory_ms, compute_ms, memory_ms, MEMORY)
    unit = max(parts, key=lambda u: parts[u])  # the precision that takes most of the compute floor names the roof
    return Floors(memory_ms, compute_ms, compute_ms, UNIT_NAMES[unit])


@dataclass(frozen=True)
class StagePoint:
    """One stage (or the whole call) of one config at one shape: a point on the roofline."""

    stage: str
    time_ms: float | None
    cost: Cost
    gbps: float | None
    tflops: float | None
    intensity: float
    memory_floor_ms: float | None
    compute_floor_ms: float | None
    floor_ms: float | None
    bound: str | None
    pct_roof: float | None  # of the roofs the report uses (measured where present)
    pct_theoretical: float | None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["cost"] = self.cost.to_dict()
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> StagePoint:
        return StagePoint(**{**data, "cost": Cost.from_dict(data["cost"])})


def stage_point(stage: str, time_ms: float | None, cost: Cost, roofs: RoofSet, theory: RoofSet) -> StagePoint:
    f = floors(cost, roofs)
    t = floors(cost, theory)
    timed = time_ms is not None and time_ms > 0
    return StagePoint(
        stage=stage,
        time_ms=time_ms,
        cost=cost,
        gbps=cost.bytes_min / (time_ms * 1e-3) / 1e9 if timed else None,
        tflops=cost.flops_tc / (time_ms * 1e-3) / 1e12 if timed else None,
        intensity=cost.intensity,
        memory_floor_ms=f.memory_ms,
        compute_floor_ms=f.compute_ms,
        floor_ms=f.floor_ms,
        bound=f.bound,
        pct_roof=100 * f.floor_ms / time_ms if timed and f.floor_ms is not None else None,
        pct_theoretical=100 * t.floor_ms / time_ms if timed and t.floor_ms is not None else None,
    )


@dataclass(frozen=True)
class EntryModel:
    """An entry's tuned and default configs, stage by stage, and the baseline where it was measured."""

    key: str
    shape: Shape
    config: str  # the label() of the tuned config (any op's)
    default_config: str
    tuned: tuple[StagePoint, ...]  # intra, state, total
    default: tuple[StagePoint, ...]
    # fla's forward, placed at the tuned call's FLOPs and bytes: same work, so its height against the tuned point
    # reads as the speedup (fla's own pipeline moves more bytes; we do not model it).
    baseline: StagePoint | None
    speedup: float  # over the default config (Entry.speedup)
    speedup_baseline: float | None  # baseline_ms / tuned median
    op_floor_ms: float | None  # minimum_bytes(shape) / memory roof: the floor of any implementation
    trials: int
    failed: int
    pruned: int

    def point(self, stage: str, which: str = "tuned") -> StagePoint | None:
        for p in getattr(self, which):
            if p.stage == stage:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "shape": dataclasses.asdict(self.shape),
            "config": self.config,
            "default_config": self.default_config,
            "tuned": [p.to_dict() for p in self.tuned],
            "default": [p.to_dict() for p in self.default],
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "speedup": self.speedup,
            "speedup_baseline": self.speedup_baseline,
            "op_floor_ms": self.op_floor_ms,
            "trials": self.trials,
            "failed": self.failed,
            "pruned": self.pruned,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> EntryModel:
        return EntryModel(
            **{
                **data,
                "shape": Shape(**data["shape"]),
                "tuned": tuple(StagePoint.from_dict(p) for p in data["tuned"]),
                "default": tuple(StagePoint.from_dict(p) for p in data["default"]),
                "baseline": None if data["baseline"] is None else StagePoint.from_dict(data["baseline"]),
            }
        )


@dataclass(frozen=True)
class Report:
    """Everything the views draw: the device, its roofs and one model per entry."""

    device: str  # GPU name
    device_id: str
    family: str
    peaks: Peaks
    measured: RoofSet | None
    roofs: RoofSet  # what the percentages divide by
    theoretical: RoofSet
    entries: tuple[EntryModel, ...]
    note: str | None  # why some figures are missing (unknown architecture, no roofs)

    def entry(self, wanted: str) -> EntryModel:
        """An entry by key ("fwd/K128-V128-bf16/T4096-BH128") or shape label ("B8-T4096-H16-K128-V128-bf16")."""
        for e in self.entries:
            if wanted in (e.key, e.shape.label()):
                return e
        known = ", ".join(f"{e.key} ({e.shape.label()})" for e in self.entries) or "none"
        raise ValueError(f"shape: expected a key or shape label of this profile, received {wanted!r}; known: {known}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "device_id": self.device_id,
            "family": self.family,
            "peaks": self.peaks.to_dict(),
            "measured": None if self.measured is None else self.measured.to_dict(),
            "roofs": self.roofs.to_dict(),
            "theoretical": self.theoretical.to_dict(),
            "entries": [e.to_dict() for e in self.entries],
            "note": self.note,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Report:
        return Report(
            device=data["device"],
            device_id=data["device_id"],
            family=data["family"],
            peaks=Peaks.from_dict(data["peaks"]),
            measured=None if data["measured"] is None else RoofSet.from_dict(data["measured"]),
            roofs=RoofSet.from_dict(data["roofs"]),
            theoretical=RoofSet.from_dict(data["theoretical"]),
            entries=tuple(EntryModel.from_dict(e) for e in data["entries"]),
            note=data["note"],
        )


def _points(
    stages: tuple[str, ...], stage_ms: dict[str, float], total_ms: float | None, costs: Mapping[str, Cost],
    roofs: RoofSet, theory: RoofSet,
) -> tuple[StagePoint, ...]:
    points = [stage_point(s, stage_ms.get(s), costs[s], roofs, theory) for s in stages]
    points.append(stage_point(TOTAL, total_ms, costs[TOTAL], roofs, theory))
    return tuple(points)


def model_entry(entry: Entry, roofs: RoofSet, theory: RoofSet) -> EntryModel:
    # The entry's op (its stage) knows its stages, its cost as the tuner times it, its default and its floor.
    spec = get_spec(entry.stage)
    tuned_costs = spec.cost(entry.shape, entry.config)
    default = spec.default_config(entry.shape)  # what the tuner timed as the default
    default_costs = spec.cost(entry.shape, default)
    tuned_ms = entry.timing.p50_ms
    baseline = None
    if entry.baseline_ms is not None:
        baseline = stage_point(TOTAL, entry.baseline_ms, tuned_costs[TOTAL], roofs, theory)
    floor_bytes = spec.minimum_bytes(entry.shape)
    return EntryModel(
        key=entry.key,
        shape=entry.shape,
        config=entry.config.label(),
        default_config=default.label(),
        tuned=_points(spec.stages, entry.stage_ms, tuned_ms, tuned_costs, roofs, theory),
        default=_points(spec.stages, entry.default_stage_ms, entry.default_timing.p50_ms, default_costs, roofs, theory),
        baseline=baseline,
        speedup=entry.speedup,
        speedup_baseline=entry.baseline_ms / tuned_ms if entry.baseline_ms is not None else None,
        op_floor_ms=floor_bytes / (roofs.memory_gbps * 1e9) * 1e3 if roofs.memory_gbps else None,
        trials=entry.trials,
        failed=entry.failed,
        pruned=entry.pruned,
    )


def build_report(profile: Profile) -> Report:
    device: DeviceInfo = profile.device
    peaks = theoretical_peaks(device)
    theory = theoretical_roofs(peaks)
    measured = measured_roofs(profile.roofs)
    roofs = combine(measured, theory)
    notes = []
    if peaks.reason:
        notes.append(f"theoretical peaks: {peaks.reason}")
    if measured is None:
        notes.append("no measured roofs in this profile (re-tune to record them)")
    return Report(
        device=device.name,
        device_id=device.device_id,
        family=device.family,
        peaks=peaks,
        measured=measured,
        roofs=roofs,
        theoretical=theory,
        entries=tuple(model_entry(e, roofs, theory) for e in sorted(profile.entries, key=lambda e: e.key)),
        note="; ".join(notes) or None,
    )


def percent_of_roof(
    shape: Shape, config: Any, stage: str, time_ms: float, device: DeviceInfo, roofs: Roofs | None = None,
    op: str = DEFAULT_OP,
) -> tuple[float | None, str | None]:
    """(percent of the binding roof, its name) of one stage ("intra", "state") or the whole call ("total") timed
    at ``time_ms``: what ``tune.py tune``'s live view can show as each stage finishes. (None, None) when the
    device's roofs are unknown."""
    theory = theoretical_roofs(theoretical_peaks(device))
    cost = get_spec(op).cost(shape, config)[stage]
    point = stage_point(stage, time_ms, cost, combine(measured_roofs(roofs), theory), theory)
    return point.pct_roof, point.bound
