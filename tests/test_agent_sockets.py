"""The agent's view of local services, from /proc/net files (pure parsing, fake files)."""

from __future__ import annotations

from pathlib import Path

from sptun.agent import in_flight, listening
from sptun.config import Port

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
TCP = HEADER + (
    "   0: 00000000:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n"
    "   1: 0200630A:01BB 0A0071CB:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n"
    "   2: 0200630A:01BB 0A0071CB:9C41 06 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n")
UDP = HEADER + "   7: 00000000:01BB 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 2 0\n"


def proc(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_listening_needs_every_port(tmp_path: Path) -> None:
    net = proc(tmp_path, tcp=TCP, udp=UDP)
    assert listening((Port("tcp", 443),), net)
    assert listening((Port("tcp", 443), Port("udp", 443)), net)
    assert not listening((Port("tcp", 443), Port("tcp", 80)), net)
    assert not listening((Port("udp", 443),), proc(tmp_path, udp=HEADER))


def test_established_is_not_listening_and_is_counted_in_flight(tmp_path: Path) -> None:
    net = proc(tmp_path, tcp=TCP.replace(" 0A ", " 06 "))  # the listener gone: only connections (one in TIME_WAIT)
    assert not listening((Port("tcp", 443),), net)
    assert in_flight({"10.99.0.2"}, (Port("tcp", 443),), net) == 1
    assert in_flight({"10.99.0.3"}, (Port("tcp", 443),), net) == 0
