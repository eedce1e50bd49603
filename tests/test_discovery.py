"""sptun.discovery: TXT records into servers, and following DNS over time."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sptun.discovery import (
    API_PORT,
    MAX_REFRESH,
    MIN_REFRESH,
    RETRY_AFTER_FAILURE,
    WG_PORT,
    Discovery,
    ServerRecord,
    parse_record,
    parse_records,
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
    ("r=superprotocol;ip=198.51.100.10;ip=198.51.100.11", "ip= appears twice"),
    ("r=superprotocol;r=superprotocol;ip=198.51.100.10", "r= appears twice"),
    ("r=superprotocol;ip=198.51.100.10;comment", "'comment' is not key=value"),
    ("r=superprotocol;ip=198.51.100.10;=5", "not key=value"),
]


@pytest.mark.parametrize("text, why", BAD, ids=[t for t, _ in BAD])
def test_malformed_records(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_record(text)
    assert why in str(info.value)


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
        assert str(e)
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
        assert repr(text) in warning or repr("r=superprotocol;ip=192.0.2.1") in warning


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
