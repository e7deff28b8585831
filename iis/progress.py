"""Progress of long loops (analysis tasks, extraction blocks, training epochs).

On a terminal: the usual tqdm bar, unchanged. Elsewhere (a Slurm or CI log, a pipe), where a
bar would be noise and tqdm rightly turns itself off: a plain log line at most every
``interval`` seconds (30 by default) with done/total, the rate and the ETA, e.g.
``analyze: 12/40 task (30%), 0.41 task/s, ETA 1 min 08 s``, and one closing line.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm

INTERVAL = 30.0  # seconds between two log lines at most


def _isatty(stream: IO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def format_seconds(seconds: float) -> str:
    """``8 s``, ``3 min 05 s``, ``2 h 07 min``: a duration for a log line."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LogProgress:
    """A tqdm-like counter that logs instead of drawing (``update``, ``close``, ``with``, iteration).

    Args:
        iterable: wrapped and counted one per item, or None to count with :meth:`update`.
        total: the count at completion; ``len(iterable)`` when None and it has one.
        desc: the line's prefix, e.g. ``analyze`` or ``train``.
        unit: what is counted, e.g. ``task``, ``img``, ``batch``.
        logger: where lines go (INFO).
        interval: seconds between two progress lines at most; the first comes after one interval.
        final: log a closing line (count, time, rate) when the loop completes.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", logger: logging.Logger | None = None, interval: float = INTERVAL,
                 final: bool = True, clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.log = logger or logging.getLogger(__name__)
        self.interval, self.final, self.clock = interval, final, clock
        self.n = 0
        self.start = self._last = clock()
        self.closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; log a line when ``interval`` has passed since the last one."""
        self.n += n
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line: done/total (percent), rate, ETA."""
        elapsed = max((self.clock() if now is None else now) - self.start, 1e-9)
        rate = self.n / elapsed
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            return (f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), "
                    f"{rate:.3g} {self.unit}/s, ETA {format_seconds(eta)}")
        return f"{self.desc}: {self.n} {self.unit}, {rate:.3g} {self.unit}/s, {format_seconds(elapsed)} so far"

    def close(self) -> None:
        """End the loop; with ``final``, log the count, the time taken and the rate once."""
        if self.closed:
            return
        self.closed = True
        if self.final and self.n:
            elapsed = max(self.clock() - self.start, 1e-9)
            of = f"/{self.total}" if self.total else ""
            self.log.info("%s: %d%s %s in %s (%.3g %s/s)", self.desc, self.n, of, self.unit,
                          format_seconds(elapsed), self.n / elapsed, self.unit)

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LogProgress was made without an iterable")
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.closed = True  # the error is the news, not the count


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             logger: logging.Logger | None = None, interval: float = INTERVAL, final: bool = True,
             stream: IO | None = None, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar when ``stream`` (stderr) is a terminal, else a :class:`LogProgress`.

    Use it as tqdm: wrap an iterable, or ``update()`` a counter, in a ``with`` block or with
    ``close()``. ``tqdm_kwargs`` (``leave``, ``smoothing``, …) go to the bar only.
    """
    stream = sys.stderr if stream is None else stream
    if _isatty(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, file=stream, **tqdm_kwargs)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, logger=logger, interval=interval, final=final)
