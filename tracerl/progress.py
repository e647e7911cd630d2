"""Progress of long commands (sft, rl, eval, score, quickstart, bench): done/total, rate (it/s, or
tokens/s where the caller counts tokens), ETA and the latest key figure (loss, reward, accuracy).

Modes: ``bar`` (a rich progress bar on stderr), ``lines`` (one plain line on stderr every N items
and at the end: for logs, CI and ``--json``), ``off``, and ``auto`` = ``bar`` when stderr is a
terminal, else ``lines``.  ``True``/``False`` mean ``auto``/``off`` (the recipes' ``progress=``
keyword).  Rates count only the items done by this process, so a resumed run's ETA is not fooled
by the steps it inherited.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from tracerl.errors import ConfigError

MODES = ("auto", "bar", "lines", "off")
LINES_PER_RUN = 20  # lines mode: about this many lines over a whole run


def progress_mode(progress: bool | str | None, stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off`` for a ``progress=`` value."""
    if progress is True or progress is None:
        progress = "auto"
    elif progress is False:
        progress = "off"
    if progress not in MODES:
        raise ConfigError(f"progress: {progress!r}; valid: {', '.join(MODES)} (or True/False)")
    if progress == "auto":
        stream = stream or sys.stderr
        return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"
    return progress


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


class ProgressReporter:
    """``with ProgressReporter("sft", total=300, unit="step") as p: ... p.update(completed, loss=x)``.

    ``update(completed=None, advance=0, tokens=0, **figures)``: the new position (absolute, or
    ``advance`` more), ``tokens`` generated/processed since the last update (shown as tokens/s),
    and the figures to show from now on (a figure keeps its last value until updated; None drops it).
    """

    def __init__(self, label: str, total: int, *, unit: str = "it", completed: int = 0,
                 progress: bool | str | None = "auto", every: int | None = None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(0, int(total))
        self.unit = unit
        self.completed = completed
        self.stream = stream or sys.stderr
        self.mode = progress_mode(progress, self.stream)
        self.every = every or max(1, math.ceil(self.total / LINES_PER_RUN))
        self.figures: dict[str, object] = {}
        self._start_completed = completed
        self._tokens = 0
        self._t0 = time.perf_counter()
        self._last_line_at = completed
        self._unprinted_figures = False
        self._bar = None
        self._task = None
        self.lines: list[str] = []  # what lines mode printed (the tests read it)

    # -- figures ----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def rate(self) -> float | None:
        """Items per second done by this process (None before the first)."""
        done, seconds = self.completed - self._start_completed, self.elapsed()
        return done / seconds if done > 0 and seconds > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        return (self.total - self.completed) / rate if rate else None

    def status(self) -> str:
        """``2.10 step/s · eta 1:02 · 412 tok/s · loss 0.412``: the figures after the count."""
        parts = []
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 0.1 else f"{1 / rate:.1f} s/{self.unit}")
        eta = self.eta()
        if eta is not None and self.completed < self.total:
            parts.append(f"eta {format_duration(eta)}")
        if self._tokens and self.elapsed() > 0:
            parts.append(f"{self._tokens / self.elapsed():.0f} tok/s")
        parts += [f"{k} {format_figure(v)}" for k, v in self.figures.items()]
        return " · ".join(parts)

    def line(self) -> str:
        pct = 100.0 * self.completed / self.total if self.total else 100.0
        return (f"{self.label} {self.completed}/{self.total} {self.unit} ({pct:.0f}%) "
                f"{format_duration(self.elapsed())} elapsed" + (f" · {s}" if (s := self.status()) else ""))

    # -- updates ----------------------------------------------------------------------------
    def update(self, completed: int | None = None, *, advance: int = 0, tokens: int = 0, **figures) -> None:
        self.completed = (self.completed if completed is None else completed) + advance
        self._tokens += tokens
        for key, value in figures.items():
            if value is None:
                self.figures.pop(key, None)
            else:
                self.figures[key] = value
        self._unprinted_figures = bool(figures)
        if self.mode == "bar" and self._bar is not None:
            self._bar.update(self._task, completed=self.completed, status=self.status())
        elif self.mode == "lines" and (self.completed - self._last_line_at >= self.every
                                       or (self.completed >= self.total and self._last_line_at < self.total)):
            self._print_line()

    def _print_line(self) -> None:
        self._last_line_at = self.completed
        self._unprinted_figures = False
        text = self.line()
        self.lines.append(text)
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> ProgressReporter:
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[status]}"), console=Console(file=self.stream))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.completed, status="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        elif self.mode == "lines" and exc[0] is None and (self.completed > self._last_line_at
                                                          or self._unprinted_figures):
            self._print_line()  # where a run that stopped early ended, or its final figures
