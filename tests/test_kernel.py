"""The kernel backend against the real wireguard module (run by scripts/test-vm).

Each test makes its own network namespace and drives sptun's own classes in it (Links,
wg.Kernel, wg.plan_peers) through a small worker process; `wg show IFACE dump` (C, not
sptun) is the independent witness of what the kernel holds.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from sptun.keys import generate_private_key, public_key

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
IFACE = "sptk0"
PREFIX = f"sptk{os.getpid() % 100000}"
_names = itertools.count()


def _why_skip() -> str | None:
    if BACKEND != "kernel":
        return ("kernel-backend checks run only with SPTUN_TEST_WIREGUARD=kernel "
                "(scripts/test-vm boots a kernel that has the wireguard module)")
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs ip (iproute2)"
    from sptun.wg import kernel_module_present

    if not kernel_module_present():
        return "this kernel has no wireguard module"
    return None


SKIP = _why_skip()
pytestmark = [pytest.mark.netns, pytest.mark.vm, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


# --- a worker in the namespace, speaking JSON lines ------------------------------------

WORKER = textwrap.dedent("""
    import json, sys, traceback
    from sptun.links import Links
    from sptun.wg import Kernel, Peer, PeerChange, plan_peers

    links = Links()
    wg = Kernel(links)

    def peer(d):
        return Peer(d["public_key"], tuple(d["allowed_ips"]), d.get("endpoint"), d.get("keepalive", 0))

    def out(p):
        return {"public_key": p.public_key, "allowed_ips": list(p.allowed_ips), "endpoint": p.endpoint,
                "keepalive": p.keepalive}

    def changes(cs):
        return [[c.action, out(c.peer)] for c in cs]

    def call(op, ifname, **kw):
        if op == "create":
            wg.create(ifname)
            return wg.is_ours(ifname)
        if op == "configure":
            wg.configure(ifname, kw["private_key"], kw.get("listen_port"))
            return None
        if op == "device":
            d = wg.device(ifname)
            return {"public_key": d.public_key, "listen_port": d.listen_port,
                    "peers": {k: out(s.peer) for k, s in d.peers.items()}}
        if op == "plan":
            return changes(plan_peers([peer(p) for p in kw["desired"]], wg.device(ifname)))
        if op == "apply":
            wg.apply(ifname, [PeerChange(a, peer(p)) for a, p in kw["changes"]])
            return None
        if op == "sync":  # what the daemons do: plan against the kernel, apply the plan
            plan = plan_peers([peer(p) for p in kw["desired"]], wg.device(ifname))
            wg.apply(ifname, plan)
            return changes(plan)
        if op == "messages":  # the peers of each netlink message of the device dump
            with wg._wg() as nl:
                return [[p.get_attr("WGPEER_A_PUBLIC_KEY").decode() for p in m.get_attr("WGDEVICE_A_PEERS") or []]
                        for m in nl.info(ifname)]
        raise ValueError(op)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": call(request.pop("op"), request.pop("ifname"), **request)}
        except Exception:
            reply = {"error": traceback.format_exc()}
        print(json.dumps(reply), flush=True)
""")


class Namespace:
    """A network namespace of this test, with a worker process of sptun in it."""

    def __init__(self) -> None:
        self.name = f"{PREFIX}-{next(_names)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.worker = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-c", WORKER],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._readline()) == {"ready": True}

    def _readline(self) -> str:
        assert self.worker.stdout is not None
        line = self.worker.stdout.readline()
        if not line:
            raise AssertionError(f"the worker in {self.name} died (exit {self.worker.wait()})")
        return line

    def call(self, op: str, ifname: str = IFACE, **kw: Any) -> Any:
        assert self.worker.stdin is not None
        self.worker.stdin.write(json.dumps({"op": op, "ifname": ifname, **kw}) + "\n")
        self.worker.stdin.flush()
        reply = json.loads(self._readline())
        if "error" in reply:
            raise AssertionError(f"{op} failed in the namespace:\n{reply['error']}")
        return reply["ok"]

    def run(self, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, capture_output=True,
                              text=True).stdout

    def wg_dump(self, ifname: str = IFACE) -> dict[str, dict[str, Any]]:
        """The peers as `wg show dump` sees them: the witness that is not sptun."""
        peers = {}
        for line in self.run("wg", "show", ifname, "dump").splitlines()[1:]:
            key, _psk, endpoint, ips, _hs, _rx, _tx, keepalive = line.split("\t")
            peers[key] = {"allowed_ips": sorted(ips.split(",")) if ips != "(none)" else [],
                          "endpoint": None if endpoint == "(none)" else endpoint,
                          "keepalive": 0 if keepalive == "off" else int(keepalive)}
        return peers

    def close(self) -> None:
        try:
            if self.worker.stdin:
                self.worker.stdin.close()
            self.worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait()
        finally:
            subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = Namespace()
    try:
        yield namespace
    finally:
        namespace.close()


needs_wg = pytest.mark.skipif(shutil.which("wg") is None, reason="needs wg (wireguard-tools) as the witness")


# --- peers --------------------------------------------------------------------------------

def peer(allowed_ips: list[str], endpoint: str | None = None, keepalive: int = 0) -> dict[str, Any]:
    return {"public_key": public_key(generate_private_key()), "allowed_ips": allowed_ips,
            "endpoint": endpoint, "keepalive": keepalive}


def v4(n: int, base: str = "10.99.0.0") -> str:
    return f"{ipaddress.IPv4Address(base) + n}/32"


def many_peers(count: int, offset: int = 0) -> list[dict[str, Any]]:
    """Peers as varied as the kernel makes them: v4 and v6 allowed-ips, subnets, endpoints
    (v4 and v6), keepalive on and off."""
    peers = []
    for i in range(offset, offset + count):
        ips = [v4(i + 2), f"fd00:99::{i + 2:x}/128"]
        if i % 5 == 0:
            ips.append(f"172.16.{i // 5 % 256}.0/24")
        endpoint = None
        if i % 3 == 0:
            endpoint = f"192.0.2.{i % 250 + 1}:{40000 + i}"
        if i % 50 == 1:
            endpoint = f"[2001:db8::{i:x}]:51820"
        peers.append(peer(ips, endpoint, keepalive=(i % 7) * 5))
    return peers


def expected(peers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {p["public_key"]: {"allowed_ips": sorted(p["allowed_ips"]), "endpoint": p["endpoint"],
                              "keepalive": p["keepalive"]} for p in peers}


def seen(device: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Kernel.device()'s peers, in the shape of expected()."""
    return {k: {"allowed_ips": sorted(p["allowed_ips"]), "endpoint": p["endpoint"], "keepalive": p["keepalive"]}
            for k, p in device["peers"].items()}


def setup_device(ns: Namespace, peers: list[dict[str, Any]], listen_port: int | None = 51820) -> str:
    """A configured device holding `peers`, through sptun; returns the device's private key."""
    private = generate_private_key()
    assert ns.call("create") is True
    ns.call("configure", private_key=private, listen_port=listen_port)
    plan = ns.call("sync", desired=peers)
    assert sorted(a for a, _ in plan) == ["add"] * len(peers)
    return private


def actions(plan: list[list[Any]]) -> list[tuple[str, str]]:
    return sorted((action, p["public_key"]) for action, p in plan)


# --- the tests ----------------------------------------------------------------------------

@needs_wg
def test_a_dump_of_300_peers_returns_every_peer_with_its_allowed_ips_and_keepalive(ns: Namespace) -> None:
    peers = many_peers(300)
    # One peer with more allowed-ips than fit in one message (~60 KB of them): the kernel
    # continues it in the next message, under the same public key.
    wide = peer([v4(i, "10.100.0.0") for i in range(2000)], keepalive=25)
    private = setup_device(ns, [*peers, wide])

    messages = ns.call("messages")
    assert len(messages) > 2, "the dump should span several netlink messages"
    assert sum(wide["public_key"] in keys for keys in messages) >= 2, "the wide peer should be split"
    device = ns.call("device")
    assert device["public_key"] == public_key(private) and device["listen_port"] == 51820
    assert len(device["peers"]) == 301
    assert seen(device) == expected([*peers, wide])
    assert ns.wg_dump() == expected([*peers, wide])  # and the kernel holds just that
    assert ns.call("plan", desired=[*peers, wide]) == []  # converged


@needs_wg
def test_adding_updating_and_removing_one_peer_leaves_every_other_untouched(ns: Namespace) -> None:
    peers = many_peers(40)
    setup_device(ns, peers)
    before = ns.wg_dump()
    assert before == expected(peers)

    def others_untouched(but: str | None = None) -> None:
        after = ns.wg_dump()
        assert {k: v for k, v in after.items() if k != but} == {k: v for k, v in before.items() if k != but}

    # add
    new = peer([v4(1000), "fd00:99::1000/128"], "198.51.100.7:51820", keepalive=25)
    assert actions(ns.call("sync", desired=[*peers, new])) == [("add", new["public_key"])]
    others_untouched(but=new["public_key"])
    assert ns.wg_dump()[new["public_key"]] == expected([new])[new["public_key"]]
    assert ns.call("plan", desired=[*peers, new]) == []
    peers.append(new)
    before = ns.wg_dump()

    # update: the allowed-ips are replaced, not added to (to disjoint ones, to fewer, to more)
    target = peers[7]
    for ips, keepalive in (([v4(2000)], 0), ([v4(2000), v4(2001), "fd00:99::2000/128"], 25), ([v4(2001)], 5)):
        target.update(allowed_ips=ips, keepalive=keepalive)
        assert actions(ns.call("sync", desired=peers)) == [("update", target["public_key"])]
        others_untouched(but=target["public_key"])
        assert ns.wg_dump()[target["public_key"]] == expected([target])[target["public_key"]]
        assert seen(ns.call("device"))[target["public_key"]]["allowed_ips"] == sorted(ips)
        assert ns.call("plan", desired=peers) == []

    # update of a roaming peer (no endpoint wanted): the endpoint the kernel has stays
    roamer = peers[3]
    assert roamer["endpoint"] is not None
    ns.call("apply", changes=[["update", {**roamer, "endpoint": None, "allowed_ips": [v4(3000)]}]])
    assert ns.wg_dump()[roamer["public_key"]] == {"allowed_ips": [v4(3000)], "endpoint": roamer["endpoint"],
                                                  "keepalive": roamer["keepalive"]}
    roamer["allowed_ips"] = [v4(3000)]
    before = ns.wg_dump()

    # remove
    gone = peers.pop(11)
    assert actions(ns.call("sync", desired=peers)) == [("remove", gone["public_key"])]
    after = ns.wg_dump()
    assert gone["public_key"] not in after
    others_untouched(but=gone["public_key"])
    assert after == expected(peers)
    assert ns.call("plan", desired=peers) == []


@needs_wg
def test_a_stale_peer_is_removed_by_plan_and_apply_and_only_it(ns: Namespace) -> None:
    peers = many_peers(30)
    setup_device(ns, peers)
    # Stale: one of ours that is no longer wanted, and one someone else added, which even
    # took a wanted peer's address (WireGuard moves an allowed-ip to its latest owner).
    stale = peers.pop(4)
    victim = peers[9]
    intruder = public_key(generate_private_key())
    ns.run("wg", "set", IFACE, "peer", intruder, "allowed-ips", f"10.200.0.1/32,{victim['allowed_ips'][0]}")
    assert victim["allowed_ips"][0] not in ns.wg_dump()[victim["public_key"]]["allowed_ips"]

    plan = ns.call("sync", desired=peers)
    assert actions(plan) == sorted([("remove", stale["public_key"]), ("remove", intruder),
                                    ("update", victim["public_key"])])
    assert ns.wg_dump() == expected(peers)  # the stale ones gone, the victim whole, the rest as they were
    assert ns.call("plan", desired=peers) == []


@needs_wg
def test_plan_is_empty_right_after_apply(ns: Namespace) -> None:
    """Converged means no change on the next pass, for each kind of peer the daemons make."""
    # server: a peer per client, its overlay /32, no endpoint (the client roams), no keepalive
    clients = [peer([v4(i + 2)]) for i in range(25)]
    setup_device(ns, clients)
    assert ns.call("plan", desired=clients) == []
    # ... and a client that roamed: the kernel learnt an endpoint sptun never asked for
    ns.run("wg", "set", IFACE, "peer", clients[0]["public_key"], "endpoint", "203.0.113.9:40000")
    assert ns.call("plan", desired=clients) == []
    assert ns.call("device")["peers"][clients[0]["public_key"]]["endpoint"] == "203.0.113.9:40000"

    # agent: one interface per server, one peer with a fixed endpoint, everything routed, keepalive
    agent_if = "sptk1"
    private = generate_private_key()
    assert ns.call("create", ifname=agent_if) is True
    ns.call("configure", ifname=agent_if, private_key=private, listen_port=None)
    device = ns.call("device", ifname=agent_if)
    assert device["public_key"] == public_key(private) and device["peers"] == {}
    server = peer(["0.0.0.0/0"], "198.51.100.10:51820", keepalive=25)
    assert actions(ns.call("sync", ifname=agent_if, desired=[server])) == [("add", server["public_key"])]
    assert ns.call("plan", ifname=agent_if, desired=[server]) == []
    assert ns.wg_dump(agent_if) == expected([server])
    # the server moved: only the endpoint changes, then it converges again
    server["endpoint"] = "198.51.100.11:51820"
    assert actions(ns.call("sync", ifname=agent_if, desired=[server])) == [("update", server["public_key"])]
    assert ns.call("plan", ifname=agent_if, desired=[server]) == []
    assert ns.wg_dump(agent_if) == expected([server])

    # the big one: 300 peers converge too, and a second pass changes nothing
    many = many_peers(300, offset=100)
    assert len(ns.call("sync", desired=many)) == 300 + 25  # 300 added, the 25 clients removed
    assert ns.call("plan", desired=many) == []
    assert ns.call("sync", desired=many) == []
    assert ns.wg_dump() == expected(many)
