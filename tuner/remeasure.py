"""``tune.py measure``: re-time a table's entries and the roofs on this GPU now, and store the result as a table.

Measuring belongs to the tuner (it owns the timing code, tuner.measure and tuner.roofs); ``tune.py report
--profile`` renders what this writes, on any machine. Every entry is timed twice, its tuned config and the
built-in default interleaved, whole call and each stage, as the tuner's final re-time does. Not run on a GPU by
its tests (there is none in CI); the timing functions it calls are the tuner's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gdn2_tune.profiles.table import Profile, Timing

# Round-robin rounds of the whole-call re-time: the tuner's final re-time uses 5 for its decision; a report only
# needs a stable median.
ROUNDS = 3


def _timing(t: dict[str, Any]) -> Timing:
    return Timing(t["p20_ms"], t["p50_ms"], t["p80_ms"], t["spread"])


def measure_profile(profile: Profile, warn: Callable[[str], None]) -> Profile:
    """``profile`` with every entry's times (tuned and default, whole call and stages) and the roofs measured on
    this GPU now. An entry that no longer runs is left out with a warning; stored fla times are dropped, since a
    baseline from another run or card is not a comparison (BASELINE.md). Raises ``RuntimeError`` without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("measuring needs a CUDA GPU and found none; `python tune.py report` renders the stored "
                           "times without one")
    import triton

    from gdn2_tune.kernels.spec import device_limits, get_spec
    from gdn2_tune.profiles.table import current_fingerprints, entry_ops
    from gdn2_tune.tuner.device import detect_device
    from gdn2_tune.tuner.measure import Bench, retime, stage_times
    from gdn2_tune.tuner.roofs import measure_roofs

    try:
        device = detect_device()
    except Exception as e:  # noqa: BLE001 - NVML missing or refusing: the stored device record still names the GPU
        warn(f"NVML unavailable ({e}); keeping the table's device record")
        device = profile.device
    entries = []
    for e in profile.entries:
        bench = None
        try:
            bench = Bench(e.shape, "cuda", op=e.stage)
            cfgs = [e.config, get_spec(e.stage).default_config(e.shape, device_limits(device.family))]
            tuned, default = (_timing(t) for t in retime(bench, cfgs, rounds=ROUNDS)["timings"])
            stages = stage_times(bench, cfgs)["stages"]
        except Exception as exc:  # noqa: BLE001 - one entry that no longer runs must not stop the others
            warn(f"{e.key}: could not be re-measured ({exc}); left out")
            continue
        finally:
            del bench
            torch.cuda.empty_cache()
        entries.append(dataclasses.replace(
            e, timing=tuned, default_timing=default, speedup=default.p50_ms / tuned.p50_ms,
            stage_ms=stages[0], default_stage_ms=stages[1], baseline_ms=None,
            # What was served before that tuning run was timed in that run, not now: no "vs before tuning" here.
            incumbent=None,
        ))
    # The times are today's kernels under today's Triton: record those, so that the table does not read as stale.
    return dataclasses.replace(
        profile, device=device, roofs=measure_roofs(device), entries=tuple(entries), trials=(),
        torch_version=str(torch.__version__), triton_version=str(triton.__version__),
        kernel_hash=current_fingerprints(entry_ops(entries)), created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
