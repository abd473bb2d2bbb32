"""Progress of long work: a live bar on a terminal, a few plain lines in a log, nothing when quiet."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

from tqdm import tqdm


# Who else hears of each bar's progress in this thread: the Python API's and the
# web app's callbacks, set with :func:`listening` around a run.
_LISTENER: ContextVar[Optional[Callable[[str, int, int], None]]] = ContextVar("recon_progress_listener", default=None)


@contextmanager
def listening(callback: Callable[[str, int, int], None]) -> Iterator[None]:
    """Within the block (this thread or task only), every bar's update also calls ``callback(description, count, total)``.

    What the callback raises comes out of the update, inside the work: the web app
    stops a cancelled run by raising KeyboardInterrupt there, as Ctrl-C would.
    """
    token = _LISTENER.set(callback)
    try:
        yield
    finally:
        _LISTENER.reset(token)


class Progress:
    def __init__(self, total: int, description: str, initial: int = 0, quiet: bool = False, stream=None):
        self.total = total
        self.description = description
        self.count = initial
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.start_count = initial
        self._next_line = initial
        self._bar: Optional[tqdm] = None
        if not quiet and self.stream.isatty():
            self._bar = tqdm(total=total, initial=initial, desc=description, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **stats) -> None:
        self.count += n
        listener = _LISTENER.get()
        if listener is not None:
            listener(self.description, self.count, self.total)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
            self._bar.update(n)
            return
        if self.quiet or self.count < self._next_line:
            return
        # Not a terminal (a log file, CI): one line per tenth of the work.
        self._next_line = self.count + max(1, self.total // 10)
        elapsed = time.monotonic() - self.started
        done = self.count - self.start_count
        eta = elapsed / done * (self.total - self.count) if done else 0.0
        figures = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
        print(f"{self.description}: {self.count}/{self.total} {figures} elapsed {elapsed:.0f}s eta {eta:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
