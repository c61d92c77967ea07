"""One live progress line for a batch job: rows committed out of the total, ok / error, images/s, output
tokens/s, elapsed time and ETA.

On a terminal the line is redrawn in place (a carriage return, no scrolling). Anywhere else (a log file,
a pipe) one full line is written every `interval_s` seconds and once at the end, so that a nightly log
holds the pace of the run without a line per shard. Nothing here knows Ray: the job reports each
committed shard with `ProgressLine.add`, and `live_progress` redraws on a timer so that the elapsed time
and the ETA move while a shard is in flight (the first one waits for the model to load). A job that runs
several caption jobs in a row (a benchmark suite) labels each line with what it counts:
`progress [MMBench_DEV_EN]: 12/200 rows ...`.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

DEFAULT_INTERVAL_S = 30.0  # a line every 30 s: about 120 lines an hour in a log, enough to see a stall
REDRAW_S = 1.0  # a terminal line is redrawn every second, so the elapsed time visibly moves
BAR_WIDTH = 12


def format_duration(seconds: float) -> str:
    """`m:ss` under an hour, `h:mm:ss` above."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(per_second: float) -> str:
    """Three significant figures without an exponent: 0.299, 5.74, 51.2, 1234; 0 before the first row."""
    if per_second == 0:
        return "0"
    if per_second >= 100:
        return f"{per_second:.0f}"
    if per_second >= 10:
        return f"{per_second:.1f}"
    return f"{per_second:.2f}" if per_second >= 1 else f"{per_second:.3f}"


class ProgressLine:
    """The figures of a running job and how they are drawn; `add`, `tick` and `close` may be called from
    different threads (the job's and the redraw timer's)."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        *,
        live: bool,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
        label: str | None = None,
    ) -> None:
        """`total`: rows this run will commit; `live`: redraw one line in place (a terminal) instead of
        writing a line every `interval_s`; `width`: terminal columns (default: asked of the terminal);
        `label`: what the line counts, shown at its start (None: nothing, the caption job's own line)."""
        self.total = total
        self.rows = 0
        self.ok = 0
        self.output_tokens = 0
        self._stream = stream
        self._live = live
        self._interval_s = interval_s
        self._clock = clock
        self._width = width
        self._log_prefix = f"progress [{label}]: " if label else "progress: "
        self._terminal_prefix = f"{label}: " if label else ""
        self._started = clock()
        self._last_line = self._started
        self._closed = False
        self._lock = threading.Lock()

    def add(self, rows: int, ok: int, output_tokens: int) -> None:
        """Count one committed shard: its rows, how many of them are ok, and their output tokens."""
        with self._lock:
            self.rows += rows
            self.ok += ok
            self.output_tokens += output_tokens
            self._refresh()

    def tick(self) -> None:
        """Redraw (terminal) or write a line if `interval_s` has passed since the last one (log)."""
        with self._lock:
            if self._closed:
                return
            self._refresh()

    def _refresh(self) -> None:
        """Redraw the terminal line, or write a log line if one is due (the caller holds the lock)."""
        if self._live:
            self._draw()
        else:
            self._line_if_due()

    def note(self, text: str) -> None:
        """A line of its own (a warning about the run) between progress lines; a terminal line is
        cleared first and redrawn after it."""
        with self._lock:
            if self._closed:
                return
            self._stream.write(f"\r\x1b[K{text}\n" if self._live else f"{text}\n")
            if self._live:
                self._draw()
            self._stream.flush()

    def close(self) -> None:
        """The final figures: the terminal line is finished with a newline, a log gets its last line."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._live:
                self._draw()
                self._stream.write("\n")
            else:
                self._stream.write(f"{self._log_prefix}{self.text()}\n")
            self._stream.flush()

    def text(self) -> str:
        """The figures as one line of text (no bar, no control characters)."""
        elapsed = self._clock() - self._started
        errors = self.rows - self.ok
        percent = 100 * self.rows / self.total if self.total else 100.0
        images_per_s = self.rows / elapsed if elapsed > 0 else 0.0
        tokens_per_s = self.output_tokens / elapsed if elapsed > 0 else 0.0
        if self.rows >= self.total:
            eta = "0:00"
        elif self.rows == 0 or elapsed <= 0:
            eta = "?"  # no rate yet: the first shard is still on its way
        else:
            eta = format_duration((self.total - self.rows) / images_per_s)
        return (
            f"{self.rows}/{self.total} rows ({percent:.0f}%), {self.ok} ok, {errors} error | "
            f"{format_rate(images_per_s)} images/s, {format_rate(tokens_per_s)} output tokens/s | "
            f"elapsed {format_duration(elapsed)}, ETA {eta}"
        )

    def _draw(self) -> None:
        filled = BAR_WIDTH * self.rows // self.total if self.total else BAR_WIDTH
        line = f"{self._terminal_prefix}[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.text()}"
        width = self._width or shutil.get_terminal_size(fallback=(120, 24)).columns
        # A line longer than the terminal wraps, and a carriage return then redraws only its last part.
        # \x1b[K clears what a longer previous line left on the right.
        self._stream.write(f"\r{line[: max(1, width - 1)]}\x1b[K")
        self._stream.flush()

    def _line_if_due(self) -> None:
        now = self._clock()
        if now - self._last_line >= self._interval_s:
            self._last_line = now
            self._stream.write(f"{self._log_prefix}{self.text()}\n")
            self._stream.flush()


@contextlib.contextmanager
def live_progress(
    total: int,
    stream: TextIO | None,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    in_place: bool | None = None,
    label: str | None = None,
) -> Iterator[ProgressLine | None]:
    """A `ProgressLine` on `stream` (None: no progress at all) with a timer thread that redraws it, and
    its final figures written on the way out, also when the job fails.

    `in_place`: redraw in place; default: when `stream` is a terminal. `label`: what the line counts,
    shown at its start.
    """
    if stream is None:
        yield None
        return
    live = stream.isatty() if in_place is None else in_place
    progress = ProgressLine(total, stream, live=live, interval_s=interval_s, label=label)
    stop = threading.Event()

    def redraw() -> None:
        while not stop.wait(REDRAW_S if live else min(REDRAW_S, interval_s)):
            progress.tick()

    timer = threading.Thread(target=redraw, name="progress-line", daemon=True)
    timer.start()
    try:
        yield progress
    finally:
        stop.set()
        timer.join()
        progress.close()
