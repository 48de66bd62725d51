"""The terminal view of a tuning run: one row per study with trials, best time, ETA and the GPU's clocks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Self

from rich.console import Console
from rich.live import Live
from rich.table import Table

from gdn2_tune.reports.text import plain
from gdn2_tune.tuner.study import StudyProgress

REFRESH_EVERY_S = 0.25
# A log line names a key, a config and a reason; a compiler's error text is cut after this many characters.
LOG_CHARS = 600


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressView:
    """A rich Live table over the studies of a run. ``enabled=False`` (or a non-terminal) prints only summaries."""

    def __init__(self, studies: Sequence[StudyProgress], *, title: str, enabled: bool = True) -> None:
        self.studies = list(studies)
        self.title = title
        self.console = Console(stderr=True)
        self._live: Live | None = None
        self._last = 0.0
        self.enabled = enabled and self.console.is_terminal

    def render(self) -> Table:
        table = Table(title=self.title, expand=False)
        for name, justify in (("study", "left"), ("phase", "left"), ("trials", "right"), ("pruned", "right"),
                              ("failed", "right"), ("best ms", "right"), ("elapsed", "right"), ("ETA", "right"),
                              ("clocks", "left"), ("% of roof", "left")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for s in self.studies:
            table.add_row(
                s.key, s.phase, f"{s.done}/{s.target}", str(s.pruned), str(s.failed),
                "-" if s.best_ms is None else f"{s.best_ms:.4f}",
                _fmt_s(time.monotonic() - s.started) if s.phase != "waiting" else "-",
                _fmt_s(s.eta_s()) if s.phase == "search" else "-", s.clocks, s.roof,
            )
        return table

    def __enter__(self) -> Self:
        if self.enabled:
            self._live = Live(self.render(), console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.__exit__(None, None, None)
            self._live = None

    def update(self, force: bool = False) -> None:
        if self._live is None:
            return
        now = time.monotonic()
        if force or now - self._last >= REFRESH_EVERY_S:
            self._last = now
            self._live.update(self.render(), refresh=True)

    def log(self, message: str) -> None:
        # Messages quote table warnings and worker errors: markup=False keeps "[a-z0-9-]" from being read as a tag,
        # plain() keeps escape sequences and megabyte-long strings off the terminal.
        self.console.print(plain(message, LOG_CHARS), highlight=False, markup=False, soft_wrap=True)
