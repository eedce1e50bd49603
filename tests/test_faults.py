"""The contract's guarantees under load: drain, crash, restarts, DNS changes, hostile input.

Each test runs a bounded load from the browser (a new TLS connection per request) while it
injects a fault, and asserts how many requests failed. Timings are printed (pytest -s) for
the record; the bounds asserted here hold with a wide margin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import LAB_TOOLS, netns_marks

from sptun.agent import interface_name
from sptun.lab import DOMAIN, Host, Lab, config_path, sptun, start_daemons, status, wait_served, write_configs

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go")

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
PREFIX = f"spf{os.getpid() % 100000}"

# Requests from the browser, one new TLS connection each, until the time or count runs out.
LOAD = textwrap.dedent("""
    import json, socket, ssl, sys, time
    server, seconds, ca, domain = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
    ctx = ssl.create_default_context(cafile=ca)
    start = time.monotonic()
    results = []
    while time.monotonic() - start < seconds and len(results) < 20000:
        t = time.monotonic() - start
        try:
            with socket.create_connection((server, 443), timeout=3) as raw:
                with ctx.wrap_socket(raw, server_hostname=domain) as s:
                    s.sendall(f"GET / HTTP/1.1\\r\\nHost: {domain}\\r\\nConnection: close\\r\\n\\r\\n".encode())
                    body = b""
                    while chunk := s.recv(4096):
                        body += chunk
            client = body.decode(errors="replace").rsplit("client=", 1)[1].split()[0]
            results.append([round(t, 3), True, client])
        except Exception as e:
            results.append([round(t, 3), False, type(e).__name__ + ": " + str(e)[:80]])
        time.sleep(0.02)
    print(json.dumps(results))
""")


class Load:
    """A bounded request loop from the browser to one server, in the background."""

    def __init__(self, lab: Lab, server: Host, seconds: float) -> None:
        self.out = lab.browser.dir / f"load-{time.monotonic_ns()}.json"
        self.proc = lab.browser.spawn([sys.executable, "-c", LOAD, server.address, str(seconds), str(lab.ca_cert), DOMAIN],
                                      log=self.out)
        self.started = time.monotonic()

    def results(self) -> list[tuple[float, bool, str]]:
        self.proc.wait(timeout=120)
        return [tuple(r) for r in json.loads(self.out.read_text().strip().splitlines()[-1])]  # type: ignore[misc]


def failures(results: list[tuple[float, bool, str]]) -> list[tuple[float, bool, str]]:
    return [r for r in results if not r[1]]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Three servers, of which DNS lists two at first; three clients."""
    lab = Lab(PREFIX, servers=3)
    try:
        lab.up()
        lab.set_txt([f"r=superprotocol;ip={s.address}" for s in lab.servers[:2]], a=[s.address for s in lab.servers[:2]])
        write_configs(lab, BACKEND)
        start_daemons(lab)
        wait_served(lab_of_two(lab))
        yield lab
    finally:
        lab.down()


def lab_of_two(lab: Lab) -> Lab:
    """wait_served over the servers in DNS only."""
    view = Lab.__new__(Lab)
    view.__dict__.update(lab.__dict__)
    view.servers = lab.servers[:2]
    return view


def daemon_pid(host: Host) -> int:
    role = "server run" if host.spec.role == "server" else "agent run"
    for pid in _pids(host):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except FileNotFoundError:
            continue
        if f"sptun {role}" in cmdline and "nsenter" not in cmdline:
            return pid
    raise AssertionError(f"no sptun daemon on {host.name}")


def _pids(host: Host) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, check=True).stdout
    return [int(p) for p in out.split()]


def wait_for(what: str, check: object, timeout: float) -> float:
    """Poll check() until true; return the seconds it took."""
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - started


def in_rotation(server: Host) -> set[str]:
    (domain,) = [d for d in status(server)["domains"] if d["name"] == DOMAIN]
    return {b["overlay_ip"] for b in domain["backends"] if b["in_rotation"]}


# --- drain, crash, restarts ---------------------------------------------------------------------------


def test_drain_loses_no_request(lab: Lab) -> None:
    s1, c1 = lab.servers[0], lab.clients[0]
    load = Load(lab, s1, 8)
    time.sleep(2)
    out = c1.run(sptun("down", "-c", config_path(c1)), timeout=60)
    assert "delete interface" in out
    results = load.results()
    print(f"\ndrain: {len(results)} requests, {len(failures(results))} failed")
    assert len(results) > 20
    assert failures(results) == []
    late = [r for r in results if r[0] > time.monotonic() - load.started - 2]
    assert "c1" not in {r[2] for r in late}  # out of the rotation after the drain
    c1.run(sptun("up", "-c", config_path(c1)), timeout=60)
    wait_served(lab_of_two(lab))


def test_a_dead_client_leaves_the_rotation_within_seconds(lab: Lab) -> None:
    s1, c2 = lab.servers[0], lab.clients[1]
    c2_ip = [t for t in status(c2)["tunnels"] if t["server"] == s1.address][0]["overlay_ip"]
    load = Load(lab, s1, 14)
    time.sleep(2)
    cut = time.monotonic() - load.started
    c2.run(["ip", "link", "set", "eth0", "down"])  # the client's uplink dies: nothing gets through
    try:
        detection = wait_for("c2 out of s1's rotation", lambda: c2_ip not in in_rotation(s1), 15)
        time.sleep(2)
    finally:
        c2.run(["ip", "link", "set", "eth0", "up"])
        c2.run(["ip", "route", "replace", "default", "via", "10.99.100.1"])
    results = load.results()
    failed = failures(results)
    print(f"\ncrash: out of the rotation {detection:.1f} s after the cut; {len(results)} requests, {len(failed)} failed, "
          f"the last failure {max((r[0] for r in failed), default=cut) - cut:.1f} s after the cut")
    assert detection < 10
    # Only requests during the detection window fail, none after it.
    assert all(r[0] < cut + detection + 1.5 for r in failed), failed
    # and it comes back once its link does
    wait_for("c2 back in s1's rotation", lambda: c2_ip in in_rotation(s1), 30)


def test_server_kill_9_and_restart_keep_serving(lab: Lab) -> None:
    s1 = lab.servers[0]
    leases_before = (s1.dir / "state" / "leases.json").read_text()
    load = Load(lab, s1, 8)
    time.sleep(2)
    os.kill(daemon_pid(s1), signal.SIGKILL)
    time.sleep(1)
    s1.spawn(sptun("server", "run", "-c", config_path(s1)), log=s1.dir / "sptun-restarted.log")
    results = load.results()
    print(f"\nserver kill -9: {len(results)} requests, {len(failures(results))} failed")
    assert failures(results) == []
    assert (s1.dir / "state" / "leases.json").read_text() == leases_before  # no client registered anew
    log = (s1.dir / "sptun-restarted.log").read_text()
    assert "create interface" not in log and "load table" not in log  # adopted, not rebuilt


def test_agent_kill_9_and_restart_keep_serving(lab: Lab) -> None:
    s1, c3 = lab.servers[0], lab.clients[2]
    load = Load(lab, s1, 8)
    time.sleep(2)
    os.kill(daemon_pid(c3), signal.SIGKILL)
    time.sleep(1)
    c3.spawn(sptun("agent", "run", "-c", config_path(c3)), log=c3.dir / "sptun-restarted.log")
    results = load.results()
    print(f"\nagent kill -9: {len(results)} requests, {len(failures(results))} failed")
    assert failures(results) == []
    assert {r[2] for r in results[-10:]} == {"c1", "c2", "c3"}
    log = (c3.dir / "sptun-restarted.log").read_text()
    assert "create interface" not in log


def test_server_down_then_up_clients_return_by_themselves(lab: Lab) -> None:
    s1 = lab.servers[0]
    s1.run(sptun("down", "-c", config_path(s1)))
    assert status(s1)["down"] is True
    s1.run(sptun("up", "-c", config_path(s1)))
    took = wait_for("all clients back through s1", lambda: len(in_rotation(s1)) == 3, 30)
    print(f"\nserver down/up: all clients back in {took:.1f} s")
    assert all(lab.curl(s1.address).ok for _ in range(3))


def test_damaged_leases_file_recovers_every_lease(lab: Lab) -> None:
    s2 = lab.servers[1]
    state = s2.dir / "state"
    before = {lease["public_key"]: lease["overlay_ip"] for lease in json.loads((state / "leases.json").read_text())["leases"]}
    os.kill(daemon_pid(s2), signal.SIGTERM)  # a server stop keeps the forwarding in place
    time.sleep(1)
    (state / "leases.json").write_text('{"format": 1, "leases": [{"public_key": "trunc')  # torn write
    s2.spawn(sptun("server", "run", "-c", config_path(s2)), log=s2.dir / "sptun-recovered.log")
    took = wait_for("s2 serving all three again", lambda: len(in_rotation(s2)) == 3, 30)
    after = {lease["public_key"]: lease["overlay_ip"] for lease in json.loads((state / "leases.json").read_text())["leases"]}
    log = (s2.dir / "sptun-recovered.log").read_text()
    print(f"\ndamaged leases: serving again after {took:.1f} s")
    assert "is damaged" in log and list(state.glob("leases.json.damaged-*"))  # said clearly, kept aside
    assert after == before  # from the backup: no lease lost, no address changed


# --- DNS changes, through the real DNS server --------------------------------------------------------


def test_dns_changes_add_and_remove_servers_and_an_outage_changes_nothing(lab: Lab) -> None:
    s1, s2, s3 = lab.servers
    agents = lab.clients

    def servers_of(client: Host) -> set[str]:
        return {t["server"] for t in status(client)["tunnels"] if t["healthy"]}

    lab.set_txt([f"r=superprotocol;ip={s.address}" for s in lab.servers], a=[s.address for s in lab.servers])
    took = wait_for("every agent has a tunnel to s3",
                    lambda: all(s3.address in servers_of(c) for c in agents), lab.ttl + 5 + 5)
    print(f"\nDNS add: every agent tunnelled to s3 in {took:.1f} s (TTL {lab.ttl} s)")
    assert took <= lab.ttl + 5 + 2
    wait_for("s3 serving", lambda: len(in_rotation(s3)) == 3, 15)
    assert {lab.curl(s3.address).body.split()[0] for _ in range(6)} == {"client=c1", "client=c2", "client=c3"}

    lab.set_txt([f"r=superprotocol;ip={s.address}" for s in (s1, s3)], a=[s1.address, s3.address])
    took = wait_for("s2's tunnels gone", lambda: all(s2.address not in servers_of(c) for c in agents), lab.ttl + 10)
    print(f"DNS remove: tunnels to s2 gone in {took:.1f} s")
    assert not any(interface_name(s2.address) in c.run(["ip", "-o", "link"]) for c in agents)

    # The DNS server stops: the last good answer stays, nothing is torn down.
    knot = [p for p in _pids(lab.dns) if b"knotd" in Path(f"/proc/{p}/cmdline").read_bytes()]
    for pid in knot:
        os.kill(pid, signal.SIGKILL)
    time.sleep(lab.ttl * 3)
    for c in agents:
        assert servers_of(c) == {s1.address, s3.address}
        assert status(c)["dns"]["error"]  # and it says DNS is failing
    assert all(lab.curl(s.address).ok for s in (s1, s3))


# --- hostile input on the registration port ---------------------------------------------------------

HOSTILE = textwrap.dedent("""
    import json, socket, sys, time
    from sptun import proto
    from sptun.keys import generate_private_key, public_key
    server, domain, token, case = sys.argv[1:5]

    def conn():
        s = socket.create_connection((server, 51821), timeout=10)
        f = s.makefile("rb")
        return s, f, proto.parse_hello(f.readline())

    def answer(f):
        line = f.readline()
        return json.loads(line) if line else {"ok": False, "reason": "closed"}

    key = generate_private_key()
    req = proto.Request("register", domain, token, public_key(key))
    if case == "replay":
        s, f, (server_key, challenge) = conn()
        line = proto.seal_request(req, key, server_key, challenge)
        s.sendall(line)
        first = answer(f)
        s2, f2, _ = conn()
        s2.sendall(line)  # the same bytes, on a new connection with a new challenge
        print(json.dumps([first["ok"], answer(f2)]))
    elif case == "unproven":
        s, f, (server_key, challenge) = conn()
        other = generate_private_key()  # seals with a key it does not register
        s.sendall(proto.seal_request(req, other, server_key, challenge))
        print(json.dumps(answer(f)))
    elif case == "slowloris":
        held = []
        for _ in range(40):
            try:
                held.append(conn()[0])
            except Exception as e:
                held.append(None)
        print(json.dumps(sum(h is not None for h in held)), flush=True)
        time.sleep(float(sys.argv[5]))
    elif case == "flood":
        reasons = []
        for _ in range(int(sys.argv[5])):
            s = socket.create_connection((server, 51821), timeout=10)
            f = s.makefile("rb")
            first = json.loads(f.readline())
            if first.get("ok") is False:  # refused before the hello: busy, rate-limited
                reasons.append(first["reason"])
                continue
            server_key, challenge = proto.parse_hello(json.dumps(first).encode())
            s.sendall(proto.seal_request(proto.Request("register", domain, "wrong", public_key(key)), key,
                                         server_key, challenge))
            reasons.append(answer(f).get("reason"))
        print(json.dumps(reasons))
    elif case == "good":
        _, a = proto.exchange(server, 51821, req, key)
        proto.exchange(server, 51821, proto.Request("deregister", domain, token, public_key(key)), key)
        print(json.dumps({"ok": True, "overlay_ip": a.overlay_ip}))
""")


def hostile(lab: Lab, source: Host, case: str, *extra: str, token: str = "") -> object:
    s1 = lab.servers[0]
    token = token or (s1.dir / "tokens" / DOMAIN).read_text().strip()
    return json.loads(source.run([sys.executable, "-c", HOSTILE, s1.address, DOMAIN, token, case, *extra], timeout=120))


def test_a_replayed_registration_is_refused(lab: Lab) -> None:
    first_ok, replay = hostile(lab, lab.browser, "replay")  # type: ignore[misc]
    assert first_ok is True and replay["ok"] is False and replay["reason"] == "replay"


def test_a_key_the_client_cannot_prove_is_refused(lab: Lab) -> None:
    reply = hostile(lab, lab.browser, "unproven")
    assert reply["ok"] is False and reply["reason"] == "unproven-key"  # type: ignore[index]


def test_slowloris_does_not_lock_out_others(lab: Lab) -> None:
    s1 = lab.servers[0]
    holder = lab.browser.spawn([sys.executable, "-c", HOSTILE, s1.address, DOMAIN, "x", "slowloris", "8"],
                               log=lab.browser.dir / "slowloris.log")
    try:
        time.sleep(3)
        # another source (the clients' NAT address) registers while the browser holds its sockets
        assert hostile(lab, lab.clients[0], "good")["ok"] is True  # type: ignore[index]
        assert all(lab.curl(s1.address).ok for _ in range(3))
    finally:
        holder.wait(timeout=30)
    assert "busy" in status(s1)["registrations"]["rejected"] or "timeout" in status(s1)["registrations"]["rejected"]


def test_a_flood_of_bad_attempts_is_rate_limited_per_source(lab: Lab) -> None:
    reasons = hostile(lab, lab.browser, "flood", "60")
    counts = Counter(reasons)  # type: ignore[arg-type]
    print(f"\nflood: {dict(counts)}")
    assert counts["bad-token"] <= 12 and counts["rate-limited"] >= 40
    # others are not affected
    assert hostile(lab, lab.clients[0], "good")["ok"] is True  # type: ignore[index]
    assert all(lab.curl(lab.servers[0].address).ok for _ in range(3))


# --- hostile configuration and CLI input ------------------------------------------------------------


def test_a_broken_config_is_refused_and_nothing_running_changes(lab: Lab) -> None:
    s1 = lab.servers[0]
    before = in_rotation(s1)
    broken = s1.dir / "broken.toml"
    for text in ('interface = "sptun0"\nlisten_port = "fifty"\n', "[[domains]]\nname = 5\n", "this is not toml ="):
        broken.write_text(text)
        proc = s1.run(["sh", "-c", f"{sys.executable} -m sptun up -c {broken} 2>&1; echo rc=$?"], check=False)
        lines = proc.strip().splitlines()
        assert lines[-1] == "rc=2" and len(lines) == 2 and lines[0].startswith("sptun: ") and str(broken) in lines[0]
    assert in_rotation(s1) == before
    assert all(lab.curl(s1.address).ok for _ in range(3))


def test_sighup_reloads_a_good_config_and_refuses_a_bad_one(lab: Lab) -> None:
    s1 = lab.servers[0]
    conf = Path(config_path(s1))
    good = conf.read_text()
    pid = daemon_pid(s1)
    log = s1.dir / "sptun-restarted.log"  # the daemon started by the kill -9 test
    seen = len(log.read_text())
    try:
        conf.write_text(good.replace('ports = ["tcp/443"]', 'ports = ["tcp/443", "tcp/8080"]'))
        os.kill(pid, signal.SIGHUP)
        wait_for("tcp/8080 forwarded", lambda: "tcp dport 8080" in s1.run(["nft", "list", "table", "inet", "sptun"]), 10)
        conf.write_text("listen_port = 'not a port'\n")
        os.kill(pid, signal.SIGHUP)
        wait_for("the refusal logged", lambda: "reload refused" in log.read_text(), 10)
        assert "tcp dport 8080" in s1.run(["nft", "list", "table", "inet", "sptun"])  # the last good config stays
    finally:
        conf.write_text(good)
        os.kill(pid, signal.SIGHUP)
    wait_for("back to tcp/443 only", lambda: "tcp dport 8080" not in s1.run(["nft", "list", "table", "inet", "sptun"]), 10)
    assert daemon_pid(s1) == pid  # no restart, no teardown
    assert "create interface" not in log.read_text()[seen:]
    assert all(lab.curl(s1.address).ok for _ in range(3))
