"""Three domains on each server's one public address and port 443, routed by SNI through the
SNI proxy (HAProxy, started and driven by sptun), end to end in a namespace lab: two servers,
six clients, two per domain (c1, c2: app; c3, c4: blue; c5, c6: green).

Each request is checked for what a browser and a web server would see: the page of a client
of the domain asked for (never another domain's), the client's own certificate (TLS passes
through), and at the client the browser's own address (transparent proxying: no PROXY
protocol). Then the awkward ClientHellos: an unknown name, none, one split over several
segments, one that never completes."""

from __future__ import annotations

import ast
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import LAB_TOOLS, netns_marks
from test_failover import (
    SLOWEST_OK,
    STREAM_SECONDS,
    Browsers,
    in_flight,
    kill_group,
    report,
    restart,
    serve_stream,
)
from test_faults import daemon_pid, wait_for

from sptun.keys import new_token, write_file_atomic

from sptun.lab import (
    DOMAIN,
    SNI_DOMAINS,
    Host,
    Lab,
    config_path,
    share_by_sni,
    slow,
    sptun,
    start_daemons,
    status,
    wait_served,
    write_configs,
)

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go", "haproxy")

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
PREFIX = f"sni{os.getpid() % 100000}"
DOMAINS = (DOMAIN, *SNI_DOMAINS)
PER_DOMAIN = 2  # clients


def domain_of(client: Host) -> str:
    return DOMAINS[(int(client.name[1:]) - 1) // PER_DOMAIN]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(PREFIX, servers=2, clients=PER_DOMAIN * len(DOMAINS))
    try:
        lab.up()
        write_configs(lab, BACKEND)
        share_by_sni(lab, {c.name: domain_of(c) for c in lab.clients})
        start_daemons(lab)
        wait_served(lab)
        yield lab
    finally:
        lab.down()


def clients_of(lab: Lab, domain: str) -> set[str]:
    return {c.name for c in lab.clients if domain_of(c) == domain}


def test_each_domain_is_split_evenly_over_its_own_clients_with_its_certificate_and_the_browsers_address(lab: Lab) -> None:
    split_evenly(lab, 4)


def test_each_domain_is_split_evenly_over_ipv6_too(lab: Lab) -> None:
    """The servers' IPv6 address is shared by the same three domains: HAProxy binds it, and
    connects to the clients' IPv6 overlay addresses from the browser's IPv6 address."""
    split_evenly(lab, 2, family=6)


def split_evenly(lab: Lab, rounds: int, family: int = 4) -> None:
    browser = lab.browser.address if family == 4 else lab.browser.address6
    for server in lab.servers:
        address = server.address if family == 4 else server.address6
        assert address and browser
        for domain in DOMAINS:
            mine = clients_of(lab, domain)
            served: Counter[str] = Counter()
            for _ in range(rounds * len(mine)):
                got = lab.curl(address, domain=domain)
                assert got.ok, f"{domain} through {server.name}: {got.error}"
                page = re.fullmatch(r"client=(\S+) remote=(\S+)\n", got.body)
                assert page, got.body
                client, remote = page.groups()
                assert client in mine, f"{domain} through {server.name} answered by {client}, not one of {mine}"
                assert remote == browser  # the browser's own address, not the proxy's
                assert got.subject and f"OU={client}" in got.subject  # the client's own certificate
                served[client] += 1
            assert served == Counter(dict.fromkeys(mine, rounds)), f"{domain} through {server.name}: {served}"


def test_http2_and_keep_alive_pass_through(lab: Lab) -> None:
    s1 = lab.servers[0]
    got = lab.curl(s1.address, domain=SNI_DOMAINS[0], args=["--http2"])
    assert got.ok and "< HTTP/2 200" in got.log, got.log[-2000:]
    # Two requests on one connection: keep-alive through the proxy.
    body = lab.browser.run(["curl", "-sS", "--cacert", lab.ca_cert, "--http1.1", "--resolve",
                            f"{DOMAIN}:443:{s1.address}", f"https://{DOMAIN}/", f"https://{DOMAIN}/", "-w",
                            "%{num_connects}\n"])
    assert body.count("client=") == 2 and body.splitlines()[-1] == "0", body  # the second reused the connection


def test_an_unknown_name_and_no_name_are_closed(lab: Lab) -> None:
    s1 = lab.servers[0]
    unknown = lab.curl(s1.address, domain="unknown.example.test", args=["--insecure"])
    assert not unknown.ok and unknown.exit_code in (35, 56), unknown.log[-1500:]
    reply, seconds = hello(lab, s1.address, None, [None])
    assert reply == b"" and seconds < 2 * slow(), seconds  # closed at once, not after the 5 s wait


def test_a_client_hello_split_over_segments_is_routed(lab: Lab) -> None:
    s1 = lab.servers[0]
    domain = SNI_DOMAINS[1]
    page, _ = hello(lab, s1.address, domain, [5, 40, 100, None], pause=0.2)
    assert page.startswith(b"client=") and page.split()[0].decode()[len("client="):] in clients_of(lab, domain), page


def test_a_client_hello_that_never_completes_is_closed_after_the_wait(lab: Lab) -> None:
    s1 = lab.servers[0]
    reply, waited = hello(lab, s1.address, DOMAIN, [20], stop=True)
    assert reply == b"" and 4.5 <= waited <= 5 + 2 * slow(), waited  # HELLO_WAIT, 5 s


def test_status_shows_the_proxy_rotation_and_down_removes_it(lab: Lab) -> None:
    s2 = lab.servers[1]
    for domain in DOMAINS:
        assert all(lab.curl(s2.address, domain=domain).ok for _ in range(2))
    st = status(s2)
    for d in st["domains"]:
        backends = d["backends"]
        assert len(backends) == PER_DOMAIN and all(b["in_rotation"] for b in backends), d
        assert sum(f["connections"] for f in d["forwards"]) >= 2, d  # the proxy's count
    pid = int((s2.dir / "state" / "sni" / "haproxy.pid").read_text())
    assert "51830" in s2.run(["ip", "-6", "rule"]) and "local default dev lo" in s2.run(["ip", "-6", "route", "show", "table", "51830"])
    s2.run(sptun("down", "-c", config_path(s2)), timeout=60 * slow())
    assert not Path(f"/proc/{pid}").exists() or "haproxy" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    for family in ("-4", "-6"):  # the proxy's rule and local route, of both families
        assert "51830" not in s2.run(["ip", family, "rule"]) and s2.run(["ip", family, "route", "show", "table", "51830"]).strip() == ""
    assert not lab.curl(s2.address, domain=SNI_DOMAINS[0], timeout=2).ok
    s2.run(sptun("up", "-c", config_path(s2)), timeout=60 * slow())
    wait_served(lab)
    assert lab.curl(s2.address, domain=SNI_DOMAINS[0]).ok


# --- a ClientHello by hand ------------------------------------------------------------------------

HELLO = r'''
import socket, ssl, sys, time
server, name, sizes, pause, stop, ca = sys.argv[1], sys.argv[2] or None, sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1", sys.argv[6]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = name is not None
if name is None:
    ctx.verify_mode = ssl.CERT_NONE
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
data = outgoing.read()
s = socket.create_connection((server, 443), timeout=20)
connected = time.monotonic()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
at = 0
for size in [int(x) if x != "rest" else None for x in sizes.split(",")]:
    piece = data[at:] if size is None else data[at:at + size]
    at += len(piece)
    s.sendall(piece)
    time.sleep(pause)
if stop:  # the ClientHello never completes: wait for the server to give up
    print(repr(s.recv(65536)))
    print(time.monotonic() - connected)
    sys.exit()
def pump():
    chunk = s.recv(65536)
    if not chunk:
        raise EOFError
    incoming.write(chunk)
try:
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out := outgoing.read():
                s.sendall(out)
            pump()
    s.sendall(outgoing.read())
    tls.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    s.sendall(outgoing.read())
    reply = b""
    while True:
        try:
            chunk = tls.read(65536)
            if not chunk:  # the server's close_notify
                break
            reply += chunk
        except ssl.SSLWantReadError:
            pump()
        except (ssl.SSLZeroReturnError, EOFError):
            break
except (EOFError, ConnectionResetError, ssl.SSLError):
    reply = b""
print(repr(reply.split(b"\r\n\r\n", 1)[-1]))
print(time.monotonic() - connected)
'''


def hello(lab: Lab, server: str, name: str | None, sizes: list[int | None], pause: float = 0.0,
          stop: bool = False) -> tuple[bytes, float]:
    """A TLS connection whose ClientHello goes out in pieces of these sizes (None: the rest),
    `pause` apart; the page it gets (b"" if the connection was closed), and the seconds from
    its connect to the end. stop: send only the pieces, then wait for the server to close."""
    script = lab.browser.dir / "hello.py"
    script.write_text(HELLO)
    out = lab.browser.run(["python3", script, server, name or "", ",".join("rest" if s is None else str(s) for s in sizes),
                           str(pause), "1" if stop else "0", lab.ca_cert], timeout=60 * slow())
    *_, page, seconds = out.strip().splitlines()
    value = ast.literal_eval(page)  # the bytes literal it printed
    assert isinstance(value, bytes)
    return value, float(seconds)


# --- faults on the SNI path, under 8 concurrent browsers -------------------------------------------
# As tests/test_failover.py makes them for the DNAT path: bench/browsers.py, a new TLS
# connection per request, each connect waiting up to 10 s as a browser's does.


def browsers(lab: Lab, domain: str, seconds: float) -> Browsers:
    return Browsers(lab, lab.servers[0], "--domain", domain, "--browsers", "8", "--seconds", str(seconds))


def test_the_proxy_outlives_a_kill_of_the_server_daemons_process_group(lab: Lab) -> None:
    s1 = lab.servers[0]
    proxy = int((s1.dir / "state" / "sni" / "haproxy.pid").read_text())
    load = browsers(lab, SNI_DOMAINS[0], 12)
    time.sleep(3)
    fault = time.monotonic()
    killed = kill_group(s1)
    time.sleep(1)
    restart(s1)
    s = report("SNI: server process group kill -9, restart after 1 s", load.result(), fault, f"; the group was {killed}")
    wait_served(lab)
    assert "haproxy" not in killed and int((s1.dir / "state" / "sni" / "haproxy.pid").read_text()) == proxy
    assert s["requests"] > 20 and s["failed"] == 0


def test_a_drain_and_a_dead_client_fail_no_connection(lab: Lab) -> None:
    s1 = lab.servers[0]
    domain = SNI_DOMAINS[1]
    drained, dead = [c for c in lab.clients if domain_of(c) == domain]
    load = browsers(lab, domain, 20)
    time.sleep(3)
    fault = time.monotonic()
    try:
        drained.run(sptun("down", "-c", config_path(drained)), timeout=60 * slow())
        drained.run(sptun("up", "-c", config_path(drained)), timeout=60 * slow())
        wait_served(lab)
        cut = time.monotonic()
        dead.run(["ip", "link", "set", "eth0", "down"])  # its uplink: the tunnel goes silent
        cut_done = time.monotonic()  # the proxy may connect to it until the link is down
        time.sleep(8)
    finally:
        dead.run(["ip", "link", "set", "eth0", "up"])
        dead.run(["ip", "route", "replace", "default", "via", "10.99.100.1"])
    result = load.result()
    caught, rest = in_flight(result, cut, dead.name, cut_done)
    failed = [r for r in rest if not r[3]]
    s = report(f"SNI: {drained.name} drained and back, then {dead.name}'s uplink cut", result, fault,
               f"; {len(caught)} requests connected to {dead.name} at the cut; the others: {len(failed)} failed, "
               f"the slowest took {max(r[2] for r in rest):.2f} s")
    wait_served(lab)
    assert s["requests"] > 20 and failed == []
    assert max(r[2] for r in rest) <= SLOWEST_OK * slow()


def proxy_pid(server: Host) -> int | None:
    try:
        return int((server.dir / "state" / "sni" / "haproxy.pid").read_text())
    except (OSError, ValueError):  # being rewritten
        return None


def reload_server(server: Host, config: str) -> float:
    """Write the server's config and SIGHUP its daemon (systemctl reload); the seconds until
    its SNI proxy's new process took over."""
    old = proxy_pid(server)
    (server.dir / "server.toml").write_text(config)
    started = time.monotonic()
    os.kill(daemon_pid(server), signal.SIGHUP)
    wait_for("the proxy's new process", lambda: proxy_pid(server) not in (None, old), 30 * slow())
    return time.monotonic() - started


def test_a_new_domain_on_the_address_reloads_the_proxy_and_fails_nothing(lab: Lab) -> None:
    """A new domain on the shared address changes the proxy's structure: that is a reload. Its
    new process takes the listeners over (-x), the old one keeps its connections (-sf) until
    they end. Under 8 browsers and a 30 s download through the proxy, nothing fails."""
    s1 = lab.servers[0]
    domain = SNI_DOMAINS[0]
    for client in lab.clients:
        if domain_of(client) == domain:
            serve_stream(client)
    before = (s1.dir / "server.toml").read_text()
    new = "red.example.test"
    write_file_atomic(s1.dir / "tokens" / new, new_token() + "\n")
    grown = before + (f'\n[[domains]]\nname = "{new}"\nlisten = ["{s1.address}"]\nports = ["tcp/443"]\n'
                      f'token_file = "{s1.dir}/tokens/{new}"\n')
    old = proxy_pid(s1)
    assert old is not None
    download = Browsers(lab, s1, "--domain", domain, "--stream", "/stream.txt", "--seconds", str(STREAM_SECONDS))
    wait_for("the stream started", lambda: any(line.get("event") == "streaming" for line in download.lines()), 15 * slow())
    load = browsers(lab, domain, 15)
    try:
        time.sleep(3)
        fault = time.monotonic()
        took = reload_server(s1, grown)
        result, got = load.result(), download.result()
    finally:
        reload_server(s1, before)
    s = report(f"SNI: a new domain on {s1.address}:443, a reload of the proxy", result, fault,
               f"; the new process took over in {took:.2f} s; the stream: "
               f"{'completed' if got['completed'] else 'FAILED'}, {got['bytes']} of {got['expected']} bytes, "
               f"stalled at most {got['stall']:.1f} s {got['error']}")
    wait_served(lab)
    assert got["completed"], got
    assert s["requests"] > 20 and s["failed"] == 0
    # The replaced process left once its last connection (the stream) ended.
    wait_for("the old proxy process gone", lambda: not Path(f"/proc/{old}").exists(), 10 * slow())
