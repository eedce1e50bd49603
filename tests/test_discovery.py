"""sptun.discovery: TXT records into servers, and following DNS over time."""

from __future__ import annotations

import ipaddress
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sptun.discovery import (
    API_PORT,
    MAX_QUOTE,
    MAX_RECORDS,
    MAX_REFRESH,
    MIN_REFRESH,
    RETRY_AFTER_FAILURE,
    WG_PORT,
    Discovery,
    ServerRecord,
    parse_record,
    parse_records,
    quote,
)
from sptun.errors import SptunError
from sptun.keys import generate_private_key, public_key

FUZZ = settings.get_profile("sptun")

PK = public_key(generate_private_key())

# --- one record ---------------------------------------------------------------------------------

GOOD = [
    ("r=superprotocol;ip=10.5.0.5", ServerRecord("10.5.0.5")),
    ("r=superprotocol;ip=198.51.100.10;port=51999", ServerRecord("198.51.100.10", 51999, API_PORT)),
    ("api=7000;ip=198.51.100.10;r=superprotocol", ServerRecord("198.51.100.10", WG_PORT, 7000)),
    (f"pk={PK};port=1;api=65535;ip=198.51.100.10;r=superprotocol", ServerRecord("198.51.100.10", 1, 65535, PK)),
    ("  r = superprotocol ;  ip= 198.51.100.10 ; port =51820 ", ServerRecord("198.51.100.10")),
    ("r=superprotocol;ip=198.51.100.10;", ServerRecord("198.51.100.10")),
    ("r=superprotocol;;ip=198.51.100.10", ServerRecord("198.51.100.10")),
    ("R=SuperProtocol;IP=198.51.100.10", ServerRecord("198.51.100.10")),
    ("r=superprotocol;ip=198.51.100.10;v=2;weight=9;comment", None),  # "comment" is not key=value: see BAD
    ("r=superprotocol;ip=198.51.100.10;v=2;weight=9;note=", ServerRecord("198.51.100.10")),
    ("ip=198.51.100.10", ServerRecord("198.51.100.10")),  # r= defaults to superprotocol
    ("r=superprotocol;ip=2001:DB8::10", ServerRecord("2001:db8::10")),
    # Documentation, private, shared and 6to4 ranges are servers' addresses in labs and behind NAT.
    ("r=superprotocol;ip=192.0.2.1", ServerRecord("192.0.2.1")),
    ("r=superprotocol;ip=203.0.113.200", ServerRecord("203.0.113.200")),
    ("r=superprotocol;ip=172.16.0.1", ServerRecord("172.16.0.1")),
    ("r=superprotocol;ip=192.168.1.1", ServerRecord("192.168.1.1")),
    ("r=superprotocol;ip=100.64.0.1", ServerRecord("100.64.0.1")),
    ("r=superprotocol;ip=fd00::1", ServerRecord("fd00::1")),
    ("r=superprotocol;ip=fd00:ec2::253", ServerRecord("fd00:ec2::253")),  # only ::254 is the metadata service
    ("r=superprotocol;ip=2002:c633:640a::1", ServerRecord("2002:c633:640a::1")),
]
GOOD = [(text, want) for text, want in GOOD if want is not None]


@pytest.mark.parametrize("text, want", GOOD, ids=[t for t, _ in GOOD])
def test_good_records(text: str, want: ServerRecord) -> None:
    assert parse_record(text) == want


IGNORED = [
    "v=spf1 include:_spf.example.test ~all",
    "google-site-verification=abcdefg",
    "hello world",
    "",
    ";;;",
    "r=otherrealm;ip=198.51.100.10",
    "r=otherrealm;ip=not-an-ip;port=x;junk",  # another realm's record is not ours to judge
    "r=superprotocolx;ip=198.51.100.10",
]


@pytest.mark.parametrize("text", IGNORED)
def test_ignored_records(text: str) -> None:
    assert parse_record(text) is None
    assert parse_records([text]) == ([], [])  # silently: no warning


def test_configured_realm() -> None:
    assert parse_record("r=lab;ip=198.51.100.10", realm="lab") == ServerRecord("198.51.100.10")
    assert parse_record("r=LAB;ip=198.51.100.10", realm="lab") == ServerRecord("198.51.100.10")
    assert parse_record("r=superprotocol;ip=198.51.100.10", realm="lab") is None
    assert parse_record("ip=198.51.100.10", realm="lab") is None  # no r= is the default realm, not "lab"


BAD = [
    ("r=superprotocol", "ip"),
    ("r=superprotocol;port=51820", "ip"),
    ("r=superprotocol;ip=", "ip"),
    ("r=superprotocol;ip=198.51.100.300", "ip"),
    ("r=superprotocol;ip=server.example.test", "ip"),
    ("r=superprotocol;ip=198.51.100.0/24", "ip"),
    ("r=superprotocol;ip=0.0.0.0", "ip"),
    ("r=superprotocol;ip=127.0.0.1", "ip"),
    ("r=superprotocol;ip=224.0.0.1", "ip"),
    ("r=superprotocol;ip=::", "ip"),
    ("r=superprotocol;ip=169.254.169.254", "ip"),  # cloud metadata
    ("r=superprotocol;ip=fd00:ec2::254", "ip"),  # cloud metadata, IPv6
    ("r=superprotocol;ip=169.254.10.1", "ip"),  # link-local
    ("r=superprotocol;ip=fe80::1", "ip"),
    ("r=superprotocol;ip=febf::1", "ip"),  # the last of fe80::/10
    ("r=superprotocol;ip=fe80::1%eth0", "ip"),  # a scope
    ("r=superprotocol;ip=2001:db8::1%eth0", "ip"),
    ("r=superprotocol;ip=fec0::1", "ip"),  # site-local, deprecated
    ("r=superprotocol;ip=::ffff:198.51.100.10", "ip"),  # IPv4-mapped
    ("r=superprotocol;ip=::ffff:127.0.0.1", "ip"),
    ("r=superprotocol;ip=::198.51.100.10", "ip"),  # IPv4-compatible: reserved
    ("r=superprotocol;ip=100::1", "ip"),  # reserved (discard-only)
    ("r=superprotocol;ip=240.0.0.1", "ip"),  # reserved
    ("r=superprotocol;ip=255.255.255.255", "ip"),
    ("r=superprotocol;ip=0.1.2.3", "ip"),  # "this network"
    ("r=superprotocol;ip=198.51.100.10;port=0", "port"),
    ("r=superprotocol;ip=198.51.100.10;port=65536", "port"),
    ("r=superprotocol;ip=198.51.100.10;port=-1", "port"),
    ("r=superprotocol;ip=198.51.100.10;port=abc", "port"),
    ("r=superprotocol;ip=198.51.100.10;port=5 1", "port"),
    ("r=superprotocol;ip=198.51.100.10;port=\u0664\u0664\u0663", "port"),  # Arabic-Indic 443
    ("r=superprotocol;ip=198.51.100.10;port=\u00b2", "port"),  # superscript two: isdigit() but not int()
    ("r=superprotocol;ip=198.51.100.10;api=99999", "api"),
    ("r=superprotocol;ip=198.51.100.10;pk=notakey", "pk"),
    ("r=superprotocol;ip=198.51.100.10;pk=" + PK[:-4], "pk"),
    ("r=superprotocol;ip=198.51.100.10;pk=", "pk"),
    ("r=superprotocol;ip=198.51.100.10;ip=198.51.100.11", "'ip' appears twice"),
    ("r=superprotocol;r=superprotocol;ip=198.51.100.10", "'r' appears twice"),
    ("r=superprotocol;ip=198.51.100.10;comment", "'comment' is not key=value"),
    ("r=superprotocol;ip=198.51.100.10;=5", "not key=value"),
]


@pytest.mark.parametrize("text, why", BAD, ids=[t for t, _ in BAD])
def test_malformed_records(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_record(text)
    assert why in str(info.value)
    assert str(info.value).isprintable()


@pytest.mark.parametrize("text, why", BAD, ids=[t for t, _ in BAD])
def test_malformed_record_is_skipped_with_a_warning_that_quotes_it(text: str, why: str) -> None:
    good = "r=superprotocol;ip=198.51.100.20"
    servers, warnings = parse_records([text, good, "v=spf1 -all"])
    assert servers == [ServerRecord("198.51.100.20")]
    assert len(warnings) == 1
    assert repr(text) in warnings[0] and why in warnings[0]


def test_records_are_sorted_and_deduplicated() -> None:
    texts = ["r=superprotocol;ip=198.51.100.30", "r=superprotocol;ip=198.51.100.10",
             "ip=198.51.100.30;r=superprotocol", "r=superprotocol;ip=198.51.100.20;port=1000"]
    servers, warnings = parse_records(texts)
    assert servers == [ServerRecord("198.51.100.10"), ServerRecord("198.51.100.20", 1000),
                       ServerRecord("198.51.100.30")]
    assert warnings == []  # the same server twice, identically, is not a mistake


def test_conflicting_records_for_one_server_keep_the_first() -> None:
    second = "r=superprotocol;ip=198.51.100.10;port=2000"
    servers, warnings = parse_records(["r=superprotocol;ip=198.51.100.10;port=1000", second])
    assert servers == [ServerRecord("198.51.100.10", 1000)]
    assert len(warnings) == 1 and repr(second) in warnings[0] and "twice" in warnings[0]


def test_ipv6_and_ipv4_servers_together() -> None:
    servers, _ = parse_records(["r=superprotocol;ip=2001:db8::1", "r=superprotocol;ip=198.51.100.10"])
    assert {s.ip for s in servers} == {"2001:db8::1", "198.51.100.10"}


@FUZZ
@given(st.text(max_size=120))
def test_fuzz_parse_record(text: str) -> None:
    """Any text is a record, nothing, or a ValueError with the reason; never another exception."""
    try:
        record = parse_record(text)
    except ValueError as e:
        assert str(e) and str(e).isprintable()
        return
    if record is not None:
        assert 1 <= record.port <= 65535 and 1 <= record.api <= 65535


keys_and_values = st.lists(st.tuples(st.sampled_from(["r", "ip", "port", "api", "pk", "x", " IP ", ""]),
                                     st.one_of(st.sampled_from(["superprotocol", "198.51.100.10", "::1", "443",
                                                                "0", "99999", PK, "", " "]),
                                               st.text(max_size=8))), max_size=6)


@settings(FUZZ, max_examples=FUZZ.max_examples // 4)  # costly to draw
@given(keys_and_values, st.booleans())
def test_fuzz_structured_records(pairs: list[tuple[str, str]], trailing: bool) -> None:
    text = ";".join(f"{k}={v}" for k, v in pairs) + (";" if trailing else "")
    servers, warnings = parse_records([text, "r=superprotocol;ip=192.0.2.1"])
    assert ServerRecord("192.0.2.1") in servers or any("192.0.2.1" in w for w in warnings)
    for warning in warnings:
        assert quote(text) in warning or repr("r=superprotocol;ip=192.0.2.1") in warning
        assert warning.isprintable()


# --- hostile answers ---------------------------------------------------------------------------

OVERLAYS = [ipaddress.ip_network("10.99.0.0/16"), ipaddress.ip_network("fd99::/64")]


def many(n: int) -> list[str]:
    return [f"r=superprotocol;ip=10.{i // 250}.{i % 250}.1" for i in range(n)]


def test_at_most_max_records_count() -> None:
    servers, warnings = parse_records(many(MAX_RECORDS))
    assert len(servers) == MAX_RECORDS and warnings == []
    servers, warnings = parse_records(many(MAX_RECORDS + 10))
    assert len(servers) == MAX_RECORDS
    assert warnings == [f"ignoring 10 of {MAX_RECORDS + 10} TXT records: at most {MAX_RECORDS} count"]


def test_the_same_records_in_any_order_give_the_same_servers() -> None:
    """Resolvers shuffle a TXT answer: which records count, and which of two that conflict
    wins, must not change from one query to the next."""
    texts = many(MAX_RECORDS + 10) + ["r=superprotocol;ip=10.0.0.1;port=2000"]
    first = parse_records(texts)
    assert parse_records(texts[::-1]) == first
    assert parse_records(texts[5:] + texts[:5]) == first


def test_a_server_inside_an_excluded_overlay_is_refused() -> None:
    for text in ["r=superprotocol;ip=10.99.0.1", "r=superprotocol;ip=10.99.255.254", "r=superprotocol;ip=fd99::5"]:
        with pytest.raises(ValueError, match="inside the overlay"):
            parse_record(text, excluded=OVERLAYS)
        assert parse_record(text) is not None  # not excluded, it is fine
    assert parse_record("r=superprotocol;ip=10.98.0.1", excluded=OVERLAYS) == ServerRecord("10.98.0.1")
    assert parse_record("r=superprotocol;ip=fd98::5", excluded=OVERLAYS) == ServerRecord("fd98::5")
    servers, warnings = parse_records([S1, "r=superprotocol;ip=10.99.0.1"], excluded=OVERLAYS)
    assert servers == [R1] and len(warnings) == 1 and "10.99.0.0/16" in warnings[0]


HOSTILE = [
    "r=superprotocol;ip=not-an-ip\n<0>forged: root login",
    "r=superprotocol;ip=198.51.100.10;port=1\r\n<0>forged",
    "r=superprotocol;ip=198.51.100.10;pk=\x1b[2J\x1b]0;title\x07",
    "r=superprotocol;ip=198.51.100.10;x\n<0>=1;x\n<0>=2",  # the key is quoted in the reason too
    "r=superprotocol;ip=198.51.100.10;junk\u2028<0>forged",  # a Unicode line separator
    "r=superprotocol;ip=2001:db8::1%\n<0>forged",  # ipaddress takes anything as an IPv6 scope
    "r=superprotocol;ip=198.51.100.10;\x00\x7f\x85\u202e",
]


@pytest.mark.parametrize("text", HOSTILE, ids=repr)
def test_a_hostile_record_is_quoted_on_one_printable_line(text: str) -> None:
    servers, warnings = parse_records([text, S2])
    assert servers == [R2] and len(warnings) == 1
    assert warnings[0].isprintable(), warnings[0]  # no newline, no control character
    assert "\n<0>" not in warnings[0] and "\u2028" not in warnings[0]


def test_a_long_record_is_cut_in_the_warning() -> None:
    text = "r=superprotocol;ip=not-an-ip;" + "x=" + "y" * 10_000
    _, warnings = parse_records([text])
    assert len(warnings) == 1 and "not-an-ip" in warnings[0] and f"({len(text)} characters)" in warnings[0]
    assert len(warnings[0]) < 2 * MAX_QUOTE + 100
    _, warnings = parse_records(["r=superprotocol;ip=" + "1" * 10_000])  # the reason quotes a field: cut too
    assert len(warnings) == 1 and len(warnings[0]) < 3 * MAX_QUOTE + 100


def test_quote() -> None:
    assert quote("r=superprotocol;ip=junk") == "'r=superprotocol;ip=junk'"
    assert quote("a\nb\x00\x1b") == "'a\\nb\\x00\\x1b'"
    assert quote("x" * MAX_QUOTE) == repr("x" * MAX_QUOTE)
    assert quote("x" * (MAX_QUOTE + 1)) == repr("x" * MAX_QUOTE) + f"... ({MAX_QUOTE + 1} characters)"


# --- following DNS over time ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTxt:
    """Answers from a script: (texts, ttl) or an exception; counts the queries."""

    def __init__(self, *answers: tuple[list[str], int] | Exception) -> None:
        self.answers = list(answers)
        self.queries: list[str] = []

    def txt(self, name: str) -> tuple[list[str], int]:
        self.queries.append(name)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


S1, S2 = "r=superprotocol;ip=198.51.100.10", "r=superprotocol;ip=198.51.100.11"
R1, R2 = ServerRecord("198.51.100.10"), ServerRecord("198.51.100.11")
DNS_DOWN = SptunError("DNS lookup of app.example.test failed: timeout", hint="check the nameservers")


def make(*answers: tuple[list[str], int] | Exception, realm: str = "superprotocol") -> tuple[Discovery, FakeTxt, Clock]:
    source, clock = FakeTxt(*answers), Clock()
    return Discovery("app.example.test", source, realm=realm, clock=clock), source, clock


def test_follows_the_ttl() -> None:
    d, source, clock = make(([S1], 60), ([S1, S2], 60))
    assert d.current() == [R1]
    assert source.queries == ["app.example.test"]
    clock.now += 59.9
    assert d.current() == [R1] and len(source.queries) == 1  # cached until the TTL runs out
    clock.now += 0.1
    assert d.current() == [R1, R2] and len(source.queries) == 2  # a server was added
    assert not d.due()


def test_a_server_removed_from_dns_goes() -> None:
    d, _, clock = make(([S1, S2], 30), ([S2], 30))
    assert d.current() == [R1, R2]
    clock.now += 30
    assert d.current() == [R2]


@pytest.mark.parametrize("ttl, interval", [(0, MIN_REFRESH), (-5, MIN_REFRESH), (1, 1.0), (86400, MAX_REFRESH),
                                           (2**31 - 1, MAX_REFRESH)])
def test_ttl_is_clamped(ttl: int, interval: float) -> None:
    d, source, clock = make(([S1], ttl))
    d.current()
    clock.now += interval - 0.01
    d.current()
    assert len(source.queries) == 1
    clock.now += 0.01
    d.current()
    assert len(source.queries) == 2


@pytest.mark.parametrize("bad", [DNS_DOWN, ([], 60), (["v=spf1 -all", "r=superprotocol;ip=junk"], 60),
                                 (["r=other;ip=198.51.100.99"], 60)],
                         ids=["dns-error", "empty-answer", "only-unusable-records", "other-realm-only"])
def test_last_good_answer_stays_and_retries(bad: tuple[list[str], int] | Exception) -> None:
    d, source, clock = make(([S1, S2], 60), bad, bad, ([S2], 60))
    assert d.current() == [R1, R2]
    clock.now += 60
    assert d.current() == [R1, R2]  # the bad answer changes nothing
    assert d.failures == 1 and d.last_error
    clock.now += RETRY_AFTER_FAILURE - 0.01
    assert d.current() == [R1, R2] and len(source.queries) == 2  # no hammering
    clock.now += 0.01
    assert d.current() == [R1, R2] and len(source.queries) == 3  # retried, still bad
    clock.now += RETRY_AFTER_FAILURE
    assert d.current() == [R2] and len(source.queries) == 4  # DNS is back
    assert d.last_error == "" and d.failures == 2


@pytest.mark.parametrize("bad", [DNS_DOWN, ([], 60), (["r=superprotocol;ip=junk"], 60)],
                         ids=["dns-error", "empty-answer", "only-malformed"])
def test_no_good_answer_yet_raises(bad: tuple[list[str], int] | Exception) -> None:
    d, source, clock = make(bad, ([S1], 60))
    with pytest.raises(SptunError) as info:
        d.current()
    assert "app.example.test" in str(info.value)
    assert d.servers is None
    clock.now += RETRY_AFTER_FAILURE
    assert d.current() == [R1]


def test_no_good_answer_yet_does_not_hammer_dns() -> None:
    d, source, clock = make(DNS_DOWN, ([S1], 60))
    with pytest.raises(SptunError):
        d.current()
    clock.now += RETRY_AFTER_FAILURE - 0.01
    with pytest.raises(SptunError) as info:
        d.current()
    assert len(source.queries) == 1 and "app.example.test" in str(info.value)
    clock.now += 0.01
    assert d.current() == [R1] and len(source.queries) == 2


def test_no_usable_record_names_the_realm() -> None:
    d, _, _ = make((["r=superprotocol;ip=198.51.100.10"], 60), realm="lab")
    with pytest.raises(SptunError) as info:
        d.refresh()
    assert "'lab'" in info.value.message and "r=lab;ip=" in info.value.hint


def test_malformed_records_are_logged_and_the_rest_count(caplog: pytest.LogCaptureFixture) -> None:
    bad = "r=superprotocol;ip=198.51.100.10;port=huge"
    d, _, _ = make(([bad, S2], 60))
    with caplog.at_level(logging.WARNING, logger="sptun"):
        assert d.current() == [R2]
    assert any(repr(bad) in r.getMessage() and "app.example.test" in r.getMessage() for r in caplog.records)


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_malformed_record_is_logged_once_not_on_every_refresh(caplog: pytest.LogCaptureFixture) -> None:
    bad, other_bad = "r=superprotocol;ip=junk", "r=superprotocol;ip=127.0.0.1"
    d, _, clock = make(([bad, S2], 60), ([bad, S2], 60), ([S2, bad, S1], 60), ([other_bad, S2], 60),
                       ([bad, S2], 60))
    with caplog.at_level(logging.WARNING, logger="sptun"):
        assert d.current() == [R2]
        for _ in range(2):
            clock.now += 60
            d.current()
        assert d.servers == [R1, R2]
        assert len(warnings_logged(caplog)) == 1 and repr(bad) in warnings_logged(caplog)[0]
        clock.now += 60
        d.current()  # another record is malformed: logged
        assert len(warnings_logged(caplog)) == 2 and repr(other_bad) in warnings_logged(caplog)[1]
        clock.now += 60
        d.current()  # the first is back: logged again
        assert len(warnings_logged(caplog)) == 3 and repr(bad) in warnings_logged(caplog)[2]


def test_a_dns_failure_does_not_make_the_warnings_come_again(caplog: pytest.LogCaptureFixture) -> None:
    bad = "r=superprotocol;ip=junk"
    d, _, clock = make(([bad, S1], 60), DNS_DOWN, ([bad, S1], 60))
    with caplog.at_level(logging.WARNING, logger="sptun"):
        d.current()
        clock.now += 60
        assert d.current() == [R1]  # DNS is down: the last good answer stays
        clock.now += RETRY_AFTER_FAILURE
        assert d.current() == [R1]
    assert sum(repr(bad) in m for m in warnings_logged(caplog)) == 1


def test_too_many_records_are_one_warning_per_answer(caplog: pytest.LogCaptureFixture) -> None:
    texts = many(MAX_RECORDS + 3)
    d, _, clock = make((texts, 60), (texts[::-1], 60), (texts[2:] + texts[:2], 60), (many(MAX_RECORDS + 4), 60))
    with caplog.at_level(logging.WARNING, logger="sptun"):
        for _ in range(3):  # the same records, shuffled
            assert len(d.current()) == MAX_RECORDS
            clock.now += 60
        assert len(warnings_logged(caplog)) == 1 and "ignoring 3 of" in warnings_logged(caplog)[0]
        d.current()  # a new answer
        assert len(warnings_logged(caplog)) == 2 and "ignoring 4 of" in warnings_logged(caplog)[1]


def test_set_excluded_drops_a_server_inside_an_overlay(caplog: pytest.LogCaptureFixture) -> None:
    inside = "r=superprotocol;ip=10.99.0.7"
    d, source, clock = make(([S1, inside], 60))
    assert d.current() == [ServerRecord("10.99.0.7"), R1]
    with caplog.at_level(logging.WARNING, logger="sptun"):
        d.set_excluded(OVERLAYS)
        assert d.servers == [R1]  # at once, even if DNS failed now
        assert d.due()  # and DNS is asked again
        assert d.current() == [R1] and len(source.queries) == 2
    assert any("10.99.0.7" in m and "inside the overlay 10.99.0.0/16" in m for m in warnings_logged(caplog))
    clock.now += 10
    d.set_excluded(list(reversed(OVERLAYS)))  # the same networks: nothing to do
    assert not d.due()
    d.set_excluded([])  # the tunnel went: the server may come back
    assert d.current() == [ServerRecord("10.99.0.7"), R1] and len(source.queries) == 3


def test_an_excluded_server_is_not_a_good_answer() -> None:
    d, _, _ = make((["r=superprotocol;ip=10.99.0.7"], 60))
    d.set_excluded(OVERLAYS)
    with pytest.raises(SptunError, match="no usable TXT record"):
        d.current()


def test_hostile_records_are_logged_on_one_line(caplog: pytest.LogCaptureFixture) -> None:
    d, _, _ = make(([*HOSTILE, S2], 60))
    with caplog.at_level(logging.WARNING, logger="sptun"):
        assert d.current() == [R2]
    assert len(warnings_logged(caplog)) == len(HOSTILE)
    assert all(m.isprintable() for m in warnings_logged(caplog))
