"""The lab itself, for real: namespaces, NAT, knot, nginx and the lab CA."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import LAB_TOOLS, netns_marks

from sptun.errors import CommandError, SptunError
from sptun.lab import DOMAIN, LAB_ROOT, Lab, alive, destroy, lab_namespaces, mounts_below, ready_timeout, topology

pytestmark = netns_marks(*LAB_TOOLS)

PREFIX = f"spt{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(PREFIX)
    pids: list[int] = []
    try:
        lab.up()
        pids = lab_pids(PREFIX)
        yield lab
    finally:
        lab.down()
        assert_gone(PREFIX, pids)


def assert_gone(prefix: str, pids: list[int]) -> None:
    """Nothing of the lab is left: namespaces, mounts, processes, directory."""
    assert lab_namespaces(prefix) == []
    assert mounts_below(LAB_ROOT / prefix) == []
    assert [p for p in pids if alive(p)] == []
    assert not (LAB_ROOT / prefix).exists()


def lab_pids(prefix: str) -> list[int]:
    return [int(p) for p in (LAB_ROOT / prefix / "pids").read_text().split()]


def kdig(lab: Lab, rtype: str) -> set[str]:
    out = lab.clients[0].run(["kdig", "@192.0.2.53", "+short", "+time=2", "+retry=1", rtype, DOMAIN])
    return set(out.split())


def test_topology_is_fixed_data() -> None:
    hosts = {h.name: h for h in topology(servers=3, clients=2)}
    assert [n for n in hosts if n[0] in "sc"] == ["s1", "s2", "s3", "c1", "c2"]
    assert hosts["s3"].address == "198.51.100.12"
    assert hosts["c2"].address == "10.99.100.12" and hosts["c2"].uplink == "nat"
    assert hosts["dns"].address == "192.0.2.53"
    assert hosts["nat"].masquerade and hosts["nat"].bridge == ("10.99.100.1/24",)


def test_dns_through_nat_and_set_txt(lab: Lab) -> None:
    assert kdig(lab, "TXT") == {'"r=superprotocol;ip=198.51.100.10"', '"r=superprotocol;ip=198.51.100.11"'}
    assert kdig(lab, "A") == {"198.51.100.10", "198.51.100.11"}
    new = [f"r=superprotocol;ip=198.51.100.{i}" for i in (10, 11, 12)]
    lab.set_txt(new, a=["198.51.100.10", "198.51.100.11", "198.51.100.12"])
    try:
        assert kdig(lab, "TXT") == {f'"{t}"' for t in new}
        assert kdig(lab, "A") == {"198.51.100.10", "198.51.100.11", "198.51.100.12"}
        lab.set_txt(new[:1])  # a=None keeps the A records
        assert kdig(lab, "TXT") == {f'"{new[0]}"'}
        assert len(kdig(lab, "A")) == 3
    finally:
        lab.set_txt(new[:2], a=["198.51.100.10", "198.51.100.11"])


def test_set_txt_escapes_and_splits(lab: Lab) -> None:
    long = "r=superprotocol;ip=198.51.100.10;x=" + "a" * 300
    lab.set_txt(['say "hi"\\', ["r=superprotocol;", "ip=198.51.100.11"], long])
    try:
        out = lab.clients[0].run(["kdig", "@192.0.2.53", "+short", "TXT", DOMAIN]).splitlines()
        assert '"say \\"hi\\"\\\\"' in out
        assert '"r=superprotocol;" "ip=198.51.100.11"' in out
        (split,) = [line for line in out if "x=" in line]
        assert split.count('" "') == 1  # 300+ bytes became two character-strings
    finally:
        lab.set_txt([f"r=superprotocol;ip={s.address}" for s in lab.servers])


def test_each_client_serves_its_own_certificate(lab: Lab) -> None:
    subjects = set()
    for client in lab.clients:
        expected = f"client={client.name} remote=127.0.0.1\n"
        assert client.run(["curl", "-sSk", "--max-time", "5", "https://127.0.0.1/"]) == expected
        assert client.run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1/"]).startswith(f"client={client.name} ")
        # Verified against the lab CA, for DOMAIN.
        result = lab.curl("127.0.0.1", source=client)
        assert result.ok, result.log
        assert result.body == expected
        assert result.subject and f"OU={client.name}" in result.subject
        subjects.add(result.subject)
    assert len(subjects) == len(lab.clients)


def test_browser_cannot_connect_to_a_client(lab: Lab) -> None:
    with pytest.raises(CommandError) as err:
        lab.browser.run(["curl", "-sSk", "--max-time", "2", "https://10.99.100.11/"])
    assert err.value.returncode == 28  # dropped by the NAT router, not refused or unroutable
    result = lab.curl("10.99.100.11", timeout=2)
    assert not result.ok and result.subject is None
    assert result.error.startswith("curl: (28) "), result.error  # what a failed hit reports


def test_client_reaches_browser_masqueraded(lab: Lab) -> None:
    www = lab.browser.dir / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("hello from the browser\n")
    log = lab.browser.dir / "http.log"
    server = lab.browser.spawn(
        [sys.executable, "-m", "http.server", "--bind", "203.0.113.10", "--directory", www, "8080"], log=log
    )
    try:
        body = ""
        for _ in range(50):
            body = lab.clients[0].run(["curl", "-sS", "--max-time", "2", "http://203.0.113.10:8080/"], check=False)
            if body:
                break
            time.sleep(0.1)
        assert body == "hello from the browser\n"
        assert '203.0.113.2 - - ' in log.read_text()  # the NAT's WAN address, not 10.99.100.11
    finally:
        server.kill()
        server.wait()


def test_up_refuses_an_existing_lab(lab: Lab) -> None:
    with pytest.raises(SptunError, match="already exists"):
        Lab(PREFIX).up()
    assert kdig(lab, "A")  # and left it alone


def test_destroy_running_lab() -> None:
    prefix = f"{PREFIX}d"
    lab = Lab(prefix, servers=1, clients=1)
    try:
        lab.up()
        pids = lab_pids(prefix)
        assert pids and all(alive(p) for p in pids)
        destroy(prefix)
        assert_gone(prefix, pids)
        destroy(prefix)  # idempotent
    finally:
        destroy(prefix)


def test_down_after_builder_was_killed() -> None:
    """kill -9 the Python that ran up(); a fresh Lab object still cleans up by prefix."""
    prefix = f"{PREFIX}k"
    script = f"from sptun.lab import Lab; Lab({prefix!r}, servers=1, clients=1).up(); print('up', flush=True)"
    # Become the orphans' reaper, so the killed builder's children do not linger as zombies.
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    builder = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        assert builder.stdout is not None
        assert builder.stdout.readline() == "up\n"
        builder.kill()
        builder.wait()
        pids = lab_pids(prefix)
        assert pids and all(alive(p) for p in pids)
        Lab(prefix).down()
        assert_gone(prefix, pids)
        Lab(prefix).down()  # idempotent
    finally:
        builder.kill()
        builder.wait()
        destroy(prefix)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_failed_up_removes_what_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """knotd refuses a broken config: up() says so quickly and leaves nothing behind."""
    prefix = f"{PREFIX}f"
    # Patched where Lab reads it: the re-export in sptun.lab is a copy of the name.
    monkeypatch.setattr("sptun.lab.net.KNOT_CONF", "server:\n    no-such-option: 1\n")
    lab = Lab(prefix, servers=1, clients=1)
    try:
        started = time.monotonic()
        with pytest.raises(SptunError, match="knot .* process exited"):
            lab.up()
        assert time.monotonic() - started < ready_timeout()
        assert_gone(prefix, [])
    finally:
        destroy(prefix)
