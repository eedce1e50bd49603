"""Configuration: TOML files loaded into typed, frozen dataclasses.

Every invalid case raises ConfigError naming the file, the key and the fix.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sptun.attest import BUILTINS, AttestationConfig, command_argv
from sptun.errors import ConfigError

SERVER_CONFIG = Path("/etc/sptun/server.toml")
AGENT_CONFIG = Path("/etc/sptun/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/sptun")
DEFAULT_REALM = "superprotocol"
WIREGUARD_MODES = ("auto", "kernel", "userspace")
MTU = 1420  # of every sptun tunnel: WireGuard's own default (1500 less its 80 bytes of headers)
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, order=True)
class Port:
    proto: str  # "tcp" | "udp"
    number: int

    def __str__(self) -> str:
        return f"{self.proto}/{self.number}"


@dataclass(frozen=True)
class Domain:
    name: str
    listen: tuple[IPAddress, ...]  # empty = any local address (of each family the server has)
    ports: tuple[Port, ...]
    token_file: Path
    max_clients: int = 1024  # leases this domain may hold at once


@dataclass(frozen=True)
class HealthConfig:
    """Active checks of each backend: a TCP connect to its overlay address and first TCP port."""

    # A dead backend is out after at most interval + fall * timeout (plus one pass): 2.5 s.
    interval: float = 0.5  # seconds between rounds of checks
    timeout: float = 1.0  # a connect's; wide enough for a client across the world
    fall: int = 2  # failed checks in a row before a backend leaves the rotation
    rise: int = 2  # good checks in a row before it comes (back) in


@dataclass(frozen=True)
class DnsConfig:
    """`[dns]`: the server publishes its own records in the zone, by RFC 2136 updates signed
    with TSIG (sptun.server.publish)."""

    server: IPAddress  # the zone's primary
    zone: str
    tsig_key_file: Path
    ttl: int = 60
    port: int = 53
    hold_down: float = 30.0  # s with no healthy client before a domain's addresses are withdrawn


@dataclass(frozen=True)
class ServerConfig:
    path: Path
    interface: str = "sptun0"
    listen_port: int = 51820
    api_port: int = 51821
    overlay: ipaddress.IPv4Network = ipaddress.IPv4Network("10.99.0.0/16")
    state_dir: Path = DEFAULT_STATE_DIR
    wireguard: str = "auto"
    domains: tuple[Domain, ...] = ()
    health: HealthConfig = HealthConfig()
    metrics: tuple[str, int] | None = None  # Prometheus endpoint (address, port); off by default
    lease_ttl: float = 24 * 3600.0  # s: a client with no registration nor handshake this long loses its lease
    overlay6: ipaddress.IPv6Network | None = None  # IPv6 overlay: each client's /128 mirrors its IPv4 lease
    dns: DnsConfig | None = None  # self-publication; off by default
    attestation: AttestationConfig | None = None  # attested joins; off by default

    role = "server"

    @property
    def server_ip(self) -> ipaddress.IPv4Address:
        """The server takes the first address of the overlay."""
        return self.overlay.network_address + 1

    @property
    def server_ip6(self) -> ipaddress.IPv6Address | None:
        return self.overlay6.network_address + 1 if self.overlay6 else None

    @property
    def families(self) -> tuple[int, ...]:
        """The address families the server forwards: 4, and 6 with an IPv6 overlay."""
        return (4, 6) if self.overlay6 else (4,)

    def ip6_of(self, ip4: str) -> str | None:
        """A client's IPv6 overlay address: the one at its IPv4 lease's offset in overlay6, so
        that the IPv4 lease is the one fact (load_server checks that overlay6 is big enough)."""
        if self.overlay6 is None:
            return None
        return str(self.overlay6.network_address + (int(ipaddress.IPv4Address(ip4)) - int(self.overlay.network_address)))

    def ip4_of(self, ip6: str) -> str | None:
        """The converse of ip6_of: the IPv4 lease an IPv6 overlay address mirrors, or None."""
        if self.overlay6 is None:
            return None
        offset = int(ipaddress.IPv6Address(ip6)) - int(self.overlay6.network_address)
        return str(self.overlay.network_address + offset) if 0 <= offset < self.overlay.num_addresses else None

    def domain(self, name: str) -> Domain | None:
        return next((d for d in self.domains if d.name == name), None)


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    domain: str
    token_file: Path = Path("/etc/sptun/token")
    ports: tuple[Port, ...] = (Port("tcp", 443),)
    nameservers: tuple[str, ...] = ()  # empty = the system resolver
    realm: str = DEFAULT_REALM
    state_dir: Path = DEFAULT_STATE_DIR
    wireguard: str = "auto"
    keepalive: int = 15
    drain_timeout: float = 10.0  # seconds `down` waits for in-flight connections
    metrics: tuple[str, int] | None = None  # Prometheus endpoint (address, port); off by default
    attestation: str | None = None  # the evidence it presents: a built-in prover, or a command
    server_attestation: AttestationConfig | None = None  # the evidence it requires of its servers

    role = "agent"


Config = ServerConfig | AgentConfig


class _Reader:
    """Reads one TOML table, checking types and remembering which keys were used."""

    def __init__(self, path: Path, table: dict[str, Any], where: str = "") -> None:
        self.path, self.table, self.where = path, table, where
        self.used: set[str] = set()

    def error(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.where}{key}: {problem}", hint=fix)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, fix: str) -> Any:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        # bool is an int in Python; a port of `true` is still wrong.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(key, f"{value!r} has the wrong type", fix)
        return value

    def port(self, key: str, default: int) -> int:
        value: int = self.get(key, int, default, "use a port number from 1 to 65535")
        if not 1 <= value <= 65535:
            raise self.error(key, f"{value} is out of range", "use a port number from 1 to 65535")
        return value

    def path_(self, key: str, default: Path) -> Path:
        value = self.get(key, str, None, "use a path in quotes")
        if value is None:
            return default
        if not value.startswith("/"):
            raise self.error(key, f"{value!r} is not an absolute path", "use an absolute path")
        return Path(value)

    def wireguard(self) -> str:
        value: str = self.get("wireguard", str, "auto", 'use "auto", "kernel" or "userspace"')
        if value not in WIREGUARD_MODES:
            raise self.error("wireguard", f"{value!r} is not a backend", 'use "auto", "kernel" or "userspace"')
        return value

    def ports(self, key: str, default: tuple[Port, ...]) -> tuple[Port, ...]:
        fix = 'use a list like ["tcp/443", "udp/443"]'
        values = self.get(key, list, None, fix)
        if values is None:
            return default
        if not values:
            raise self.error(key, "is empty", fix)
        ports = []
        for value in values:
            port = parse_port(value)
            if port is None:
                raise self.error(key, f"{value!r} is not a port like \"tcp/443\"", fix)
            if port in ports:
                raise self.error(key, f"{value!r} is listed twice", "list each port once")
            ports.append(port)
        return tuple(ports)

    def domain_name(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not _HOSTNAME.match(value.lower().rstrip(".")):
            raise self.error(key, f"{value!r} is not a DNS name", 'use a name like "app.example.com"')
        return value.lower().rstrip(".")

    def metrics(self) -> tuple[str, int] | None:
        fix = 'use "9586" (on loopback) or "127.0.0.1:9586" (address:port), or leave it out'
        value = self.get("metrics", str, None, fix)
        if value is None:
            return None
        if value.isascii() and value.isdigit():  # a port alone: on loopback, never on every address
            value = f"127.0.0.1:{value}"
        address, sep, port = value.rpartition(":")
        try:
            ipaddress.ip_address(address.strip("[]"))
            number = int(port)
        except ValueError:
            raise self.error("metrics", f"{value!r} is not address:port", fix) from None
        if not sep or not 1 <= number <= 65535:
            raise self.error("metrics", f"{value!r} is not address:port", fix)
        return address.strip("[]"), number

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key", "remove it or check its spelling")


def parse_port(value: Any) -> Port | None:
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"(tcp|udp)/(\d{1,5})", value.strip().lower())
    if not m or not 1 <= int(m.group(2)) <= 65535:
        return None
    return Port(m.group(1), int(m.group(2)))


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", hint="create it, or pass another with -c") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied", hint="run as root") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory", hint="pass the config file with -c") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", hint="fix the syntax") from None


def load_server(path: Path) -> ServerConfig:
    r = _Reader(path, _load_toml(path))
    interface = r.get("interface", str, "sptun0", "use an interface name of 1 to 15 characters")
    if not _IFNAME.match(interface):
        raise r.error("interface", f"{interface!r} is not a valid interface name", "use 1 to 15 letters, digits, - _ or .")
    overlay_text = r.get("overlay", str, "10.99.0.0/16", 'use an IPv4 network like "10.99.0.0/16"')
    try:
        overlay = ipaddress.IPv4Network(overlay_text)
    except ValueError:
        raise r.error("overlay", f"{overlay_text!r} is not an IPv4 network", 'use a network like "10.99.0.0/16" (host bits zero)') from None
    if overlay.prefixlen > 29:
        raise r.error("overlay", f"{overlay} is too small", "use a /29 or larger network")
    listen_port = r.port("listen_port", 51820)
    api_port = r.port("api_port", 51821)
    state_dir = r.path_("state_dir", DEFAULT_STATE_DIR)
    wireguard = r.wireguard()
    raw_domains = r.get("domains", list, [], "use [[domains]] tables")
    health = _load_health(path, r.get("health", dict, {}, "use a [health] table"))
    metrics = r.metrics()
    lease_ttl = _duration(r, "lease_ttl", "24h", MIN_LEASE_TTL)
    overlay6 = _overlay6(r, overlay)
    raw_dns = r.get("dns", dict, None, "use a [dns] table")
    raw_attestation = r.get("attestation", dict, None, "use an [attestation] table")
    r.finish()

    domains: list[Domain] = []
    for i, raw in enumerate(raw_domains):
        if not isinstance(raw, dict):
            raise r.error("domains", f"entry {i} is not a table", "use [[domains]] tables")
        domains.append(_load_domain(path, i, raw, overlay, overlay6))
    _check_domains(path, domains, overlay6 is not None)
    dns = _load_dns(path, raw_dns, domains) if raw_dns is not None else None
    attestation = _load_attestation(path, raw_attestation, "attestation.") if raw_attestation is not None else None
    return ServerConfig(path, interface, listen_port, api_port, overlay, state_dir, wireguard, tuple(domains), health,
                        metrics, lease_ttl, overlay6, dns, attestation)


def _attestation_method(r: _Reader, key: str, default: str | None) -> str | None:
    fix = f'use {", ".join(repr(b) for b in BUILTINS)}, or the absolute path of a command (with its arguments)'
    value: str | None = r.get(key, str, default, fix)
    if value is not None and value not in BUILTINS and command_argv(value) is None:
        raise r.error(key, f"{value!r} is neither a built-in nor an absolute command path", fix)
    return value


def _load_attestation(path: Path, raw: dict[str, Any], where: str, server: bool = True) -> AttestationConfig:
    """[attestation] (server) or [server_attestation] (agent). The tpm2 verifier needs the
    reference PCR values: without them it could only say that *some* TPM signed."""
    r = _Reader(path, raw, where)
    require = r.get("require", bool, False, "use true or false")
    verify = _attestation_method(r, "verify", "tpm2")
    assert verify is not None
    enrolled = r.path_("enrolled", Path("/etc/sptun/attestation"))
    fix = 'use a table of PCR index to hex value, like pcrs = { 0 = "00…00", 16 = "00…00" } (sha256 bank)'
    raw_pcrs = r.get("pcrs", dict, {}, fix)
    pcrs = []
    for index, value in raw_pcrs.items():
        if not (index.isascii() and index.isdigit() and int(index) < 24):
            raise r.error("pcrs", f"{index!r} is not a PCR index (0 to 23)", fix)
        if not isinstance(value, str) or not re.fullmatch(r"(0x)?[0-9A-Fa-f]{64}", value):
            raise r.error("pcrs", f"PCR {index}: {value!r} is not a sha256 value (64 hex digits)", fix)
        pcrs.append((int(index), value.lower().removeprefix("0x")))
    if verify == "tpm2" and not pcrs:
        raise r.error("pcrs", "is missing: the tpm2 verifier compares the quoted PCRs with reference values",
                      fix + "; read them on a reference machine with `tpm2_pcrread sha256:0,16`")
    evidence = _attestation_method(r, "evidence", None) if server else None
    max_age = _duration(r, "max_age", "10m", 60.0) if server else 600.0  # agents re-register every 10 s
    r.finish()
    return AttestationConfig(require, verify, enrolled, tuple(sorted(pcrs)), evidence, max_age)


def _load_dns(path: Path, raw: dict[str, Any], domains: list[Domain]) -> DnsConfig:
    """[dns]: every domain it publishes must lie in the zone and list its addresses (the
    A/AAAA records to publish: "any local address" names none)."""
    r = _Reader(path, raw, "dns.")
    fix = 'use the IP address of the zone\'s primary, like "192.0.2.53"'
    text = r.get("server", str, None, fix)
    if text is None:
        raise r.error("server", "is missing", fix)
    try:
        server = ipaddress.ip_address(text)
    except ValueError:
        raise r.error("server", f"{text!r} is not an IP address", fix) from None
    r.used.add("zone")
    if "zone" not in raw:
        raise r.error("zone", "is missing", 'add zone = "example.com"')
    zone = r.domain_name("zone", raw["zone"])
    tsig_key_file = r.path_("tsig_key_file", Path("/etc/sptun/tsig.key"))
    ttl = r.get("ttl", int, 60, "use seconds from 1 to 86400")
    if not 1 <= ttl <= 86400:
        raise r.error("ttl", f"{ttl} is out of range", "use seconds from 1 to 86400")
    port = r.port("port", 53)
    hold_down = _seconds(r, "hold_down", 30, 1, 3600)
    r.finish()
    for i, d in enumerate(domains):
        if d.name != zone and not d.name.endswith("." + zone):
            raise ConfigError(f"{path}: domains[{i}].name: {d.name} is not in the [dns] zone {zone}",
                              hint="publish only names of that zone, or leave [dns] out")
        if not d.listen:
            raise ConfigError(f"{path}: domains[{i}].listen: [dns] publishes the domain's addresses, and it lists none",
                              hint='list the public addresses to publish, like listen = ["198.51.100.10"]')
    return DnsConfig(server, zone, tsig_key_file, ttl, port, hold_down)


def _overlay6(r: _Reader, overlay: ipaddress.IPv4Network) -> ipaddress.IPv6Network | None:
    fix = 'use a unique local IPv6 network like "fd99::/64", or leave it out'
    text = r.get("overlay6", str, None, fix)
    if text is None:
        return None
    try:
        overlay6 = ipaddress.IPv6Network(text)
    except ValueError:
        raise r.error("overlay6", f"{text!r} is not an IPv6 network", fix + " (host bits zero)") from None
    if overlay6.num_addresses < overlay.num_addresses:  # each IPv4 lease has its mirror in it (ip6_of)
        raise r.error("overlay6", f"{overlay6} is smaller than the overlay {overlay}",
                      f"use a /{128 - (32 - overlay.prefixlen)} or larger network")
    if overlay6.is_multicast or overlay6.is_loopback or overlay6.is_link_local or overlay6.is_unspecified:
        raise r.error("overlay6", f"{overlay6} is not a unicast network", fix)
    return overlay6


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_LEASE_TTL = 30.0  # s: below this, a client between two registrations could lose its lease


def parse_duration(value: str, what: str) -> float:
    """Seconds of "90s", "30m", "24h", "7d" (or a plain number of seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not m:
        raise ConfigError(f"{what}: {value!r} is not a duration", hint='use a duration like "90s", "30m", "24h" or "7d"')
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _duration(r: _Reader, key: str, default: str, low: float) -> float:
    fix = f'use a duration like "24h" (at least {low:g} s)'
    value = r.get(key, (str, int), default, fix)
    try:
        seconds = parse_duration(str(value), key)
    except ConfigError:
        raise r.error(key, f"{value!r} is not a duration", fix) from None
    if seconds < low:
        raise r.error(key, f"{value!r} is too short", fix)
    return seconds


def _seconds(r: _Reader, key: str, default: float, low: float, high: float) -> float:
    fix = f"use seconds from {low:g} to {high:g}"
    value = r.get(key, (int, float), default, fix)
    if not low <= value <= high:
        raise r.error(key, f"{value} is out of range", fix)
    return float(value)


def _count(r: _Reader, key: str, default: int) -> int:
    value: int = r.get(key, int, default, "use a whole number from 1 to 100")
    if not 1 <= value <= 100:
        raise r.error(key, f"{value} is out of range", "use a whole number from 1 to 100")
    return value


def _load_health(path: Path, raw: dict[str, Any]) -> HealthConfig:
    h = _Reader(path, raw, "health.")
    d = HealthConfig()
    health = HealthConfig(_seconds(h, "interval", d.interval, 0.1, 60), _seconds(h, "timeout", d.timeout, 0.1, 60),
                          _count(h, "fall", d.fall), _count(h, "rise", d.rise))
    h.finish()
    return health


def _load_domain(path: Path, i: int, raw: dict[str, Any], overlay: ipaddress.IPv4Network,
                 overlay6: ipaddress.IPv6Network | None) -> Domain:
    d = _Reader(path, raw, f"domains[{i}].")
    d.used.add("name")
    if "name" not in raw:
        raise d.error("name", "is missing", 'add name = "app.example.com"')
    name = d.domain_name("name", raw["name"])
    listen: list[IPAddress] = []
    for value in d.get("listen", list, [], 'use a list of IP addresses like ["198.51.100.10", "2001:db8::10"]'):
        try:
            if not isinstance(value, str):  # ip_address(3325256714) would take a number
                raise ValueError(value)
            address = ipaddress.ip_address(value)
        except ValueError:
            raise d.error("listen", f"{value!r} is not an IP address", 'use addresses like "198.51.100.10"') from None
        if address.version == 6 and overlay6 is None:
            raise d.error("listen", f"{address} is IPv6, but the server has no IPv6 overlay",
                          'add overlay6 = "fd99::/64" (a unique local network) to the server\'s config')
        if address.version == 6 and (address.is_link_local or address.is_multicast or address.is_loopback
                                     or address.is_unspecified or address.ipv4_mapped):
            raise d.error("listen", f"{address} is not a public unicast address", 'use addresses like "2001:db8::10"')
        for net in (overlay, overlay6):
            if net is not None and address in net:
                raise d.error("listen", f"{address} is inside the overlay {net}", "use a public address, or move the overlay")
        if address in listen:
            raise d.error("listen", f"{address} is listed twice", "list each address once")
        listen.append(address)
    ports = d.ports("ports", (Port("tcp", 443),))
    token_file = d.path_("token_file", Path(f"/etc/sptun/tokens/{name}"))
    max_clients = d.get("max_clients", int, 1024, "use a whole number from 1 to 1000000")
    if not 1 <= max_clients <= 1_000_000:
        raise d.error("max_clients", f"{max_clients} is out of range", "use a whole number from 1 to 1000000")
    d.finish()
    return Domain(name, tuple(listen), ports, token_file, max_clients)


def _check_domains(path: Path, domains: list[Domain], ipv6: bool = False) -> None:
    """Two domains cannot share a name. They may share an address and a TCP port (sptun then
    routes by SNI: sptun.sni), but not a UDP port (a datagram names no domain), and
    not a port on "any address" beside one on a specific address (which one would win?).
    SNI routing on "any address" of a dual-stack server (ipv6) is not done yet: it would need
    an upstream of each family."""
    taken: list[tuple[str, Port, str]] = []  # (address, or "*" for any, port, domain)
    for i, dom in enumerate(domains):
        if dom.name in [d.name for d in domains[:i]]:
            raise ConfigError(f"{path}: domains[{i}].name: {dom.name} is listed twice", hint="merge the two [[domains]] tables")
        mine = [(str(a), port) for a in dom.listen or ["*"] for port in dom.ports]
        for address, port in mine:
            for other_address, other_port, other in taken:
                if port != other_port or (address != other_address and "*" not in (address, other_address)):
                    continue
                shown = "any address" if "*" in (address, other_address) else address
                if port.proto == "udp":
                    raise ConfigError(f"{path}: domains[{i}]: {dom.name} and {other} both take {port} on {shown}",
                                      hint="a UDP port cannot be shared (no server name to route by): "
                                           "give each domain its own listen address for it")
                if address != other_address:
                    raise ConfigError(f"{path}: domains[{i}]: {dom.name} and {other} both take {port} on {shown}",
                                      hint="to share the port (routed by SNI), give both domains the same listen "
                                           "addresses; else give each its own")
                if address == "*" and ipv6:
                    raise ConfigError(f"{path}: domains[{i}]: {dom.name} and {other} both take {port} on {shown} "
                                      "of a dual-stack server, which SNI routing does not do yet",
                                      hint="list the shared addresses of both families in listen")
        taken += [(address, port, dom.name) for address, port in mine]


def load_agent(path: Path) -> AgentConfig:
    r = _Reader(path, _load_toml(path))
    r.used.add("domain")
    if "domain" not in r.table:
        raise r.error("domain", "is missing", 'add domain = "app.example.com"')
    domain = r.domain_name("domain", r.table["domain"])
    token_file = r.path_("token_file", Path("/etc/sptun/token"))
    ports = r.ports("ports", (Port("tcp", 443),))
    nameservers = r.get("nameservers", list, [], 'use a list of IP addresses like ["192.0.2.53"]')
    for value in nameservers:
        try:
            if not isinstance(value, str):  # ip_address(5) would take a number
                raise ValueError(value)
            ipaddress.ip_address(value)
        except ValueError:
            raise r.error("nameservers", f"{value!r} is not an IP address", 'use addresses like "192.0.2.53"') from None
    realm = r.get("realm", str, DEFAULT_REALM, 'use a realm name like "superprotocol"')
    if not realm or ";" in realm or "=" in realm or realm != realm.strip():
        raise r.error("realm", f"{realm!r} is not a realm name", 'use a word like "superprotocol"')
    state_dir = r.path_("state_dir", DEFAULT_STATE_DIR)
    wireguard = r.wireguard()
    keepalive = r.get("keepalive", int, 15, "use seconds from 1 to 3600")
    if not 1 <= keepalive <= 3600:
        raise r.error("keepalive", f"{keepalive} is out of range", "use seconds from 1 to 3600")
    drain_timeout = _seconds(r, "drain_timeout", 10.0, 0, 600)
    metrics = r.metrics()
    attestation = _attestation_method(r, "attestation", None)
    raw_server_attestation = r.get("server_attestation", dict, None, "use a [server_attestation] table")
    r.finish()
    server_attestation = (_load_attestation(path, raw_server_attestation, "server_attestation.", server=False)
                          if raw_server_attestation is not None else None)
    return AgentConfig(path, domain, token_file, ports, tuple(nameservers), realm, state_dir, wireguard, keepalive,
                       drain_timeout, metrics, attestation, server_attestation)


def check_token_files(cfg: Config) -> None:
    """Each token file the config names holds a usable token (keys.read_token's checks: it
    exists, is open to no other user, and holds MIN_TOKEN_CHARS or more), else ConfigError naming
    the config, the key, the token file and the fix. For a starting daemon or `sptun up`."""
    from sptun.keys import TokenFileError, read_token  # here: NaCl is slow to import, and only a start needs it

    if isinstance(cfg, ServerConfig):
        files = [(f"domains[{i}].token_file", d.token_file, d.name) for i, d in enumerate(cfg.domains)]
    else:
        files = [("token_file", cfg.token_file, cfg.domain)]
    for key, path, domain in files:
        try:
            read_token(path, domain)
        except TokenFileError as e:
            raise ConfigError(f"{cfg.path}: {key}: {path} {e.problem}", hint=e.hint) from None


def load(path: Path | None) -> Config:
    """Load whichever role `path` configures; without a path, the default file that exists."""
    if path is None:
        existing = [p for p in (SERVER_CONFIG, AGENT_CONFIG) if p.exists()]
        if not existing:
            raise ConfigError(f"neither {SERVER_CONFIG} nor {AGENT_CONFIG} exists", hint="create one, or pass a config with -c")
        if len(existing) > 1:
            raise ConfigError(f"both {SERVER_CONFIG} and {AGENT_CONFIG} exist", hint="pass the one you mean with -c")
        path = existing[0]
    raw = _load_toml(path)
    if "domains" in raw or "domain" not in raw:
        return load_server(path)
    return load_agent(path)
