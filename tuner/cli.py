"""The subcommands of ``tune.py``: argument definitions and the library calls behind them.

What a user sees when something goes wrong is decided here, once, in :func:`main`: a mistake they can fix (a bad
argument, a path that cannot be written, no GPU) is one line on stderr saying what to do, with exit code 2; an
internal error is one line too, with exit code 1, and ``--debug`` shows the traceback; Ctrl-C says where the run
is kept and the command that resumes it, with exit code 130. Every argument is checked before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console

from gdn2_tune.kernels.spec import DEFAULT_OP, get_spec, registered
from gdn2_tune.profiles import table
from gdn2_tune.reports import show as show_view
from gdn2_tune.reports.export import OutputError, check_output
from gdn2_tune.reports.text import markup, plain
from gdn2_tune.tuner import study as study_mod
from gdn2_tune.tuner.suite import INTERPRET_SHAPE, SHAPE_SYNTAX, SUITE, parse_shape

if TYPE_CHECKING:
    from gdn2_tune.tuner.run import TuneOptions

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
# What shells report for a process ended by SIGINT (128 + 2); scripts wrapping tune.py test for it.
EXIT_INTERRUPTED = 130
# Our own messages quote paths and commands; a table's strings inside them are cut far shorter (reports.text).
MESSAGE_CHARS = 2000
# The journal file of a run dir when --storage is not given (tuner.study.open_storage names it the same).
JOURNAL_NAME = "studies.journal.log"


def _stderr() -> Console:
    # soft_wrap: a message stays one line (the terminal wraps it), so that it can be read by grep and by scripts.
    return Console(stderr=True, soft_wrap=True)


class UsageError(ValueError):
    """A mistake on the command line or in the environment that the user can fix; the message says how."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; one line naming the command and ``--help`` reads better."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    p.add_argument("--op", default=DEFAULT_OP, metavar="OP[,OP...]",
                   help=f"the registered op(s) to tune, of {[spec.name for spec in registered()]}, comma-separated, "
                        f"or 'all' (default {DEFAULT_OP}); each op's spec gives the space, the suite and what is "
                        "timed. Several ops run one after another into one table, sharing --budget-minutes evenly")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help=f"shapes to tune ({SHAPE_SYNTAX}); default: the op's suite ({len(SUITE)} shapes for "
                        f"{DEFAULT_OP})")
    p.add_argument("--sampler", choices=study_mod.SAMPLERS, default="tpe",
                   help="tpe (seeded multivariate TPE, default), gp (needs scipy), cmaes (needs cmaes; all parameters "
                        "are categorical, so it falls back to per-parameter TPE), random, or grid (every feasible "
                        "point; narrow the space with --param first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=_positive_int, default=30,
                   help="evaluated trials per study, summed over resumed runs and processes (default 30; "
                        "infeasible points are free and not counted)")
    p.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="search time per study (default: 90 s, none with --interpret); also capped by the "
                        "study's share of --budget-minutes")
    p.add_argument("--budget-minutes", type=_positive_float, default=None,
                   help="wall time for the whole run, final re-times included (default 8 on one GPU, 8/N with N "
                        "GPUs, none with --interpret); split across the studies still to run")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: postgresql://user@host/db (shared between processes and machines), "
                        "sqlite:///path, or journal:PATH; default: a journal file under --run-dir")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where the journal, worker logs and interpreter tables go (default runs/default, "
                        "runs/interpret with --interpret); rerunning with the same run dir resumes")
    p.add_argument("--gpus", type=_gpus, default=None,
                   help="GPU indices, e.g. 0,1: one search process per GPU, each taking the next study no GPU "
                        "has started (N studies at once)")
    p.add_argument("--interpret", action="store_true",
                   help=f"run everything on the CPU through the Triton interpreter at {INTERPRET_SHAPE.label()} "
                        "(timings mean nothing; the table says so)")
    p.add_argument("--output", type=Path, default=None,
                   help="table file to write/merge into (default profiles/<device-id>.json; "
                        "<run-dir>/cpu-interpreter.json with --interpret)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2",
                   help="narrow one parameter of the space, e.g. --param chunk=64,128 (repeatable)")
    p.add_argument("--parallel", type=_positive_int, default=None,
                   help="gate/compile worker processes per GPU (default: the cores this process may use - 2, split across GPUs)")
    p.add_argument("--gate-timeout", type=_positive_float, default=240.0, metavar="SECONDS",
                   help="compile + correctness gate of one config before it counts as a hang (default 240)")
    p.add_argument("--time-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                   help="timing of one config before it counts as a hang (default 120)")
    p.add_argument("--top-k", type=_positive_int, default=4, help="candidates re-timed interleaved at the end")
    p.add_argument("--no-progress", action="store_true", help="no live table (logs only)")
    p.add_argument("--force", action="store_true", help="let --output replace a file that is not a table")


def _check_directory(path: Path, flag: str) -> None:
    """``path`` is, or can be created as, a writable directory."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {path} is a file, expected a directory; choose another path")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot create or write {path} ({existing} is not a writable directory); "
                         "choose another path")


def _journal(storage: str | None, run_dir: Path) -> Path | None:
    """The journal file of the run, or None for a database storage."""
    if storage is None:
        return run_dir / JOURNAL_NAME
    if storage.startswith("journal:") or storage.endswith(".log"):
        return Path(storage.removeprefix("journal:"))
    return None


# The default search budget, in GPU time: a run on N GPUs gets 1/N of it as wall time.
DEFAULT_BUDGET_GPU_MINUTES = 8.0
DEFAULT_STUDY_GPU_SECONDS = 90.0


def _require_gpus(gpus: tuple[int, ...] | None) -> None:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("no CUDA GPU found (torch sees none); to try the whole flow on the CPU, run "
                         "`python tune.py tune --interpret`")
    count = torch.cuda.device_count()
    if gpus and max(gpus) >= count:
        raise UsageError(f"--gpus: expected indices below {count} (this machine has {count} GPU"
                         f"{'s' if count != 1 else ''}), received {','.join(map(str, gpus))}")


def tune_ops(args: argparse.Namespace) -> tuple[str, ...]:
    """The ops ``--op`` names, in its order (``all``: every registered op); UsageError for an unknown one, or for
    --shapes or --param with several ops (their values belong to one op's space and shapes)."""
    names = ([spec.name for spec in registered()] if args.op.strip() == "all"
             else [name.strip() for name in args.op.split(",") if name.strip()])
    if not names:
        raise UsageError(f"--op: expected an op name, a comma-separated list or 'all', received {args.op!r}")
    for name in names:
        try:
            get_spec(name)
        except ValueError as err:
            raise UsageError(f"--op: {str(err).removeprefix('op: ')}") from None
    if len(names) > 1 and (args.shapes or args.param):
        flag = "--shapes" if args.shapes else "--param"
        raise UsageError(f"{flag}: applies to one op, received --op {','.join(names)}; tune the ops one at a time")
    return tuple(dict.fromkeys(names))


def tune_options(args: argparse.Namespace, op: str | None = None) -> TuneOptions:
    """The run's :class:`tuner.run.TuneOptions` for ``op`` (default: ``--op``, one op), after every check that
    needs no GPU time (raises UsageError)."""
    from gdn2_tune.tuner.run import RUNS_DIR, TuneOptions
    from gdn2_tune.tuner.space import parse_param_choices

    try:
        spec = get_spec(args.op if op is None else op)
    except ValueError as err:
        raise UsageError(f"--op: {str(err).removeprefix('op: ')}") from None
    if args.interpret:
        shapes = tuple(parse_shape(s) for s in args.shapes) if args.shapes else (spec.interpret_shape,)
        budget, timeout = args.budget_minutes, args.timeout
        if args.gpus:
            raise UsageError("--gpus: not with --interpret (the interpreter runs on the CPU); drop one of them")
    else:
        shapes = tuple(parse_shape(s) for s in args.shapes) if args.shapes else spec.suite
        # The budget is GPU time: with --gpus 0,1 two studies are searched at once, one per GPU, so the run takes
        # half the wall time (benchmarks/halving.py measures it). A study is searched on one GPU, so its own limit
        # stays the same.
        gpus = len(args.gpus or ()) or 1
        budget = DEFAULT_BUDGET_GPU_MINUTES / gpus if args.budget_minutes is None else args.budget_minutes
        timeout = DEFAULT_STUDY_GPU_SECONDS if args.timeout is None else args.timeout
    choices = parse_param_choices(args.param, spec.name)
    run_dir = args.run_dir or (RUNS_DIR / ("interpret" if args.interpret else "default"))
    _check_directory(run_dir, "--run-dir")
    if args.storage is not None:
        journal = _journal(args.storage, run_dir)
        if journal is None and "://" not in args.storage:
            raise UsageError(f"--storage: expected postgresql://user@host/db, sqlite:///path or journal:PATH, "
                             f"received {args.storage!r}")
        if journal is not None:
            _check_output("--storage", journal, ours=lambda _: True, force=False)
    if args.output is not None:
        _check_output("--output", args.output, ours=_is_table, force=args.force)
    elif not args.interpret:
        _check_directory(table.PROFILES_DIR, "the default --output directory")
    if not args.interpret:
        _require_gpus(args.gpus)
    return TuneOptions(
        shapes=shapes, sampler=args.sampler, seed=args.seed, trials=args.trials, timeout_s=timeout,
        budget_minutes=budget, storage=args.storage, run_dir=run_dir, gpus=args.gpus, interpret=args.interpret,
        output=args.output, param_choices={k: tuple(v) for k, v in choices.items()}, parallel=args.parallel,
        gate_timeout_s=args.gate_timeout, time_timeout_s=args.time_timeout, top_k=args.top_k, op=spec.name,
        progress=not args.no_progress,
    )


def _program() -> str:
    """How the user started us, for the commands we suggest: ``python tune.py`` or the ``gdn2-tune`` script."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name == "gdn2-tune" else "python tune.py"


def interrupted_message(options: TuneOptions, argv: Sequence[str]) -> str:
    """Where an interrupted run is kept and the exact command that resumes it (the same command: a run resumes
    from its run dir, or from --storage, and counts the trials it finds there)."""
    run_dir = Path(options.run_dir)
    journal = _journal(options.storage, run_dir)
    kept = f"the studies are kept in {journal or options.storage}"
    command = [*shlex.split(_program()), *argv]
    if "--run-dir" not in argv and not any(a.startswith("--run-dir=") for a in argv):
        command += ["--run-dir", str(run_dir)]
    return f"interrupted: {kept} (run dir {run_dir}); resume with: {shlex.join(command)}"


def study_weight(options: TuneOptions) -> float:
    """How much of a budget shared by several ops ``options``' studies need: a study counts as one share, or as the
    fraction of ``--trials`` its whole space amounts to when smaller (a two-point algorithm study needs two trials,
    not thirty). The space's size before its constraints bounds the feasible count; counting those exactly takes
    ~40 s for the backward on a CPU. An even split per op gave the 9 forward shapes ~9 s each on an H200
    (2026-11-30) while the two-point algorithm studies finished in seconds."""
    return len(options.shapes) * min(options.trials, options.space().size()) / options.trials


def tune_command(args: argparse.Namespace) -> int:
    from gdn2_tune.tuner.run import tune

    ops = tune_ops(args)
    runs = [tune_options(args, op) for op in ops]  # every check before any GPU time
    weights = [study_weight(o) for o in runs]
    code = 0
    started = time.monotonic()
    for i, options in enumerate(runs):
        if len(runs) > 1 and options.budget_minutes is not None:
            # What is left of the budget goes to this op by its share of the remaining studies' weight, so time
            # an earlier op did not use flows on to the later ones.
            left = max(0.0, options.budget_minutes - (time.monotonic() - started) / 60)
            options = dataclasses.replace(options, budget_minutes=left * weights[i] / sum(weights[i:]))
        try:
            result = tune(options)
        except KeyboardInterrupt:
            if args.debug:
                raise
            _stderr().print(markup(interrupted_message(options, args.argv), MESSAGE_CHARS), highlight=False)
            return EXIT_INTERRUPTED
        # Each op's run merges into the same output table, leaving the other ops' entries as they are.
        code = code or (0 if result.profile_path is not None and result.entries else 1)
    return code


def add_measure_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=Path, default=None,
                   help="table whose entries to re-time (default: what `tune.py report` shows on this machine)")
    p.add_argument("--output", "-o", type=Path, default=None,
                   help="where to store the measured table (default runs/measured/<table name>.json)")
    p.add_argument("--force", action="store_true", help="let --output replace a file that is not a table")


def measure_command(args: argparse.Namespace) -> int:
    """Re-time a table's entries and the roofs on this GPU; store them as a table that ``report`` renders."""
    from gdn2_tune.reports.cli import default_profile
    from gdn2_tune.tuner.remeasure import measure_profile
    from gdn2_tune.tuner.run import RUNS_DIR

    err = _stderr()
    path = args.profile
    if path is None:
        path = default_profile().path
        if path is None:
            raise UsageError("no table to measure; pass --profile PATH")
    output = args.output or RUNS_DIR / "measured" / path.name
    _check_output("--output", output, ours=_is_table, force=args.force)
    _require_gpus(None)
    profile = _load(path, err)
    measured = measure_profile(profile, lambda w: err.print(f"[yellow]warning:[/] {markup(w)}", highlight=False))
    table.save_profile(measured, output)
    err.print(markup(f"wrote {output}: {len(measured.entries)} entries measured now; render it with "
                     f"`{_program()} report --profile {shlex.quote(str(output))}`", MESSAGE_CHARS), highlight=False)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# show / merge / export


def _load_or_complain(path: Path, console: Console) -> table.Profile | None:
    """For show, which goes on to the next table: the table after its warnings (skipped entries), or None after
    one error line saying why it is unusable."""
    profile, warnings = table.load_profile(path)
    for w in warnings if profile is not None else warnings[:-1]:
        console.print(f"[yellow]warning:[/] {markup(w)}", highlight=False)
    if profile is None:
        console.print(f"tune.py show: error: {markup(warnings[-1] if warnings else f'{path}: not a usable table')}",
                      highlight=False)
    return profile


def _load(path: Path, console: Console) -> table.Profile:
    """The table, after printing its warnings; :class:`UsageError` saying why if it is unusable."""
    profile, warnings = table.load_profile(path)
    for w in warnings if profile is not None else warnings[:-1]:
        console.print(f"[yellow]warning:[/] {markup(w)}", highlight=False)
    if profile is None:
        raise UsageError(warnings[-1] if warnings else f"{path}: not a usable table")
    return profile


def _check_output(flag: str, path: Path, *, ours: Callable[[Path], bool], force: bool) -> None:
    try:
        check_output(path, ours=ours, what="table", force=force)
    except OutputError as e:
        raise UsageError(f"{flag}: {e}") from None


def _is_table(path: Path) -> bool:
    """Whether ``path`` holds a config table (valid or not): what --output may overwrite without --force."""
    try:
        if path.stat().st_size > table.MAX_TABLE_BYTES:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "schema_version" in data and "entries" in data


def _suite_keys(profile: table.Profile) -> list[tuple[str, str]]:
    """(key, label) of each suite shape of the table's op: what `show` counts as covered or missing."""
    op = get_spec(table.table_op(profile.entries))
    return [(table.entry_key(op.name, s), s.label()) for s in op.suite]


def add_show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tables", nargs="*", type=Path, help="table files (default: every profiles/*.json)")
    p.add_argument("--json", action="store_true", help="print the tables as JSON (one document, a list of tables)")
    p.add_argument("--width", type=int, default=None,
                   help="columns to lay out for (default: the terminal's, 80 when piped)")


def show_command(args: argparse.Namespace) -> int:
    console = Console(width=args.width)
    err = _stderr()
    paths = list(args.tables) or sorted(table.PROFILES_DIR.glob("*.json"))
    if not paths:
        raise UsageError(f"no tables in {table.PROFILES_DIR}; name table files, e.g. tune.py show PATH.json")
    status = 0
    docs = []
    for path in paths:
        profile = _load_or_complain(path, err)
        if profile is None:
            status = 1
            continue
        if args.json:
            docs.append(show_view.show_dict(profile, path, _suite_keys(profile)))
            continue
        for renderable in show_view.show_view(profile, path, console.width, _suite_keys(profile)):
            console.print(renderable, highlight=False)
    if args.json:
        print(json.dumps(docs, indent=2))
    return status


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tables", nargs="+", type=Path, help="tables of one device (from several runs or machines)")
    p.add_argument("--output", "-o", type=Path, required=True, help="where to write the merged table")
    p.add_argument("--force", action="store_true", help="let --output replace a file that is not a table")


def merge_command(args: argparse.Namespace) -> int:
    _check_output("--output", args.output, ours=_is_table, force=args.force)
    err = _stderr()
    profiles, names = [], []
    for path in args.tables:
        profiles.append(_load(path, err))
        names.append(str(path))
    merged, notes = table.merge_profiles(profiles, names=names)
    out = Console(soft_wrap=True)  # what was kept and written is the command's output; warnings go to stderr
    for n in notes:
        out.print(markup(n), highlight=False)
    table.save_profile(merged, args.output)
    out.print(markup(f"wrote {args.output}: {len(merged.entries)} entries"), highlight=False)
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", type=Path, help="a table file")
    p.add_argument("destination", type=Path, help="file or directory to write the validated table to")
    p.add_argument("--strict", action="store_true", help="fail on any warning (skipped entries, stale sources)")
    p.add_argument("--keep-trials", action="store_true", help="keep the study histories (default: drop them)")
    p.add_argument("--force", action="store_true", help="let the destination replace a file that is not a table")


def export_command(args: argparse.Namespace) -> int:
    err = _stderr()
    dest = args.destination
    if not dest.is_dir():
        # Checked before loading when the name is known; a directory's file name comes from the table's device.
        _check_output("destination", dest, ours=_is_table, force=args.force)
    profile, warnings = table.load_profile(args.table)
    if profile is None:
        for w in warnings[:-1]:
            err.print(f"[yellow]warning:[/] {markup(w)}", highlight=False)
        raise UsageError(f"{warnings[-1] if warnings else args.table}; not exported")
    problems = list(warnings)
    problems += [f"{args.table}: stale ({reason}): still served, re-tune for best speed"
                 for reason in table.staleness(profile)]
    if profile.interpret:
        problems.append(f"{args.table}: interpret: an interpreter table; its timings mean nothing")
    for w in problems:
        err.print(f"[yellow]warning:[/] {markup(w)}", highlight=False)
    if args.strict and problems:
        raise UsageError("not exported: --strict and the warnings above")
    if dest.is_dir():
        dest = table.profile_path(profile.device.device_id, dest)
        _check_output("destination", dest, ours=_is_table, force=args.force)
    if not args.keep_trials:
        profile = dataclasses.replace(profile, trials=())
    table.save_profile(profile, dest)
    Console(soft_wrap=True).print(markup(f"wrote {dest}: {len(profile.entries)} entries"), highlight=False)
    return 0


def main_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tune.py", description="Autotune the GDN-2 chunk kernels and manage tables.")
    debug_help = "show the full traceback of an error (by default: one line)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    commands: list[tuple[str, Callable[[argparse.ArgumentParser], object], str]] = [
        ("tune", add_tune_arguments, "tune the kernel stages for this GPU (or --interpret) and write its table"),
        ("show", add_show_arguments, "print a table's entries and its coverage of the suite"),
        ("merge", add_merge_arguments, "combine tables of one device, keeping the faster entry per key"),
        ("export", add_export_arguments, "validate a table and write a clean copy (e.g. to ship)"),
        ("measure", add_measure_arguments,
         "(GPU) re-time a table's configs on this GPU now and store the times as a table for `report --profile`"),
    ]
    for name, add, helptext in commands:
        p = sub.add_parser(name, help=helptext, description=helptext)
        add(p)
        # Also after the command (tune.py tune --debug); SUPPRESS keeps a --debug given before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    report = sub.add_parser("report", help="terminal reports from stored tables (reports.cli)")
    from gdn2_tune.reports import cli as reports_cli

    reports_cli.add_arguments(report)
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def run_command(args: argparse.Namespace) -> int:
    if args.command == "report":
        from gdn2_tune.reports import cli as reports_cli

        return int(reports_cli.run(args))
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "tune": tune_command, "show": show_command, "merge": merge_command, "export": export_command,
        "measure": measure_command,
    }
    return handlers[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = main_parser().parse_args(argv)
    # The command's own arguments, for the resume command of an interrupted run.
    args.argv = argv[argv.index(args.command):] if args.command in argv else argv
    err = _stderr()
    try:
        return run_command(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        err.print(f"tune.py {args.command}: interrupted", highlight=False)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as e:
        # ValueError: what the library raises for arguments it rejects (shapes, --param, table contents);
        # OSError: a path that cannot be read or written. Both are the user's to fix, and the message says how.
        if args.debug:
            raise
        err.print(markup(f"tune.py {args.command}: error: {_describe(e)}", MESSAGE_CHARS), highlight=False)
        return EXIT_USER_ERROR
    except Exception as e:
        if args.debug:
            raise
        err.print(markup(f"tune.py {args.command}: internal error: {type(e).__name__}: {_describe(e)} "
                         f"(run again with --debug for the traceback)", MESSAGE_CHARS), highlight=False)
        return EXIT_INTERNAL_ERROR


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return plain(e, MESSAGE_CHARS)
