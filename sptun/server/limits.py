"""Limits for the internet-facing registration API: a bounded per-source failure limiter and a
rejection log that summarises instead of writing one line per rejected connection.

Sources are keyed by `source_key`: an IPv4 address is its own key, an IPv6 address counts as its
/64 (one host usually holds a whole /64, so per-address keys would let it pick fresh ones at will).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sptun.errors import printable

UNKNOWN_SOURCE = "?"
MAX_SOURCES = 10000


def source_key(address: str) -> str:
    """The limiter key of a peer address: IPv4 as is (also when IPv4-mapped IPv6), IPv6 as its
    /64 network, anything unparsable as "?"."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return UNKNOWN_SOURCE
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class FailureLimiter:
    """Counts bad attempts per source key over a sliding window; `allowed` of them within `window`
    seconds block the source until the oldest leaves the window. Memory is bounded: at most
    `max_sources` keys (the least recently failing is forgotten first), `allowed` times each."""

    def __init__(self, allowed: int = 10, window: float = 60.0, max_sources: int = MAX_SOURCES) -> None:
        self.allowed, self.window, self.max_sources = allowed, window, max_sources
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()  # least recently failing first

    def blocked(self, source: str, now: float | None = None) -> bool:
        key = source_key(source)
        times = self.failures.get(key)
        if times is None:
            return False
        now = time.monotonic() if now is None else now
        while times and now - times[0] > self.window:
            times.popleft()
        if not times:
            del self.failures[key]
        return len(times) >= self.allowed

    def fail(self, source: str, now: float | None = None) -> None:
        key = source_key(source)
        times = self.failures.get(key)
        if times is None:
            times = self.failures[key] = deque(maxlen=self.allowed)  # the newest `allowed` decide
            while len(self.failures) > self.max_sources:
                self.failures.popitem(last=False)
        else:
            self.failures.move_to_end(key)
        times.append(time.monotonic() if now is None else now)

    def __len__(self) -> int:
        return len(self.failures)


@dataclass
class _Interval:
    start: float
    counts: Counter[str] = field(default_factory=Counter)  # rejections after the logged first one


def _reasons(counts: Counter[str]) -> str:
    return ", ".join(f"{printable(reason, 40)} {n}" for reason, n in counts.most_common())


class RejectionLog:
    """Summarises rejected registrations. Per source key, the first rejection of an interval of
    `every` seconds is logged in full; the rest are counted and logged as one summary line when the
    interval ends (seen lazily, on the next `record` or on `flush`). `flush`, called periodically,
    also logs one total of all rejections since the last flush, by reason. Busy and rate-limited
    rejections go through `count`: in the total only.

    Distinct sources each get their first line (200 sources: 200 lines, then the total); at most
    `max_sources` intervals are tracked, and the oldest is dropped unsummarised past that (its
    rejections are still in the total). Network strings are escaped with `printable`."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = MAX_SOURCES) -> None:
        self.log, self.every, self.clock, self.max_sources = logger, every, clock, max_sources
        self.intervals: OrderedDict[str, _Interval] = OrderedDict()  # oldest start first
        self.totals: Counter[str] = Counter()
        self.since = clock()

    def record(self, source: str, reason: str, detail: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self.totals[reason] += 1
        self._expire(now)
        key = source_key(source)
        interval = self.intervals.get(key)
        if interval is not None:
            interval.counts[reason] += 1
            return
        self.log.warning("rejected registration from %s: %s", printable(source, 60), printable(detail))
        self.intervals[key] = _Interval(now)
        while len(self.intervals) > self.max_sources:
            self.intervals.popitem(last=False)

    def count(self, reason: str) -> None:
        """A rejection that is in the total only (busy, rate-limited)."""
        self.totals[reason] += 1

    def flush(self, now: float | None = None) -> None:
        """Summarise the intervals that have ended, and log the total since the last flush."""
        now = self.clock() if now is None else now
        self._expire(now)
        if self.totals:
            self.log.warning("%d rejected registrations in the last %.0f s (reasons: %s)",
                             sum(self.totals.values()), now - self.since, _reasons(self.totals))
        self.totals = Counter()
        self.since = now

    def _expire(self, now: float) -> None:
        # Intervals are in order of start, so the ended ones are at the front: amortised O(1).
        while self.intervals:
            key, interval = next(iter(self.intervals.items()))
            if now - interval.start < self.every:
                break
            del self.intervals[key]
            if interval.counts:
                self.log.warning("%s: %d more rejections in the last %g s (reasons: %s)", printable(key, 60),
                                 sum(interval.counts.values()), self.every, _reasons(interval.counts))
