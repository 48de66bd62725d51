"""The subcommands of ``tune.py``: argument definitions and the library calls behind them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gdn2_tune.profiles import table
from gdn2_tune.tuner import study as study_mod
from gdn2_tune.tuner.suite import INTERPRET_SHAPE, SHAPE_SYNTAX, SUITE, parse_shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, received {value}")
    return value


def _gpus(text: str) -> tuple[int, ...]:
    try:
        gpus = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1, received {text!r}") from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative GPU indices like 0,1, received {text!r}")
    return gpus


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help=f"shapes to tune ({SHAPE_SYNTAX}); default: the benchmark suite ({len(SUITE)} shapes)")
    p.add_argument("--sampler", choices=study_mod.SAMPLERS, default="tpe",
                   help="tpe (seeded multivariate TPE, default), gp (needs scipy), cmaes (needs cmaes; all parameters "
                        "are categorical, so it falls back to per-parameter TPE), random, or grid (every feasible "
                        "point; narrow the space with --param first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=_positive_int, default=30,
                   help="evaluated trials per study, summed over resumed runs and processes (default 30; "
                        "infeasible points are free and not counted)")
    p.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="search time per study (default: 90 s on a GPU, none with --interpret); also capped by "
                        "the study's share of --budget-minutes")
    p.add_argument("--budget-minutes", type=_positive_float, default=None,
                   help="wall time for the whole run, final re-times included (default 8 on a GPU, none with "
                        "--interpret); split across the studies still to run")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: postgresql://user@host/db (shared between processes and machines), "
                        "sqlite:///path, or journal:PATH; default: a journal file under --run-dir")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where the journal, worker logs and interpreter tables go (default runs/default, "
                        "runs/interpret with --interpret); rerunning with the same run dir resumes")
    p.add_argument("--gpus", type=_gpus, default=None,
                   help="GPU indices, e.g. 0,1: one search process per GPU on the same studies")
    p.add_argument("--interpret", action="store_true",
                   help=f"run everything on the CPU through the Triton interpreter at {INTERPRET_SHAPE.label()} "
                        "(timings mean nothing; the table says so)")
    p.add_argument("--output", type=Path, default=None,
                   help="table file to write/merge into (default profiles/<device-id>.json; "
                        "<run-dir>/cpu-interpreter.json with --interpret)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2",
                   help="narrow one parameter of the space, e.g. --param chunk=64,128 (repeatable)")
    p.add_argument("--parallel", type=_positive_int, default=None,
                   help="gate/compile worker processes per GPU (default: CPU cores - 2, split across GPUs)")
    p.add_argument("--gate-timeout", type=_positive_float, default=240.0, metavar="SECONDS",
                   help="compile + correctness gate of one config before it counts as a hang (default 240)")
    p.add_argument("--time-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                   help="timing of one config before it counts as a hang (default 120)")
    p.add_argument("--top-k", type=_positive_int, default=4, help="candidates re-timed interleaved at the end")
    p.add_argument("--no-progress", action="store_true", help="no live table (logs only)")


def tune_command(args: argparse.Namespace) -> int:
    from gdn2_tune.tuner.run import RUNS_DIR, TuneOptions, tune
    from gdn2_tune.tuner.space import parse_param_choices

    if args.interpret:
        shapes = tuple(parse_shape(s) for s in args.shapes) if args.shapes else (INTERPRET_SHAPE,)
        budget, timeout = args.budget_minutes, args.timeout
    else:
        shapes = tuple(parse_shape(s) for s in args.shapes) if args.shapes else SUITE
        budget = 8.0 if args.budget_minutes is None else args.budget_minutes
        timeout = 90.0 if args.timeout is None else args.timeout
    choices = parse_param_choices(args.param)
    run_dir = args.run_dir or (RUNS_DIR / ("interpret" if args.interpret else "default"))
    options = TuneOptions(
        shapes=shapes, sampler=args.sampler, seed=args.seed, trials=args.trials, timeout_s=timeout,
        budget_minutes=budget, storage=args.storage, run_dir=run_dir, gpus=args.gpus, interpret=args.interpret,
        output=args.output, param_choices={k: tuple(v) for k, v in choices.items()}, parallel=args.parallel,
        gate_timeout_s=args.gate_timeout, time_timeout_s=args.time_timeout, top_k=args.top_k,
        progress=not args.no_progress,
    )
    result = tune(options)
    return 0 if result.profile_path is not None and result.entries else 1


# ---------------------------------------------------------------------------------------------------------------
# show / merge / export


def _load_or_complain(path: Path, console: Console) -> table.Profile | None:
    profile, warnings = table.load_profile(path)
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    return profile


def add_show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tables", nargs="*", type=Path, help="table files (default: every profiles/*.json)")


def show_command(args: argparse.Namespace) -> int:
    console = Console()
    paths = list(args.tables) or sorted(table.PROFILES_DIR.glob("*.json"))
    if not paths:
        console.print(f"no tables in {table.PROFILES_DIR}")
        return 1
    status = 0
    for path in paths:
        profile = _load_or_complain(path, console)
        if profile is None:
            status = 1
            continue
        d = profile.device
        stale = table.staleness(profile)
        title = (f"{path}: {d.name} ({d.device_id}, {d.family}, {d.sm_count} SMs), driver {d.driver}, "
                 f"torch {profile.torch_version}, triton {profile.triton_version}, {profile.created}, "
                 f"sampler {profile.sampler}" + (" [INTERPRETER: timings mean nothing]" if profile.interpret else "")
                 + (f" [STALE, still served; re-tune for best speed: {'; '.join(stale)}]" if stale else ""))
        t = Table(title=title, title_justify="left")
        for col in ("key", "config", "p50 ms", "p20-p80", "default ms", "speedup", "spread", "intra/state ms",
                    "trials", "pruned", "failed"):
            t.add_column(col)
        for e in profile.entries:
            t.add_row(
                e.key, e.config.label(), f"{e.timing.p50_ms:.4f}", f"{e.timing.p20_ms:.4f}-{e.timing.p80_ms:.4f}",
                f"{e.default_timing.p50_ms:.4f}", f"{e.speedup:.2f}x", f"{e.timing.spread:.1%}",
                "/".join(f"{e.stage_ms.get(s, float('nan')):.3f}" for s in ("intra", "state")),
                str(e.trials), str(e.pruned), str(e.failed),
            )
        console.print(t)
        covered = {e.key for e in profile.entries}
        missing = [s.label() for s in SUITE if table.entry_key("fwd", s) not in covered]
        console.print(f"suite coverage: {len(SUITE) - len(missing)}/{len(SUITE)}"
                      + (f"; missing: {', '.join(missing)}" if missing else ""), highlight=False)
    return status


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tables", nargs="+", type=Path, help="tables of one device (from several runs or machines)")
    p.add_argument("--output", "-o", type=Path, required=True, help="where to write the merged table")


def merge_command(args: argparse.Namespace) -> int:
    console = Console()
    profiles, names = [], []
    for path in args.tables:
        profile = _load_or_complain(path, console)
        if profile is None:
            console.print(f"[red]error:[/] {path} is not a usable table", highlight=False)
            return 1
        profiles.append(profile)
        names.append(str(path))
    try:
        merged, notes = table.merge_profiles(profiles, names=names)
    except ValueError as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        return 1
    for n in notes:
        console.print(n, highlight=False)
    table.save_profile(merged, args.output)
    console.print(f"wrote {args.output}: {len(merged.entries)} entries", highlight=False)
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", type=Path, help="a table file")
    p.add_argument("destination", type=Path, help="file or directory to write the validated table to")
    p.add_argument("--strict", action="store_true", help="fail on any warning (skipped entries, stale sources)")
    p.add_argument("--keep-trials", action="store_true", help="keep the study histories (default: drop them)")


def export_command(args: argparse.Namespace) -> int:
    import dataclasses

    console = Console()
    profile, warnings = table.load_profile(args.table)
    problems = list(warnings)
    if profile is not None:
        problems += [f"{args.table}: stale ({reason}): still served, re-tune for best speed"
                     for reason in table.staleness(profile)]
    if profile is not None and profile.interpret:
        problems.append(f"{args.table}: interpret: an interpreter table; its timings mean nothing")
    for w in problems:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if profile is None or (args.strict and problems):
        console.print("[red]error:[/] not exported", highlight=False)
        return 1
    dest = args.destination
    if dest.is_dir():
        dest = table.profile_path(profile.device.device_id, dest)
    if not args.keep_trials:
        profile = dataclasses.replace(profile, trials=())
    table.save_profile(profile, dest)
    console.print(f"wrote {dest}: {len(profile.entries)} entries", highlight=False)
    return 0


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune.py", description="Autotune the GDN-2 chunk kernels and manage tables.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, helptext in (
        ("tune", add_tune_arguments, "tune the kernel stages for this GPU (or --interpret) and write its table"),
        ("show", add_show_arguments, "print a table's entries and its coverage of the suite"),
        ("merge", add_merge_arguments, "combine tables of one device, keeping the faster entry per key"),
        ("export", add_export_arguments, "validate a table and write a clean copy (e.g. to ship)"),
    ):
        add(sub.add_parser(name, help=helptext, description=helptext))
    report = sub.add_parser("report", help="terminal reports from stored tables (reports.cli)")
    try:
        from gdn2_tune.reports import cli as reports_cli
    except ImportError as err:
        report.set_defaults(report_missing=str(err))
    else:
        reports_cli.add_arguments(report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = main_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "tune":
            return tune_command(args)
        if args.command == "show":
            return show_command(args)
        if args.command == "merge":
            return merge_command(args)
        if args.command == "export":
            return export_command(args)
        if args.command == "report":
            if getattr(args, "report_missing", None):
                parser.error(f"report: the reports package is not available ({args.report_missing})")
            from gdn2_tune.reports import cli as reports_cli

            return int(reports_cli.run(args))
    except ValueError as err:
        parser.error(str(err))
    raise AssertionError(f"unhandled command {args.command!r}")
