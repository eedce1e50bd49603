"""The Vagrant lab (vagrant/): its data is the namespace lab's, the Vagrantfile validates,
the host-side secrets are sound, and the per-boot network provisioning does what the
namespace lab's routers do. No VM is started: that needs a hypervisor (see vagrant/README.md).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sptun.lab import DNS_ADDRESS, DOMAIN, topology

ROOT = Path(__file__).resolve().parent.parent
VAGRANT_DIR = ROOT / "vagrant"
DATA = VAGRANT_DIR / "topology.json"


def lab() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DATA.read_text())
    return data


def test_topology_json_is_what_the_generator_writes() -> None:
    """vagrant/topology.json is generated from sptun.lab (net and demo): never edited by hand,
    never stale. After changing the namespace lab, run scripts/gen-vagrant-data."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-vagrant-data"), "--stdout"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == DATA.read_text(), "vagrant/topology.json is stale: run scripts/gen-vagrant-data"


def test_same_hosts_and_addresses_as_the_namespace_lab() -> None:
    hosts = {h["lab_name"]: h for h in lab()["hosts"]}
    assert [h.name for h in topology()] == [h["lab_name"] for h in lab()["hosts"]]
    for spec in topology():
        assert hosts[spec.name]["address"] == spec.address and hosts[spec.name]["role"] == spec.role
    names = [h["name"] for h in lab()["hosts"]]
    assert {"dns", "server1", "server2", "client1", "client2", "client3", "browser"} <= set(names)
    assert lab()["dns"] == DNS_ADDRESS and lab()["domain"] == DOMAIN


def test_every_route_leads_through_a_connected_router() -> None:
    nets = {n["name"]: ipaddress.ip_network(n["cidr"]) for n in lab()["networks"]}
    owners = {ipaddress.ip_address(nic["ip"]) for h in lab()["hosts"] for nic in h["nics"]}
    for host in lab()["hosts"]:
        connected = [nets[nic["network"]] for nic in host["nics"]]
        assert any(ipaddress.ip_address(host["address"]) in net for net in connected), host["name"]
        for dest, via in host["routes"]:
            gateway = ipaddress.ip_address(via)
            assert gateway in owners, (host["name"], via)
            assert any(gateway in net for net in connected), (host["name"], dest, via)
        # Every lab subnet is reachable: connected or routed.
        routed = {ipaddress.ip_network(dest) for dest, _ in host["routes"]}
        assert set(nets.values()) <= set(connected) | routed, host["name"]
    # libvirt's own address on each network is no lab host's.
    assert not {ipaddress.ip_address(n["host_ip"]) for n in lab()["networks"]} & owners


@pytest.fixture(scope="module")
def vagrant() -> str:
    path = shutil.which("vagrant")
    if path is None:
        pytest.skip("vagrant is not installed (scripts/setup installs Debian's vagrant and vagrant-libvirt)")
    return path


def test_vagrant_validate(vagrant: str, tmp_path: Path) -> None:
    env = dict(os.environ, VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"), VAGRANT_CHECKPOINT_DISABLE="1")
    plugins = subprocess.run([vagrant, "plugin", "list"], capture_output=True, text=True, env=env, timeout=120)
    if "vagrant-libvirt" in plugins.stdout:
        # The libvirt provider's own settings are checked too (it needs no running libvirtd
        # for that). VirtualBox's cannot be, without VirtualBox installed.
        env["VAGRANT_DEFAULT_PROVIDER"] = "libvirt"
        args = [vagrant, "validate"]
    else:
        args = [vagrant, "validate", "--ignore-provider"]
    proc = subprocess.run(args, cwd=VAGRANT_DIR, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "Vagrantfile validated successfully" in proc.stdout, proc.stdout + proc.stderr


def test_lab_secrets(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    secrets = tmp_path / ".lab"
    clients = [h["name"] for h in lab()["hosts"] if h["role"] == "client"]
    argv = [str(VAGRANT_DIR / "lab-secrets"), str(secrets), DOMAIN, *clients]
    subprocess.run(argv, check=True, timeout=120)
    token = (secrets / "token").read_text()
    assert 40 <= len(token.strip()) <= 256 and token.strip().replace("-", "").replace("_", "").isalnum()
    subprocess.run(argv, check=True, timeout=120)  # again: everything kept
    assert (secrets / "token").read_text() == token
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for client in clients:
        pem = secrets / f"{client}.pem"
        assert stat.S_IMODE((secrets / f"{client}.key").stat().st_mode) == 0o600
        subprocess.run(["openssl", "verify", "-CAfile", str(secrets / "ca.pem"), str(pem)], check=True,
                       capture_output=True, timeout=60)
        out = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-subject", "-ext", "subjectAltName"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        assert f"OU = {client}" in out and f"DNS:{DOMAIN}" in out


# --- the per-boot network provisioning, in a network namespace ------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.skip("needs root, ip and nft")
    name = f"sptvag-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, *argv: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def fake_vm(ns: str, name: str) -> dict[str, Any]:
    """The NICs that Vagrant would give the VM, holding the same addresses."""
    host: dict[str, Any] = next(h for h in lab()["hosts"] if h["name"] == name)
    in_ns(ns, "ip", "link", "set", "lo", "up")
    for i, nic in enumerate(host["nics"], 1):
        # A veth pair with both ends in the namespace (no dummy module everywhere).
        in_ns(ns, "ip", "link", "add", f"eth{i}", "type", "veth", "peer", "name", f"peer{i}")
        in_ns(ns, "ip", "addr", "add", f"{nic['ip']}/{nic['prefixlen']}", "dev", f"eth{i}")
        in_ns(ns, "ip", "link", "set", f"peer{i}", "up")
        in_ns(ns, "ip", "link", "set", f"eth{i}", "up")
    return host


def provision(ns: str, name: str) -> str:
    env = dict(os.environ, SPTUN_LAB_REPO=str(ROOT))
    return in_ns(ns, str(VAGRANT_DIR / "provision"), name, "net", env=env)


@pytest.mark.netns
def test_provision_net_on_the_nat_router(netns: str) -> None:
    host = fake_vm(netns, "nat")
    for _ in range(2):  # every boot, and `vagrant provision`: idempotent
        out = provision(netns, "nat")
    assert "NAT from eth1 out of eth2" in out  # nics: the LAN first, then the uplink
    ruleset = in_ns(netns, "nft", "list", "table", "inet", "lab")
    assert 'iifname "eth2" oifname "eth1" drop' in ruleset and 'oifname "eth2" meta nfproto ipv4 masquerade' in ruleset
    assert in_ns(netns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
    routes = in_ns(netns, "ip", "-4", "route", "show")
    for dest, via in host["routes"]:
        assert f"{dest} via {via}" in routes


@pytest.mark.netns
def test_provision_net_on_a_client(netns: str) -> None:
    host = fake_vm(netns, "client1")
    provision(netns, "client1")
    routes = in_ns(netns, "ip", "-4", "route", "show")
    assert {f"{d} via {v}" for d, v in host["routes"]} <= {" ".join(r.split()[:3]) for r in routes.splitlines()}
    assert in_ns(netns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "0"
    assert "table inet lab" not in in_ns(netns, "nft", "list", "ruleset")
