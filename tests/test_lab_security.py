"""The contract's Join and Leases guarantees, end to end in the namespace lab.

- Join: an impostor server, listed in the lab's DNS without pk=, receives real agents'
  registrations. It finds no token in them, and nothing it captured gets it (or anyone)
  into the real server: not the captured bytes replayed, not the captured proof sealed
  anew. The agents' real tunnels keep serving throughout.
- Leases: with lease_ttl = 30 s (the least allowed), a client whose host dies (its agent
  killed with SIGKILL and its WireGuard interfaces gone, so neither registrations nor
  handshakes arrive) loses its lease, its peer and its place in every server's rotation
  within lease_ttl plus a few seconds; the others keep theirs throughout.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from nacl.public import Box, PrivateKey, PublicKey
from support import LAB_TOOLS, netns_marks
from test_faults import Load, _pids, daemon_pid, failures, wait_for

from sptun import proto
from sptun.agent import interface_name
from sptun.keys import generate_private_key, public_key, write_file_atomic
from sptun.lab import (
    DOMAIN,
    Host,
    Lab,
    alive,
    browse,
    config_path,
    server_txt,
    slow,
    start_daemons,
    status,
    wait_served,
    write_configs,
)

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go", "wg")

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
PREFIX = f"sps{os.getpid() % 100000}"
LEASE_TTL = 30  # s: the servers' lease_ttl, the smallest the config allows
IMPOSTOR = "203.0.113.66"  # an extra address of the browser host: the impostor's own
API_PORT = 51821


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Two servers, two clients."""
    lab = Lab(PREFIX, servers=2, clients=2)
    try:
        lab.up()
        write_configs(lab, BACKEND)
        start_daemons(lab)
        wait_served(lab)
        yield lab
    finally:
        lab.down()


def token_of(lab: Lab) -> str:
    return (lab.servers[0].dir / "tokens" / DOMAIN).read_text().strip()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --- Join: an impostor server learns nothing that lets it join -----------------------------------

# A registration API that speaks protocol 2's hello with a key of its own, records the line
# each agent sends (with the challenge it was sent), and refuses. Bounded in time and count.
IMPOSTOR_API = textwrap.dedent("""
    import base64, json, os, socket, sys, time
    from sptun import proto
    from sptun.keys import public_key
    address, port, key_file, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    seconds, limit = float(sys.argv[5]), int(sys.argv[6])
    private = open(key_file).read().strip()
    mine = public_key(private)
    listener = socket.create_server((address, port))
    listener.settimeout(0.5)
    deadline, served = time.monotonic() + seconds, 0
    while time.monotonic() < deadline and served < limit:
        try:
            conn, peer = listener.accept()
        except TimeoutError:
            continue
        served += 1
        challenge = os.urandom(proto.CHALLENGE_LEN)
        line = b""
        with conn:
            try:
                conn.settimeout(5)
                conn.sendall(proto.hello(mine, challenge))
                while not line.endswith(b"\\n") and len(line) <= proto.MAX_MESSAGE:
                    chunk = conn.recv(proto.MAX_MESSAGE + 1)
                    if not chunk:
                        break
                    line += chunk
                conn.sendall(proto.reject("refused", "not today"))
            except OSError:
                pass
        record = {"peer": peer[0], "challenge": base64.b64encode(challenge).decode(),
                  "line": base64.b64encode(line).decode()}
        with open(out_path, "a") as out:
            out.write(json.dumps(record) + "\\n")
""")

# From the impostor's address to the real server: (b) the captured line replayed as it is;
# (c) the captured proof sealed anew, with the impostor's own key (the client's private key
# it does not have), registering that key.
ATTACK = textwrap.dedent("""
    import base64, json, os, socket, sys
    from nacl.public import Box, PrivateKey, PublicKey
    from sptun import proto
    from sptun.keys import generate_private_key, public_key
    source, server, port, domain = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    captured, proof = base64.b64decode(sys.argv[5]), base64.b64decode(sys.argv[6])

    def connect():
        s = socket.create_connection((server, port), timeout=10, source_address=(source, 0))
        f = s.makefile("rb")
        return s, f, proto.parse_hello(f.readline())

    def answer(f):
        line = f.readline()
        return json.loads(line) if line else {"ok": False, "reason": "closed"}

    s, f, (server_key, challenge) = connect()
    with s:
        s.sendall(captured)
        replay = answer(f)

    attacker = generate_private_key()
    s, f, (server_key2, challenge2) = connect()
    with s:
        inner = {"op": "register", "domain": domain, "challenge": base64.b64encode(challenge2).decode(),
                 "proof": base64.b64encode(proof).decode()}
        box = Box(PrivateKey(base64.b64decode(attacker)), PublicKey(base64.b64decode(server_key2)))
        nonce = os.urandom(Box.NONCE_SIZE)
        sealed = box.encrypt(json.dumps(inner).encode(), nonce).ciphertext
        s.sendall(json.dumps({"key": public_key(attacker), "nonce": base64.b64encode(nonce).decode(),
                              "box": base64.b64encode(sealed).decode()}).encode() + b"\\n")
        reseal = answer(f)
    print(json.dumps({"replay": replay, "reseal": reseal, "server_key": server_key2,
                      "challenge": base64.b64encode(challenge2).decode(), "attacker": public_key(attacker)}))
""")


def captures(path: Path) -> list[dict[str, str]]:
    """The impostor's records so far (complete lines only)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def sender(capture: dict[str, str]) -> str | None:
    """The key a captured request claims, if it is one."""
    try:
        key = json.loads(base64.b64decode(capture["line"]))["key"]
    except (ValueError, KeyError, TypeError):
        return None
    return key if isinstance(key, str) else None


def open_box(line: bytes, private: str) -> bytes:
    """The plaintext of a request's box, opened as its recipient (the impostor) can."""
    obj = json.loads(line)
    box = Box(PrivateKey(base64.b64decode(private)), PublicKey(base64.b64decode(obj["key"])))
    return box.decrypt(base64.b64decode(obj["box"]), base64.b64decode(obj["nonce"]))


def healthy_servers(client: Host) -> set[str]:
    return {t["server"] for t in status(client)["tunnels"] if t["healthy"]}


def test_an_impostor_server_learns_nothing_that_lets_it_join(lab: Lab) -> None:
    started = time.monotonic()
    wait_served(lab)  # (at once, unless a test before left a client coming back)
    s1, browser = lab.servers[0], lab.browser
    token = token_of(lab)
    real = [server_txt(s.address) for s in lab.servers]
    client_keys = {status(c)["public_key"]: c for c in lab.clients}
    rejected_before = dict(status(s1)["registrations"]["rejected"])

    impostor_key = generate_private_key()
    impostor_pub = public_key(impostor_key)
    key_file, out = browser.dir / "impostor.key", browser.dir / "impostor.jsonl"
    write_file_atomic(key_file, impostor_key + "\n")
    browser.run(["ip", "addr", "add", f"{IMPOSTOR}/24", "dev", "eth0"])
    api = browser.spawn([sys.executable, "-c", IMPOSTOR_API, IMPOSTOR, str(API_PORT), key_file, out,
                         str(90 * slow()), "60"], log=browser.dir / "impostor.log")
    try:
        load = Load(lab, s1, 8 * slow())  # browsing through s1 while the agents meet the impostor
        lab.set_txt([*real, server_txt(IMPOSTOR)])  # no pk=: trusted on first use
        took = wait_for("every agent registering with the impostor",
                        lambda: {sender(c) for c in captures(out)} >= set(client_keys), lab.ttl + 20 * slow())
        got = [c for c in captures(out) if sender(c)]
        print(f"\nimpostor: every agent came to it {took:.1f} s after the TXT record; {len(got)} registrations captured")

        # (a) Neither the bytes on the wire nor the box the impostor opens hold the token.
        secrets = {token.encode(), b64(token.encode()).encode(), base64.urlsafe_b64encode(token.encode())}
        claims = []
        for c in got:
            line, challenge = base64.b64decode(c["line"]), base64.b64decode(c["challenge"])
            plain = open_box(line, impostor_key)
            leaked = any(secret in line or secret in plain for secret in secrets)  # (the message must not show it)
            assert not leaked, "the token, or its base64, is in a request the impostor captured"
            assert b"token" not in plain
            claim = proto.open_request(line, impostor_key, challenge)
            # the control: a real registration, made with the real token, for this impostor
            assert claim.client_key in client_keys and claim.domain == DOMAIN and claim.op == "register"
            assert claim.proves(token, impostor_pub, challenge)
            claims.append((line, claim))

        # (b) and (c), from the impostor's own address to the real server s1.
        line, claim = claims[0]
        result = json.loads(browser.run([sys.executable, "-c", ATTACK, IMPOSTOR, s1.address, str(API_PORT), DOMAIN,
                                         b64(line), b64(claim.proof)]))
        replay, reseal = result["replay"], result["reseal"]
        assert replay["ok"] is False and replay["reason"] in ("unproven-key", "replay"), replay
        assert reseal["ok"] is False and reseal["reason"] == "bad-token", reseal
        real_key, real_challenge = result["server_key"], base64.b64decode(result["challenge"])
        assert real_key == status(s1)["public_key"] != impostor_pub
        assert not claim.proves(token, real_key, real_challenge)  # the captured proof is worthless there
        rejected = status(s1)["registrations"]["rejected"]
        assert rejected.get(replay["reason"], 0) > rejected_before.get(replay["reason"], 0)
        assert rejected.get("bad-token", 0) > rejected_before.get("bad-token", 0)
        assert result["attacker"] not in {lease["public_key"] for lease in read_leases(s1)}
        logged = token in (s1.dir / "sptun.log").read_text()
        assert not logged, "the token is in s1's log"

        # (d) The refused impostor got no tunnel, and the real ones served throughout.
        results = load.results()
        assert len(results) > 20 and failures(results) == [], failures(results)[:5]
        for client in lab.clients:
            (entry,) = [t for t in status(client)["tunnels"] if t["server"] == IMPOSTOR]
            assert entry["healthy"] is False and entry["overlay_ip"] is None, entry
            assert healthy_servers(client) == {s.address for s in lab.servers}
            assert interface_name(IMPOSTOR) not in client.run(["ip", "-o", "link"])
        wait_served(lab, timeout=10 * slow())
        for server in lab.servers:
            hits = browse(lab, server, 2 * len(lab.clients))
            assert all(h.ok for h in hits), [h.error for h in hits if not h.ok]
            assert {h.client for h in hits} == {c.name for c in lab.clients}
    finally:
        lab.set_txt(real)
        api.terminate()
        api.wait(timeout=10 * slow())
        browser.run(["ip", "addr", "del", f"{IMPOSTOR}/24", "dev", "eth0"], check=False)
    # The impostor leaves the agents with its record.
    wait_for("the impostor gone from every agent",
             lambda: all(IMPOSTOR not in {t["server"] for t in status(c)["tunnels"]} for c in lab.clients),
             lab.ttl + 10 * slow())
    print(f"impostor test: {time.monotonic() - started:.1f} s")


# --- Leases: a dead client's lease expires -----------------------------------------------------------


def kill_host(client: Host) -> None:
    """As if the client's host died: its agent killed (SIGKILL), and its WireGuard interfaces
    gone with whatever runs them (wireguard-go processes of that host only), so neither
    registrations nor handshakes reach the servers any more."""
    os.kill(daemon_pid(client), signal.SIGKILL)
    userspace = []
    for pid in _pids(client):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if os.path.basename(argv[0]) == b"wireguard-go" and len(argv) > 1 and argv[1].startswith(b"sptun"):
            userspace.append(pid)
    for pid in userspace:
        os.kill(pid, signal.SIGKILL)
    wait_for("wireguard-go gone", lambda: not any(alive(pid) for pid in userspace), 10 * slow())
    for link in json.loads(client.run(["ip", "-j", "link", "show"])):
        if link["ifname"].startswith("sptun"):
            client.run(["ip", "link", "del", link["ifname"]], check=False)  # (a tun may vanish by itself)
    assert not [link for link in json.loads(client.run(["ip", "-j", "link", "show"]))
                if link["ifname"].startswith("sptun")]


def read_leases(server: Host) -> list[dict[str, str]]:
    """leases.json's leases. A save moves the file to leases.json.bak before it writes the
    new one: a reader may find no file for a moment."""
    path = server.dir / "state" / "leases.json"
    for _ in range(50):
        try:
            leases: list[dict[str, str]] = json.loads(path.read_text())["leases"]
            return leases
        except FileNotFoundError:
            time.sleep(0.02)
    raise AssertionError(f"no {path}")


def server_view(server: Host) -> tuple[dict[str, str], dict[str, str], set[str], set[str]]:
    """(leases.json: key -> address, status backends: key -> address, keys in the rotation,
    the interface's peers by `wg show`)."""
    leases = {lease["public_key"]: lease["overlay_ip"] for lease in read_leases(server)}
    (domain,) = [d for d in status(server)["domains"] if d["name"] == DOMAIN]
    backends = {b["public_key"]: b["overlay_ip"] for b in domain["backends"]}
    rotation = {b["public_key"] for b in domain["backends"] if b["healthy"] and b["in_rotation"]}
    peers = set(server.run(["wg", "show", "sptun0", "peers"]).split())
    return leases, backends, rotation, peers


@contextmanager
def lease_ttl(lab: Lab, value: str) -> Iterator[None]:
    """Every server with `lease_ttl = value`, by a reload of its config (SIGHUP); the config
    as it was afterwards. Only this test runs with a short lease_ttl: the others' clients must
    not depend on how it treats the living."""
    confs = {s.name: Path(config_path(s)) for s in lab.servers}
    original = {name: conf.read_text() for name, conf in confs.items()}

    def reload(texts: dict[str, str]) -> None:
        logs = {s.name: (s.dir / "sptun.log", len((s.dir / "sptun.log").read_bytes())) for s in lab.servers}
        for s in lab.servers:
            confs[s.name].write_text(texts[s.name])
            os.kill(daemon_pid(s), signal.SIGHUP)
        for name, (log, seen) in logs.items():
            wait_for(f"{name} reloading lease_ttl",
                     lambda log=log, seen=seen: b"reloaded the config: lease_ttl" in log.read_bytes()[seen:], 10 * slow())

    # A top-level key: before the first [table].
    reload({name: f'lease_ttl = "{value}"\n' + text for name, text in original.items()})
    try:
        yield
    finally:
        reload(original)


def released(lab: Lab) -> list[str]:
    """The servers' log lines about released leases, for failure messages."""
    return [f"{s.name}: {line}" for s in lab.servers
            for line in (s.dir / "sptun.log").read_text(errors="replace").splitlines() if re.search(r"release \S+ of ", line)]


def test_a_dead_clients_lease_expires_and_the_others_stay(lab: Lab) -> None:
    dead = lab.clients[-1]
    try:
        with lease_ttl(lab, f"{LEASE_TTL}s"):
            a_dead_clients_lease_expires_and_the_others_stay(lab, dead)
    finally:
        if not any(b"sptun agent run" in cmdline(pid) and b"nsenter" not in cmdline(pid) for pid in _pids(dead)):
            start_daemons(lab, [dead])  # the host comes back: its agent joins again by itself (a new lease)
    wait_served(lab)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except FileNotFoundError:
        return b""


def a_dead_clients_lease_expires_and_the_others_stay(lab: Lab, dead: Host) -> None:
    living = [c for c in lab.clients if c is not dead]
    dead_key = status(dead)["public_key"]
    keep = {c.name: status(c)["public_key"] for c in living}
    before = {s.name: server_view(s) for s in lab.servers}
    for s in lab.servers:
        leases, backends, rotation, peers = before[s.name]
        assert {dead_key, *keep.values()} <= rotation & peers & leases.keys()
    dead_ips = {s.name: before[s.name][0][dead_key] for s in lab.servers}

    kill_host(dead)
    killed = time.monotonic()
    gone_at: dict[str, float] = {}
    lapses: list[str] = []  # a living client missing from a server, ever
    deadline = killed + LEASE_TTL + 15 * slow()
    while len(gone_at) < len(lab.servers) and time.monotonic() < deadline:
        for s in lab.servers:
            leases, backends, rotation, peers = server_view(s)
            t = time.monotonic() - killed
            for name, key in keep.items():
                if leases.get(key) != before[s.name][0][key] or key not in backends or key not in peers:
                    lapses.append(f"{t:.1f} s: {name} lost its lease or peer on {s.name}")
            if s.name not in gone_at and dead_key not in leases.keys() | backends.keys() | peers:
                gone_at[s.name] = t
                assert dead_ips[s.name] not in leases.values(), "its address is released"
        time.sleep(0.5)
    print(f"\nlease_ttl {LEASE_TTL} s: the dead client gone (lease, backend, peer) after "
          + ", ".join(f"{name}: {t:.1f} s" for name, t in gone_at.items()))
    assert not lapses, "\n".join([*lapses[:5], *released(lab)])
    assert gone_at.keys() == {s.name for s in lab.servers}, \
        "\n".join([f"the dead client still holds a lease after {LEASE_TTL + 15 * slow():g} s: {gone_at}", *released(lab)])
    # For its silence, not at its death: the health checks take a dead client out of the rotation
    # within seconds, but its lease (and address) outlive that.
    assert all(t >= LEASE_TTL / 3 for t in gone_at.values()), gone_at

    # The others still serve, through every server, and only they answer.
    for s in lab.servers:
        leases, backends, rotation, peers = server_view(s)
        assert set(keep.values()) <= rotation & peers
        hits = browse(lab, s, 2 * len(living))
        assert all(h.ok for h in hits) and {h.client for h in hits} == set(keep), hits
