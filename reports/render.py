"""Rich renderables for the report views; plotext draws the roofline chart. No kernel launches, no GPU.

Each view is a function ``Report (+ Profile) -> list of rich renderables``, so the CLI can print them, record
them for ``--export`` and tests can render them into a string and read what they say.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gdn2_tune.profiles.table import Profile, TrialRecord, staleness
from gdn2_tune.reports.roofline import TOTAL, EntryModel, Report, StagePoint
from gdn2_tune.reports.text import plain

UNKNOWN = "unknown architecture"
NA = "—"
CHART_HEIGHT = 22
CHART_MAX_WIDTH = 110
# Markers of the chart: a stage's initial, upper case for the tuned config, lower case for the default ("I", "s",
# "T" for the total), B for the baseline. Any op's stages get one, so the chart needs no table of stage names.


def marker(which: str, stage: str) -> str:
    letter = stage[:1] or "?"
    return letter.upper() if which == "tuned" else letter.lower()
BASELINE_MARKER = "B"
# A failure reason is a compiler or worker message; its first line or two say what went wrong.
REASON_CHARS = 160


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def ms(value: float | None) -> str:
    return NA if value is None else f"{value:.3f}"


def ratio(value: float | None) -> str:
    return NA if value is None else f"{value:.2f}×"


def pct(value: float | None, report: Report) -> str:
    if value is not None:
        return f"{value:.0f}%"
    return UNKNOWN if _roofs_unknown(report) else NA


def si(value: float | None, unit: str) -> str:
    """3 significant digits with a G/T prefix: 1.07 GB, 112 GFLOP."""
    if value is None:
        return NA
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _roofs_unknown(report: Report) -> bool:
    """No compute roof at all: neither measured nor from the per-SM table."""
    return report.roofs.bf16_tflops is None and report.roofs.tf32_tflops is None


def _roof_cell(value: float | None, unit: str, report: Report, theoretical: bool) -> str:
    if value is not None:
        return f"{value:,.0f} {unit}"
    if theoretical and unit != "GB/s" and report.peaks.reason:
        return UNKNOWN
    return NA


# ---------------------------------------------------------------------------------------------------------------
# Header: the device and its roofs


def header(report: Report, profile: Profile, source: str) -> RenderableType:
    roofs = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    roofs.add_column("roof")
    roofs.add_column("measured", justify="right")
    roofs.add_column("theoretical", justify="right")
    measured = report.measured
    rows = (
        ("memory (copy, read + write)", "memory_gbps", "GB/s"),
        ("bf16 tensor core", "bf16_tflops", "TFLOP/s"),
        ("tf32 tensor core", "tf32_tflops", "TFLOP/s"),
        ("fp32 FMA", "fp32_tflops", "TFLOP/s"),
    )
    for label, name, unit in rows:
        roofs.add_row(
            label,
            _roof_cell(getattr(measured, name) if measured else None, unit, report, theoretical=False),
            _roof_cell(getattr(report.theoretical, name), unit, report, theoretical=True),
        )
    lines = [
        # Every string here may come from the table file: plain() keeps escape sequences off the terminal.
        Text.assemble(("device ", "dim"), (plain(f"{report.device} ({report.family})"), "bold")),
        Text.assemble(("profile ", "dim"), plain(source), ("  created ", "dim"), plain(profile.created),
                      ("  torch ", "dim"), plain(profile.torch_version), ("  triton ", "dim"),
                      plain(profile.triton_version)),
        Text.assemble(("roofs used ", "dim"), plain(report.roofs.source), ("  peaks ", "dim"),
                      plain(report.peaks.source)),
    ]
    if profile.interpret:
        lines.append(Text("tuned through the Triton interpreter: its times mean nothing", style="bold red"))
    if report.note:
        lines.append(Text(plain(report.note), style="yellow"))
    return Panel(Group(*lines, roofs), title="gdn2-tune report", expand=False)


# ---------------------------------------------------------------------------------------------------------------
# Suite view


def _two_line_label(label: str) -> str:
    """``B8-T4096-H16-K128-V128-bf16`` on two lines, batch and heads above the head dims: the widest cell of the
    suite table halves, so that it fits 80 columns without cutting a label."""
    head, sep, tail = label.partition("-K")
    return f"{head}\n{sep[1:]}{tail}" if sep else label


# Below this many columns the suite table puts each shape label on two lines.
NARROW_COLUMNS = 100


def suite_table(report: Report, profile: Profile | None = None, width: int = NARROW_COLUMNS) -> Table:
    table = Table(title="suite: forward per shape (medians, ms)", header_style="bold", box=box.SIMPLE_HEAD,
                  padding=(0, 1), collapse_padding=True, pad_edge=False)
    before = {e.key: e.vs_before for e in profile.entries} if profile is not None else {}
    # Columns with nothing to say for any entry are left out (most tables have no fla time and older ones no
    # "before tuning"): a narrower table that fits 80 columns reads better than a column of dashes.
    has_fla = any(e.baseline is not None for e in report.entries)
    has_before = any(v is not None for v in before.values())
    columns: list[tuple[str, str]] = [("shape", "left"), ("tuned", "right"), ("default", "right")]
    columns += [("fla", "right")] if has_fla else []
    columns += [("vs\ndefault", "right")]
    columns += [("vs\nfla", "right")] if has_fla else []
    columns += [("vs before\ntuning", "right")] if has_before else []
    columns += [("% of\nroof", "right"), ("binding\nroof", "left"), ("op\nfloor", "right")]
    for name, justify in columns:
        # fold, never an ellipsis: a cut label or number is worse than a cell on two lines.
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for e in report.entries:
        tuned, default = e.point(TOTAL), e.point(TOTAL, "default")
        label = e.shape.label()
        cells = [_two_line_label(label) if width < NARROW_COLUMNS else label, ms(tuned.time_ms if tuned else None),
                 ms(default.time_ms if default else None)]
        cells += [ms(e.baseline.time_ms if e.baseline else None)] if has_fla else []
        cells += [ratio(e.speedup)]
        cells += [ratio(e.speedup_baseline)] if has_fla else []
        cells += [ratio(before.get(e.key))] if has_before else []
        cells += [pct(tuned.pct_roof if tuned else None, report), _short_bound(tuned.bound if tuned else None, report),
                  ms(e.op_floor_ms)]
        table.add_row(*cells, end_section=width < NARROW_COLUMNS)
    table.caption = ("vs = speedup of the tuned config"
                     + (" (before tuning: over what this GPU was served before the run, timed in the same run)"
                        if has_before else "")
                     + "; % of roof = the binding roof's floor time / measured time for the whole call (TC: tensor "
                     "cores); op floor = inputs read once + output written once at the memory roof")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Shape view


def _short_bound(bound: str | None, report: Report) -> str:
    if bound is None:
        return UNKNOWN if _roofs_unknown(report) else NA
    return bound.replace(" tensor core", " TC").replace(" CUDA cores", " CUDA")


def shape_table(report: Report, e: EntryModel) -> Table:
    table = Table(title=f"{e.shape.label()}  ({e.key})", header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1),
                  collapse_padding=True, pad_edge=False)
    # Two-line headers keep the table inside 100 columns.
    cols = ("", "stage", "ms", "share", "GB", "GB/s", "TC\nGFLOP", "TFLOP\n/s", "CUDA\nGFLOP", "FLOP\n/B",
            "binding\nroof", "%\nroof", "%\ntheor", "floor\nms")
    for c in cols:
        table.add_column(c, justify="left" if c in ("", "stage", "binding\nroof") else "right", no_wrap=True)

    def row(label: str, p: StagePoint, total: float | None, *, end: bool = False) -> None:
        share = f"{100 * p.time_ms / total:.0f}%" if p.time_ms is not None and total else NA
        table.add_row(
            label, p.stage, ms(p.time_ms), share, f"{p.cost.bytes_min / 1e9:.3g}",
            f"{p.gbps:,.0f}" if p.gbps is not None else NA, f"{p.cost.flops_tc / 1e9:.3g}",
            f"{p.tflops:.1f}" if p.tflops is not None else NA,
            f"{p.cost.flops_cuda / 1e9:.3g}" if label != "fla" else NA, f"{p.intensity:.1f}",
            _short_bound(p.bound, report), pct(p.pct_roof, report), pct(p.pct_theoretical, report), ms(p.floor_ms),
            end_section=end,
        )

    for which in ("tuned", "default"):
        points: Sequence[StagePoint] = getattr(e, which)
        total = next((p.time_ms for p in points if p.stage == TOTAL), None)
        for i, p in enumerate(points):
            row(which if i == 0 else "", p, total, end=p.stage == TOTAL)
    if e.baseline is not None:
        row("fla", e.baseline, None)
    table.caption = (f"tuned   {e.config}\ndefault {e.default_config}\n"
                     f"speedup {ratio(e.speedup)} over default, {ratio(e.speedup_baseline)} over fla; "
                     f"op floor {ms(e.op_floor_ms)} ms. GB = each tensor a stage touches, once; fla is placed at the "
                     "tuned call's work")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Roofline chart


@dataclass(frozen=True)
class ChartPoint:
    marker: str
    label: str
    intensity: float
    tflops: float


def chart_points(entries: Sequence[EntryModel], stages: Sequence[str]) -> list[ChartPoint]:
    out: list[ChartPoint] = []
    for e in entries:
        for which in ("tuned", "default"):
            for p in getattr(e, which):
                if p.stage in stages and p.tflops and p.intensity > 0:
                    out.append(ChartPoint(marker(which, p.stage), f"{which} {p.stage}", p.intensity, p.tflops))
        if e.baseline is not None and e.baseline.tflops and TOTAL in stages:
            out.append(ChartPoint(BASELINE_MARKER, "fla baseline", e.baseline.intensity, e.baseline.tflops))
    return out


def _roof_lines(report: Report) -> list[tuple[str, str, float, float]]:
    """(label, marker, memory GB/s, compute TFLOP/s) of each roof to draw: measured first, theoretical beside."""
    lines = []
    # Theoretical first so that the measured roofs, drawn later, sit on top where the two overlap.
    for roofs, marker in ((report.theoretical, "·"), (report.measured, "braille")):
        if roofs is None or roofs.memory_gbps is None:
            continue
        for unit in ("bf16", "tf32"):
            peak = roofs.tflops(unit)
            if peak:
                lines.append((f"{unit} roof ({roofs.source})", marker, roofs.memory_gbps, peak))
    return lines


def roofline_chart(report: Report, points: Sequence[ChartPoint], width: int, title: str) -> RenderableType:
    """A log-log roofline (FLOP/byte against TFLOP/s) drawn by plotext, in log10 space with decade ticks."""
    import plotext as plt  # imported here: only the views with a chart need it

    if not points:
        return Text("roofline: no timed points to draw", style="dim")
    lines = _roof_lines(report)
    xs = [p.intensity for p in points]
    ys = [p.tflops for p in points]
    tops = [peak for _, _, _, peak in lines] + ys
    # Limits in log10 space, a little margin around the data and the highest roof; ticks on whole decades.
    x_lo, x_hi = math.log10(min(xs)) - 0.6, math.log10(max(xs)) + 0.6
    y_lo, y_hi = math.log10(min(ys)) - 0.5, math.log10(max(tops)) + 0.15

    plt.terminal.limit(False, False)  # the rich console decides the width, not the size of a (possibly absent) tty
    fig = plt.figure
    fig.clear()
    fig.plot_size(max(40, min(width, CHART_MAX_WIDTH)), CHART_HEIGHT)
    fig.theme("simple")
    steps = 100
    grid = [x_lo + (x_hi - x_lo) * i / steps for i in range(steps + 1)]
    for label, marker, gbps, peak in lines:
        # attainable TFLOP/s = min(bandwidth × intensity, peak); GB/s × FLOP/B = GFLOP/s, hence the 1e-3
        roof = [math.log10(min(gbps * 1e-3 * 10**x, peak)) for x in grid]
        sig = fig.signal(grid, roof, marker=marker)
        sig.lines()
        fig.draw(sig)
    for label, _marker, _gbps, peak in lines:
        if report.measured is None or "theoretical" not in label:
            # name the plateau at its right end (the measured roofs, or the theoretical ones when nothing was measured)
            fig.draw(fig.text(x_hi, math.log10(peak), label.split()[0], alignment="right"))
    for marker in dict.fromkeys(p.marker for p in points):
        chosen = [p for p in points if p.marker == marker]
        fig.draw(fig.signal([math.log10(p.intensity) for p in chosen], [math.log10(p.tflops) for p in chosen],
                            marker=marker))
    x_ticks = list(range(math.ceil(x_lo), math.floor(x_hi) + 1))
    y_ticks = list(range(math.ceil(y_lo), math.floor(y_hi) + 1))
    fig.ruler("x").ticks(x_ticks, [_decade(d) for d in x_ticks])
    fig.ruler("y").ticks(y_ticks, [_decade(d) for d in y_ticks])
    fig.ruler("x").lim(x_lo, x_hi)
    fig.ruler("y").lim(y_lo, y_hi)
    fig.legend(active=False)  # plotext places its legend over the data; ours goes underneath
    fig.title(title)
    fig.label("FLOP/byte", axis="x")
    fig.label("TFLOP/s", axis="y")
    drawing = Text.from_ansi(fig.build().string())
    legend = Text("  ".join(f"{m} {label}" for m, label in dict.fromkeys((p.marker, p.label) for p in points)))
    roof_legend = Text("  ".join(
        f"{'⢕' if marker == 'braille' else marker} {label}" for label, marker, _, _ in dict.fromkeys(lines)
    ) or "no roofs known for this device", style="dim")
    return Group(drawing, legend, roof_legend)


def _decade(d: int) -> str:
    value = 10.0**d
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


# ---------------------------------------------------------------------------------------------------------------
# Convergence view


# A table stores each trial's Optuna state; two kinds of FAIL are not the config's failures, and the tuner's counts
# (Entry.failed, which `show` prints) leave them out: a trial stopped by the study deadline or by a killed process
# (re-queued and measured by the next run) and a duplicate proposal (answered without a measurement). The record
# keeps only their reason, so they are recognised by the tuner's wording (tests/test_reports_render.py checks that
# tuner/study.py still uses it).
INTERRUPTED_REASONS = ("study deadline passed while it compiled", "its process ended before the trial finished")
DUPLICATE_REASON_PREFIX = "duplicate of "


def outcome(t: TrialRecord) -> str:
    """"complete", "pruned", "failed", "interrupted" or "duplicate": what the tuner counted the trial as."""
    if t.state == "COMPLETE":
        return "complete"
    if t.state == "PRUNED":
        return "pruned"
    reason = t.reason or ""
    if reason in INTERRUPTED_REASONS:
        return "interrupted"
    if reason.startswith(DUPLICATE_REASON_PREFIX):
        return "duplicate"
    return "failed"


@dataclass(frozen=True)
class Convergence:
    """A study's history: running best against trial number, and where failed and pruned trials fell."""

    key: str
    numbers: tuple[int, ...]
    best_ms: tuple[float | None, ...]  # running best after each trial
    best: float | None
    best_at: int | None
    within_5pct_at: int | None  # first trial whose running best was within 5% of the final best
    failed: tuple[int, ...]  # as the tuner counts them: not the interrupted trials nor the duplicates
    pruned: tuple[int, ...]
    reasons: tuple[tuple[str, int], ...]  # distinct failure/prune reasons with their counts
    not_run: tuple[int, ...] = ()  # interrupted trials and duplicate proposals: no verdict on the config

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.key, "numbers": list(self.numbers), "best_ms": list(self.best_ms), "best": self.best,
            "best_at": self.best_at, "within_5pct_at": self.within_5pct_at, "failed": list(self.failed),
            "pruned": list(self.pruned), "reasons": [list(r) for r in self.reasons], "not_run": list(self.not_run),
        }


def convergence(trials: Sequence[TrialRecord], key: str) -> Convergence:
    mine = sorted((t for t in trials if t.key == key), key=lambda t: t.number)
    best: float | None = None
    best_at = None
    running: list[float | None] = []
    for t in mine:
        if t.state == "COMPLETE" and t.value_ms is not None and (best is None or t.value_ms < best):
            best, best_at = t.value_ms, t.number
        running.append(best)
    within = None
    if best is not None:
        within = next(t.number for t, b in zip(mine, running, strict=True) if b is not None and b <= 1.05 * best)
    reasons = Counter(f"{outcome(t)}: {plain(t.reason, REASON_CHARS)}" for t in mine
                      if outcome(t) not in ("complete", "duplicate") and t.reason)
    return Convergence(
        key=key,
        numbers=tuple(t.number for t in mine),
        best_ms=tuple(running),
        best=best,
        best_at=best_at,
        within_5pct_at=within,
        failed=tuple(t.number for t in mine if outcome(t) == "failed"),
        pruned=tuple(t.number for t in mine if outcome(t) == "pruned"),
        reasons=tuple(reasons.most_common()),
        not_run=tuple(t.number for t in mine if outcome(t) in ("interrupted", "duplicate")),
    )


def outcome_strip(trials: Sequence[TrialRecord], key: str) -> Text:
    """One character per trial in order: ▼ a new best, · completed, p pruned, x failed, - not run (interrupted
    or a duplicate proposal)."""
    text = Text()
    best = None
    for t in sorted((t for t in trials if t.key == key), key=lambda t: t.number):
        kind = outcome(t)
        if kind == "failed":
            text.append("x", style="red")
        elif kind in ("interrupted", "duplicate"):
            text.append("-", style="dim")
        elif kind == "pruned":
            text.append("p", style="yellow")
        elif t.value_ms is not None and (best is None or t.value_ms < best):
            best = t.value_ms
            text.append("▼", style="green")
        else:
            text.append("·")
    return text


def convergence_table(profile: Profile, keys: Sequence[str]) -> Table:
    table = Table(title="convergence: studies (▼ new best, · completed, p pruned, x failed, - not run)",
                  header_style="bold",
                  box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    # The outcome strip sits under the key and folds onto more lines for long studies.
    table.add_column("key / trial outcomes", overflow="fold", min_width=30)
    for c in ("proposals", "best ms", "best at", "≤5% at", "failed", "pruned", "not run"):
        table.add_column(c, justify="right", no_wrap=True)
    for key in keys:
        c = convergence(profile.trials, key)
        table.add_row(Text(key + "\n") + outcome_strip(profile.trials, key), str(len(c.numbers)), ms(c.best),
                      _num(c.best_at), _num(c.within_5pct_at), str(len(c.failed)), str(len(c.pruned)),
                      str(len(c.not_run)), end_section=True)
    table.caption = ("≤5% at: the first trial after which the best found was within 5% of the final best; failed and "
                     "pruned as `show` counts them; not run: stopped by a deadline or a killed process (measured "
                     "again by the next run), or a duplicate proposal")
    return table


def _num(value: int | None) -> str:
    return NA if value is None else f"#{value}"


def convergence_chart(c: Convergence, trials: Sequence[TrialRecord], width: int) -> RenderableType:
    """Running best (line) and each completed trial (·) against trial number; failed (x) and pruned (p) trials
    sit on the top edge, where they fell in the study."""
    import plotext as plt

    done = [(t.number, t.value_ms) for t in trials if t.key == c.key and t.state == "COMPLETE" and t.value_ms]
    if not done:
        return Text(f"{c.key}: no completed trials to draw", style="dim")
    top = max(v for _, v in done) * 1.05
    plt.terminal.limit(False, False)
    fig = plt.figure
    fig.clear()
    fig.plot_size(max(40, min(width, CHART_MAX_WIDTH)), 16)
    fig.theme("simple")
    run = [(n, b) for n, b in zip(c.numbers, c.best_ms, strict=True) if b is not None]
    line = fig.signal([n for n, _ in run], [b for _, b in run], marker="braille")
    line.lines()
    fig.draw(line)
    fig.draw(fig.signal([n for n, _ in done], [v for _, v in done], marker="·"))
    if c.failed:
        fig.draw(fig.signal(list(c.failed), [top] * len(c.failed), marker="x"))
    if c.pruned:
        fig.draw(fig.signal(list(c.pruned), [top] * len(c.pruned), marker="p"))
    fig.legend(active=False)
    fig.title(f"{c.key}: best ms against trial number")
    fig.label("trial", axis="x")
    fig.label("ms", axis="y")
    reasons = Table(box=None, show_header=False, pad_edge=False)
    reasons.add_column(justify="right")
    reasons.add_column()
    for reason, count in c.reasons:
        reasons.add_row(f"{count}×", Text(reason))
    return Group(Text.from_ansi(fig.build().string()),
                 Text("⢕ running best  · completed  x failed  p pruned (on the top edge)", style="dim"), reasons)


# ---------------------------------------------------------------------------------------------------------------
# Coverage view


def coverage_table(report: Report, profile: Profile) -> Table:
    stale = staleness(profile)
    # Text, not str, for everything quoting the file: rich would read a "[bold]" in it as markup.
    title = Text(plain(f"coverage: {len(profile.entries)} keys on {report.device}, tuned {profile.created} "
                       f"({profile.sampler}, budget {profile.budget})"))
    table = Table(title=title, header_style="bold")
    for c in ("key / shape", "tuned config", "trials", "failed", "pruned", "fla timed"):
        table.add_column(c, justify="right" if c in ("trials", "failed", "pruned") else "left", overflow="fold",
                         min_width=30 if c == "key / shape" else None)
    for e in report.entries:
        # A config label is "C64/intra:.../state:..."; one part per line keeps the column narrow.
        table.add_row(f"{e.key}\n{e.shape.label()}", e.config.replace("/", "\n"), str(e.trials), str(e.failed),
                      str(e.pruned), "yes" if e.baseline is not None else "no", end_section=True)
    table.caption = Text(plain(
        f"kernel sources {profile.kernel_hash}"
        + (f" — STALE ({'; '.join(stale)}): still served; re-tune for best speed" if stale else " (current)")
        + f"; torch {profile.torch_version}, triton {profile.triton_version}", 1000))
    return table


# ---------------------------------------------------------------------------------------------------------------
# Views


def view_suite(report: Report, profile: Profile, source: str, width: int, chart: bool) -> list[RenderableType]:
    out: list[RenderableType] = [header(report, profile, source), suite_table(report, profile, width)]
    if chart:
        out.append(roofline_chart(report, chart_points(report.entries, (TOTAL,)), width,
                                  "roofline: whole forward per shape"))
    return out


def view_shape(report: Report, profile: Profile, source: str, width: int, chart: bool,
               e: EntryModel) -> list[RenderableType]:
    out: list[RenderableType] = [header(report, profile, source), shape_table(report, e)]
    if chart:
        out.append(roofline_chart(report, chart_points([e], tuple(p.stage for p in e.tuned)), width,
                                  f"roofline: {e.shape.label()} by stage"))
    return out


def view_convergence(report: Report, profile: Profile, source: str, width: int, chart: bool,
                     e: EntryModel | None) -> list[RenderableType]:
    keys = [e.key] if e is not None else sorted({t.key for t in profile.trials})
    out: list[RenderableType] = [header(report, profile, source)]
    if not profile.trials:
        out.append(Text("this profile holds no trial history", style="yellow"))
        return out
    out.append(convergence_table(profile, keys))
    if chart:
        out += [convergence_chart(convergence(profile.trials, k), profile.trials, width) for k in keys]
    return out


def view_coverage(report: Report, profile: Profile, source: str) -> list[RenderableType]:
    return [header(report, profile, source), coverage_table(report, profile)]
