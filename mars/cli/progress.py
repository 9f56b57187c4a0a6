"""Progress of the long ``mars`` commands (ingest, eval, train ...), always on standard error.

On a terminal it is a rich bar: done/total, the rate, an ETA, the elapsed time. Anywhere else
(a pipe, a log file, CI) rich would print nothing until the end, so :func:`meter` writes a
plain line instead every ``MARS_PROGRESS_INTERVAL`` seconds (default 10; 0 writes one per
update), then a final one::

    ingest: 512/2191 (23%) · 48.1 items/s · about 35 s left
    ingest: 2191/2191 (100%) · 45.0 items/s · done in 49 s

``quiet`` (the commands' ``--json``) writes nothing at all. The rate is measured from the first
update that counted something, so a slow first batch (models loading) does not drag it down
for the rest of the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mars.cli.common import err

INTERVAL_ENV = "MARS_PROGRESS_INTERVAL"
"""Environment variable: seconds between two plain progress lines when standard error is not a terminal."""

DEFAULT_INTERVAL_S = 10.0
"""Seconds between two plain progress lines unless ``MARS_PROGRESS_INTERVAL`` says otherwise."""


def interval_s() -> float:
    """Seconds between two plain progress lines: ``MARS_PROGRESS_INTERVAL`` (≥ 0) or 10."""
    try:
        return max(float(os.environ.get(INTERVAL_ENV, "") or DEFAULT_INTERVAL_S), 0.0)
    except ValueError:
        return DEFAULT_INTERVAL_S


def duration(seconds: float) -> str:
    """``seconds`` for people: ``0.4 s``, ``35 s``, ``2 min 05 s``, ``1 h 07 min``."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Meter:
    """Counts of one long loop, shown as :func:`meter` chose (rich bar, plain lines or nothing).

    Args:
        label: what runs, the start of every line (e.g. ``ingest``, ``align``).
        total: how many units in all (None: unknown, no percentage nor ETA).
        unit: the rate's unit (``items``, ``queries``, ``epochs`` ...).
        show: called with the meter after each update (the display); None shows nothing.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, label: str, total: int | None, unit: str = "items",
                 show: Callable[[Meter], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit, self.done, self.note = label, total, unit, 0, ""
        self._show, self.clock = show, clock
        self.started = clock()
        self._first: tuple[float, int] | None = None  # (time, done) of the first update that counted something
        self._latest: tuple[float, int] | None = None  # (time, done) of the latest update that counted more

    def advance(self, n: int = 1, *, note: str | None = None) -> None:
        """``n`` more units done (``note``: replaces the text shown after the counts, e.g. a loss)."""
        self.update(self.done + n, note=note)

    def update(self, done: int | None = None, *, total: int | None = None, note: str | None = None) -> None:
        """Set the units ``done`` so far, the ``total`` (when it became known) and the ``note``."""
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        if done is not None and done != self.done:
            self.done = done
            self._latest = (self.clock(), done)
            if self._first is None:
                self._first = self._latest
        if self._show is not None:
            self._show(self)

    def elapsed(self) -> float:
        """Seconds since the meter started."""
        return self.clock() - self.started

    def rate(self) -> float | None:
        """Units per second between the first update that counted something and the latest one
        that counted more (from the start while there is only one); None before that. Updates
        that count nothing new (a poll between two batches) leave it as it is."""
        if self._first is None or self._latest is None:
            return None
        (t0, d0), (t1, d1) = self._first, self._latest
        if d1 > d0 and t1 > t0:
            return (d1 - d0) / (t1 - t0)
        return d1 / (t1 - self.started) if d1 > 0 and t1 > self.started else None

    def eta_s(self) -> float | None:
        """Seconds left at :meth:`rate` (None without a total or a rate, and once done reaches the total)."""
        rate = self.rate()
        if self.total is None or self.done >= self.total or not rate:
            return None
        return max(self.total - self.done, 0) / rate

    def info(self) -> str:
        """The text after the counts: rate, ETA and note, joined by `` · ``."""
        rate, eta = self.rate(), self.eta_s()
        parts = [self._per(rate) if rate else "", f"about {duration(eta)} left" if eta is not None else "", self.note]
        return " · ".join(p for p in parts if p)

    def _per(self, rate: float) -> str:
        """``rate`` (units per second) as ``48.1 items/s``, or per minute below one a second."""
        return f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{rate * 60:.2g} {self.unit}/min"

    def counts(self) -> str:
        """``done/total (pct%)``, ``done`` without a total, nothing for a stage that counts nothing."""
        if not self.total:
            return str(self.done) if self.done else ""
        return f"{self.done}/{self.total} ({min(self.done / self.total, 1.0):.0%})"

    def _joined(self, *parts: str) -> str:
        """``label: counts · part · part ...`` (``label · part ...`` without counts), empty parts left out."""
        counts = self.counts()
        return " · ".join([f"{self.label}: {counts}" if counts else self.label, *(p for p in parts if p)])

    def line(self) -> str:
        """The plain progress line: ``label: counts · rate · ETA · note``; before there is a
        rate, the time elapsed instead (from 1 s on), so a long first batch still shows life."""
        elapsed = self.elapsed()
        waited = f"{duration(elapsed)} elapsed" if self.rate() is None and elapsed >= 1 else ""
        return self._joined(waited, self.info(), "" if self.counts() or waited or self.note else "started")

    def final_line(self, failed: bool = False) -> str:
        """The last plain line: counts, the rate over the whole run and how long it took."""
        elapsed = self.elapsed()
        rate = self._per(self.done / elapsed) if self.done and elapsed > 0 else ""
        return self._joined(rate, self.note, f"stopped after {duration(elapsed)}" if failed else f"done in {duration(elapsed)}")


class _PlainLines:
    """Display of a meter as plain lines on ``console``: one at the start, then at most one per
    ``interval`` seconds (written on an update, so a loop without updates writes none)."""

    def __init__(self, console: Console, interval: float) -> None:
        self.console, self.interval, self.last = console, interval, float("-inf")

    def write(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def __call__(self, m: Meter) -> None:
        now = m.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.write(m.line())


@contextmanager
def meter(label: str, total: int | None = None, *, unit: str = "items", quiet: bool = False,
          console: Console | None = None, clock: Callable[[], float] = time.monotonic) -> Iterator[Meter]:
    """Show the progress of the block's loop on standard error; yields the :class:`Meter` to update.

    Args:
        label: what runs, e.g. ``ingest`` or ``align``.
        total: units in all, if known (:meth:`Meter.update` can set it later).
        unit: the rate's unit (``items``, ``queries`` ...).
        quiet: show nothing (``--json``).
        console: where to show it; default standard error (:data:`mars.cli.common.err`).
        clock: seconds, monotonic (tests pass their own).

    On a terminal the rich bar stays on screen after the block; elsewhere a plain line is
    written at the start, every :func:`interval_s` seconds on updates, and at the end (saying
    ``stopped after`` when the block raised).
    """
    out = console or err
    if quiet:
        yield Meter(label, total, unit, clock=clock)
        return
    if out.is_terminal:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=out) as bar:
            task: TaskID = bar.add_task(label, total=total, info="")

            def show(m: Meter) -> None:
                bar.update(task, completed=m.done, total=m.total, info=m.info())

            yield Meter(label, total, unit, show, clock)
        return
    plain = _PlainLines(out, interval_s())
    m = Meter(label, total, unit, plain, clock)
    plain(m)
    try:
        yield m
    except BaseException:
        plain.write(m.final_line(failed=True))
        raise
    plain.write(m.final_line())


class CountedSearches:
    """``engine`` whose ``search`` calls ``on_search()`` after each search; every other
    attribute is the engine's. For library loops that search once per query and take no
    progress callback (e.g. :func:`evaluation.runner.run_eval`, which needs only ``search`` and
    ``settings``)."""

    def __init__(self, engine: Any, on_search: Callable[[], None]) -> None:
        self._engine, self._on_search = engine, on_search

    def search(self, *args: Any, **kwargs: Any) -> Any:
        """The engine's search, then one tick."""
        result = self._engine.search(*args, **kwargs)
        self._on_search()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


__all__ = ["CountedSearches", "DEFAULT_INTERVAL_S", "INTERVAL_ENV", "Meter", "duration", "interval_s", "meter"]
