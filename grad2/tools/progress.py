"""Progress bars that draw on a terminal and stay out of the way in a log.

:func:`progress_bar` takes tqdm's arguments and returns a tqdm bar:

- on a terminal (the stream's ``isatty()``, or ``terminal=True``) it is tqdm as usual;
- elsewhere (a pipe, a file, CI) it is rate-limited: nothing for a bar that ends within
  :data:`LOG_INTERVAL_S` seconds, then one plain ASCII line every :data:`LOG_INTERVAL_S`
  seconds while it runs (and its last state when it ends, for ``leave=True``). Each redraw
  is its own line, without the carriage returns and cursor moves that a log would keep as
  thousands of frames. A caller's ``mininterval``, ``maxinterval`` or ``delay`` win.

A caller's ``disable=`` is honoured either way. tqdm (the ``lab`` extra) is imported on
the first bar; without it the bar is silent (it iterates and ignores updates), so the
tools run on the library alone.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

#: Seconds between two lines of a bar written to a stream that is not a terminal.
LOG_INTERVAL_S = 30.0

#: What tqdm writes to move the cursor up a line (nested bars); a log has no use for it.
_CURSOR_UP = "\x1b[A"


class _LineWriter:
    """A stream for tqdm that writes each redraw of a bar as one plain line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace(_CURSOR_UP, "").replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _SilentBar:
    """The bar without tqdm: iterates over ``iterable``; updates, postfixes and closing do
    nothing."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(() if self.iterable is None else self.iterable)

    def __enter__(self) -> _SilentBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, terminal: bool | None = None,
                 **tqdm_kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or for ``update()`` calls) written to ``file``
    (default ``sys.stderr``): drawn as usual on a terminal, one plain line every
    :data:`LOG_INTERVAL_S` seconds elsewhere (see the module docstring). ``terminal``
    overrides the stream's ``isatty()``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _SilentBar(iterable)
    stream = tqdm_kwargs.pop("file", None) or sys.stderr
    if terminal is None:
        terminal = is_terminal(stream)
    if terminal:
        return tqdm(iterable, file=stream, **tqdm_kwargs)
    for key in ("mininterval", "maxinterval", "delay"):
        tqdm_kwargs.setdefault(key, LOG_INTERVAL_S)
    tqdm_kwargs.setdefault("ascii", True)
    return _log_bar(tqdm)(iterable, file=_LineWriter(stream), **tqdm_kwargs)


def _log_bar(tqdm: type) -> type:
    """tqdm whose postfix and description changes wait for the next timed redraw (tqdm
    redraws on each by default: a line per training step in a log)."""

    class LogBar(tqdm):
        def set_postfix(self, ordered_dict: Any = None, refresh: bool = True,
                        **kwargs: Any) -> None:
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

        def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
            super().set_description(desc, refresh=False)

    return LogBar
