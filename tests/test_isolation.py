"""Isolation rests on sptun's own marks, for real: a lab with one server and one client, each
with a "container" that other software publishes by a DNAT of its own, in its own table.

- Through its tunnel a client reaches only the connections sptun forwards to it, not a
  container the server publishes with Docker-style DNAT: a forward chain that trusted any
  DNAT (`ct status dnat`) would let it through; sptun's asks for its own mark, nft.DNAT_MARK.
- A server reaches only the client's published ports, nothing the client forwards: not a
  container the client publishes, not an address routed behind it.

Each "container" is a namespace of the test's own, named after the lab's prefix (so the lab's
cleanup removes it too), behind a veth "docker0", with a web server on port 80 and a counter
of the packets that arrive from the overlay: what reaches it, whether or not replies make it
back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from support import LAB_TOOLS, netns_marks

from sptun.errors import CommandError
from sptun.lab import LAB_OVERLAY, Host, Lab, slow, start_daemons, status, wait_served, write_configs
from sptun.run import run

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go", "wg")

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
PREFIX = f"spi{os.getpid() % 100000}"
PUBLISHED = 8080  # the port other software publishes its container on, on the server and the client
SERVER_OVERLAY = "10.99.0.1"  # the server's own overlay address: the first of LAB_OVERLAY
ROUTE_TABLE, ROUTE_PREF = 4242, 90  # the client's test route of the server's public address


def docker_table(bridge: str, container: str) -> str:
    """What Docker's `-p 8080:80` amounts to, in a table of its own: a DNAT of the host's own
    addresses to the container, and the forward accepts that go with it."""
    return f"""table ip docker {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname != "{bridge}" fib daddr type local tcp dport {PUBLISHED} dnat to {container}:80
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        oifname "{bridge}" ct state established,related accept
        oifname "{bridge}" ip daddr {container} tcp dport 80 accept
        iifname "{bridge}" accept
    }}
}}
"""


@dataclass(frozen=True)
class Container:
    netns: str
    address: str

    def run(self, *argv: str, input: str | None = None) -> str:
        return run(["ip", "netns", "exec", self.netns, *argv], input=input, timeout=30 * slow())

    def from_overlay(self) -> int:
        """Packets that reached this container from an overlay address."""
        rules = json.loads(self.run("nft", "-j", "list", "chain", "inet", "probe", "input"))["nftables"]
        return sum(e["counter"]["packets"] for item in rules if "rule" in item
                   for e in item["rule"]["expr"] if "counter" in e)


@contextmanager
def container(lab: Lab, host: Host, name: str, subnet: str) -> Iterator[Container]:
    """A namespace behind host's new veth "docker0" (SUBNET.1/16), with a web server at SUBNET.2
    that answers `container NAME`, and Docker's table for it on host."""
    box = Container(f"{lab.prefix}-{name}", f"{subnet}.2")
    run(["ip", "netns", "add", box.netns])
    web: subprocess.Popen[bytes] | None = None
    try:
        run(["ip", "link", "add", "docker0", "netns", host.netns, "type", "veth", "peer", "name", "eth0",
             "netns", box.netns])  # fmt: skip
        host.run(["ip", "addr", "add", f"{subnet}.1/16", "dev", "docker0"])
        host.run(["ip", "link", "set", "docker0", "up"])
        box.run("ip", "link", "set", "lo", "up")
        box.run("ip", "addr", "add", f"{box.address}/16", "dev", "eth0")
        box.run("ip", "link", "set", "eth0", "up")
        box.run("ip", "route", "add", "default", "via", f"{subnet}.1")
        box.run("nft", "-f", "-", input=PROBE.format(overlay=LAB_OVERLAY))
        root = lab.dir / name
        root.mkdir()
        (root / "index.html").write_text(f"container {name}\n")
        web = subprocess.Popen(["ip", "netns", "exec", box.netns, sys.executable, "-m", "http.server", "80",
                                "--bind", box.address, "--directory", str(root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        box.run("curl", "-sS", "--retry", "20", "--retry-connrefused", "--retry-delay", "0", "--retry-max-time",
                f"{10 * slow():g}", f"http://{box.address}/")  # fmt: skip
        host.run(["nft", "-f", "-"], input=docker_table("docker0", box.address))
        yield box
    finally:
        host.run(["nft", "delete", "table", "ip", "docker"], check=False)
        if web is not None:  # by its pid: `ip netns exec` execs the web server
            web.terminate()
            try:
                web.wait(timeout=10)
            except subprocess.TimeoutExpired:
                web.kill()
                web.wait()
        run(["ip", "netns", "del", box.netns], check=False)  # and with it both ends of the veth


PROBE = """table inet probe {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ip saddr {overlay} counter
    }}
}}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(PREFIX, servers=1, clients=1)
    try:
        lab.up()
        write_configs(lab, BACKEND)
        start_daemons(lab)
        wait_served(lab)
        yield lab
    finally:
        lab.down()


def curl(host: Host, url: str, *options: str) -> tuple[int, str]:
    """(curl's exit code, the body) of one short fetch from host; 28 is a timeout."""
    try:
        return 0, host.run(["curl", "-sS", "--max-time", f"{3 * slow():g}", *options, url])
    except CommandError as e:
        return e.returncode, ""


DROPPED = (28, 0)  # curl timed out (not refused), and not one packet reached the container


def attempt(box: Container, host: Host, url: str) -> tuple[int, int]:
    """(curl's exit code, packets from the overlay that reached box) of one fetch from host."""
    before = box.from_overlay()
    code, _ = curl(host, url)
    return code, box.from_overlay() - before


def drops(host: Host, comment: str) -> int:
    """The packets counted by the sptun rule with this comment (0 if there is none)."""
    items = json.loads(host.run(["nft", "-j", "list", "table", "inet", "sptun"]))["nftables"]
    return sum(e["counter"]["packets"] for item in items if item.get("rule", {}).get("comment") == comment
               for e in item["rule"]["expr"] if "counter" in e)


def test_a_client_cannot_reach_a_container_the_server_publishes(lab: Lab) -> None:
    (s1,), (c1,) = lab.servers, lab.clients
    (tunnel,) = status(c1)["tunnels"]
    with container(lab, s1, "ctrs", "172.17.0") as box:
        # The control: published to the internet, the browser reaches it.
        assert curl(lab.browser, f"http://{s1.address}:{PUBLISHED}/") == (0, "container ctrs\n")
        before = drops(s1, "clients reach only their forwarded connections")
        # Through the tunnel, on purpose: the server's overlay address, and its public address
        # (for this port only: the tunnel's own packets go to that address too).
        dev = tunnel["interface"]
        routes = [  # (add, delete)
            (["ip", "route", "add", f"{SERVER_OVERLAY}/32", "dev", dev], ["ip", "route", "del", f"{SERVER_OVERLAY}/32"]),
            (["ip", "route", "add", "default", "dev", dev, "table", str(ROUTE_TABLE)],
             ["ip", "route", "flush", "table", str(ROUTE_TABLE)]),
            (["ip", "rule", "add", "pref", str(ROUTE_PREF), "to", s1.address, "ipproto", "tcp", "dport", str(PUBLISHED),
              "lookup", str(ROUTE_TABLE)], ["ip", "rule", "del", "pref", str(ROUTE_PREF)]),
        ]  # fmt: skip
        undo: list[list[str]] = []
        reached: dict[str, tuple[int, int]] = {}
        try:
            for add, delete in routes:
                c1.run(add)
                undo.append(delete)
            for address in (SERVER_OVERLAY, s1.address):
                assert dev in c1.run(["ip", "route", "get", address, "ipproto", "tcp", "dport", str(PUBLISHED)])
                reached[address] = attempt(box, c1, f"http://{address}:{PUBLISHED}/")
        finally:
            for delete in reversed(undo):
                c1.run(delete, check=False)
        assert reached == {SERVER_OVERLAY: DROPPED, s1.address: DROPPED}
        assert drops(s1, "clients reach only their forwarded connections") > before  # by sptun's filter
        # sptun's own forwards pass beside Docker's table, replies included (they carry the mark).
        hit = lab.curl(s1.address)
        assert hit.ok and "client=c1" in hit.body, hit.error


def test_a_server_reaches_only_the_published_ports_of_a_client(lab: Lab) -> None:
    (s1,), (c1,) = lab.servers, lab.clients
    (tunnel,) = status(c1)["tunnels"]
    overlay_ip = tunnel["overlay_ip"]
    nat = lab.hosts["nat"]
    c1.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])  # as Docker does on the client
    try:
        with container(lab, c1, "ctrc", "172.18.0") as box:
            # The controls: the published port answers through the tunnel; the client's own
            # forwarding is undisturbed (its LAN reaches the container it publishes).
            code, body = curl(s1, f"https://{overlay_ip}/", "-k")
            assert code == 0 and f"client=c1 remote={SERVER_OVERLAY}" in body, (code, body)
            assert curl(nat, f"http://{c1.address}:{PUBLISHED}/") == (0, "container ctrc\n")
            before = drops(c1, "the server reaches nothing behind the client")

            # A container the client publishes with Docker, by the client's overlay address.
            reached = {"published container": attempt(box, s1, f"http://{overlay_ip}:{PUBLISHED}/")}

            # An address routed behind the client. A server that routes it into the tunnel can
            # send there (the client's peer allows any address): sptun's server would not, so
            # its daemon is paused meanwhile, lest it put the peer's allowed-ips back.
            (daemon,) = [p for p in s1.procs if isinstance(p.args, list) and "server" in p.args and "run" in p.args]
            key = next(line.split()[0] for line in s1.run(["wg", "show", "sptun0", "allowed-ips"]).splitlines()
                       if f"{overlay_ip}/32" in line)
            os.kill(daemon.pid, signal.SIGSTOP)
            try:
                s1.run(["wg", "set", "sptun0", "peer", key, "allowed-ips", f"{overlay_ip}/32,172.18.0.0/16"])
                s1.run(["ip", "route", "add", "172.18.0.0/16", "dev", "sptun0"])
                reached["routed address"] = attempt(box, s1, f"http://{box.address}/")
            finally:
                s1.run(["ip", "route", "del", "172.18.0.0/16", "dev", "sptun0"], check=False)
                s1.run(["wg", "set", "sptun0", "peer", key, "allowed-ips", f"{overlay_ip}/32"], check=False)
                os.kill(daemon.pid, signal.SIGCONT)

            assert reached == {"published container": DROPPED, "routed address": DROPPED}
            assert drops(c1, "the server reaches nothing behind the client") > before  # by sptun's filter
    finally:
        c1.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"], check=False)
    hit = lab.curl(s1.address)  # and serving goes on
    assert hit.ok and "client=c1" in hit.body, hit.error
