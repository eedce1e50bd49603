"""The agent's socket-diagnostics edge: is the local service listening, and how many
connections are in flight through the tunnels (for the drain)."""

from __future__ import annotations

import os
import socket
import struct
from typing import Protocol

from sptun.config import Port
from sptun.errors import SptunError

# sock_diag (linux/inet_diag.h): the kernel lists only the sockets in the states asked for.
# /proc/net/tcp instead walks the whole connection hash table on every read: ~2 ms each
# second for an idle agent, and more the busier its web server is.
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10  # an unconnected UDP socket is in TCP_CLOSE
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def local_sockets(protocol: str, state: int, family: int = socket.AF_INET) -> list[tuple[str, int]]:
    """(local address, local port) of this network namespace's sockets of a protocol in a state."""
    # inet_diag_req_v2: family, protocol, extensions, pad, states; then an empty socket id
    request = struct.pack("=BBBxI", family, PROTOCOLS[protocol], 0, 1 << state) + bytes(48)
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    found: list[tuple[str, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.sendto(header + request, (0, 0))
        while data := s.recv(65536):
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + 16)
                    if errno:
                        raise SptunError(f"sock_diag: {os.strerror(-errno)}")
                    return found
                # inet_diag_msg: family, state, timer, retrans; then sport, dport (big-endian), src
                body = offset + 16
                port = struct.unpack_from("!H", data, body + 4)[0]
                packed = data[body + 8:body + 8 + (4 if family == socket.AF_INET else 16)]
                found.append((socket.inet_ntop(family, packed), port))
                offset += (length + 3) & ~3
    return found


def listening(ports: tuple[Port, ...], families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)) -> bool:
    """Whether a local service listens on every port (this network namespace, in one of
    these address families)."""
    for port in ports:
        state = TCP_LISTEN if port.proto == "tcp" else TCP_CLOSE
        if not any(p == port.number for family in families for _, p in local_sockets(port.proto, state, family)):
            return False
    return True


def in_flight(addresses: set[str], ports: tuple[Port, ...]) -> int:
    """Established TCP connections to the service on these (overlay) addresses, of both families."""
    tcp = {p.number for p in ports if p.proto == "tcp"}
    return sum(1 for family in (socket.AF_INET, socket.AF_INET6) for address, port in local_sockets("tcp", TCP_ESTABLISHED, family)
               if address in addresses and port in tcp)


class Sockets(Protocol):
    def listening(self, ports: tuple[Port, ...]) -> bool: ...

    def listening6(self, ports: tuple[Port, ...]) -> bool:
        """Whether it listens on IPv6 too (an IPv6 or dual-stack socket on every port)."""
        ...

    def in_flight(self, addresses: set[str], ports: tuple[Port, ...]) -> int: ...


class SockDiag:
    """The real edge: this network namespace's sockets, through sock_diag."""

    def listening(self, ports: tuple[Port, ...]) -> bool:
        return listening(ports)

    def listening6(self, ports: tuple[Port, ...]) -> bool:
        return listening(ports, (socket.AF_INET6,))

    def in_flight(self, addresses: set[str], ports: tuple[Port, ...]) -> int:
        return in_flight(addresses, ports)
