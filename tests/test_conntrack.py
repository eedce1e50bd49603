"""Counting each backend's open connections from /proc/net/nf_conntrack (pure parsing), and releasing
the ones a backend never answered (ctnetlink, in a namespace of our own)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sptun.server import active_connections

TABLE = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=203.0.113.10 dst=198.51.100.10 sport=40000 dport=443 src=10.99.0.2 dst=203.0.113.10 sport=443 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431998 ESTABLISHED src=203.0.113.11 dst=198.51.100.10 sport=40001 dport=443 src=10.99.0.2 dst=203.0.113.11 sport=443 dport=40001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431997 ESTABLISHED src=203.0.113.10 dst=198.51.100.10 sport=40002 dport=443 src=10.99.0.3 dst=203.0.113.10 sport=443 dport=40002 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 117 TIME_WAIT src=203.0.113.10 dst=198.51.100.10 sport=40003 dport=443 src=10.99.0.4 dst=203.0.113.10 sport=443 dport=40003 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 59 SYN_SENT src=203.0.113.10 dst=198.51.100.10 sport=40004 dport=443 [UNREPLIED] src=10.99.0.4 dst=203.0.113.10 sport=443 dport=40004 mark=0 zone=0 use=2
ipv4     2 tcp      6 431990 ESTABLISHED src=10.99.0.2 dst=10.99.0.1 sport=50000 dport=51821 src=10.99.0.1 dst=10.99.0.2 sport=51821 dport=50000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=203.0.113.10 dst=198.51.100.10 sport=5000 dport=443 src=10.99.0.2 dst=203.0.113.10 sport=443 dport=5000 mark=0 zone=0 use=2
"""


def test_counts_established_dnat_connections_by_backend(tmp_path: Path) -> None:
    table = tmp_path / "nf_conntrack"
    table.write_text(TABLE)
    # not TIME_WAIT or SYN_SENT, not a connection to the server itself (no DNAT), not UDP
    assert active_connections(table) == Counter({"10.99.0.2": 2, "10.99.0.3": 1})


def test_an_empty_table_counts_nothing_and_a_missing_one_is_unknown(tmp_path: Path) -> None:
    table = tmp_path / "nf_conntrack"
    table.write_text("")
    assert active_connections(table) == Counter()
    assert active_connections(tmp_path / "missing") is None


# --- releasing a backend's unanswered connections, in a kernel of our own -----------------------

RELEASE_SETUP = """set -e
ip link set lo up
ip addr add fd99::1/64 dev lo nodad
ip addr add 10.99.0.1/24 dev lo
nft -f - <<'X'
table inet t {
  chain out { type filter hook output priority 0; tcp dport 443 ct mark set 0x08000000; tcp dport 444 ct mark set 0x02000000; }
  chain in { type filter hook input priority 0; tcp dport { 443, 444, 8443 } tcp flags syn drop; }
}
X
"""

RELEASE = """
import json, socket, sys, time
from sptun.conntrack import NetlinkConntrack
out = {}
for address in ("fd99::1", "10.99.0.1"):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for port in (443, 444, 8443):  # 443: DNAT's mark (set on output); 444: the SNI proxy's; 8443: none
        s = socket.socket(family)
        s.setblocking(False)
        try:
            s.connect((address, port))  # its SYN is dropped on input: it stays unanswered
        except BlockingIOError:
            pass
    time.sleep(0.3)
    out[address] = NetlinkConntrack().release_unreplied([address]).get(address, 0)
out["left"] = [line for line in open("/proc/net/nf_conntrack") if "SYN_SENT" in line]
print(json.dumps(out))
"""


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft for a scratch namespace")
def test_a_backends_unanswered_connections_are_released_in_both_families() -> None:
    """Only sptun's (its marks: DNAT's and the SNI proxy's), only unanswered, only the backend's: of either family (an
    IPv6 twin's too, which pyroute2's own reply-tuple filter never finds)."""
    ns = f"spct{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "bash", "-c", RELEASE_SETUP], check=True)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", RELEASE], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        assert got["fd99::1"] == 2 and got["10.99.0.1"] == 2
        assert len(got["left"]) == 2 and all("8443" in line for line in got["left"]), got  # unmarked: kept
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
