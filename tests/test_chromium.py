"""A real browser through the tunnel: headless Chromium, in the lab's browser namespace, fetches
pages through one server on both data paths (one server, two clients):

- kernel DNAT: DOMAIN on the server's main address, port 443 (c1), and on its IPv6 address;
- SNI: on a second public address, DOMAIN and SNI_DOMAINS share port 443, routed by SNI
  through HAProxy (c1: DOMAIN, c2: blue).

Each page is checked as in test_e2e_sni: the domain's own client answered, with its own
certificate (Chromium trusts the lab CA through an NSS database, nothing is ignored), and saw
the browser's address. What curl does not send is Chromium's ClientHello: about 2 KB (a
post-quantum key share), more than one TCP segment; the server counts such split ClientHellos,
and each test checks that its own was one."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import LAB_TOOLS, netns_marks

from sptun.lab import (
    DOMAIN,
    SNI_DOMAINS,
    Host,
    Lab,
    share_by_sni,
    slow,
    sni_address,
    start_daemons,
    wait_served,
    write_configs,
)

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go", "haproxy", "chromium", "certutil")

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
PREFIX = f"chr{os.getpid() % 100000}"

# In the server's namespace, beside sptun's table: ClientHellos (a handshake record, message
# type 1) longer than 1500 bytes that begin in a packet of at most 1500, so they go on in
# another segment. @ih is the TCP payload.
SPLIT_HELLOS = """table ip chromium_test {
    counter split_hellos {}
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        tcp dport 443 @ih,0,8 0x16 @ih,40,8 0x01 @ih,24,16 > 1500 meta length <= 1500 counter name split_hellos
    }
}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(PREFIX, servers=1, clients=2)
    try:
        lab.up()
        server = lab.servers[0]
        server.run(["ip", "addr", "add", f"{sni_address(server)}/24", "dev", "eth0"])
        server.run(["nft", "-f", "-"], input=SPLIT_HELLOS)
        # veth hands a GSO packet over whole, the ClientHello as one 2 KB packet: one segment
        # per packet, as on a real link.
        lab.browser.run(["ip", "link", "set", "dev", "eth0", "gso_max_segs", "1"])
        nssdb = trusting_home(lab) / ".pki" / "nssdb"  # where Chromium on Linux looks
        nssdb.mkdir(parents=True)
        lab.browser.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"])
        lab.browser.run(["certutil", "-A", "-d", f"sql:{nssdb}", "-n", "sptun lab CA", "-t", "C,,", "-i", lab.ca_cert])
        write_configs(lab, BACKEND)
        share_by_sni(lab, {"c2": SNI_DOMAINS[0]}, sni_address)
        start_daemons(lab)
        wait_served(lab)
        yield lab
    finally:
        lab.down()


def trusting_home(lab: Lab) -> Path:
    """Chromium's HOME: its NSS database trusts the lab CA."""
    return lab.browser.dir / "chromium-home"


def split_hellos(server: Host) -> int:
    out = server.run(["nft", "list", "counter", "ip", "chromium_test", "split_hellos"])
    packets = re.search(r"packets (\d+)", out)
    assert packets, out
    return int(packets.group(1))


@dataclass(frozen=True)
class Page:
    dom: str  # as --dump-dom prints it
    hellos: list[int]  # the ClientHellos Chromium sent, bytes
    certificates: list[str]  # the server certificates it received, PEM
    log: str  # its stderr, less the D-Bus noise (no bus in the lab)


def chromium(lab: Lab, domain: str, address: str, home: Path | None = None) -> Page:
    """https://domain/ by headless Chromium in the browser's namespace, domain resolved to
    address; with a fresh profile, and home (by default trusting_home) as HOME."""
    run_dir = lab.browser.dir / f"chromium-{uuid.uuid4().hex[:12]}"
    run_dir.mkdir()
    net_log = run_dir / "net-log.json"
    argv = ["chromium",
            "--headless", "--no-sandbox",  # no display; as root Chromium refuses to start sandboxed
            "--disable-gpu", f"--user-data-dir={run_dir / 'profile'}",
            f"--host-resolver-rules=MAP {domain} {f'[{address}]' if ':' in address else address}",
            f"--timeout={30_000 * slow():.0f}",  # ms for the page; then it prints what it has and exits
            f"--log-net-log={net_log}", "--dump-dom", f"https://{domain}/"]  # fmt: skip
    env = {**os.environ, "HOME": str(home or trusting_home(lab))}
    proc = subprocess.Popen(lab.browser.cmd(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    try:
        dom, err = proc.communicate(timeout=60 * slow())
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Chromium and its helpers: the group it leads
        dom, err = proc.communicate()
        raise AssertionError(f"chromium for {domain} at {address} did not exit:\n{err[-2000:]}") from None
    log = "\n".join(line for line in err.splitlines() if "dbus" not in line)
    return Page(dom, *tls_of(net_log), log)


def tls_of(net_log: Path) -> tuple[list[int], list[str]]:
    """From Chromium's net log: the sizes of the ClientHellos it sent (TLS records, bytes), and
    the server certificates it received (PEM); none if the log is missing or cut short."""
    try:
        log = json.loads(net_log.read_text())
    except (OSError, ValueError):
        return [], []
    kinds = log["constants"]["logEventTypes"]
    hellos, certificates = [], []
    for event in log["events"]:
        params = event.get("params", {})
        if event["type"] == kinds["SSL_HANDSHAKE_MESSAGE_SENT"] and params.get("type") == 1:
            hellos.append(5 + len(base64.b64decode(params["bytes"])))  # with the record's header
        elif event["type"] == kinds["SSL_CERTIFICATES_RECEIVED"]:
            certificates.append(params["certificates"][0].strip())
    return hellos, certificates


@pytest.mark.parametrize(
    ("domain", "sni", "client"),
    [
        pytest.param(DOMAIN, False, "c1", id="dnat-app"),
        pytest.param(SNI_DOMAINS[0], True, "c2", id="sni-blue"),
        pytest.param(DOMAIN, True, "c1", id="sni-app"),
        pytest.param(DOMAIN, None, "c1", id="dnat-app-ipv6"),  # None: the server's IPv6 address
    ],
)
def test_chromium_gets_the_page_of_the_domains_client_with_its_certificate_and_the_browsers_address(
    lab: Lab, domain: str, sni: bool | None, client: str
) -> None:
    server = lab.servers[0]
    address = sni_address(server) if sni else server.address if sni is not None else server.address6
    browser = lab.browser.address if sni is not None else lab.browser.address6
    assert address and browser
    where = f"{domain} at {address}"
    split_before = split_hellos(server)
    page = chromium(lab, domain, address)
    seen = re.search(r"client=(\S+) remote=(\S+)", page.dom)
    assert seen, f"{where}: no lab page in {page.dom!r}; chromium said:\n{page.log[-2000:]}"
    assert seen.group(1) == client, f"{where} answered by {seen.group(1)}, not {client}"
    assert seen.group(2) == browser, f"{where}: {client} saw {seen.group(2)}, not the browser's address"
    own = lab.cert_paths(client)[1].read_text().strip()
    assert page.certificates and set(page.certificates) == {own}, f"{where}: not {client}'s own certificate"
    if sni is not None:  # (the counter is IPv4's)
        assert split_hellos(server) > split_before, f"{where}: no ClientHello in more than one segment ({page.hellos} B)"
    print(f"\nchromium, {where}: {client}, the browser's address; ClientHellos of {page.hellos} B"
          + (", split" if sni is not None else ""))


def test_without_the_lab_ca_chromium_refuses_the_page(lab: Lab) -> None:
    """The trust above is the lab CA's: a HOME without it, and the page is refused."""
    home = lab.browser.dir / "chromium-home-bare"
    home.mkdir(exist_ok=True)
    page = chromium(lab, DOMAIN, lab.servers[0].address, home=home)
    assert "client=" not in page.dom and "ERR_CERT_AUTHORITY_INVALID" in page.log, page.log[-2000:]
