"""Tunnel servers from DNS TXT records: `r=superprotocol;ip=198.51.100.10[;port=..;api=..;pk=..]`."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.exception
import dns.resolver

from sptun.config import DEFAULT_REALM
from sptun.errors import SptunError
from sptun.keys import decode_key

log = logging.getLogger("sptun")

WG_PORT = 51820
API_PORT = 51821
MIN_REFRESH = 1.0  # seconds; a TTL of 0 must not turn into a busy loop
MAX_REFRESH = 300.0  # a long TTL still gets checked every few minutes
RETRY_AFTER_FAILURE = 5.0
MAX_RECORDS = 64  # TXT records considered per name; the rest are ignored, with one warning
MAX_QUOTE = 120  # characters of a record quoted in a log line

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never a server: cloud metadata services, and "this network" (0/8, where 0.0.0.0 is only the start).
REFUSED_ADDRESSES = frozenset(map(ipaddress.ip_address, ["169.254.169.254", "fd00:ec2::254"]))
THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def quote(text: str, limit: int = MAX_QUOTE) -> str:
    """Untrusted text for a log line: escaped as repr() does (a control character, a newline,
    any non-printable character shows as \\xNN, \\n, \\uNNNN), so it can neither break the line
    nor start one with a syslog priority like `<0>`; and cut to its first `limit` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass(frozen=True, order=True)
class ServerRecord:
    ip: str
    port: int = WG_PORT
    api: int = API_PORT
    pk: str | None = None  # pinned WireGuard public key of the server


def parse_record(text: str, realm: str = DEFAULT_REALM, excluded: Collection[Network] = ()) -> ServerRecord | None:
    """One TXT record (its strings already joined). None if it belongs to another realm, or
    is not an sptun record at all; ValueError with the reason if it is ours but malformed, or
    names an address that cannot be a server's (see server_address). `excluded`: the overlays
    of the tunnels in use, which no server may be inside."""
    fields: dict[str, str] = {}
    problems = []
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not part.strip():
            continue
        if not sep or not key:
            problems.append(f"{quote(part.strip())} is not key=value")
        elif key in fields:
            problems.append(f"{quote(key)} appears twice")  # the key too is the record's text
        else:
            fields[key] = value.strip()
    if "r" not in fields and "ip" not in fields:
        return None  # an unrelated TXT record (SPF, site verification, ...)
    if fields.get("r", DEFAULT_REALM).lower() != realm.lower():
        return None
    if problems:
        raise ValueError(problems[0])
    if "ip" not in fields:
        raise ValueError("no ip=")
    ip = server_address(fields["ip"], excluded)
    port = _port(fields, "port", WG_PORT)
    api = _port(fields, "api", API_PORT)
    pk = fields.get("pk")
    if pk is not None and decode_key(pk) is None:
        raise ValueError(f"pk={quote(pk)} is not a base64 WireGuard key")
    return ServerRecord(str(ip), port, api, pk)


def server_address(text: str, excluded: Collection[Network] = ()) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of ip=, or ValueError if a server cannot be there: loopback, link-local,
    multicast, unspecified, reserved (which includes 240/4 and most of ::/8), an IPv4-mapped
    IPv6 address, a cloud metadata service, or inside one of the `excluded` networks. Private
    and documentation ranges (10/8, fd00::/8, 198.51.100/24, 2001:db8::/32, ...) are fine."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"ip={quote(text)} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and (ip.scope_id is not None or ip.ipv4_mapped or ip.is_site_local):
        raise ValueError(f"ip={quote(text)} is not a usable server address")  # fe80::1%eth0, ::ffff:10.0.0.1, fec0::1
    if (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
            or ip in REFUSED_ADDRESSES or ip in THIS_NETWORK):
        raise ValueError(f"ip={ip} is not a usable server address")
    for network in excluded:
        if ip in network:
            raise ValueError(f"ip={ip} is inside the overlay {network} of a tunnel")
    return ip


def _port(fields: dict[str, str], key: str, default: int) -> int:
    if key not in fields:
        return default
    value = fields[key]
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:  # not "²" nor "٤٤٣"
        raise ValueError(f"{key}={quote(value)} is not a port")
    return int(value)


def parse_records(texts: list[str], realm: str = DEFAULT_REALM,
                  excluded: Collection[Network] = ()) -> tuple[list[ServerRecord], list[str]]:
    """All servers of a TXT answer, and a warning for each record that was skipped. The records
    are taken in sorted order, not the order DNS gave (which resolvers shuffle), so that the
    same records always give the same servers: which MAX_RECORDS count, which of two
    conflicting ones wins."""
    texts = sorted(texts)
    warnings = []
    if len(texts) > MAX_RECORDS:
        warnings.append(f"ignoring {len(texts) - MAX_RECORDS} of {len(texts)} TXT records: at most {MAX_RECORDS} count")
        texts = texts[:MAX_RECORDS]
    servers: dict[str, ServerRecord] = {}
    for text in texts:
        try:
            record = parse_record(text, realm, excluded)
        except ValueError as e:
            warnings.append(f"skipping malformed TXT record {quote(text)}: {e}")
            continue
        if record is None:
            continue
        if record.ip in servers and servers[record.ip] != record:
            warnings.append(f"skipping TXT record {quote(text)}: server {record.ip} is listed twice")
            continue
        servers[record.ip] = record
    return sorted(servers.values()), warnings


class TxtSource(Protocol):
    def txt(self, name: str) -> tuple[list[str], int]:
        """The joined strings of each TXT record of name, and the TTL."""
        ...


class DnsTxtSource:
    """The real resolver: dnspython, against the configured nameservers or the system's."""

    def __init__(self, nameservers: tuple[str, ...] = (), timeout: float = 3.0) -> None:
        self.resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            self.resolver.nameservers = list(nameservers)
        self.resolver.lifetime = timeout
        self.resolver.cache = None  # we follow the TTL ourselves

    def txt(self, name: str) -> tuple[list[str], int]:
        try:
            answer = self.resolver.resolve(name, "TXT")
        except dns.resolver.NXDOMAIN:
            raise SptunError(f"{name} does not exist in DNS", hint="add the domain's TXT records") from None
        except dns.resolver.NoAnswer:
            raise SptunError(f"{name} has no TXT records", hint='add one "r=superprotocol;ip=SERVER" record per server') from None
        except dns.exception.Timeout:
            servers = ", ".join(nameserver(str(s)) for s in self.resolver.nameservers)
            raise SptunError(f"no answer from {servers} for TXT {name} within {self.resolver.lifetime:g} s",
                             hint="check the nameservers") from None
        except dns.resolver.NoNameservers as e:
            raise SptunError(f"TXT lookup of {name} failed: {nameserver_errors(e.kwargs.get('errors', []))}",
                             hint="check the nameservers") from None
        except dns.exception.DNSException as e:
            raise SptunError(f"DNS lookup of {name} failed: {e}") from None
        texts = []
        for rdata in answer:
            texts.append(b"".join(rdata.strings).decode("utf-8", errors="replace"))
        ttl = answer.rrset.ttl if answer.rrset is not None else 0
        return texts, ttl


def nameserver(text: str) -> str:
    """dnspython's name for a nameserver, "Do53:192.0.2.53@53", as 192.0.2.53."""
    return text.removeprefix("Do53:").removesuffix("@53")


def nameserver_errors(errors: list[tuple[Any, ...]]) -> str:
    """What each nameserver said, from dnspython's (server, tcp, port, error, response) list:
    "192.0.2.53: REFUSED; 192.0.2.54: Network is unreachable"."""
    said: dict[str, str] = {}
    for server, _, _, error, _ in errors:
        said[nameserver(str(server))] = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return "; ".join(f"{server}: {what}" for server, what in said.items()) or "no nameserver answered"


class Discovery:
    """The servers of a domain, refreshed when the TTL runs out. When DNS fails, or answers
    with no usable server, the last good answer stays in force. The warnings about an answer's
    records are logged when they first appear, not again on each refresh that finds them."""

    def __init__(self, domain: str, source: TxtSource, realm: str = DEFAULT_REALM,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.domain, self.source, self.realm, self.clock = domain, source, realm, clock
        self.servers: list[ServerRecord] | None = None  # None until the first good answer
        self.next_refresh = 0.0
        self.last_error = ""
        self.refreshes = 0
        self.failures = 0
        self.excluded: frozenset[Network] = frozenset()
        self.warned: frozenset[str] = frozenset()  # the warnings of the last answer, logged already

    def set_excluded(self, networks: Iterable[Network]) -> None:
        """The overlays of the tunnels in use (replacing the last call's): a server inside one
        would send its WireGuard traffic into a tunnel. Such servers are dropped from the
        current answer at once, and their records skipped from then on; when the networks
        change, the next current() asks DNS again."""
        excluded = frozenset(networks)
        if excluded == self.excluded:
            return
        self.excluded = excluded
        self.next_refresh = min(self.next_refresh, self.clock())
        if self.servers is not None:
            self.servers = [s for s in self.servers if not any(ipaddress.ip_address(s.ip) in n for n in excluded)]

    def due(self) -> bool:
        return self.clock() >= self.next_refresh

    def refresh(self) -> list[ServerRecord]:
        """Query now. Raise SptunError only if there never was a good answer."""
        self.refreshes += 1
        try:
            texts, ttl = self.source.txt(self.domain)
            servers, warnings = parse_records(texts, self.realm, self.excluded)
            for warning in warnings:
                if warning not in self.warned:
                    log.warning("%s: %s", self.domain, warning)
            self.warned = frozenset(warnings)
            if not servers:
                raise SptunError(f"{self.domain} has no usable TXT record for realm {self.realm!r}",
                                 hint=f'add "r={self.realm};ip=SERVER" records')
        except SptunError as e:
            self.failures += 1
            self.last_error = str(e)
            self.next_refresh = self.clock() + RETRY_AFTER_FAILURE
            if self.servers is None:
                raise
            log.warning("%s; keeping the last good answer (%d servers)", e, len(self.servers))
            return self.servers
        if servers != self.servers:
            log.info("%s: servers from DNS: %s", self.domain, ", ".join(s.ip for s in servers))
        self.servers = servers
        self.last_error = ""
        self.next_refresh = self.clock() + min(max(float(ttl), MIN_REFRESH), MAX_REFRESH)
        return servers

    def current(self) -> list[ServerRecord]:
        """The servers now: refreshed if the TTL (or the retry delay) has run out."""
        if self.due():
            return self.refresh()
        if self.servers is None:  # no good answer yet, and not time to ask again
            raise SptunError(self.last_error)
        return self.servers


def txt_rdata(record: str | Sequence[str]) -> str:
    """Zone-file text for one TXT record: quoted character-strings (a str is split into
    255-byte ones), escaped. The lab's zone file and the server's dynamic updates write it."""
    if isinstance(record, str):
        data = record.encode()
        chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    else:
        chunks = [part.encode() for part in record]
    return " ".join('"' + "".join(_txt_char(b) for b in chunk) + '"' for chunk in chunks)


def _txt_char(byte: int) -> str:
    if byte in b'"\\':
        return "\\" + chr(byte)
    return chr(byte) if 0x20 <= byte < 0x7F else f"\\{byte:03d}"
