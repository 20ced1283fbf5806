"""Progress of long work (training, toy-world rendering, latent caching, shard inspection) on the console.

On a terminal one line is redrawn in place (`\\r`); when the output is a file or a pipe (a log, CI, `tee`) a plain
line is printed every `ISA4D_PROGRESS_SECONDS` seconds (default 30) and at the end, so a log holds a readable
history instead of one huge `\\r` line. Every line shows done/total, elapsed time and the ETA:

    toy world train  120/240 clips (50%)  elapsed 1:02  ETA 1:02  | 1.9 clips/s
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

DEFAULT_SECONDS = 30.0  # between lines when the output is not a terminal
TERMINAL_SECONDS = 0.2  # between redraws on a terminal


def format_seconds(seconds: float) -> str:
    """`1:05`, `1:02:03`; `?` for an unknown time."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "it",
                postfix: str = "") -> str:
    """One progress line; the ETA assumes the rate so far holds."""
    if total:
        eta = elapsed / done * (total - done) if done else float("nan")
        head = f"{desc}  {done}/{total} {unit} ({100 * done / total:.0f}%)  elapsed {format_seconds(elapsed)}  " \
               f"ETA {format_seconds(eta)}"
    else:
        head = f"{desc}  {done} {unit}  elapsed {format_seconds(elapsed)}"
    rate = done / elapsed if elapsed > 0 else 0.0
    tail = f"{rate:.2f} {unit}/s" if rate < 10 else f"{rate:.0f} {unit}/s"
    return f"{head}  | {postfix + ', ' if postfix else ''}{tail}"


def _is_terminal(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts units of work and reports them (module doc). Use as a context manager or call `close()`.

    `every`: seconds between lines off a terminal (default `ISA4D_PROGRESS_SECONDS` or 30); `terminal` forces the
    mode (default: whether `stream` is a tty)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream: IO | None = None,
                 every: float | None = None, terminal: bool | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        env = os.environ.get("ISA4D_PROGRESS_SECONDS")
        self.every = TERMINAL_SECONDS if self.terminal else (every if every is not None
                                                              else float(env) if env else DEFAULT_SECONDS)
        self.done, self.postfix = 0, ""
        self.start = time.monotonic()
        self._last = self.start
        self._closed = False
        self._width = 0

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        if n == 0 and postfix is None:
            return
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._emit(final=False)

    def set(self, done: int, postfix: str | None = None) -> None:
        """Jump to an absolute count (a trainer's global step)."""
        self.update(done - self.done, postfix)

    def line(self) -> str:
        return format_line(self.desc, self.done, self.total, time.monotonic() - self.start, self.unit, self.postfix)

    def _emit(self, final: bool) -> None:
        text = self.line()
        if self.terminal:
            pad = max(self._width - len(text), 0)
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """The final line (always printed once, so even short work leaves one line)."""
        if not self._closed:
            self._closed = True
            self._emit(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", **kwargs) -> Iterator[T]:
    """`for x in track(xs, "caching"):` with a Progress over `xs` (its `len` when it has one)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update()


def count_tar_samples(paths: Iterable[str]) -> int | None:
    """The WebDataset samples (distinct keys) in local tar shards, from their headers alone; None when any path is
    remote or unreadable (the progress then shows no total)."""
    import tarfile

    total = 0
    for path in paths:
        if "://" in path or path.startswith("pipe:") or not os.path.isfile(path):
            return None
        try:
            with tarfile.open(path) as tar:
                total += len({name.split("/")[-1].split(".")[0] for name in tar.getnames()
                              if not name.split("/")[-1].startswith("__")})
        except (tarfile.TarError, OSError):
            return None
    return total
