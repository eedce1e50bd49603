"""`status` as typed, immutable values. A role builds one from its own state and a read of
the kernel; the control socket, the metrics and the CLI only ever read these. The
`status --json` object of ../shared/CONTRACT.md is `to_json()` of them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TunnelStatus:
    server: str
    interface: str
    port: int
    overlay_ip: str | None
    server_overlay_ip: str | None
    server_key: str | None
    registered: bool
    up: bool  # the interface exists, with our key
    healthy: bool  # registered, with a fresh WireGuard handshake
    handshake_age: float | None
    rx_bytes: int
    tx_bytes: int
    error: str | None
    overlay_ip6: str | None = None  # with a dual-stack server: ours and its, in its IPv6 overlay
    server_overlay_ip6: str | None = None
    server_attested: bool | None = None  # with [server_attestation]: the server's last evidence verified
    server_attestation: str | None = None  # what was verified, or why not


@dataclass(frozen=True)
class DnsStatus:
    servers: list[str]
    error: str | None
    refreshes: int = 0
    failures: int = 0


@dataclass(frozen=True)
class AgentStatus:
    domain: str
    public_key: str | None
    wireguard: str
    down: bool
    listening: bool
    ports: list[str]
    dns: DnsStatus
    tunnels: list[TunnelStatus]
    role: str = "agent"
    attestation_key: str | None = None  # with attestation = "tpm2": the fingerprint of the AK it quotes with


@dataclass(frozen=True)
class BackendStatus:
    overlay_ip: str
    public_key: str
    healthy: bool  # passes the server's active checks (or, with no daemon, a fresh handshake)
    reason: str
    in_rotation: bool  # in the kernel's maps now
    handshake_age: float | None
    endpoint: str | None
    rx_bytes: int
    tx_bytes: int
    active_connections: int | None
    since: float
    overlay_ip6: str | None = None  # its mirror in the IPv6 overlay, on a dual-stack server
    healthy6: bool | None = None  # that mirror's own checks (None: no IPv6 there)
    reason6: str | None = None
    attested: bool | None = None  # its last registration's evidence verified (None: not checked)
    attestation: str | None = None  # what was verified, or why not
    measurements: dict[str, str] | None = None  # the verified PCR values ("sha256:16" -> hex)


@dataclass(frozen=True)
class ForwardStatus:
    listen: str
    port: str
    connections: int
    bytes: int


@dataclass(frozen=True)
class DomainStatus:
    name: str
    listen: list[str]
    ports: list[str]
    backends: list[BackendStatus]
    forwards: list[ForwardStatus]


@dataclass(frozen=True)
class RegistrationCounts:
    accepted: int
    rejected: dict[str, int]


@dataclass(frozen=True)
class AttestationRefusal:
    at: float
    public_key: str
    domain: str
    reason: str


@dataclass(frozen=True)
class AttestationStatus:
    """[attestation]: how clients' evidence is checked, and what came of it."""

    require: bool
    verify: str
    verified: int
    refused: int
    admitted: int  # failed, admitted all the same (require = false)
    refusals: list[AttestationRefusal]  # the last few, newest last


@dataclass(frozen=True)
class PublicationStatus:
    """A server's own records in DNS ([dns])."""

    zone: str
    published: bool  # the last sync succeeded (or none ran yet: False)
    error: str | None  # the last failure's line, until a sync succeeds
    withdrawn: list[str]  # domains whose addresses this server withdrew (no healthy client)


@dataclass(frozen=True)
class ServerStatus:
    interface: str
    public_key: str | None
    listen_port: int
    api_port: int
    overlay: str
    overlay_ip: str
    wireguard: str
    down: bool
    up: bool
    table_loaded: bool
    registrations: RegistrationCounts
    domains: list[DomainStatus]
    role: str = "server"
    overlay6: str | None = None  # the IPv6 overlay, and the server's address there
    overlay_ip6: str | None = None
    publication: PublicationStatus | None = None  # with [dns]: this server's records in the zone
    attestation: AttestationStatus | None = None  # with [attestation]


@dataclass(frozen=True)
class DaemonStatus:
    """The daemon's own side, added when the status comes through its control socket."""

    process: dict[str, Any]
    passes: int
    failed_passes: int
    last_error: str | None


Status = AgentStatus | ServerStatus


def to_json(status: Status, daemon: DaemonStatus | None = None) -> dict[str, Any]:
    data = dataclasses.asdict(status)
    if daemon is not None:
        data.update(dataclasses.asdict(daemon))
    return data
