"""The registration API's limits: source keys, the bounded failure limiter, the rejection log
summaries and escaping of network strings in log lines."""

from __future__ import annotations

import logging

import pytest

from sptun.errors import printable
from sptun.server.limits import FailureLimiter, RejectionLog, source_key


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> tuple[logging.Logger, Lines]:
    logger = logging.getLogger("sptun.test-limits")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = Lines()
    logger.handlers = [handler]
    return logger, handler


# --- source_key


@pytest.mark.parametrize("address, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("", "?"),
    ("not an address", "?"),
    ("x\n<0>forged", "?"),
])
def test_source_key(address: str, key: str) -> None:
    assert source_key(address) == key


# --- FailureLimiter


def test_limiter_blocks_after_allowed_failures_and_forgets_after_window() -> None:
    limiter = FailureLimiter(allowed=3, window=60.0)
    for t in range(3):
        assert not limiter.blocked("192.0.2.1", now=t)
        limiter.fail("192.0.2.1", now=t)
    assert limiter.blocked("192.0.2.1", now=3)
    assert not limiter.blocked("192.0.2.2", now=3)
    assert not limiter.blocked("192.0.2.1", now=60.5)  # the first left the window
    assert not limiter.blocked("192.0.2.1", now=200)
    assert len(limiter) == 0  # an expired source is forgotten


def test_ipv6_addresses_in_one_64_share_a_budget() -> None:
    limiter = FailureLimiter(allowed=4, window=60.0)
    for i in range(4):
        limiter.fail(f"2001:db8:1:2::{i + 1:x}", now=0)
    assert limiter.blocked("2001:db8:1:2:aaaa::99", now=1)
    assert not limiter.blocked("2001:db8:1:3::1", now=1)  # the next /64 has its own


def test_mapped_ipv4_is_the_ipv4_address() -> None:
    limiter = FailureLimiter(allowed=2, window=60.0)
    limiter.fail("::ffff:192.0.2.9", now=0)
    limiter.fail("192.0.2.9", now=0)
    assert limiter.blocked("192.0.2.9", now=1)
    assert limiter.blocked("::ffff:192.0.2.9", now=1)


def test_limiter_memory_is_bounded() -> None:
    limiter = FailureLimiter(allowed=10, window=60.0, max_sources=1000)
    for i in range(100_000):
        limiter.fail(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now=0)
        limiter.fail(f"2001:db8:{i:x}::1", now=0)
        assert len(limiter.failures) <= 1000
    for _ in range(100):
        limiter.fail("192.0.2.1", now=0)
    assert all(len(times) <= 10 for times in limiter.failures.values())


def test_limiter_evicts_the_least_recently_failing() -> None:
    limiter = FailureLimiter(allowed=2, window=60.0, max_sources=2)
    limiter.fail("192.0.2.1", now=0)
    limiter.fail("192.0.2.2", now=0)
    limiter.fail("192.0.2.1", now=1)  # .1 is now the most recent
    limiter.fail("192.0.2.3", now=2)  # evicts .2
    assert list(limiter.failures) == ["192.0.2.1", "192.0.2.3"]
    assert limiter.blocked("192.0.2.1", now=2)


# --- RejectionLog


def test_burst_from_one_source_gives_at_most_two_lines(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    rejections = RejectionLog(logger, every=10.0, clock=lambda: 0.0)
    for i in range(200):
        rejections.record("192.0.2.1", "bad-token" if i % 3 else "replay", "token not accepted", now=i * 0.01)
    rejections.record("192.0.2.1", "bad-token", "token not accepted", now=5.0)
    assert handler.lines == ["rejected registration from 192.0.2.1: token not accepted"]
    rejections.flush(now=10.0)  # the interval ended: its summary, then the total
    assert handler.lines[1:] == [
        "192.0.2.1: 200 more rejections in the last 10 s (reasons: bad-token 134, replay 66)",
        "201 rejected registrations in the last 10 s (reasons: bad-token 134, replay 67)",
    ]


def test_interval_end_is_seen_on_the_next_record(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    rejections = RejectionLog(logger, every=10.0, clock=lambda: 0.0)
    for t in (0.0, 1.0, 2.0, 12.0):
        rejections.record("192.0.2.1", "replay", "replayed", now=t)
    assert handler.lines == [
        "rejected registration from 192.0.2.1: replayed",
        "192.0.2.1: 2 more rejections in the last 10 s (reasons: replay 2)",
        "rejected registration from 192.0.2.1: replayed",  # a new interval
    ]


def test_single_rejection_gives_no_summary(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    rejections = RejectionLog(logger, clock=lambda: 0.0)
    rejections.record("192.0.2.1", "timeout", "no request in time", now=0)
    rejections.flush(now=30)
    rejections.flush(now=40)  # nothing since the last flush: no line
    assert handler.lines == ["rejected registration from 192.0.2.1: no request in time",
                             "1 rejected registrations in the last 30 s (reasons: timeout 1)"]


def test_burst_from_many_sources_one_line_each_then_the_total(lines: tuple[logging.Logger, Lines]) -> None:
    """The requirement is one line per source key per interval: 200 sources give 200 first lines
    (an IPv6 /64 is one source), then one total; repeats within the interval add nothing."""
    logger, handler = lines
    rejections = RejectionLog(logger, every=10.0, clock=lambda: 0.0)
    for _ in range(5):
        for i in range(200):
            rejections.record(f"198.51.100.{i}", "bad-token", "bad", now=1)
    for i in range(200):
        rejections.record(f"2001:db8:7:7::{i + 1:x}", "bad-token", "bad", now=1)
    assert len(handler.lines) == 201
    rejections.flush(now=5)  # the intervals go on: the total only
    assert handler.lines[-1] == "1200 rejected registrations in the last 5 s (reasons: bad-token 1200)"
    rejections.flush(now=11)  # they ended: one summary per repeating source, no total (nothing new)
    assert len(handler.lines) == 201 + 1 + 201
    assert handler.lines[-1] == "2001:db8:7:7::/64: 199 more rejections in the last 10 s (reasons: bad-token 199)"


def test_counted_rejections_are_in_the_total_only(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    rejections = RejectionLog(logger, clock=lambda: 100.0)
    for _ in range(50):
        rejections.count("busy")
    for _ in range(20):
        rejections.count("rate-limited")
    assert handler.lines == []
    rejections.flush(now=110)
    assert handler.lines == ["70 rejected registrations in the last 10 s (reasons: busy 50, rate-limited 20)"]


def test_rejection_log_memory_is_bounded(lines: tuple[logging.Logger, Lines]) -> None:
    logger, _ = lines
    rejections = RejectionLog(logger, clock=lambda: 0.0, max_sources=100)
    for i in range(10_000):
        rejections.record(f"10.0.{i >> 8 & 255}.{i & 255}", "bad-token", "bad", now=0)
        assert len(rejections.intervals) <= 100


def test_rejection_log_uses_its_clock(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    now = [0.0]
    rejections = RejectionLog(logger, every=10.0, clock=lambda: now[0])
    rejections.record("192.0.2.1", "replay", "replayed")
    rejections.record("192.0.2.1", "replay", "replayed")
    now[0] = 10.0
    rejections.flush()
    assert handler.lines[1:] == ["192.0.2.1: 1 more rejections in the last 10 s (reasons: replay 1)",
                                 "2 rejected registrations in the last 10 s (reasons: replay 2)"]


def test_network_strings_are_escaped_in_log_lines(lines: tuple[logging.Logger, Lines]) -> None:
    logger, handler = lines
    rejections = RejectionLog(logger, clock=lambda: 0.0)
    rejections.record("192.0.2.1", "bad\nreason", "unknown domain x\n<0>forged\r\u202e", now=0)
    rejections.record("x\n<0>forged", "bad-token", "x", now=0)
    rejections.record("x\n<0>forged", "bad-token", "x", now=0)
    rejections.flush(now=20)
    assert handler.lines[0] == "rejected registration from 192.0.2.1: unknown domain x\\x0a<0>forged\\x0d\\u202e"
    assert handler.lines[1] == "rejected registration from x\\x0a<0>forged: x"
    assert all("\n" not in line and "\r" not in line for line in handler.lines)
    assert "bad\\x0areason 1" in handler.lines[-1]


# --- printable


@pytest.mark.parametrize("text, escaped", [
    ("x\n<0>forged", "x\\x0a<0>forged"),
    ("a\r\nb", "a\\x0d\\x0ab"),
    ("\x00\x1f\x7f\x85\x9b", "\\x00\\x1f\\x7f\\x85\\x9b"),  # C0, DEL, C1 (NEL, CSI)
    ("\udc80", "\\udc80"),  # a lone surrogate (from surrogateescape)
    ("abc\u202egnp.exe", "abc\\u202egnp.exe"),  # bidi override
    ("\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069", "\\u202a\\u202b\\u202c\\u202d\\u2066\\u2067\\u2068\\u2069"),
    ("\u2028\u2029", "\\u2028\\u2029"),  # line and paragraph separators
    ("\U000e0001", "\\U000e0001"),
    ("é.example ünïcode", "é.example ünïcode"),  # printable non-ASCII stays
    ("a\\x0ab", "a\\x0ab"),
    (42, "42"),
])
def test_printable_escapes(text: object, escaped: str) -> None:
    assert printable(text) == escaped


def test_printable_cuts_long_strings() -> None:
    assert printable("a" * 120) == "a" * 120
    assert printable("a" * 121) == "a" * 119 + "…"
    assert printable("a" * 10_000_000) == "a" * 119 + "…"
    assert printable("abc", limit=2) == "a…"
    assert printable("\n" * 1000, limit=10) == "\\x0a\\x0a…"  # no escape is cut in half
    assert printable("\n" * 2, limit=8) == "\\x0a\\x0a"


@pytest.mark.parametrize("text", ["x\n" * 500, "\r" * 500, "\u2028" * 50, "\udc80\n" * 100])
def test_printable_never_gives_a_raw_line_break(text: str) -> None:
    out = printable(text)
    assert len(out) <= 120
    assert not any(ch in out for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
