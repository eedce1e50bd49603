"""The whole path, for real: knot, sptun servers and agents, WireGuard, nft, nginx, curl.

The backend is SPTUN_TEST_WIREGUARD (default "auto": wireguard-go on a host without the
module, the kernel module inside the VM tier). The assertions are the same for both.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from support import LAB_TOOLS, netns_marks

from sptun.agent import RULE_PRIORITY, interface_name
from sptun.agent.plan import FALLBACK_PRIORITY
from sptun.daemon import RMEM_WANTED, rmem_default
from sptun.errors import CommandError
from sptun.keys import ensure_private_dir, generate_private_key, public_key, write_file_atomic
from sptun.proto import MAX_MESSAGE
from sptun.daemon import SCRAPE_MAX_AGE
from sptun.lab import (
    DOMAIN,
    LAB_OVERLAY,
    LAB_OVERLAY6,
    Host,
    Lab,
    browse,
    config_path,
    slow,
    sptun,
    start_daemons,
    status,
    status_cli,
    wait_served,
    write_configs,
)
from sptun.leases import Lease, Leases, LeaseStore
from sptun.nft import MARK_BASE, MARK_MASK

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go")

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
PREFIX = f"spe{os.getpid() % 100000}"
OTHER = "other.example.test"  # a second domain on every server, with its own token


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(PREFIX)
    try:
        lab.up()
        write_configs(lab, BACKEND, extra_domains=(OTHER,), ports=("tcp/443", "udp/443"), metrics=True)
        same_leases_on_every_server(lab)
        for client in lab.clients:
            client.spawn([sys.executable, "-c", UDP_ECHO, client.name], log=client.dir / "udp-echo.log")
        start_daemons(lab)
        wait_served(lab)
        yield lab
    finally:
        lab.down()


# A UDP service on each client: answers each datagram with who it is and whom it saw. It
# listens in both families, as a service behind a dual-stack server should (its agent tells
# the servers so: one that listens on IPv4 only gets no IPv6 browsers).
UDP_ECHO = textwrap.dedent("""
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((address, 443))
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            data, peer = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(f"client={sys.argv[1]} remote={peer[0]}".encode(), peer)
""")

UDP_BROWSER = textwrap.dedent("""
    import socket, sys
    for _ in range(int(sys.argv[2])):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a new source port: a new flow
            s.settimeout(3)
            s.sendto(b"hello", (sys.argv[1], 443))
            try:
                print(s.recvfrom(2048)[0].decode())
            except TimeoutError:
                print("timeout")
""")


def same_leases_on_every_server(lab: Lab) -> None:
    """Servers are independent, so their overlays may overlap: give each client the same
    address on both, the hardest case for reply routing. Also proves leases are read back."""
    leases = []
    for i, client in enumerate(lab.clients):
        key = generate_private_key()
        ensure_private_dir(client.dir / "state")
        write_file_atomic(client.dir / "state" / "private.key", key + "\n")
        leases.append(Lease(public_key(key), DOMAIN, f"10.99.0.{i + 2}", time.time(), seen=time.time()))
    for server in lab.servers:
        ensure_private_dir(server.dir / "state")
        LeaseStore(server.dir / "state").save(Leases(ipaddress.IPv4Network(LAB_OVERLAY), leases))


def tunnel_of(client: Host, server: Host) -> dict:
    (tunnel,) = [t for t in status(client)["tunnels"] if t["server"] == server.address]
    return tunnel


@pytest.mark.vm
def test_requests_through_each_server_are_even_keep_the_source_and_pass_tls(lab: Lab) -> None:
    names = [c.name for c in lab.clients]
    for server in lab.servers:
        hits = browse(lab, server, 4 * len(names))
        assert all(h.ok for h in hits), [h.error for h in hits if not h.ok]
        # numgen inc: exactly even over k*N requests
        assert Counter(h.client for h in hits) == {name: 4 for name in names}
        # the browser's own address reaches the client: no SNAT, no proxy
        assert {h.source for h in hits} == {lab.browser.address}
        # TLS passes through: each answer carries the answering client's own certificate
        for h in hits:
            assert f"OU={h.client}" in h.subject, h


@pytest.mark.vm
def test_ipv6_browsers_are_even_keep_their_address_and_pass_tls(lab: Lab) -> None:
    """The same over IPv6: each server's public IPv6 address DNATs into its IPv6 overlay, to
    the same clients, round-robin; the client sees the browser's IPv6 address."""
    names = [c.name for c in lab.clients]
    assert lab.browser.address6
    for server in lab.servers:
        assert server.address6
        hits = browse(lab, server, 4 * len(names), address=server.address6)
        assert all(h.ok for h in hits), [h.error for h in hits if not h.ok]
        assert Counter(h.client for h in hits) == {name: 4 for name in names}
        assert {h.source for h in hits} == {lab.browser.address6}
        for h in hits:
            assert f"OU={h.client}" in h.subject, h


@pytest.mark.vm
def test_udp_ports_are_forwarded_like_tcp(lab: Lab) -> None:
    names = [c.name for c in lab.clients]
    for server in lab.servers:
        out = lab.browser.run([sys.executable, "-c", UDP_BROWSER, server.address, str(2 * len(names))]).split()
        assert "timeout" not in out
        answers = [dict(part.split("=") for part in pair) for pair in zip(out[::2], out[1::2], strict=True)]
        assert Counter(a["client"] for a in answers) == {name: 2 for name in names}
        assert {a["remote"] for a in answers} == {lab.browser.address}


def mirror6(ip: str) -> str:
    """A lease's IPv6 twin: at its offset in LAB_OVERLAY, in LAB_OVERLAY6."""
    offset = int(ipaddress.IPv4Address(ip)) - int(ipaddress.IPv4Network(LAB_OVERLAY).network_address)
    return str(ipaddress.IPv6Network(LAB_OVERLAY6).network_address + offset)


def test_status_json_follows_the_contract(lab: Lab) -> None:
    server = status_cli(lab.servers[0])
    assert server["role"] == "server" and server["interface"] == "sptun0"
    assert server["daemon"] is True and server["process"]["rss_bytes"] > 0
    table = lab.servers[0].run(sptun("status", "-c", config_path(lab.servers[0])))
    assert DOMAIN in table and "10.99.0.2" in table and "healthy" in table and "daemon pid" in table
    # --watch refreshes until Ctrl-C, then exits 0 (into a file: a frame per refresh)
    log = lab.servers[0].dir / "watch.log"
    watch = lab.servers[0].spawn(sptun("status", "--watch", "--interval", "0.3", "-c", config_path(lab.servers[0])), log=log)
    try:
        deadline = time.monotonic() + 30 * slow()  # a start of the CLI took over 40 s in the busy VM
        while not ("healthy" in log.read_text() and watch.poll() is None) and time.monotonic() < deadline:
            time.sleep(0.2)
        watched = log.read_text()
        assert DOMAIN in watched and "healthy" in watched, watched
    finally:
        watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=10 * slow()) == 0
    (domain,) = [d for d in server["domains"] if d["name"] == DOMAIN]
    assert len(domain["backends"]) == 3
    for b in domain["backends"]:
        assert b["healthy"] is True and b["overlay_ip"].startswith("10.99.0.") and len(b["public_key"]) == 44
        assert b["overlay_ip6"] == mirror6(b["overlay_ip"])  # both families
    assert (server["overlay6"], server["overlay_ip6"]) == ("fd99::/64", "fd99::1")
    agent = status(lab.clients[0])  # (the CLI's part is proven above: each start is costly in the VM)
    assert agent["role"] == "agent" and agent["domain"] == DOMAIN
    assert sorted(t["server"] for t in agent["tunnels"]) == [s.address for s in lab.servers]
    for t in agent["tunnels"]:
        assert t["healthy"] is True and t["interface"] == interface_name(t["server"])
        server = next(s for s in lab.servers if s.address == t["server"])
        (backends,) = [d["backends"] for d in status(server)["domains"] if d["name"] == DOMAIN]
        assert t["overlay_ip"] in [b["overlay_ip"] for b in backends]
        assert (t["overlay_ip6"], t["server_overlay_ip6"]) == (mirror6(t["overlay_ip"]), "fd99::1")


@pytest.mark.parametrize("family", [4, 6])
def test_status_counts_the_open_connections_of_each_backend(lab: Lab, family: int) -> None:
    s1 = lab.servers[0]
    address = s1.address if family == 4 else s1.address6
    assert address

    def active() -> int:
        (domain,) = [d for d in status(s1)["domains"] if d["name"] == DOMAIN]
        return sum(b["active_connections"] for b in domain["backends"])

    before = active()
    hold = "import socket, sys, time; s = socket.create_connection((sys.argv[1], 443)); time.sleep(600)"
    holder = lab.browser.spawn([sys.executable, "-c", hold, address], log=lab.browser.dir / f"hold{family}.log")
    try:
        deadline = time.monotonic() + 10 * slow()
        while (now := active()) != before + 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert now == before + 1 == 1  # an IPv6 connection counts as its client's too
    finally:
        holder.terminate()
        holder.wait(timeout=20)


def test_overlapping_leases_are_told_apart_by_interface(lab: Lab) -> None:
    """Every client holds the same address from both servers (see the fixture), yet the
    requests above succeed through both: replies leave by the tunnel they came in on."""
    for i, client in enumerate(lab.clients):
        assert [t["overlay_ip"] for t in status(client)["tunnels"]] == [f"10.99.0.{i + 2}"] * 2


def sptun_links(host: Host) -> dict[str, dict]:
    """sptun's interfaces on host, by name, as `ip -d -j link` shows them."""
    return {link["ifname"]: link for link in json.loads(host.run(["ip", "-d", "-j", "link", "show"]))
            if link["ifname"].startswith("sptun")}


def test_the_backend_is_the_one_asked_for(lab: Lab) -> None:
    """Kernel WireGuard links in the VM tier; on a host without the module, `auto` runs
    wireguard-go (tun links) and every daemon says so in its log."""
    fallback = "no wireguard kernel module here; using userspace wireguard-go"
    for host in lab.servers + lab.clients:
        kinds = {link.get("linkinfo", {}).get("info_kind", "?") for link in sptun_links(host).values()}
        log = (host.dir / "sptun.log").read_text()
        if BACKEND == "kernel":
            assert kinds == {"wireguard"} and fallback not in log, (host, kinds)
        else:
            assert BACKEND == "auto" and not os.path.exists("/sys/module/wireguard"), "run the kernel backend in the VM tier"
            assert kinds == {"tun"} and fallback in log, (host, kinds)
            if (rmem_default() or 0) < RMEM_WANTED:  # and warns that its receive buffer is small
                assert "net.core.rmem_default is" in log and "60-sptun.conf" in log


@pytest.mark.vm
def test_replies_leave_by_the_tunnel_they_came_in_on(lab: Lab) -> None:
    """The agent's policy routing, read back from the kernel: for each tunnel, a table whose
    default route leaves by it, one rule from its overlay address with its mark to that
    table, and loose rp_filter on the tunnel only."""
    for client in lab.clients:
        links = sptun_links(client)
        rules = [r for r in json.loads(client.run(["ip", "-j", "rule", "show"])) if r.get("priority") == RULE_PRIORITY]
        tunnels = status(client)["tunnels"]
        assert len(rules) == len(tunnels) == len(lab.servers)
        for t in tunnels:
            name = t["interface"]
            table = MARK_BASE | links[name]["ifindex"]
            routes = json.loads(client.run(["ip", "-j", "route", "show", "table", str(table)]))
            assert [(r["dst"], r["dev"]) for r in routes] == [("default", name)]
            (rule,) = [r for r in rules if int(r["table"]) == table]
            assert (rule["src"], rule.get("srclen", 32), int(rule["fwmark"], 16)) == (t["overlay_ip"], 32, table)
            assert client.run(["cat", f"/proc/sys/net/ipv4/conf/{name}/rp_filter"]).strip() == "2"
        default = client.run(["cat", "/proc/sys/net/ipv4/conf/default/rp_filter"]).strip()
        assert client.run(["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]).strip() == default  # untouched


def wg_peers(host: Host) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(latest handshake, rx bytes, tx bytes) by (interface, peer), from `wg show all dump`:
    wireguard-tools reading the kernel or wireguard-go, not sptun."""
    peers = {}
    for line in host.run(["wg", "show", "all", "dump"]).splitlines():
        fields = line.split("\t")
        if len(fields) == 9:  # a peer; an interface's line has 5 fields
            peers[(fields[0], fields[1])] = (int(fields[5]), int(fields[6]), int(fields[7]))
    return peers


def nft_table(host: Host) -> tuple[int, dict[str, int]]:
    """The handle of table inet sptun (a reload makes a new table, with a new handle), and
    the packet counter of each rule with a comment (a reload zeroes it)."""
    items = json.loads(host.run(["nft", "-j", "list", "table", "inet", "sptun"]))["nftables"]
    (handle,) = [item["table"]["handle"] for item in items if "table" in item]
    counters = {}
    for item in items:
        rule = item.get("rule", {})
        for expr in rule.get("expr", []):
            if "counter" in expr and "comment" in rule:
                counters[rule["comment"]] = expr["counter"]["packets"]
    return handle, counters


@pytest.mark.vm
def test_up_again_is_a_no_op(lab: Lab) -> None:
    """`sptun up` on a host that is up changes nothing: no interface made again, WireGuard
    sessions and their counters kept, no nft reload."""
    for server in lab.servers:  # traffic first: handshakes and counters to keep
        assert all(h.ok for h in browse(lab, server, 3))
    for host in (lab.servers[0], lab.clients[0]):
        links = {name: link["ifindex"] for name, link in sptun_links(host).items()}
        peers, (table, counters) = wg_peers(host), nft_table(host)
        assert links and peers and all(handshake > 0 for handshake, _, _ in peers.values())

        out = host.run(sptun("up", "-c", config_path(host)))
        assert "[#]" not in out, out  # no change to report

        assert {name: link["ifindex"] for name, link in sptun_links(host).items()} == links
        after = wg_peers(host)
        assert after.keys() == peers.keys()
        for key, (handshake, rx, tx) in peers.items():  # a peer made again starts from 0
            assert after[key][0] >= handshake and after[key][1] >= rx and after[key][2] >= tx, (host, key)
        new_table, new_counters = nft_table(host)
        assert new_table == table and new_counters.keys() == counters.keys()
        assert all(new_counters[k] >= n for k, n in counters.items())
        if host in lab.servers:
            assert max(counters.values()) > 0  # so a reload would have shown


REGISTER = textwrap.dedent("""
    import json, sys
    from sptun import proto
    from sptun.keys import generate_private_key, public_key
    from sptun.errors import ProtocolError
    server = sys.argv[1]
    for domain, token in json.loads(sys.argv[2]):  # one process: a Python start is slow in the VM
        key = generate_private_key()
        try:
            _, a = proto.exchange(server, 51821, proto.Request("register", domain, token, public_key(key)), key)
            proto.exchange(server, 51821, proto.Request("deregister", domain, token, public_key(key)), key)
            print(json.dumps({"ok": True, "overlay_ip": a.overlay_ip}))
        except ProtocolError as e:
            print(json.dumps({"ok": False, "reason": e.reason, "error": e.message}))
""")


def register(lab: Lab, attempts: list[tuple[str, str]]) -> list[dict]:
    """Register (and deregister) a new key for each (domain, token), from the browser."""
    out = lab.browser.run([sys.executable, "-c", REGISTER, lab.servers[0].address, json.dumps(attempts)])
    return [json.loads(line) for line in out.splitlines()]


def test_registration_needs_the_domains_own_token(lab: Lab) -> None:
    s1 = lab.servers[0]
    app_token = (s1.dir / "tokens" / DOMAIN).read_text().strip()
    other_token = (s1.dir / "tokens" / OTHER).read_text().strip()
    before = status(s1)["registrations"]["rejected"].get("bad-token", 0)

    wrong, other, crossed, unknown, accepted = register(lab, [
        (DOMAIN, "not-the-token"),
        (DOMAIN, other_token),  # another domain's token
        (OTHER, app_token),
        ("unknown.example.test", app_token),
        (DOMAIN, app_token),  # the control: the right token works
    ])
    assert [r.get("reason") for r in (wrong, other, crossed, unknown)] == ["bad-token"] * 3 + ["unknown-domain"]
    assert accepted["ok"] and accepted["overlay_ip"].startswith("10.99.0."), accepted

    assert status(s1)["registrations"]["rejected"]["bad-token"] == before + 3
    log = (s1.dir / "sptun.log").read_text()
    assert "rejected registration" in log
    for token in (app_token, other_token):
        assert token not in log  # tokens are never logged
    assert all(h.ok for h in browse(lab, s1, 3))  # and the server keeps serving


def test_garbage_on_the_registration_port_is_refused_and_serving_goes_on(lab: Lab) -> None:
    s1 = lab.servers[0]
    probe = textwrap.dedent("""
        import socket, sys
        for payload in (b"garbage\\n", b"{}\\n", b"x" * 20000 + b"\\n", b"{\\"key\\": 1"):
            s = socket.create_connection((sys.argv[1], 51821), timeout=10)
            s.recv(4096)  # hello
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            print(s.recv(4096).decode().strip())
            s.close()
    """)
    assert 20000 > MAX_MESSAGE  # the third payload is over the limit
    replies = [json.loads(line) for line in lab.browser.run([sys.executable, "-c", probe, s1.address]).splitlines()]
    assert [r["ok"] for r in replies] == [False] * 4
    assert {r["reason"] for r in replies} >= {"malformed", "oversized"}
    assert all(h.ok for h in browse(lab, s1, 3))


def in_ns(host: Host, *argv: str, check: bool = True) -> str:
    return host.run(list(argv), check=check)


def test_a_client_reaches_nothing_through_the_overlay(lab: Lab) -> None:
    """Not another client, not the server itself, not the server's other networks."""
    c1, c2 = lab.clients[0], lab.clients[1]
    s1 = lab.servers[0]
    tunnel = tunnel_of(c1, s1)["interface"]
    c2_overlay = tunnel_of(c2, s1)["overlay_ip"]
    router = "198.51.100.1"  # on the server's public network
    drops_before = forward_drops(lab)
    # Send into the tunnel on purpose: routes in c1's main table, removed afterwards.
    in_ns(c1, "ip", "route", "add", "10.99.0.0/20", "dev", tunnel)
    in_ns(c1, "ip", "route", "add", f"{router}/32", "dev", tunnel)
    try:
        for url in (f"https://{c2_overlay}/", "http://10.99.0.1:51821/", f"http://{router}/"):
            with pytest.raises(CommandError) as err:
                in_ns(c1, "curl", "-sk", "--max-time", "2", url)
            assert err.value.returncode == 28, url  # silently dropped: not refused, not answered
    finally:
        in_ns(c1, "ip", "route", "del", "10.99.0.0/20", "dev", tunnel, check=False)
        in_ns(c1, "ip", "route", "del", f"{router}/32", "dev", tunnel, check=False)
    # The packets did reach a server, and its isolation filter dropped them. (Which server:
    # c1 has the same address on both tunnels, and a TCP connect looks its route up again
    # with that source, where the tunnels' own rules come first: either may carry them.)
    assert forward_drops(lab) > drops_before


def test_a_client_reaches_nothing_through_the_overlay_over_ipv6_either(lab: Lab) -> None:
    """As above, in the IPv6 overlay: not another client's /128, not the server's own overlay
    address, not the server's public IPv6 network."""
    c1, c2 = lab.clients[0], lab.clients[1]
    s1 = lab.servers[0]
    tunnel = tunnel_of(c1, s1)["interface"]
    c2_overlay6, server6 = tunnel_of(c2, s1)["overlay_ip6"], tunnel_of(c1, s1)["server_overlay_ip6"]
    router = "2001:db8::1"  # the inet router, on the servers' public IPv6 link
    assert c2_overlay6 and server6
    drops_before = forward_drops(lab)
    in_ns(c1, "ip", "-6", "route", "add", f"{router}/128", "dev", tunnel)
    try:
        for url in (f"https://[{c2_overlay6}]/", f"http://[{server6}]:51821/", f"http://[{router}]/"):
            with pytest.raises(CommandError) as err:
                in_ns(c1, "curl", "-sk", "--max-time", "2", url)
            assert err.value.returncode == 28, url  # silently dropped: not refused, not answered
    finally:
        in_ns(c1, "ip", "-6", "route", "del", f"{router}/128", "dev", tunnel, check=False)
    assert forward_drops(lab) > drops_before  # (by either server: see above)


def forward_drops(lab: Lab) -> int:
    """Packets the servers' isolation filters (their forward and input chains) dropped."""
    total = 0
    for server in lab.servers:
        ruleset = json.loads(server.run(["nft", "-j", "list", "table", "inet", "sptun"]))
        for item in ruleset["nftables"]:
            rule = item.get("rule")
            if rule and rule["chain"] in ("forward", "input"):
                for expr in rule["expr"]:
                    if "counter" in expr:
                        total += expr["counter"]["packets"]
    return total


def test_malformed_txt_records_beside_good_ones(lab: Lab) -> None:
    good = [f"r=superprotocol;ip={s.address}" for s in lab.servers]
    bad = ["r=superprotocol;ip=not-an-ip", "r=superprotocol;port=1", "r=superprotocol; ip = 198.51.100.99 ; port=99999"]
    other = ["v=spf1 -all", "r=someone-else;ip=198.51.100.12"]
    c1 = lab.clients[0]
    lab.set_txt([" r = superprotocol ; ip = 198.51.100.10 ; future=1 ", good[1], *bad, *other])
    try:
        deadline = time.monotonic() + lab.ttl + 10 * slow()
        log = c1.dir / "sptun.log"
        while time.monotonic() < deadline and "not-an-ip" not in log.read_text():
            time.sleep(0.5)
        text = log.read_text()
        for record in bad:
            assert f"skipping malformed TXT record {record!r}" in text
        assert "v=spf1" not in text and "someone-else" not in text  # not ours: ignored quietly
        tunnels = status(c1)["tunnels"]
        assert sorted(t["server"] for t in tunnels) == [s.address for s in lab.servers]
        assert all(t["healthy"] for t in tunnels)
        assert all(h.ok for s in lab.servers for h in browse(lab, s, 3))
    finally:
        lab.set_txt(good)


def test_wireguard_kernel_without_the_module_fails_in_one_line(lab: Lab) -> None:
    if BACKEND == "kernel" or os.path.exists("/sys/module/wireguard"):
        pytest.skip("this kernel has the wireguard module; the VM tier checks the kernel backend itself")
    s2 = lab.servers[1]
    conf = s2.dir / "kernel.toml"
    conf.write_text(f'state_dir = "{s2.dir}/kernel-state"\nwireguard = "kernel"\n')
    with pytest.raises(CommandError) as err:
        s2.run(sptun("up", "-c", str(conf)))
    lines = err.value.stderr.strip().splitlines()
    assert err.value.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("sptun: ") and "no wireguard module" in lines[0]


def scrape(host: Host) -> dict[str, float]:
    text = host.run(["curl", "-sS", "--max-time", f"{5 * slow():g}", "http://127.0.0.1:9586/metrics"])
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_endpoints_follow_the_traffic(lab: Lab) -> None:
    s1, c1 = lab.servers[0], lab.clients[0]
    key = f'sptun_forwarded_connections_total{{domain="{DOMAIN}",listen="{s1.address}",port="tcp/443"}}'
    before = scrape(s1)
    assert all(h.ok for h in browse(lab, s1, 6))
    time.sleep(SCRAPE_MAX_AGE)  # a scrape within that reuses the last one's status
    after = scrape(s1)
    assert after[key] - before[key] == 6  # the nft rule counter: one per new connection
    rotation = {k for k, v in after.items() if k.startswith("sptun_backend_in_rotation{") and DOMAIN in k and v == 1}
    assert len(rotation) == 3  # (a test client that registered and left is still listed, draining)
    assert all(after[k.replace("in_rotation", "healthy")] == 1 for k in rotation)
    assert after['sptun_registrations_total{result="accepted"}'] >= 3
    assert after["sptun_reconcile_duration_seconds_count"] > 0
    agent = scrape(c1)
    assert agent["sptun_tunnels_up"] == 2 and agent["sptun_dns_refreshes_total"] >= 1
    assert sum(v for k, v in agent.items() if k.startswith("sptun_tunnel_received_bytes_total")) > 0


def test_secrets_stay_in_their_files(lab: Lab) -> None:
    """Private keys and tokens: 0600 files under 0700 directories, never in a log or a status."""
    secrets = {}
    for host in lab.servers + lab.clients:
        files = [host.dir / "state" / "private.key", *(host.dir / "tokens").glob("*")]
        for path in files:
            assert path.stat().st_mode & 0o777 == 0o600, path
            assert path.parent.stat().st_mode & 0o077 == 0, path.parent
            secrets[path] = path.read_text().strip()
    outputs = [(host.dir / "sptun.log").read_text() for host in lab.servers + lab.clients]
    outputs += [json.dumps(status(host)) for host in lab.servers + lab.clients]
    for path, secret in secrets.items():
        assert not any(secret in text for text in outputs), f"the secret in {path} leaked"


@pytest.mark.parametrize("config, error", [
    ('overlay = "198.51.100.0/24"\n', "overlay: 198.51.100.0/24 overlaps 198.51.100.0/24 dev eth0"),
    ('overlay = "10.98.0.0/16"\noverlay6 = "2001:db8::/64"\n', "overlay6: 2001:db8::/64 overlaps 2001:db8::/64 dev eth0"),
    ('overlay = "10.98.0.0/16"\noverlay6 = "fd98::/64"\n[[domains]]\nname = "x.example.test"\nlisten = ["2001:db8::99"]\n',
     "domains[0].listen: 2001:db8::99 is not an address of this host"),
    ('overlay = "10.98.0.0/16"\n[[domains]]\nname = "x.example.test"\nlisten = ["198.51.100.99"]\n',
     "domains[0].listen: 198.51.100.99 is not an address of this host"),
], ids=["overlay", "overlay6", "listen6-not-local", "listen-not-local"])
def test_an_overlay_over_a_local_network_or_a_foreign_listen_address_is_refused(lab: Lab, config: str, error: str) -> None:
    s2 = lab.servers[1]
    conf = s2.dir / "overlap.toml"
    conf.write_text(f'interface = "sptest0"\nstate_dir = "{s2.dir}/overlap-state"\n{config}')
    with pytest.raises(CommandError) as err:
        s2.run(sptun("up", "-c", str(conf)))
    (line,) = err.value.stderr.strip().splitlines()
    assert err.value.returncode == 2 and line.startswith("sptun: ") and error in line, line
    assert "sptest0" not in s2.run(["ip", "link"])  # nothing was made


def sptun_leftovers(host: Host) -> dict[str, object]:
    """What sptun makes on a host, in both families."""
    links = [link["ifname"] for link in json.loads(host.run(["ip", "-j", "link", "show"]))
             if link["ifname"].startswith("sptun")]
    rules = [r for family in ("-4", "-6") for r in json.loads(host.run(["ip", "-j", family, "rule", "show"]))
             if r.get("priority") in (RULE_PRIORITY, FALLBACK_PRIORITY)]
    routes = [r for family in ("-4", "-6") for r in json.loads(host.run(["ip", "-j", family, "route", "show", "table", "all"]))
              if str(r.get("table", "")).isdigit() and int(r["table"]) & MARK_MASK == MARK_BASE]
    tables = host.run(["nft", "list", "tables"]).split()
    return {"links": links, "rules": rules, "routes": routes, "nft": "sptun" in tables}


@pytest.mark.vm
def test_down_removes_everything_sptun_made_and_lasts(lab: Lab) -> None:
    c1, s1, s2 = lab.clients[0], lab.servers[0], lab.servers[1]
    assert sptun_leftovers(c1)["links"], "the agent should have tunnels before down"
    default_before = c1.run(["ip", "route", "show", "default"])

    print(c1.run(sptun("down", "-c", config_path(c1))))
    assert sptun_leftovers(c1) == {"links": [], "rules": [], "routes": [], "nft": False}
    assert c1.run(["ip", "route", "show", "default"]) == default_before  # nothing else touched
    # Deregistered: both servers took c1 out of the rotation, and the others still serve.
    for server in lab.servers:
        hits = browse(lab, server, 4)
        assert all(h.ok for h in hits) and {h.client for h in hits} == {"c2", "c3"}
    # down lasts: the running daemon does not bring it back
    time.sleep(3)
    assert sptun_leftovers(c1)["links"] == []
    assert status(c1)["down"] is True

    print(s1.run(sptun("down", "-c", config_path(s1))))
    assert sptun_leftovers(s1) == {"links": [], "rules": [], "routes": [], "nft": False}
    print(s1.run(sptun("down", "-c", config_path(s1))))  # idempotent
    assert all(h.ok for h in browse(lab, s2, 2))  # the other server is untouched

    # and `up` brings it back
    s1.run(sptun("up", "-c", config_path(s1)))
    c1.run(sptun("up", "-c", config_path(c1)))
    assert len(sptun_leftovers(c1)["links"]) == 2
