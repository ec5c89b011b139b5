"""A bounded rate of page requests per address, so nobody can guess links by the thousand or
keep the listener's one worker busy with pages while Daraja waits."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_ADDRESSES = 10_000  # addresses remembered at once; the least recently seen is forgotten


class PageRate:
    """A token bucket per address: ``per_minute`` requests a minute, up to that many at once.

    Memory is bounded by :data:`MAX_ADDRESSES`. Safe to call from several worker threads.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, address: str) -> float:
        """0 when ``address`` may make a request now (and it is counted), else the seconds
        until it may."""
        rate = self.per_minute / 60.0
        now = self.clock()
        with self._lock:
            tokens, since = self._buckets.pop(address, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - since) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            if not wait:
                tokens -= 1
            self._buckets[address] = (tokens, now)
            while len(self._buckets) > MAX_ADDRESSES:
                self._buckets.popitem(last=False)
        return wait
