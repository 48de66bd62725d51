"""``tune.py show``: a table's header and entries, readable at any width from 40 columns and when piped.

Keys are never cut: at 110 columns and more each entry is one row of a table whose key column never wraps; below
that each entry is a short block under its full key, with values that wrap between words. ``show --json`` gives
the same content as data. Every string from the file goes through :mod:`reports.text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gdn2_tune.kernels.spec import get_spec
from gdn2_tune.profiles.table import Entry, Profile, staleness
from gdn2_tune.reports.text import plain

# The one-row-per-entry table needs about 116 columns (the 37 of a packed-batch key, eight number columns).
WIDE_COLUMNS = 120
JSON_SCHEMA = 1


def header(profile: Profile, path: Path) -> list[RenderableType]:
    d = profile.device
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    # Text, not str: rich would read a table's "[bold]" as markup.
    grid.add_row("device", Text(plain(f"{d.name} ({d.device_id}, {d.family}, {d.sm_count} SMs), driver {d.driver}")))
    grid.add_row("software", Text(plain(f"torch {profile.torch_version}, triton {profile.triton_version}")))
    grid.add_row("tuned", Text(plain(f"{profile.created} with {profile.sampler}")))
    if profile.interpret:
        grid.add_row(Text("INTERPRETER", style="bold red"), "an interpreter table: its timings mean nothing")
    for reason in staleness(profile):
        grid.add_row(Text("STALE", style="yellow"), Text(plain(f"still served; re-tune for best speed: {reason}")))
    return [Text(plain(path), style="bold"), grid]


def _config_lines(entry: Entry) -> str:
    # "C32/intra:.../state:..." is 60 characters; two lines keep it inside the 37 columns of the longest key.
    return entry.config.label().replace("/", " ", 1).replace("/", "\n")


def vs_before(entry: Entry, sep: str = " ") -> str:
    """"1.13×", "1.00× kept" when the run kept what was served before; "—" for tables that did not record it."""
    ratio = entry.vs_before
    if ratio is None or entry.incumbent is None:
        return "—"
    return f"{ratio:.2f}×" + (f"{sep}kept" if entry.kept_incumbent else "")


def wide_table(profile: Profile) -> Table:
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False, header_style="bold")
    t.add_column("key / config", no_wrap=True)
    for name in ("p50 ms\np20–p80", "default ms\nspeedup", "vs before\ntuning", "spread", "stage ms\n(each)",
                 "trials", "pruned", "failed"):
        t.add_column(name, justify="right", no_wrap=True)
    for e in profile.entries:
        t.add_row(
            Text(e.key, style="bold") + Text("\n" + _config_lines(e), style="dim"),
            f"{e.timing.p50_ms:.4f}\n{e.timing.p20_ms:.3f}–{e.timing.p80_ms:.3f}",
            f"{e.default_timing.p50_ms:.4f}\n{e.speedup:.2f}×", vs_before(e, "\n"), f"{e.timing.spread:.1%}",
            # One line per stage of the entry's op, in pipeline order (the forward: intra, then state).
            "\n".join(f"{e.stage_ms[s]:.3f}" if s in e.stage_ms else "—" for s in get_spec(e.stage).stages),
            str(e.trials), str(e.pruned), str(e.failed), end_section=True,
        )
    return t


def entry_block(e: Entry) -> RenderableType:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("config", e.config.label().replace("/", " / "))
    grid.add_row("p50", f"{e.timing.p50_ms:.4f} ms (p20–p80 {e.timing.p20_ms:.4f}–{e.timing.p80_ms:.4f}, "
                        f"spread {e.timing.spread:.1%})")
    grid.add_row("default", f"{e.default_timing.p50_ms:.4f} ms: tuned is {e.speedup:.2f}× faster")
    if e.incumbent is not None and e.vs_before is not None:
        verdict = ("kept: nothing beat it beyond the spread or in every round" if e.kept_incumbent
                   else f"tuned is {e.vs_before:.2f}× as fast")
        grid.add_row("before", Text(plain(f"{e.incumbent.timing.p50_ms:.4f} ms served before tuning "
                                          f"({e.incumbent.describe()}); {verdict}")))
    grid.add_row("stages", ", ".join(f"{stage} {ms:.3f} ms" for stage, ms in sorted(e.stage_ms.items())))
    grid.add_row("trials", f"{e.trials} timed, {e.pruned} pruned, {e.failed} failed")
    return Group(Text(e.key, style="bold"), grid, Text(""))


def coverage_line(profile: Profile, suite: Sequence[tuple[str, str]]) -> Text:
    """``suite`` = (key, shape label) of each suite shape."""
    covered = {e.key for e in profile.entries}
    missing = [label for key, label in suite if key not in covered]
    return Text(f"suite coverage: {len(suite) - len(missing)}/{len(suite)}"
                + (f"; missing: {', '.join(missing)}" if missing else ""))


def show_view(profile: Profile, path: Path, width: int, suite: Sequence[tuple[str, str]]) -> list[RenderableType]:
    out = header(profile, path)
    if not profile.entries:
        out.append(Text("no entries", style="yellow"))
    elif width >= WIDE_COLUMNS:
        out.append(wide_table(profile))
    else:
        out.append(Text(""))
        out += [entry_block(e) for e in profile.entries]
    out.append(coverage_line(profile, suite))
    return out


def show_dict(profile: Profile, path: Path, suite: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``show --json``: the table as stored (its own JSON form, less the trial history) plus what show derives."""
    covered = {e.key for e in profile.entries}
    data = profile.to_dict()
    data.pop("trials", None)
    return {
        "schema": JSON_SCHEMA,
        "path": str(path),
        "stale": list(staleness(profile)),
        "table": data,
        "vs_before_tuning": {e.key: e.vs_before for e in profile.entries},
        "suite_missing": [label for key, label in suite if key not in covered],
    }
