"""One progress channel for long work: the library reports Progress events, the CLI renders them.

A stage (e.g. "quantize", "imatrix", "windows") reports `done` of `total` units, starting at 0. On a terminal
the CLI draws a bar with count and ETA (tqdm); otherwise (batch jobs, Ray, redirected output) it logs INFO lines
through `logging` every ~10% of a stage or 30 s, each with the count and an ETA, so logs show where a run is.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int
    unit: str


ProgressCallback = Callable[[Progress], None]

LOG_EVERY_S = 30.0
LOG_STEPS = 10  # a line every tenth of a stage


class CliProgress:
    """Renders Progress events: a tqdm bar per stage on a terminal, rate-limited log lines otherwise.
    Use as a context manager (the last bar is closed on exit); the instance is the callback."""

    def __init__(self, tty: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._clock = clock
        self._stage: str | None = None
        self._bar = None

    def __enter__(self) -> CliProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._close_bar()

    def __call__(self, event: Progress) -> None:
        now = self._clock()
        if event.stage != self._stage:
            self._close_bar()
            self._stage, self._start, self._start_done = event.stage, now, event.done
            self._logged_at, self._logged_step = now, -1
            if self.tty:
                from tqdm import tqdm

                self._bar = tqdm(total=event.total, desc=event.stage, unit=f" {event.unit}",
                                 unit_scale=event.total >= 10_000, file=sys.stderr, dynamic_ncols=True)
        if self._bar is not None:
            self._bar.update(event.done - self._bar.n)
            return
        step = event.done * LOG_STEPS // event.total if event.total else 0
        if step > self._logged_step or now - self._logged_at >= LOG_EVERY_S:
            self._logged_at, self._logged_step = now, step
            log.info("%s", self.line(event, now))

    def line(self, event: Progress, now: float) -> str:
        """'quantize: 1.2M/4.7M weights (25%), 3 s elapsed, ETA 9 s'."""
        text = f"{event.stage}: {_count(event.done)}/{_count(event.total)} {event.unit}"
        if event.total:
            text += f" ({100 * event.done / event.total:.0f}%)"
        elapsed, progressed = now - self._start, event.done - self._start_done
        text += f", {_duration(elapsed)} elapsed"
        if 0 < progressed and event.done < event.total:
            text += f", ETA {_duration(elapsed / progressed * (event.total - event.done))}"
        return text

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _count(n: int) -> str:
    for suffix, size in (("G", 1e9), ("M", 1e6), ("K", 1e4)):
        if n >= size:
            return f"{n / size:.1f}{suffix}" if suffix != "K" else f"{n / 1e3:.0f}K"
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
