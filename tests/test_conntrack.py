"""Counting each backend's open connections from /proc/net/nf_conntrack (pure parsing)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

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
