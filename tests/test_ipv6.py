"""Dual stack end to end, and a client on an IPv6-only network.

The lab: two servers, three clients. The servers, the browser and DNS have both families;
the home LAN has IPv6 too (routed, not NATed), and c3's network has no IPv4 uplink at all.
DNS lists s1 by its IPv4 address and s2 by its IPv6 address (TXT `ip=`), so c1 and c2
tunnel to both (to s2 over IPv6), and c3 joins s2 only, over IPv6: its WireGuard endpoint
and its registration are IPv6, and it asks DNS over IPv6. Browsers of both families reach
every client of each server, and the clients see the browsers' own addresses.

    .venv/bin/python -m pytest -q -s tests/test_ipv6.py     # -s prints the figures
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from support import LAB_TOOLS, netns_marks
from test_e2e import mirror6, sptun_leftovers
from test_failover import BROWSERS, nginx_pids, report

from sptun.lab import (
    Host,
    Lab,
    browse,
    config_path,
    server_txt,
    slow,
    sptun,
    start_daemons,
    status,
    write_configs,
)

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go")

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
PREFIX = f"six{os.getpid() % 100000}"


def served(lab: Lab) -> dict[str, set[str]]:
    """Each server's clients that are healthy and in its rotation, by name."""
    out: dict[str, set[str]] = {}
    for server in lab.servers:
        by_ip = {t["overlay_ip"]: c.name for c in lab.clients for t in status(c)["tunnels"]
                 if t["server"] in (server.address, server.address6)}
        out[server.name] = {by_ip.get(b["overlay_ip"], "?") for d in status(server)["domains"] for b in d["backends"]
                            if b["healthy"] and b["in_rotation"]}
    return out


EXPECTED = {"s1": {"c1", "c2"}, "s2": {"c1", "c2", "c3"}}  # c3 cannot reach s1's IPv4 endpoint


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(PREFIX, servers=2, clients=3, ipv6_only=1)
    try:
        lab.up()
        s1, s2 = lab.servers
        assert s2.address6
        lab.set_txt([server_txt(s1.address), server_txt(s2.address6)])
        write_configs(lab, BACKEND)
        start_daemons(lab)
        wait_for_rotations(lab)
        yield lab
    finally:
        lab.down()


def wait_for_rotations(lab: Lab) -> None:
    deadline = time.monotonic() + 120 * slow()
    while (now := served(lab)) != EXPECTED:
        assert time.monotonic() < deadline, f"not served as expected: {now}"
        time.sleep(0.5)


def tunnels(client: Host) -> dict[str, dict]:
    return {t["server"]: t for t in status(client)["tunnels"]}


@pytest.mark.vm
def test_a_client_on_an_ipv6_only_network_tunnels_over_ipv6(lab: Lab) -> None:
    s1, s2 = lab.servers
    c1, c3 = lab.clients[0], lab.clients[2]
    assert s2.address6
    mine = tunnels(c3)
    assert mine[s2.address6]["healthy"] and mine[s2.address6]["overlay_ip6"]
    assert not mine[s1.address]["registered"]  # one clear line, and no tunnel
    assert "this host has no IPv4 route there" in mine[s1.address]["error"], mine[s1.address]["error"]
    # Its WireGuard endpoint, and c1's to s2, are IPv6 (an IPv4 address is never asked).
    for client in (c3, c1):
        endpoints = client.run(["wg", "show", tunnels(client)[s2.address6]["interface"], "endpoints"])
        assert f"[{s2.address6}]:51820" in endpoints, endpoints
    assert "nameservers = [\"2001:db8::53\"]" in (c3.dir / "agent.toml").read_text()  # DNS over IPv6 too


@pytest.mark.vm
@pytest.mark.parametrize("family", [4, 6])
def test_browsers_of_both_families_reach_every_client_keeping_their_address(lab: Lab, family: int) -> None:
    browser = lab.browser.address if family == 4 else lab.browser.address6
    for server in lab.servers:
        address = server.address if family == 4 else server.address6
        assert address
        mine = sorted(EXPECTED[server.name])
        hits = browse(lab, server, 4 * len(mine), address=address)
        assert all(h.ok for h in hits), [h.error for h in hits if not h.ok]
        assert Counter(h.client for h in hits) == dict.fromkeys(mine, 4), f"through {server.name} at {address}"
        assert {h.source for h in hits} == {browser}
        for h in hits:
            assert f"OU={h.client}" in h.subject, h


def test_a_drain_over_ipv6_fails_no_connection(lab: Lab) -> None:
    """8 browsers over IPv6 through s2, a connect waiting up to 10 s each, while c3 (the
    IPv6-only client) drains and comes back."""
    s2, c3 = lab.servers[1], lab.clients[2]
    assert s2.address6
    out = lab.browser.dir / f"browsers-{time.monotonic_ns()}.json"
    load = lab.browser.spawn([sys.executable, BROWSERS, s2.address6, "--ca", lab.ca_cert, "--browsers", "8",
                              "--seconds", "14"], log=out)
    time.sleep(3)
    fault = time.monotonic()
    c3.run(sptun("down", "-c", config_path(c3)), timeout=60 * slow())
    c3.run(sptun("up", "-c", config_path(c3)), timeout=60 * slow())
    load.wait(timeout=60 * slow())
    result = json.loads(out.read_text().splitlines()[-1])
    s = report("IPv6: c3 drained and back, through s2's IPv6 address", result, fault)
    wait_for_rotations(lab)
    assert s["requests"] > 20 and s["failed"] == 0


def reload_nginx(client: Host, config: str) -> None:
    (client.dir / "nginx.conf").write_text(config)
    os.kill(nginx_pids(client)[0], signal.SIGHUP)


def test_a_client_that_serves_ipv4_only_gets_no_ipv6_browsers(lab: Lab) -> None:
    """Its agent says so when it registers: the servers leave it out of their IPv6 rotations
    (it would drop their SYNs), and keep it in the IPv4 ones. When its service listens on
    IPv6 again, it is back in them."""
    s2, c2 = lab.servers[1], lab.clients[1]
    assert s2.address6
    dual = (c2.dir / "nginx.conf").read_text()
    reload_nginx(c2, dual.replace("        listen [::]:80;\n", "").replace("        listen [::]:443 ssl http2;\n", ""))
    try:
        c2_ip = tunnels(c2)[s2.address6]["overlay_ip"]
        deadline = time.monotonic() + 30 * slow()
        while not in_rotation_ipv4_only(s2, c2_ip) or mirror6(c2_ip) in ipv6_map(s2):  # out of the kernel's map too
            assert time.monotonic() < deadline, "c2 is still in s2's IPv6 rotation"
            time.sleep(0.5)
        hits = browse(lab, s2, 8, address=s2.address6)
        assert all(h.ok for h in hits) and Counter(h.client for h in hits) == {"c1": 4, "c3": 4}
        hits = browse(lab, s2, 6, address=s2.address)
        assert all(h.ok for h in hits) and Counter(h.client for h in hits) == {"c1": 2, "c2": 2, "c3": 2}
        assert in_rotation_ipv4_only(s2, c2_ip)
    finally:
        reload_nginx(c2, dual)
    deadline = time.monotonic() + 30 * slow()
    back = 0  # checks in a row that found it back: its agent may register twice while nginx reloads
    while back < 4:
        back = back + 1 if in_ipv6_rotation(s2, c2_ip) and mirror6(c2_ip) in ipv6_map(s2) else 0  # after `rise`
        assert time.monotonic() < deadline, "c2 is not back in s2's IPv6 rotation"
        time.sleep(0.5)
    hits = browse(lab, s2, 6, address=s2.address6)
    assert all(h.ok for h in hits) and Counter(h.client for h in hits) == {"c1": 2, "c2": 2, "c3": 2}


# In a client: its web server stops answering over IPv6 (SYNs dropped), and only over IPv6.
DROP_IPV6_HTTPS = """table inet sptest_drop6 {
    chain input { type filter hook input priority -10; policy accept; meta nfproto ipv6 tcp dport 443 drop; }
}
"""


def test_a_client_that_stops_answering_over_ipv6_leaves_only_the_ipv6_rotation(lab: Lab) -> None:
    """Health is per family: c2's IPv6 twin fails its checks (the server's probe and the
    kernel's passive sets, over IPv6) while IPv4 passes. IPv6 browsers go to c1 and c3 only,
    IPv4 browsers still to all three, and status says which family is down and why."""
    s2, c2 = lab.servers[1], lab.clients[1]
    assert s2.address6
    c2_ip = tunnels(c2)[s2.address6]["overlay_ip"]
    c2.run(["nft", "-f", "-"], input=DROP_IPV6_HTTPS)
    try:
        deadline = time.monotonic() + 30 * slow()
        while (b := backend(s2, c2_ip))["healthy6"] is not False or mirror6(c2_ip) in ipv6_map(s2):
            assert time.monotonic() < deadline, f"c2's IPv6 twin is still healthy on s2: {b}"
            time.sleep(0.5)
        assert b["healthy"], b  # IPv4 passes its own checks
        hits = browse(lab, s2, 8, address=s2.address6)
        assert all(h.ok for h in hits) and Counter(h.client for h in hits) == {"c1": 4, "c3": 4}
        hits = browse(lab, s2, 6, address=s2.address)
        assert all(h.ok for h in hits) and Counter(h.client for h in hits) == {"c1": 2, "c2": 2, "c3": 2}
    finally:
        c2.run(["nft", "delete", "table", "inet", "sptest_drop6"])
    deadline = time.monotonic() + 30 * slow()
    while not (backend(s2, c2_ip)["healthy6"] and mirror6(c2_ip) in ipv6_map(s2)):
        assert time.monotonic() < deadline, "c2 is not back in s2's IPv6 rotation"
        time.sleep(0.5)


def backend(server: Host, overlay_ip: str) -> dict:
    (found,) = [b for d in status(server)["domains"] for b in d["backends"] if b["overlay_ip"] == overlay_ip]
    return found


def in_ipv6_rotation(server: Host, overlay_ip: str) -> bool:
    """The backend has its IPv6 twin and is in every rotation of its domain, IPv6's included."""
    b = backend(server, overlay_ip)
    return bool(b["overlay_ip6"] and b["in_rotation"])


def ipv6_map(server: Host) -> set[str]:
    """The IPv6 forward's rotation as the kernel has it (map @rr1: the domain's second forward)."""
    listing = json.loads(server.run(["nft", "-j", "list", "map", "inet", "sptun", "rr1"]))
    return {str(v) for item in listing["nftables"] if "map" in item for _, v in item["map"].get("elem", [])}


def in_rotation_ipv4_only(server: Host, overlay_ip: str) -> bool:
    b = backend(server, overlay_ip)
    return b["overlay_ip6"] is None and b["in_rotation"]


@pytest.mark.parametrize("family", [4, 6])
def test_a_browser_that_spoofs_a_clients_overlay_address_reaches_no_client(lab: Lab, family: int) -> None:
    """A browser that sends from c2's overlay address would have the client it is DNATed to
    answer c2 through the tunnels. The server drops overlay sources that do not come through
    the tunnel: IPv6 has no rp_filter to do it."""
    s2, c2 = lab.servers[1], lab.clients[1]
    mine = tunnels(c2)[s2.address6]
    spoofed = mine["overlay_ip"] if family == 4 else mine["overlay_ip6"]
    public = s2.address if family == 4 else f"[{s2.address6}]"
    lab.browser.run(["ip", "addr", "add", f"{spoofed}/{32 if family == 4 else 128}", "dev", "lo", *(["nodad"] if family == 6 else [])])
    try:
        out = lab.browser.run(["sh", "-c", f"for i in 1 2 3; do curl -sk --max-time 2 --interface {spoofed} "
                                           f"https://{public}/ >/dev/null; echo $?; done"])
        assert "0" not in out.split(), out  # no connection either
    finally:
        lab.browser.run(["ip", "addr", "del", f"{spoofed}/{32 if family == 4 else 128}", "dev", "lo"])
    full = ipaddress.ip_address(spoofed).exploded if family == 6 else spoofed  # as nf_conntrack writes it
    for client in lab.clients:
        originals = [line.split(" src=")[1].split()[0] for line in client.run(["cat", "/proc/net/nf_conntrack"]).splitlines()
                     if " src=" in line]  # each connection's first source: who opened it
        assert full not in originals, f"{client.name} got a connection from the spoofed {spoofed}"
    rule = next(line for line in s2.run(["nft", "list", "chain", "inet", "sptun", "antispoof"]).splitlines()
                if f" ip{'' if family == 4 else '6'} saddr " in line)
    assert "packets 0 " not in rule, rule  # dropped by the server, on the way in


def test_down_leaves_nothing_of_either_family(lab: Lab) -> None:
    c3 = lab.clients[2]
    assert sptun_leftovers(c3)["links"]
    c3.run(sptun("down", "-c", config_path(c3)), timeout=60 * slow())
    assert sptun_leftovers(c3) == {"links": [], "rules": [], "routes": [], "nft": False}
    c3.run(sptun("up", "-c", config_path(c3)), timeout=60 * slow())
    wait_for_rotations(lab)
