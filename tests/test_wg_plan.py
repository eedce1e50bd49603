"""sptun.wg.plan_peers: the pure diff from the device's peers to the wanted ones."""

from __future__ import annotations

import pytest

from sptun.keys import generate_private_key, public_key
from sptun.wg import Device, Peer, PeerChange, PeerState, plan_peers

A, B, C = sorted(public_key(generate_private_key()) for _ in range(3))


def device(*peers: Peer) -> Device:
    return Device(public_key="srv", listen_port=51820,
                  peers={p.public_key: PeerState(p, last_handshake=1700000000.0, rx_bytes=10, tx_bytes=20) for p in peers})


def summary(changes: list[PeerChange]) -> list[tuple[str, str]]:
    return [(c.action, c.peer.public_key) for c in changes]


PA = Peer(A, ("10.99.0.2/32",))
PB = Peer(B, ("10.99.0.3/32",))
PC = Peer(C, ("10.99.0.4/32",))


@pytest.mark.parametrize("desired, actual", [
    ([], device()),
    ([PA], device(PA)),
    ([PA, PB, PC], device(PC, PB, PA)),
    ([Peer(A, ("10.0.0.0/8", "10.99.0.2/32"))], device(Peer(A, ("10.99.0.2/32", "10.0.0.0/8")))),
    ([Peer(A, ("10.99.0.1/32",), None, 0)], device(Peer(A, ("10.99.0.1/32",), "198.51.100.7:40123", 0))),
    ([Peer(A, ("10.99.0.1/32",), "198.51.100.10:51820", 15)], device(Peer(A, ("10.99.0.1/32",), "198.51.100.10:51820", 15))),
], ids=["empty", "one", "order-of-peers", "order-of-allowed-ips", "roaming-endpoint", "named-endpoint"])
def test_converged(desired: list[Peer], actual: Device) -> None:
    assert plan_peers(desired, actual) == []


def test_add_update_remove() -> None:
    actual = device(PA, Peer(B, ("10.99.0.9/32",)))
    changes = plan_peers([PB, PC], actual)
    assert summary(changes) == [("remove", A), ("update", B), ("add", C)]  # removals first, then by key
    assert {c.action: c.peer for c in changes} == {"remove": PA, "add": PC, "update": PB}


def test_applying_the_plan_converges() -> None:
    desired = [PB, Peer(C, ("10.99.0.4/32",), "198.51.100.10:51820", 15)]
    actual = device(PA, Peer(B, ("10.99.0.8/32",)))
    peers = dict(actual.peers)
    for change in plan_peers(desired, actual):
        if change.action == "remove":
            del peers[change.peer.public_key]
        else:
            peers[change.peer.public_key] = PeerState(change.peer)
    assert plan_peers(desired, Device(peers=peers)) == []


def test_removals_come_first() -> None:
    """Removing first frees allowed-ips that an added peer may take over."""
    changes = plan_peers([Peer(B, ("10.99.0.2/32",))], device(PA))
    assert summary(changes) == [("remove", A), ("add", B)]


@pytest.mark.parametrize("have, want", [
    (Peer(A, ("10.99.0.2/32",)), Peer(A, ("10.99.0.3/32",))),
    (Peer(A, ("10.99.0.2/32",)), Peer(A, ("10.99.0.2/32", "10.99.0.3/32"))),
    (Peer(A, ("10.99.0.2/32", "10.99.0.3/32")), Peer(A, ("10.99.0.2/32",))),
    (Peer(A, ("10.99.0.2/32",)), Peer(A, ())),
    (Peer(A, ("10.99.0.1/32",), "198.51.100.10:51820"), Peer(A, ("10.99.0.1/32",), "198.51.100.11:51820")),
    (Peer(A, ("10.99.0.1/32",), "198.51.100.10:51820"), Peer(A, ("10.99.0.1/32",), "198.51.100.10:51999")),
    (Peer(A, ("10.99.0.1/32",), None), Peer(A, ("10.99.0.1/32",), "198.51.100.10:51820")),
    (Peer(A, ("10.99.0.1/32",), keepalive=0), Peer(A, ("10.99.0.1/32",), keepalive=15)),
    (Peer(A, ("10.99.0.1/32",), keepalive=25), Peer(A, ("10.99.0.1/32",), keepalive=15)),
], ids=["other-ip", "ip-added", "ip-removed", "ips-emptied", "other-endpoint-host", "other-endpoint-port",
        "endpoint-named", "keepalive-on", "keepalive-changed"])
def test_updates(have: Peer, want: Peer) -> None:
    assert plan_peers([want], device(have)) == [PeerChange("update", want)]


def test_duplicate_desired_peers_count_once() -> None:
    assert plan_peers([PA, PA], device()) == [PeerChange("add", PA)]


def test_plan_is_deterministic() -> None:
    desired = [PC, PA, PB]
    assert plan_peers(desired, device()) == plan_peers(list(reversed(desired)), device())
    assert summary(plan_peers(desired, device())) == [("add", A), ("add", B), ("add", C)]


@pytest.mark.parametrize("change, text", [
    (PeerChange("add", Peer(A, ("10.99.0.2/32",))), f"add peer {A} allowed-ips 10.99.0.2/32"),
    (PeerChange("update", Peer(A, ("10.99.0.1/32", "10.99.0.0/16"), "198.51.100.10:51820", 15)),
     f"update peer {A} allowed-ips 10.99.0.1/32,10.99.0.0/16 at 198.51.100.10:51820"),
    (PeerChange("remove", Peer(A, ("10.99.0.2/32",))), f"remove peer {A}"),
])
def test_peer_change_is_one_readable_line(change: PeerChange, text: str) -> None:
    assert str(change) == text
    assert "\n" not in str(change)
