"""The agent's view of local services, through sock_diag: real sockets on loopback, in this
process's own network namespace (no root needed, nothing routed)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from sptun.agent import in_flight, listening
from sptun.config import Port


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s


def port_of(s: socket.socket) -> int:
    return int(s.getsockname()[1])


def test_listening_needs_every_port(listener: socket.socket) -> None:
    tcp = Port("tcp", port_of(listener))
    assert listening((tcp,))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_socket:
        udp_socket.bind(("127.0.0.1", 0))
        udp = Port("udp", port_of(udp_socket))
        assert listening((tcp, udp))
        assert not listening((Port("tcp", udp.number), udp))  # a UDP socket does not listen on TCP
    assert not listening((tcp, udp))  # closed


def test_an_ipv6_listener_counts() -> None:
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        assert listening((Port("tcp", port_of(server)),))


def test_established_is_not_listening_and_is_counted_in_flight(listener: socket.socket) -> None:
    port = Port("tcp", port_of(listener))
    with socket.create_connection(("127.0.0.1", port.number)) as client:
        accepted, _ = listener.accept()
        with accepted:
            assert in_flight({"127.0.0.1"}, (port,)) == 1  # the server's side only, not the client's
            assert in_flight({"127.0.0.2"}, (port,)) == 0
            listener.close()
            assert not listening((port,))
            assert in_flight({"127.0.0.1"}, (port,)) == 1  # the connection outlives its listener
        client.close()
