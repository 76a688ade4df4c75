"""The one progress bar every loop uses: tqdm on a terminal, plain lines in a log file.

tqdm redraws its bar in place with carriage returns and, for nested bars, cursor-movement escape
codes (``ESC[A``); written to a file (``faststeal run ... 2> log``, a batch job's output) those
become unreadable noise. :func:`progress_bar` returns a tqdm bar when the stream is a terminal
and otherwise a :class:`LineProgress`, which writes one plain line per report (``desc: n/total
unit (p%) key=value``), at most one per ``every`` percent of the total or ``interval`` seconds,
plus a final line when it closes. Both support the subset the package uses: iteration, ``update``,
``set_postfix``, ``close``, ``n`` and use as a context manager.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO


class LineProgress:
    """Line-per-update progress for non-terminal output (no ``\\r``, no escape codes)."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
                 desc: str = "", unit: str = "it", file: Optional[TextIO] = None,
                 every: float = 10.0, interval: float = 30.0) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc, self.unit = desc, unit
        self.file = file
        self.every, self.interval = every, interval
        self.n = 0
        self.postfix = ""
        self._last_n, self._last_t = 0, time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        due = now - self._last_t >= self.interval
        if self.total:
            step = self.total * self.every / 100.0
            due = due or (self.n - self._last_n >= step) or self.n >= self.total
        if due and self.n != self._last_n:
            self._write()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n or self.n == 0:
                self._write()

    def _write(self) -> None:
        self._last_n, self._last_t = self.n, time.monotonic()
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        post = f" {self.postfix}" if self.postfix else ""
        prefix = f"{self.desc}: " if self.desc else ""
        out = self.file if self.file is not None else sys.stderr
        print(f"{prefix}{count} {self.unit}{pct}{post}", file=out, flush=True)


class _Disabled:
    """A bar that shows nothing (progress off)."""

    def __init__(self, iterable: Optional[Iterable] = None) -> None:
        self.iterable, self.n = iterable, 0

    def __iter__(self) -> Iterator:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> "_Disabled":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
                 desc: str = "", unit: str = "it", disable: bool = False, leave: bool = True,
                 file: Optional[TextIO] = None) -> Any:
    """A progress bar over ``iterable`` (or updated by hand up to ``total``).

    On a terminal (``file``, default stderr, ``isatty()``): ``tqdm`` with dynamic width;
    otherwise :class:`LineProgress`. ``disable=True``: a silent bar with the same methods.
    ``leave=False`` removes a finished terminal bar (a log keeps its lines).
    """
    if disable:
        return _Disabled(iterable)
    stream = file if file is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=file,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, file=file)
