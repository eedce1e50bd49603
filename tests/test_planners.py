"""Both planners as pure functions, table-driven: (wanted, kernel) -> changes, and [] once
converged. No root, no kernel: each case is plain values."""

from __future__ import annotations

from pathlib import Path

import pytest

from sptun import nft
from sptun.agent.plan import (
    FALLBACK_PRIORITY,
    RULE_PRIORITY,
    AgentKernel,
    AgentWanted,
    Rule,
    TunnelWanted,
    interface_name,
    plan_teardown,
)
from sptun.agent.plan import plan as plan_agent
from sptun.changes import (
    AddRule,
    CreateLink,
    DeleteLink,
    DeleteRule,
    DeleteTable,
    LinkState,
    LinkUp,
    LoadTable,
    SetAddresses,
    SetDefaultRoute,
    SetKey,
    SetSysctl,
    UpdatePeer,
    ReleaseUnreplied,
    UpdateRotation,
)
from sptun.config import MTU, Port
from sptun.discovery import ServerRecord
from sptun.keys import generate_private_key, public_key
from sptun.server.plan import IP_FORWARD, ServerKernel, ServerWanted
from sptun.server.plan import plan as plan_server
from sptun.server.plan import plan_teardown as plan_teardown_server
from sptun.wg import Device, Peer, PeerState

ME = public_key(generate_private_key())
S1_KEY, S2_KEY = public_key(generate_private_key()), public_key(generate_private_key())
S1, S2 = ServerRecord("198.51.100.10"), ServerRecord("198.51.100.20")
PORTS = (Port("tcp", 443),)
T1 = TunnelWanted(S1, "10.99.0.2", S1_KEY)
T2 = TunnelWanted(S2, "10.99.0.2", S2_KEY)  # overlays of two servers may overlap
N1, N2 = interface_name(S1.ip), interface_name(S2.ip)


def wanted(*tunnels: TunnelWanted) -> AgentWanted:
    return AgentWanted(ME, PORTS, 15, tuple(tunnels))


def peer(t: TunnelWanted) -> Peer:
    return Peer(t.server_key, ("0.0.0.0/0",), f"{t.server.ip}:{t.server.port}", 15)


def link(t: TunnelWanted, index: int, with_peer: bool = True, **kw: object) -> LinkState:
    """A tunnel's link as a converged kernel has it."""
    peers = {t.server_key: PeerState(peer(t), 1.0)} if with_peer else {}
    base: dict[str, object] = dict(name=t.ifname, index=index, ours=True, up=True, mtu=MTU,
                                   addresses=(f"{t.overlay_ip}/32",), device=Device(ME, 40000, peers), rp_filter="2",
                                   default_route=index)
    base.update(kw)
    return LinkState(**base)  # type: ignore[arg-type]


def rules(t: TunnelWanted, index: int) -> tuple[Rule, ...]:
    """Its two rules: with its mark, and the fallback with none."""
    mark = nft.client_mark(index)
    return Rule(mark, f"{t.overlay_ip}/32", mark), Rule(0, f"{t.overlay_ip}/32", mark, FALLBACK_PRIORITY)


def converged(*tunnels_with_index: tuple[TunnelWanted, int]) -> AgentKernel:
    marks = {t.ifname: nft.client_mark(i) for t, i in tunnels_with_index}
    return AgentKernel({t.ifname: link(t, i) for t, i in tunnels_with_index},
                       tuple(r for t, i in tunnels_with_index for r in rules(t, i)),
                       nft.comment_of(nft.render_client(marks, PORTS)), True)


def kinds(changes: list[object]) -> list[str]:
    return [type(c).__name__ for c in changes]


# --- agent -------------------------------------------------------------------------------------


def test_agent_converged_means_nothing_to_do() -> None:
    assert plan_agent(wanted(T1, T2), converged((T1, 11), (T2, 12))) == []
    assert plan_agent(wanted(), converged()) == []  # the table (its input filter) stays loaded


def test_agent_join_from_nothing_goes_in_rounds_link_then_rules_then_peer() -> None:
    """The peer starts the handshake (and so the traffic): it comes only once replies can leave."""
    first = plan_agent(wanted(T1), AgentKernel())
    assert first == [CreateLink(N1, f"to {S1.ip}"), LoadTable(nft.render_client({}, PORTS), "0 tunnels", fresh=True)]
    fresh_link = link(T1, 11, with_peer=False, up=False, mtu=1500, addresses=(), rp_filter="1", default_route=None,
                      device=Device())
    empty_table = nft.comment_of(nft.render_client({}, PORTS))
    second = plan_agent(wanted(T1), AgentKernel({N1: fresh_link}, (), empty_table, True))
    mark = nft.client_mark(11)
    assert kinds(second) == ["SetKey", "SetAddresses", "LinkUp", "SetSysctl", "SetDefaultRoute", "AddRule", "AddRule",
                             "LoadTable"]
    assert second[:7] == [SetKey(N1, ME), SetAddresses(N1, ("10.99.0.2/32",)), LinkUp(N1, MTU),
                          SetSysctl(f"net/ipv4/conf/{N1}/rp_filter", "2"), SetDefaultRoute(mark, N1),
                          AddRule(RULE_PRIORITY, mark, "10.99.0.2/32", N1, mark),
                          AddRule(FALLBACK_PRIORITY, 0, "10.99.0.2/32", N1, mark)]
    assert not any(isinstance(c, UpdatePeer) for c in second)  # no rule in the kernel yet: no peer
    ready = converged((T1, 11))
    ready.links[N1] = link(T1, 11, with_peer=False)
    third = plan_agent(wanted(T1), ready)
    assert [str(c) for c in third] == [f"{N1}: add peer {S1_KEY} allowed-ips 0.0.0.0/0 at {S1.ip}:51820"]


def test_agent_a_server_gone_from_dns_loses_its_link_and_rule() -> None:
    kernel = converged((T1, 11), (T2, 12))
    changes = plan_agent(wanted(T1), kernel)
    mark = nft.client_mark(12)
    assert changes[:3] == [DeleteLink(N2, "no tunnel wants it"), DeleteRule(RULE_PRIORITY, mark, "10.99.0.2/32", mark),
                           DeleteRule(FALLBACK_PRIORITY, 0, "10.99.0.2/32", mark)]
    assert kinds(changes) == ["DeleteLink", "DeleteRule", "DeleteRule", "LoadTable"]


def test_agent_overlapping_overlays_get_a_rule_each_told_apart_by_mark() -> None:
    changes = plan_agent(wanted(T1, T2), AgentKernel({N1: link(T1, 11), N2: link(T2, 12)}, (), None, False))
    added = [c for c in changes if isinstance(c, AddRule) and c.mark]
    assert [(r.mark, r.src) for r in added] == [(nft.client_mark(11), "10.99.0.2/32"), (nft.client_mark(12), "10.99.0.2/32")]
    # The fallbacks (no mark) only route a reply's first lookup: after the marked rules, each to its own table.
    fallbacks = [c for c in changes if isinstance(c, AddRule) and not c.mark]
    assert {(r.priority, r.route_table) for r in fallbacks} == {(FALLBACK_PRIORITY, nft.client_mark(11)),
                                                                 (FALLBACK_PRIORITY, nft.client_mark(12))}
    assert FALLBACK_PRIORITY > RULE_PRIORITY


@pytest.mark.parametrize("drift, expected", [
    (dict(addresses=("10.99.0.9/32",)), [SetAddresses(N1, ("10.99.0.2/32",))]),
    (dict(up=False), [LinkUp(N1, MTU)]),
    (dict(mtu=1500), [LinkUp(N1, MTU)]),
    (dict(rp_filter="1"), [SetSysctl(f"net/ipv4/conf/{N1}/rp_filter", "2")]),
    (dict(default_route=None), [SetDefaultRoute(nft.client_mark(11), N1)]),
    (dict(device=Device(public_key(generate_private_key()), 40000, {S1_KEY: PeerState(peer(T1))})), [SetKey(N1, ME)]),
], ids=["address", "down", "mtu", "rp_filter", "route", "key"])
def test_agent_repairs_each_kind_of_drift_and_only_that(drift: dict[str, object], expected: list[object]) -> None:
    kernel = converged((T1, 11))
    kernel.links[N1] = link(T1, 11, **drift)
    assert plan_agent(wanted(T1), kernel) == expected


def test_agent_a_stale_link_in_our_name_is_replaced() -> None:
    stale = LinkState(N1, 11, False, True, 1500)
    assert plan_agent(wanted(T1), AgentKernel({N1: stale}, (), None, False))[:2] == [
        DeleteLink(N1, "stale, not a WireGuard device of ours"), CreateLink(N1, f"to {S1.ip}")]


def test_agent_kick_re_adds_a_converged_peer() -> None:
    kicked = TunnelWanted(S1, "10.99.0.2", S1_KEY, kick=True)
    assert [str(c) for c in plan_agent(wanted(kicked), converged((T1, 11)))] == [
        f"{N1}: remove peer {S1_KEY}", f"{N1}: add peer {S1_KEY} allowed-ips 0.0.0.0/0 at {S1.ip}:51820"]


def test_agent_a_foreign_rule_at_our_priority_goes() -> None:
    kernel = converged((T1, 11))
    foreign = Rule(0, "192.0.2.1/32", 100)
    kernel = AgentKernel(kernel.links, kernel.rules + (foreign,), kernel.nft_digest, True)
    assert plan_agent(wanted(T1), kernel) == [DeleteRule(RULE_PRIORITY, 0, "192.0.2.1/32", 100)]


def test_agent_teardown_removes_everything_of_ours() -> None:
    kernel = converged((T1, 11), (T2, 12))
    changes = plan_teardown(kernel)
    assert kinds(changes) == ["DeleteLink", "DeleteLink", "DeleteRule", "DeleteRule", "DeleteRule", "DeleteRule", "DeleteTable"]
    assert plan_teardown(AgentKernel()) == []


def test_agent_a_dual_stack_tunnel_gets_both_addresses_rules_and_routes() -> None:
    """With an IPv6 overlay the tunnel carries both families: its /128 beside its /32, a rule
    and a default route in its table for each family (the same mark), and ::/0 from the server."""
    dual = TunnelWanted(S1, "10.99.0.2", S1_KEY, overlay_ip6="fd99::2")
    mark = nft.client_mark(11)
    v4_only = converged((T1, 11))
    changes = plan_agent(wanted(dual), v4_only)
    assert changes == [SetAddresses(N1, ("10.99.0.2/32", "fd99::2/128")), SetDefaultRoute(mark, N1, 6),
                       AddRule(RULE_PRIORITY, mark, "fd99::2/128", N1, mark),
                       AddRule(FALLBACK_PRIORITY, 0, "fd99::2/128", N1, mark)]  # the peer waits for them
    both = AgentKernel({N1: link(dual, 11, addresses=("10.99.0.2/32", "fd99::2/128"), default_route6=11)},
                       v4_only.rules + (Rule(mark, "fd99::2/128", mark), Rule(0, "fd99::2/128", mark, FALLBACK_PRIORITY)),
                       v4_only.nft_digest, True)
    assert [str(c) for c in plan_agent(wanted(dual), both)] == [
        f"{N1}: update peer {S1_KEY} allowed-ips 0.0.0.0/0,::/0 at {S1.ip}:51820"]
    teardown = plan_teardown(both)
    assert DeleteRule(RULE_PRIORITY, mark, "fd99::2/128", mark) in teardown


def test_every_change_is_one_line() -> None:
    changes = plan_agent(wanted(T1, T2), AgentKernel()) + plan_teardown(converged((T1, 11)))
    assert changes and all("\n" not in str(c) and str(c) for c in changes)


# --- server ------------------------------------------------------------------------------------

FWD = nft.Forward("app.example.test", "198.51.100.10", Port("tcp", 443))
K1, K2 = public_key(generate_private_key()), public_key(generate_private_key())
B1, B2 = "10.99.0.2", "10.99.0.3"


def server_wanted(rotation: frozenset[str] = frozenset({B1, B2}), peers: tuple[str, ...] = (K1, K2)) -> ServerWanted:
    ips = {K1: B1, K2: B2}
    return ServerWanted("sptun0", ME, 51820, ("10.99.0.1/16",), tuple(Peer(k, (f"{ips[k]}/32",)) for k in peers),
                        (FWD,), (rotation,))


def server_kernel(rotation: list[str] | None = None, peers: tuple[str, ...] = (K1, K2), **kw: object) -> ServerKernel:
    ips = {K1: B1, K2: B2}
    device = Device(ME, 51820, {k: PeerState(Peer(k, (f"{ips[k]}/32",))) for k in peers})
    base: dict[str, object] = dict(name="sptun0", index=5, ours=True, up=True, mtu=MTU, addresses=("10.99.0.1/16",),
                                   device=device)
    base.update(kw)
    table = nft.TableState(True, nft.server_comment("sptun0", [FWD], overlays=("10.99.0.0/16",)), {FWD.key: 3},
                           {"rr0": rotation if rotation is not None else [B1, B2]})
    return ServerKernel(LinkState(**base), "1", table)  # type: ignore[arg-type]


def test_server_converged_means_nothing_to_do() -> None:
    assert plan_server(server_wanted(), server_kernel()) == []


def test_server_from_nothing_creates_the_interface_first() -> None:
    assert plan_server(server_wanted(), ServerKernel(None, "0", nft.TableState())) == [CreateLink("sptun0", "")]


def test_server_a_fresh_interface_gets_key_address_forwarding_peers_and_table() -> None:
    fresh = ServerKernel(LinkState("sptun0", 5, True, False, 1500), "0", nft.TableState())
    changes = plan_server(server_wanted(), fresh)
    assert kinds(changes) == ["SetKey", "SetAddresses", "LinkUp", "SetSysctl", "UpdatePeer", "UpdatePeer", "LoadTable"]
    assert changes[3] == SetSysctl(IP_FORWARD, "1")
    load = changes[-1]
    assert isinstance(load, LoadTable) and load.fresh and "numgen inc mod 2" in load.ruleset


@pytest.mark.parametrize("rotation, expected", [
    (frozenset({B1}), [UpdateRotation(0, FWD.key, (B1, B2), (B1,)), ReleaseUnreplied((B2,))]),  # a health flip
    (frozenset(), [UpdateRotation(0, FWD.key, (B1, B2), ()), ReleaseUnreplied((B1, B2))]),  # one dump for both
    (frozenset({B2}), [UpdateRotation(0, FWD.key, (B1, B2), (B2,)), ReleaseUnreplied((B1,))]),
], ids=["one-down", "all-down", "first-down"])
def test_server_health_flips_change_the_rotation_in_place(rotation: frozenset[str], expected: list[object]) -> None:
    assert plan_server(server_wanted(rotation), server_kernel()) == expected


def test_a_backend_coming_back_releases_nothing() -> None:
    assert plan_server(server_wanted(), server_kernel(rotation=[B1])) == [UpdateRotation(0, FWD.key, (B1,), (B1, B2))]


def test_server_a_restart_adopts_the_kernel_as_it_is() -> None:
    """The same wanted state over the kernel a previous process left: nothing to do."""
    assert plan_server(server_wanted(), server_kernel()) == []


def test_server_a_join_adds_the_peer_and_the_rotation_follows_health() -> None:
    joined = plan_server(server_wanted(frozenset({B1})), server_kernel([B1], peers=(K1,)))
    assert [str(c) for c in joined] == [f"sptun0: add peer {K2} allowed-ips {B2}/32"]
    healthy = plan_server(server_wanted(), server_kernel([B1]))
    assert healthy == [UpdateRotation(0, FWD.key, (B1,), (B1, B2))]


def test_server_a_leave_removes_the_peer() -> None:
    assert [str(c) for c in plan_server(server_wanted(frozenset({B1}), peers=(K1,)), server_kernel([B1]))] == [
        f"sptun0: remove peer {K2}"]


def test_server_a_new_structure_reloads_the_table() -> None:
    kernel = server_kernel()
    other = nft.TableState(True, "sptun server 0000000000000000", kernel.nft_table.handles, kernel.nft_table.maps)
    changes = plan_server(server_wanted(), ServerKernel(kernel.link, "1", other))
    assert kinds(changes) == ["LoadTable"] and not changes[0].fresh  # type: ignore[union-attr]


def test_server_teardown_removes_the_table_then_the_interface() -> None:
    assert plan_teardown_server("sptun0", True, True) == [DeleteTable(), DeleteLink("sptun0", "down")]
    assert plan_teardown_server("sptun0", False, False) == []
    assert str(DeleteTable()) == "delete table inet sptun"


# --- dual stack: each IPv4 lease mirrored in the IPv6 overlay ---------------------------------------


def test_a_dual_stack_server_forwards_each_family_to_the_same_clients(tmp_path: Path) -> None:
    from sptun.config import load_server
    from sptun.leases import Lease
    from sptun.server.plan import by_lease, forwards, peer_of, rotations_by_family

    path = tmp_path / "server.toml"
    path.write_text('overlay6 = "fd99::/64"\n[[domains]]\nname = "a.test"\nlisten = ["198.51.100.10", "2001:db8::10"]\n'
                    '[[domains]]\nname = "b.test"\nports = ["tcp/8443"]\n')
    cfg = load_server(path)
    fwds = forwards(cfg)
    assert [(f.domain, f.listen, f.family, f.key) for f in fwds] == [
        ("a.test", "198.51.100.10", 4, "a.test 198.51.100.10 tcp/443"),
        ("a.test", "2001:db8::10", 6, "a.test 2001:db8::10 tcp/443"),
        ("b.test", None, 4, "b.test * tcp/8443"),
        ("b.test", None, 6, "b.test *6 tcp/8443"),  # any address: once per family, under keys of their own
    ]
    v4_only = Lease(K2, "a.test", "10.99.0.4", 0.0, ipv6=False)  # its service does not listen on IPv6
    leases = [Lease(K1, "a.test", "10.99.0.2", 0.0), Lease(ME, "a.test", "10.99.0.3", 0.0), v4_only]
    assert rotations_by_family(cfg, leases) == {
        4: {"a.test": {"10.99.0.2", "10.99.0.3", "10.99.0.4"}, "b.test": set()},
        6: {"a.test": {"fd99::2", "fd99::3"}, "b.test": set()}}  # IPv6 browsers only to those that serve IPv6
    assert by_lease(cfg, ["fd99::2", "10.99.0.3"]) == {"10.99.0.2", "10.99.0.3"}
    assert peer_of(leases[0], cfg).allowed_ips == ("10.99.0.2/32", "fd99::2/128")
    assert peer_of(v4_only, cfg).allowed_ips == ("10.99.0.4/32",)
