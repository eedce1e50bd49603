"""Tunnel servers from DNS TXT records: `r=superprotocol;ip=198.51.100.10[;port=..;api=..;pk=..]`."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

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


@dataclass(frozen=True, order=True)
class ServerRecord:
    ip: str
    port: int = WG_PORT
    api: int = API_PORT
    pk: str | None = None  # pinned WireGuard public key of the server


def parse_record(text: str, realm: str = DEFAULT_REALM) -> ServerRecord | None:
    """One TXT record (its strings already joined). None if it belongs to another realm, or
    is not an sptun record at all; ValueError with the reason if it is ours but malformed."""
    fields: dict[str, str] = {}
    problems = []
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not part.strip():
            continue
        if not sep or not key:
            problems.append(f"{part.strip()!r} is not key=value")
        elif key in fields:
            problems.append(f"{key}= appears twice")
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
    try:
        ip = ipaddress.ip_address(fields["ip"])
    except ValueError:
        raise ValueError(f"ip={fields['ip']!r} is not an IP address") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise ValueError(f"ip={ip} is not a usable server address")
    port = _port(fields, "port", WG_PORT)
    api = _port(fields, "api", API_PORT)
    pk = fields.get("pk")
    if pk is not None and decode_key(pk) is None:
        raise ValueError(f"pk={pk!r} is not a base64 WireGuard key")
    return ServerRecord(str(ip), port, api, pk)


def _port(fields: dict[str, str], key: str, default: int) -> int:
    if key not in fields:
        return default
    value = fields[key]
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:  # not "²" nor "٤٤٣"
        raise ValueError(f"{key}={value!r} is not a port")
    return int(value)


def parse_records(texts: list[str], realm: str = DEFAULT_REALM) -> tuple[list[ServerRecord], list[str]]:
    """All servers of a TXT answer, and a warning for each record that was skipped."""
    servers: dict[str, ServerRecord] = {}
    warnings = []
    for text in texts:
        try:
            record = parse_record(text, realm)
        except ValueError as e:
            warnings.append(f"skipping malformed TXT record {text!r}: {e}")
            continue
        if record is None:
            continue
        if record.ip in servers and servers[record.ip] != record:
            warnings.append(f"skipping TXT record {text!r}: server {record.ip} is listed twice")
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
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise SptunError(f"DNS lookup of {name} failed: {e}", hint="check the nameservers") from None
        except dns.exception.DNSException as e:
            raise SptunError(f"DNS lookup of {name} failed: {e}") from None
        texts = []
        for rdata in answer:
            texts.append(b"".join(rdata.strings).decode("utf-8", errors="replace"))
        ttl = answer.rrset.ttl if answer.rrset is not None else 0
        return texts, ttl


class Discovery:
    """The servers of a domain, refreshed when the TTL runs out. When DNS fails, or answers
    with no usable server, the last good answer stays in force."""

    def __init__(self, domain: str, source: TxtSource, realm: str = DEFAULT_REALM,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.domain, self.source, self.realm, self.clock = domain, source, realm, clock
        self.servers: list[ServerRecord] | None = None  # None until the first good answer
        self.next_refresh = 0.0
        self.last_error = ""
        self.refreshes = 0
        self.failures = 0

    def due(self) -> bool:
        return self.clock() >= self.next_refresh

    def refresh(self) -> list[ServerRecord]:
        """Query now. Raise SptunError only if there never was a good answer."""
        self.refreshes += 1
        try:
            texts, ttl = self.source.txt(self.domain)
            servers, warnings = parse_records(texts, self.realm)
            for warning in warnings:
                log.warning("%s: %s", self.domain, warning)
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
