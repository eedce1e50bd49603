"""Self-publication in DNS (`[dns]`): the server's own TXT record (with `pk=`) and A/AAAA
records for each domain it serves, by RFC 2136 dynamic updates signed with TSIG, sent to
the zone's primary (dnspython).

The planning is pure: from what the zone holds now and what this server wants, the exact
records to add and delete. Only this server's own records are ever deleted: its TXT
records are those whose `pk=` is its key, its address records those its config lists.
Every change names one record (RFC 2136 deletes of one RR, adds of one RR), so an update
is idempotent and never touches another server's records.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sptun.config import DEFAULT_REALM, DnsConfig, Domain, ServerConfig
from sptun.discovery import API_PORT, WG_PORT, txt_rdata
from sptun.errors import SptunError

ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512")
_KEY_FILE_MAX = 4096  # bytes: a key file is a few lines
MIN_SECRET_BYTES = 16
UPDATE_TIMEOUT = 5.0  # s, one update or query to the primary


@dataclass(frozen=True)
class TsigKey:
    name: str
    algorithm: str
    secret: str = field(repr=False)  # base64; a secret: never in a repr, a log or an error


# Three spellings of the same key: Knot's `keymgr -t NAME` (YAML), BIND's `tsig-keygen NAME`,
# and kdig's -y `ALGORITHM:NAME:SECRET` on one line.
_KNOT = re.compile(r"id:\s*(?P<name>\S+)\s+algorithm:\s*(?P<algorithm>\S+)\s+secret:\s*(?P<secret>\S+)")
_BIND = re.compile(r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{\s*algorithm\s+"?(?P<algorithm>[^";\s]+)"?\s*;'
                   r'\s*secret\s+"(?P<secret>[^"]+)"\s*;')
_LINE = re.compile(r"(?P<algorithm>hmac-[a-z0-9]+):(?P<name>[^:\s]+):(?P<secret>\S+)")


def read_tsig_key(path: Path) -> TsigKey:
    """The TSIG key in path, in any of the three spellings above. SptunError (one line that
    never shows the secret) if the file is missing, open to other users, or holds no usable
    key."""
    hint = f"write it with `keymgr -t NAME hmac-sha256 > {path}` (Knot) or `tsig-keygen NAME`, then chmod 600 {path}"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise SptunError(f"TSIG key file {path} is open to other users (mode {mode & 0o777:04o})",
                                 hint=f"chmod 600 {path}")
            data = f.read(_KEY_FILE_MAX + 1)
    except FileNotFoundError:
        raise SptunError(f"TSIG key file {path} does not exist", hint=hint) from None
    except PermissionError:
        raise SptunError(f"TSIG key file {path} is not readable", hint="run as root") from None
    except OSError as e:
        raise SptunError(f"TSIG key file {path} cannot be read: {e.strerror or e}", hint=hint) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SptunError(f"TSIG key file {path} is not text", hint=hint) from None
    m = None if len(data) > _KEY_FILE_MAX else (_KNOT.search(text) or _BIND.search(text) or _LINE.search(text))
    if m is None:
        raise SptunError(f"TSIG key file {path} holds no key (name, algorithm and secret)", hint=hint)
    name, algorithm, secret = m.group("name").rstrip(".").lower(), m.group("algorithm").lower(), m.group("secret")
    if algorithm not in ALGORITHMS:
        raise SptunError(f"TSIG key file {path}: algorithm {algorithm[:20]!r} is not one of {', '.join(ALGORITHMS)}",
                         hint=hint)
    try:
        raw = base64.b64decode(secret, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) < MIN_SECRET_BYTES:
        raise SptunError(f"TSIG key file {path}: the secret is not base64 of {MIN_SECRET_BYTES} bytes or more", hint=hint)
    return TsigKey(name, algorithm, secret)


# --- what this server wants in the zone ------------------------------------------------------


@dataclass(frozen=True)
class DomainRecords:
    """One domain's records as this server wants them: its TXT record, and its addresses
    (A/AAAA), published or withdrawn (no healthy client, or going down)."""

    name: str
    txt: str
    addresses: tuple[str, ...]
    publish_addresses: bool = True


def endpoint_of(domain: Domain) -> str:
    """The WireGuard endpoint the TXT record announces: the domain's first listen address.
    A record has one; list an IPv6 address first for clients on IPv6-only networks (those
    with IPv4 only then cannot join this server), an IPv4 one first for the others."""
    return str(domain.listen[0])


def server_txt(endpoint: str, public_key: str, listen_port: int = WG_PORT, api_port: int = API_PORT,
               realm: str = DEFAULT_REALM) -> str:
    """`r=...;ip=...;pk=...`, and `port=`/`api=` when they are not the defaults."""
    fields = [f"r={realm}", f"ip={endpoint}"]
    fields += [f"port={listen_port}"] if listen_port != WG_PORT else []
    fields += [f"api={api_port}"] if api_port != API_PORT else []
    return ";".join([*fields, f"pk={public_key}"])


def wanted_records(cfg: ServerConfig, public_key: str, withdrawn: Iterable[str] = ()) -> list[DomainRecords]:
    """Each domain's records; `withdrawn`: the domains whose addresses are not to be published."""
    out = set(withdrawn)
    return [DomainRecords(d.name, server_txt(endpoint_of(d), public_key, cfg.listen_port, cfg.api_port),
                          tuple(str(a) for a in d.listen), d.name not in out) for d in cfg.domains]


# --- the changes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordChange:
    op: str  # "add" | "delete"
    name: str
    rdtype: str  # "TXT" | "A" | "AAAA"
    value: str

    def __str__(self) -> str:
        return f"{self.op} {self.name} {self.rdtype} {self.value}"


def rdtype_of(address: str) -> str:
    return "AAAA" if ipaddress.ip_address(address).version == 6 else "A"


def pk_of(txt: str) -> str | None:
    """The pk= of a TXT record's text, if it has one."""
    for part in txt.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip().lower() == "pk":
            return value.strip()
    return None


def plan_records(want: DomainRecords, zone_txt: Iterable[str], zone_addresses: Iterable[str],
                 public_key: str) -> list[RecordChange]:
    """The changes that bring the zone from what it holds (the domain's TXT texts and A/AAAA
    addresses) to `want`: a TXT record of this server's key that is not the wanted one goes,
    the wanted one comes; its addresses come, or go if withdrawn. Nothing else is touched."""
    txts = list(zone_txt)
    have = {str(ipaddress.ip_address(a)) for a in zone_addresses}
    changes = [RecordChange("delete", want.name, "TXT", t) for t in txts if pk_of(t) == public_key and t != want.txt]
    changes += [RecordChange("add", want.name, "TXT", want.txt)] if want.txt not in txts else []
    for address in want.addresses:
        if want.publish_addresses and address not in have:
            changes.append(RecordChange("add", want.name, rdtype_of(address), address))
        elif not want.publish_addresses and address in have:
            changes.append(RecordChange("delete", want.name, rdtype_of(address), address))
    return changes


def plan_removal(want: DomainRecords, zone_txt: Iterable[str], zone_addresses: Iterable[str],
                 public_key: str, addresses_only: bool) -> list[RecordChange]:
    """Withdrawal before going down: first the addresses (browsers stop arriving once the
    TTL has passed), then, with addresses_only False, the TXT records of this key too."""
    have = {str(ipaddress.ip_address(a)) for a in zone_addresses}
    changes = [RecordChange("delete", want.name, rdtype_of(a), a) for a in want.addresses if a in have]
    if not addresses_only:
        changes += [RecordChange("delete", want.name, "TXT", t) for t in zone_txt if pk_of(t) == public_key]
    return changes


# --- the zone's primary (dnspython) --------------------------------------------------------------


def read_zone(conf: DnsConfig, name: str) -> tuple[list[str], list[str]]:
    """The name's TXT texts and A/AAAA addresses as the primary holds them (asked directly,
    no cache in between). SptunError if it cannot be asked."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode

    txts: list[str] = []
    addresses: list[str] = []
    for rdtype in ("TXT", "A", "AAAA"):
        query = dns.message.make_query(name, rdtype)
        try:
            reply = dns.query.tcp(query, str(conf.server), timeout=UPDATE_TIMEOUT, port=conf.port)
        except (OSError, dns.exception.DNSException) as e:
            raise SptunError(f"cannot ask the DNS primary {conf.server} for {name} {rdtype}: {e or type(e).__name__}",
                             hint="check [dns] server and port, and that it serves the zone") from None
        if reply.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise SptunError(f"the DNS primary {conf.server} answered {dns.rcode.to_text(reply.rcode())} for {name} {rdtype}",
                             hint="check that it serves the zone")
        for rrset in reply.answer:
            for rdata in rrset:
                if rdtype == "TXT":
                    txts.append(b"".join(rdata.strings).decode(errors="replace"))
                else:
                    addresses.append(rdata.address)
    return txts, addresses


class ZoneChanged(SptunError):
    """An update's prerequisite failed: the zone changed since it was read."""


def send_update(conf: DnsConfig, key: TsigKey, changes: list[RecordChange],
                if_addresses: tuple[str, list[str]] | None = None) -> None:
    """One signed update of the zone with these changes, all or nothing. SptunError (one
    line, no secret) if the primary cannot be reached or refuses it. if_addresses (a name,
    its A/AAAA addresses as read): the update applies only if they are still exactly those
    (RFC 2136 prerequisites, checked by the primary in one step); ZoneChanged if not."""
    import dns.exception
    import dns.name
    import dns.query
    import dns.rcode
    import dns.tsig
    import dns.tsigkeyring
    import dns.update

    if not changes:
        return
    keyring = dns.tsigkeyring.from_text({key.name: (key.algorithm, key.secret)})
    update = dns.update.UpdateMessage(conf.zone, keyring=keyring, keyname=dns.name.from_text(key.name),
                                      keyalgorithm=dns.name.from_text(key.algorithm))
    if if_addresses is not None:
        name, addresses = if_addresses
        for rdtype in ("A", "AAAA"):
            values = [a for a in addresses if rdtype_of(a) == rdtype]
            if values:
                update.present(dns.name.from_text(name), rdtype, *values)
            else:
                update.absent(dns.name.from_text(name), rdtype)
    for c in changes:
        value = txt_rdata(c.value) if c.rdtype == "TXT" else c.value
        if c.op == "add":
            update.add(dns.name.from_text(c.name), conf.ttl, c.rdtype, value)
        else:
            update.delete(dns.name.from_text(c.name), c.rdtype, value)
    try:
        reply = dns.query.tcp(update, str(conf.server), timeout=UPDATE_TIMEOUT, port=conf.port)
    except (dns.tsig.PeerBadSignature, dns.tsig.BadSignature):
        raise SptunError(f"the DNS primary {conf.server} found the signature of key {key.name} wrong (BADSIG): "
                         "the secret differs from the zone's", hint="check tsig_key_file against the zone's key") from None
    except dns.tsig.PeerBadTime:
        raise SptunError(f"the DNS primary {conf.server} refused the update's time (BADTIME)",
                         hint="set this host's clock (NTP)") from None
    except dns.tsig.PeerBadKey:
        # Knot answers a key its update policy does not allow for these names as it answers
        # an unknown key (NOTAUTH, BADKEY): one line for both.
        raise SptunError(f"the DNS primary {conf.server} refused key {key.name} for this update (BADKEY): "
                         "a key it does not know, or names its update policy does not give that key",
                         hint="check the key's name in tsig_key_file, and the zone's update policy for it") from None
    except (OSError, dns.exception.DNSException) as e:
        raise SptunError(f"cannot send the update of {conf.zone} to {conf.server}: {e or type(e).__name__}",
                         hint="check [dns] server and port") from None
    if if_addresses is not None and reply.rcode() in (dns.rcode.NXRRSET, dns.rcode.YXRRSET):
        raise ZoneChanged(f"the addresses of {if_addresses[0]} changed in {conf.zone} while this update was made")
    if reply.rcode() != dns.rcode.NOERROR:
        raise SptunError(f"the DNS primary {conf.server} refused the update of {conf.zone}: {dns.rcode.to_text(reply.rcode())}",
                         hint="check that the zone's update policy lets this key change these names")


# --- keeping the zone in step -----------------------------------------------------------------------

ZONE_CHANGED_TRIES = 3
RETRY_MIN, RETRY_MAX = 5.0, 300.0  # s between tries after a failure, doubling
RECHECK = 60.0  # s: the zone is read again this often with nothing changed here (a hand edit, a restore)


class Publisher:
    """This server's records in the zone, kept in step by the server's publish loop: what was
    last published, when to read the zone again, the backoff after a failure, and how long
    each domain has gone without a healthy client."""

    def __init__(self, conf: DnsConfig) -> None:
        self.conf = conf
        self.published: list[DomainRecords] | None = None  # as the zone last held them after a sync
        self.due = 0.0  # time.monotonic() of the next sync, with nothing changed
        self.backoff = RETRY_MIN
        self.error = ""  # the last failure's line, until a sync succeeds
        self.unserved_since: dict[str, float] = {}
        self.served_once: set[str] = set()  # domains a healthy client has served since this start
        self.kept_as_last: set[str] = set()  # domains withdrawn here whose addresses stay: no other server's

    def withdrawn(self, served: dict[str, bool], now: float,
                  last_served: Mapping[str, float] | None = None) -> set[str]:
        """The domains whose addresses should be withdrawn: served by no healthy client for
        the hold-down (no flapping), or never yet since this daemon started (a new server
        announces its TXT record, so that clients join, and its addresses once one serves:
        browsers never find it empty). A domain that is served (again) is published at once.
        last_served: when each domain's clients last passed a check (monotonic), where the
        hold-down starts: they may have died before the checks said so."""
        for domain, ok in served.items():
            if ok:
                self.unserved_since.pop(domain, None)
                self.served_once.add(domain)
            else:
                self.unserved_since.setdefault(domain, min(now, (last_served or {}).get(domain, now)))
        return {d for d, since in self.unserved_since.items()
                if d in served and (d not in self.served_once or now - since >= self.conf.hold_down)}

    def needs_sync(self, wants: list[DomainRecords], now: float) -> bool:
        """When the wanted records changed (unless a failure's backoff runs), and when due."""
        return now >= self.due or (wants != self.published and not self.error)

    def sync(self, wants: list[DomainRecords], public_key: str, key: TsigKey) -> list[RecordChange]:
        """Read each domain's records from the primary, and send what differs from wants.
        The last server of a domain keeps its addresses even with no healthy client: serving
        errors beats NXDOMAIN, and the domain comes back by itself when a client does.
        Blocking (a thread). SptunError on the first failure."""
        done: list[RecordChange] = []
        for want in wants:
            done += self._sync_domain(want, public_key, key)
        return done

    def _sync_domain(self, want: DomainRecords, public_key: str, key: TsigKey) -> list[RecordChange]:
        """A withdrawal is sent on condition that the addresses read are still the zone's:
        two servers losing their clients at once must not both leave, each relying on the
        other. When that fails, the zone is read again, and the other's leaving seen."""
        for _ in range(ZONE_CHANGED_TRIES):
            txts, addresses = read_zone(self.conf, want.name)
            others = {str(ipaddress.ip_address(a)) for a in addresses} - set(want.addresses)
            plan = want if want.publish_addresses or others else replace(want, publish_addresses=True)
            if plan is want:
                self.kept_as_last.discard(want.name)
            else:
                self.kept_as_last.add(want.name)
            changes = plan_records(plan, txts, addresses, public_key)
            withdrawing = any(c.op == "delete" and c.rdtype != "TXT" for c in changes)
            try:
                send_update(self.conf, key, changes, (want.name, addresses) if withdrawing else None)
                return changes
            except ZoneChanged:
                continue
        raise SptunError(f"the addresses of {want.name} in {self.conf.zone} kept changing while this server withdrew its own")

    def succeeded(self, wants: list[DomainRecords], now: float) -> None:
        self.published, self.error, self.backoff, self.due = wants, "", RETRY_MIN, now + RECHECK

    def failed(self, error: str, now: float) -> bool:
        """Note a failure; True if it is news (a new line for the log)."""
        news = error != self.error
        self.error, self.due = error, now + self.backoff
        self.backoff = min(self.backoff * 2, RETRY_MAX)
        return news

    def removal(self, wants: list[DomainRecords], public_key: str, key: TsigKey,
                addresses_only: bool) -> list[RecordChange]:
        """Withdraw before going down: the addresses, or (addresses_only False) the TXT too.
        Blocking (a thread). Afterwards nothing counts as published."""
        self.published, self.due = None, 0.0
        done: list[RecordChange] = []
        for want in wants:
            txts, addresses = read_zone(self.conf, want.name)
            changes = plan_removal(want, txts, addresses, public_key, addresses_only)
            send_update(self.conf, key, changes)
            done += changes
        return done
