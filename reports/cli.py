"""``python tune.py report`` (tune.py wires ``add_arguments`` and ``run``) and ``python -m gdn2_tune.reports``.

Profile lookup, in order: ``--profile PATH``; the shipped table of the GPU this runs on
(``profiles/<device_id>.json``); the shipped H100 table (so a fresh clone on a laptop renders something real).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from gdn2_tune.profiles.table import PROFILES_DIR, Profile, Timing, device_id_from_name, load_profile, profile_path
from gdn2_tune.reports import render
from gdn2_tune.reports.roofline import Report, build_report

VIEWS = ("suite", "shape", "convergence", "coverage")
# The table a machine with no GPU (or a GPU with no table) falls back to: the one every release ships.
SHIPPED_FALLBACK = "h100-80gb-hbm3"
JSON_SCHEMA = 1


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--profile", type=Path, default=None,
                        help="table to report on (default: this GPU's shipped table, else the shipped H100 one)")
    parser.add_argument("--view", choices=VIEWS, default="suite",
                        help="suite: every shape at a glance; shape: one shape by stage (needs --shape); "
                             "convergence: best time against trial number; coverage: keys, configs, dates")
    parser.add_argument("--shape", default=None,
                        help="entry key (fwd/K128-V128-bf16/T4096-BH128) or shape label (B8-T4096-H16-K128-V128-bf16)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--export", nargs=2, metavar=("FORMAT", "PATH"), default=None,
                        help="also write the rendered view as html or svg")
    parser.add_argument("--no-chart", action="store_true", help="tables only")
    parser.add_argument("--width", type=int, default=None, help="terminal width to render for")
    parser.add_argument("--measure", action="store_true",
                        help="(GPU) time the table's configs on this GPU now, instead of the stored times")
    parser.add_argument("--benchmark", type=Path, default=None,
                        help="a suite.json of benchmarks/bench_fwd.py run with this table: its tuned, default and "
                             "fla times (one run, same inputs) replace the stored ones, so the baseline shows too")
    return parser


# A benchmark call this much slower than the tuner's CUDA-graph replay of the same config spent the difference on
# the host: at the suite's 1x2048 shape on an H100 (2026-11-26) 0.381 ms eagerly against 0.172 ms replayed, while
# the large shapes agreed within 3%.
HOST_BOUND_RATIO = 1.5


def with_benchmark(profile: Profile, path: Path) -> tuple[Profile, list[str]]:
    """Swap in the times of one benchmark run (tuned, default and fla timed together) for matching entries.

    A row is used only if it ran on this profile's GPU model and timed the entry's own config; the stored
    times of the other entries stay, and no fla time is shown for them (a baseline from another run is not a
    comparison, BASELINE.md).
    """
    data = json.loads(path.read_text())
    gpu = data.get("env", {}).get("gpu")
    if gpu != profile.device.name:
        return profile, [f"{path}: measured on {gpu!r}, not {profile.device.name!r}; ignored"]
    rows = {r["shape"]: r for r in data.get("rows", []) if "fla" in r}
    entries, notes = [], []
    for e in profile.entries:
        row = rows.get(e.shape.label())
        if row is None or row.get("config") != e.config.label():
            entries.append(dataclasses.replace(e, baseline_ms=None))
            notes.append(f"{e.key}: no benchmark row with this config; stored times, no baseline")
            continue
        tuned = Timing(*row["tuned"], spread=e.timing.spread)
        if tuned.p50_ms > HOST_BOUND_RATIO * e.timing.p50_ms:
            notes.append(f"{e.key}: the benchmark's eager call took {tuned.p50_ms:.3f} ms, "
                         f"{tuned.p50_ms / e.timing.p50_ms:.1f}x the tuner's graph replay ({e.timing.p50_ms:.3f} ms): "
                         "host-bound at this size (Python and launch overhead), not a slower kernel")
        default = Timing(*row["default"], spread=e.default_timing.spread)
        entries.append(dataclasses.replace(e, timing=tuned, default_timing=default,
                                           speedup=default.p50_ms / tuned.p50_ms, baseline_ms=row["fla"][1]))
    return dataclasses.replace(profile, entries=tuple(entries)), notes


def default_profile(root: Path = PROFILES_DIR) -> tuple[Path | None, str]:
    """(path, why this one). The running GPU's table if it ships one, else the shipped H100 table."""
    why = "no GPU here"
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            path = profile_path(device_id_from_name(name), root)
            if path.exists():
                return path, f"shipped table of this GPU ({name})"
            why = f"no shipped table for {name}"
    except Exception as err:  # noqa: BLE001 - a broken CUDA setup must not stop an offline report
        why = f"CUDA unavailable ({err})"
    fallback = profile_path(SHIPPED_FALLBACK, root)
    if fallback.exists():
        return fallback, f"shipped H100 table ({why})"
    candidates = sorted(Path(root).glob("h100*.json"))
    if candidates:
        return candidates[0], f"shipped H100 table ({why})"
    return None, why


def measure_profile(profile: Profile, err: Console | None = None) -> Profile:
    """Re-time every entry of ``profile`` (tuned and default config, whole call and each stage) and the roofs on
    this GPU, through the tuner's timing functions (tuner.measure, tuner.roofs); reports/ launches nothing itself.

    Stored fla times are dropped: a baseline from another run or card is not a comparison (BASELINE.md).
    """
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(f"--measure needs torch with CUDA: {e}") from None
    if not torch.cuda.is_available():
        raise RuntimeError("--measure needs a CUDA GPU and found none; drop --measure to render the stored times")
    try:
        from gdn2_tune.tuner.device import detect_device
        from gdn2_tune.tuner.measure import Bench, retime, stage_times
        from gdn2_tune.tuner.roofs import measure_roofs
    except ImportError as e:
        raise RuntimeError(
            f"--measure needs the tuner's timing functions (tuner.measure, tuner.device, tuner.roofs): {e}; "
            "drop --measure to render the stored times"
        ) from None
    from datetime import UTC, datetime

    from gdn2_tune.kernels.config import default_config
    from gdn2_tune.profiles.table import Timing

    try:
        device = detect_device()
    except Exception as e:  # noqa: BLE001 - NVML missing or refusing: the stored device record still names the GPU
        if err:
            err.print(f"[yellow]warning:[/] NVML unavailable ({e}); keeping the profile's device record")
        device = profile.device

    def timing(t: dict[str, Any]) -> Timing:
        return Timing(t["p20_ms"], t["p50_ms"], t["p80_ms"], t["spread"])

    entries = []
    for e in profile.entries:
        try:
            bench = Bench(e.shape, "cuda")
            cfgs = [e.config, default_config(e.shape)]
            tuned, default = (timing(t) for t in retime(bench, cfgs, rounds=3)["timings"])
            stages = stage_times(bench, cfgs)["stages"]
        except Exception as exc:  # noqa: BLE001 - one entry that no longer runs must not stop the report
            if err:
                err.print(f"[yellow]warning:[/] {e.key}: could not be re-measured ({exc}); left out", highlight=False)
            continue
        finally:
            bench = None
            torch.cuda.empty_cache()
        entries.append(dataclasses.replace(
            e, timing=tuned, default_timing=default, speedup=default.p50_ms / tuned.p50_ms,
            stage_ms=stages[0], default_stage_ms=stages[1], baseline_ms=None,
        ))
    return dataclasses.replace(
        profile, device=device, roofs=measure_roofs(device), entries=tuple(entries),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def payload(view: str, report: Report, profile: Profile, source: str, entry: str | None) -> dict[str, Any]:
    """The ``--json`` document: the whole model (``report``, loadable with Report.from_dict) plus the view's rows."""
    out: dict[str, Any] = {"schema": JSON_SCHEMA, "view": view, "profile": source, "report": report.to_dict()}
    if view == "convergence":
        keys = [entry] if entry else sorted({t.key for t in profile.trials})
        out["convergence"] = [render.convergence(profile.trials, k).to_dict() for k in keys]
    elif view == "coverage":
        out["coverage"] = {
            "created": profile.created,
            "kernel_hash": profile.kernel_hash,
            "torch_version": profile.torch_version,
            "triton_version": profile.triton_version,
            "sampler": profile.sampler,
            "budget": dict(profile.budget),
            "keys": [{"key": e.key, "shape": dataclasses.asdict(e.shape), "config": e.config} for e in report.entries],
        }
    elif view == "shape" and entry:
        out["shape"] = entry
    return out


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    err = Console(stderr=True)
    path: Path | None = args.profile
    if path is None:
        path, why = default_profile()
        if path is None:
            err.print(f"[red]report:[/] no profile to show ({why}) and no shipped H100 table in {PROFILES_DIR}; "
                      "pass --profile PATH")
            return 2
        source = f"{path} ({why})"
    else:
        source = str(path)
    profile, warnings = load_profile(path)
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if profile is None:
        err.print(f"[red]report:[/] cannot use {path}", highlight=False)
        return 2
    if args.measure:
        try:
            profile = measure_profile(profile, err)
        except RuntimeError as e:
            err.print(f"[red]report:[/] {e}", highlight=False)
            return 2
        source += " (re-measured now)"
    elif args.benchmark is not None:
        profile, notes = with_benchmark(profile, args.benchmark)
        for note in notes:
            err.print(f"[yellow]note:[/] {note}", highlight=False)
        source += f" (times and fla baseline from {args.benchmark})"

    report = build_report(profile)
    entry = None
    if args.view == "shape" and not args.shape:
        err.print("[red]report:[/] --view shape needs --shape KEY_OR_LABEL; keys: "
                  + ", ".join(e.key for e in report.entries), highlight=False)
        return 2
    if args.shape:
        try:
            entry = report.entry(args.shape)
        except ValueError as e:
            err.print(f"[red]report:[/] {e}", highlight=False)
            return 2

    if args.json:
        text = json.dumps(payload(args.view, report, profile, source, entry.key if entry else None), indent=2)
        print(text)
        return 0

    if args.export and args.export[0] not in ("html", "svg"):
        err.print(f"[red]report:[/] --export: expected html or svg, received {args.export[0]!r}", highlight=False)
        return 2
    console = console or Console(record=bool(args.export), width=args.width)
    width = args.width or console.width
    chart = not args.no_chart
    if args.view == "suite":
        views = render.view_suite(report, profile, source, width, chart)
    elif args.view == "shape":
        assert entry is not None
        views = render.view_shape(report, profile, source, width, chart, entry)
    elif args.view == "convergence":
        views = render.view_convergence(report, profile, source, width, chart, entry)
    else:
        views = render.view_coverage(report, profile, source)
    for v in views:
        console.print(v)
    if args.export:
        kind, out = args.export
        if kind == "html":
            console.save_html(out)
        else:
            console.save_svg(out, title=f"gdn2-tune report: {args.view}")
        err.print(f"wrote {out}", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m gdn2_tune.reports", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
