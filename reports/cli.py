"""``python tune.py report`` (tune.py wires ``add_arguments`` and ``run``) and ``python -m gdn2_tune.reports``.

Profile lookup, in order: ``--profile PATH``; the table the dispatcher serves on this machine (``GDN2_PROFILE``, this
GPU's own table, a table of its architecture family: :func:`profiles.dispatch.serving_tables`), said in the report
with how it was chosen; the shipped H100 table (so a fresh clone on a laptop renders something real).

Nothing here launches a kernel or imports the tuner: ``python tune.py measure`` re-times a table on a GPU and stores
the result as a table, which ``--profile`` then renders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from gdn2_tune.profiles import dispatch
from gdn2_tune.profiles.table import PROFILES_DIR, Profile, Timing, load_profile, profile_path
from gdn2_tune.reports import export, render
from gdn2_tune.reports.roofline import Report, build_report
from gdn2_tune.reports.text import markup, plain

VIEWS = ("suite", "shape", "convergence", "coverage")
# The table a machine with no GPU (or a GPU with no table) falls back to: the one every release ships.
SHIPPED_FALLBACK = "h100-80gb-hbm3"
JSON_SCHEMA = 1


MIN_WIDTH = 40


def _width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of columns, received {text!r}") from None
    if value < MIN_WIDTH:
        raise argparse.ArgumentTypeError(f"expected at least {MIN_WIDTH} columns, received {value}")
    return value


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
                        help="also write the rendered view as html or svg (missing directories are created; an "
                             "existing file is replaced only if it is an earlier export)")
    parser.add_argument("--force", action="store_true", help="let --export overwrite a file that is not an export")
    parser.add_argument("--no-chart", action="store_true", help="tables only")
    parser.add_argument("--width", type=_width, default=None, help="terminal width to render for (at least 40)")
    # Measuring moved to the tuner (reports/ launches nothing); the flag stays only to say where it went.
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
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


@dataclass(frozen=True)
class Serving:
    """Which table a report renders when no ``--profile`` is given, and why: on a GPU without a table of its own
    the user must learn that the numbers are another GPU's, and that ``tune.py tune`` makes a table for this one."""

    path: Path | None
    source: str  # dispatch.SOURCES' "user", "own", "family", or "fallback" (no table serves this machine)
    why: str
    advice: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": None if self.path is None else str(self.path), "source": self.source, "why": self.why,
                "advice": self.advice}


TUNE_ADVICE = "run `python tune.py tune` on this GPU to tune it and write its own table"


def default_profile(root: Path = PROFILES_DIR) -> Serving:
    """The table the dispatcher serves on this machine first (from ``dispatch.SHIPPED_DIR``), else the shipped H100
    table in ``root``; see :class:`Serving`."""
    with warnings.catch_warnings():
        # The dispatcher's warnings (a stale or missing table) are for a running op; the report says it its way.
        warnings.simplefilter("ignore", dispatch.TableWarning)
        device = dispatch.running_device()
        tables = dispatch.serving_tables()
    here = "no GPU here" if device is None else f"this GPU ({device.device_id}, {device.family})"
    for source, path in tables:
        if source == "user":
            return Serving(path, source, f"{dispatch.ENV_PROFILE} names it; the dispatcher serves it first", None)
        if source == "own":
            return Serving(path, source, f"the shipped table of {here}", None)
        if source == "family":
            assert device is not None
            return Serving(path, source,
                           f"{here} has no table of its own; the dispatcher serves this table of another "
                           f"{device.family} GPU (family fallback), and for a shape without its own key the "
                           "nearest bucket's entry", TUNE_ADVICE)
    candidates = [profile_path(SHIPPED_FALLBACK, root), *sorted(Path(root).glob("h100*.json"))]
    fallback = next((c for c in candidates if c.is_file()), None)
    served = ("" if device is None else
              "; no table serves it, so the dispatcher launches the built-in default configs")
    advice = None if device is None else TUNE_ADVICE
    if fallback is None:
        return Serving(None, "fallback", f"{here}{served}; no shipped H100 table in {root} either", advice)
    return Serving(fallback, "fallback", f"{here}{served}; showing the shipped H100 table for reference", advice)


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
    err = Console(stderr=True, soft_wrap=True)

    def fail(message: str) -> int:
        err.print(f"report: error: {markup(message)}", highlight=False)
        return 2

    if args.measure:
        return fail("--measure moved to the tuner: run `python tune.py measure --output FILE.json` on the GPU, "
                    "then `python tune.py report --profile FILE.json`")
    if args.export:
        kind, out = args.export[0], Path(args.export[1])
        if kind not in export.EXPORT_KINDS:
            return fail(f"--export: expected html or svg, received {kind!r}")
        try:
            export.check_output(out, ours=export.is_export, what="report export", force=args.force)
        except export.OutputError as e:
            return fail(f"--export: {e}")
    serving = None
    path: Path | None = args.profile
    if path is None:
        serving = default_profile()
        if serving.path is None:
            return fail(f"no table to show ({serving.why}); pass --profile PATH")
        path = serving.path
        source = str(path)  # why this one is said once, in the "serving:" line above the report
    else:
        source = str(path)
    profile, problems = load_profile(path)
    # An unusable table's last problem says why; the one line of the error.
    for w in problems if profile is not None else problems[:-1]:
        err.print(f"[yellow]warning:[/] {markup(w)}", highlight=False)
    if profile is None:
        return fail(problems[-1] if problems else f"cannot use {path}")
    if args.benchmark is not None:
        profile, notes = with_benchmark(profile, args.benchmark)
        for note in notes:
            err.print(f"[yellow]note:[/] {markup(note)}", highlight=False)
        source += f" (times and fla baseline from {args.benchmark})"

    report = build_report(profile)
    entry = None
    if args.view == "shape" and not args.shape:
        return fail("--view shape needs --shape KEY_OR_LABEL; keys: " + ", ".join(e.key for e in report.entries))
    if args.shape:
        try:
            entry = report.entry(args.shape)
        except ValueError as e:
            return fail(str(e))

    if args.json:
        doc = payload(args.view, report, profile, source, entry.key if entry else None)
        if serving is not None:
            doc["serving"] = serving.to_dict()
        print(json.dumps(doc, indent=2))
        return 0

    console = console or Console(record=bool(args.export), width=args.width)
    width = args.width or console.width
    chart = not args.no_chart
    if serving is not None:
        console.print(Text(plain(f"serving: {serving.path}: {serving.why}"), style="yellow"))
        if serving.advice:
            console.print(Text(f"advice: {serving.advice}", style="yellow"))
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
        kind, out = args.export[0], Path(args.export[1])
        if kind == "html":
            text = console.export_html()
        else:
            text = console.export_svg(title=f"gdn2-tune report: {args.view}")
        try:
            export.write_text(out, export.mark(kind, text))
        except OSError as e:
            return fail(f"--export: cannot write {out} ({e.strerror or e}); choose another path")
        err.print(f"wrote {markup(out)}", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m gdn2_tune.reports", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
