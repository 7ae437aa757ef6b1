"""Progress for long phases (tokenisation, the reference pass, the WiSE-FT curve, downloads and uploads) and the
training ETA: a tqdm bar on a terminal, and one plain line per interval where the output is a log (Ray's forwarded
worker output, a RayJob's log, CI), since a bar's carriage returns become one unreadable line there."""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterable, Iterator, Optional, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_INTERVAL_S = 30.0
"""Off a terminal: a line at most this often (and one at the end when the phase took longer)."""


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 65 -> '1m05s', 7.2 -> '7s'."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def eta(done: int, total: int, elapsed_s: float) -> Optional[str]:
    """The time left at the pace so far, or None before there is a pace."""
    if done <= 0 or total <= done:
        return None
    return duration(elapsed_s / done * (total - done))


def progress(items: Iterable[T], total: Optional[int], desc: str, *, show: bool = True,
             stream: Optional[TextIO] = None, interval_s: float = LOG_INTERVAL_S) -> Iterator[T]:
    """`items`, reporting progress on `stream` (default stderr) when `show` (rank 0 only, in the workers)."""
    stream = stream or sys.stderr
    if not show:
        yield from items
        return
    if stream.isatty():
        yield from tqdm(items, total=total, desc=f"[ftdist] {desc}", file=stream, leave=False, dynamic_ncols=True)
        return
    t0 = last = time.monotonic()
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= interval_s:
            last = now
            of = f"/{total} ({100 * n / total:.0f}%)" if total else ""
            left = eta(n, total, now - t0) if total else None
            stream.write(f"[ftdist] {desc}: {n}{of}, {duration(now - t0)}" + (f", eta {left}" if left else "")
                         + "\n")
            stream.flush()
    if last != t0:  # the phase was long enough to report on: say it ended
        stream.write(f"[ftdist] {desc}: done, {n} in {duration(time.monotonic() - t0)}\n")
        stream.flush()


def size(n: float) -> str:
    """Bytes as people read them: 1.5 GB, 312 MB, 12 kB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


class Meter:
    """Bytes moved by a transfer (a download, an upload): a tqdm bar on a terminal, one line per interval off one.
    Thread-safe: boto3 reports progress from its transfer threads."""

    def __init__(self, total: Optional[int], desc: str, *, stream: Optional[TextIO] = None,
                 interval_s: float = LOG_INTERVAL_S) -> None:
        self.total, self.desc, self.interval_s = total, desc, interval_s
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.bar = (tqdm(total=total, desc=f"[ftdist] {desc}", unit="B", unit_scale=True, file=self.stream,
                         leave=False, dynamic_ncols=True) if self.stream.isatty() else None)

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
                return
            now = time.monotonic()
            if now - self.last < self.interval_s:
                return
            self.last = now
            of = f"/{size(self.total)} ({100 * self.done / self.total:.0f}%)" if self.total else ""
            left = eta(self.done, self.total, now - self.t0) if self.total else None
            self.stream.write(f"[ftdist] {self.desc}: {size(self.done)}{of}, {duration(now - self.t0)}"
                              + (f", eta {left}" if left else "") + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.last != self.t0:  # long enough to have reported: say it ended
            self.stream.write(f"[ftdist] {self.desc}: done, {size(self.done)} in "
                              f"{duration(time.monotonic() - self.t0)}\n")
            self.stream.flush()
