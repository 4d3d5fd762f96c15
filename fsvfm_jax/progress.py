"""Progress of long work: a tqdm bar on a terminal, and on a non-interactive stream (a batch job's
log) no bar, only a plain log line now and then, so logs stay readable."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("fsvfm_jax.progress")


class Progress:
    """``update(n, **counts)`` after each unit of work; ``close()`` (or ``with``) at the end.

    On a terminal (``stream.isatty()``, or ``interactive=True``): a tqdm bar with rate, ETA and the
    counts, and log records are printed above the bar instead of through it. Otherwise: an INFO
    line ``desc: done/total (rate, ETA) counts`` at most every ``log_every_s`` seconds and one at
    the end; ``log_every_s=None`` prints nothing (for loops that log on their own).
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", stream=None, interactive: bool | None = None,
                 log_every_s: float | None = 60.0):
        stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.done, self.counts = total, desc, unit, 0, {}
        self.interactive = stream.isatty() if interactive is None else interactive
        self.log_every_s = log_every_s
        self._t0 = self._last = time.monotonic()
        self._bar = self._redirect = None
        if self.interactive:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, smoothing=0.05)

    def set_total(self, total: int) -> None:
        """For work whose size is known only once it has started."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1, **counts) -> None:
        self.done += n
        self.counts.update(counts)
        if self._bar is not None:
            if counts:
                self._bar.set_postfix(self.counts, refresh=False)
            self._bar.update(n)
        elif self.log_every_s is not None and time.monotonic() - self._last >= self.log_every_s:
            self._log()

    def _log(self) -> None:
        self._last = now = time.monotonic()
        rate = self.done / max(now - self._t0, 1e-9)
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if rate > 0 and self.total else ""
        extra = "".join(f" {k} {v}" for k, v in self.counts.items())
        log.info("%s: %d/%d %s (%.1f %s/s%s)%s", self.desc, self.done, self.total, self.unit, rate, self.unit, eta, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
            self._bar = None
        elif self.log_every_s is not None and self._last is not None:
            self._log()
            self._last = None  # closed: log the end once

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
