"""The conntrack edge: connections DNATed to each backend, for `status`; and the release of
the connections a backend never answered, when it leaves the rotation."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

from sptun.errors import SptunError
from sptun.nft import DNAT_MARK, PROXIED_MARK, OUR_CONNECTIONS

log = logging.getLogger("sptun")

CONNTRACK = Path("/proc/net/nf_conntrack")  # this network namespace's table, as text
CONNTRACK_BUDGET = 2.0  # s: status must not wait long on a huge table
SEEN_REPLY = 0x2  # IPS_SEEN_REPLY, a conntrack status bit


class ConntrackTable(Protocol):
    def release_unreplied(self, backends: Collection[str]) -> dict[str, int]:
        """Delete the entries of sptun's connections to these backends (DNATed, or the SNI
        proxy's) that they never answered (TCP in SYN_SENT, UDP unreplied): a browser's next
        SYN retransmission is then a new connection, DNATed to a backend in the rotation; and
        a new connection that reuses a stale entry's ports is not taken for a retransmission
        (which the passive check would count against the backend). Returns how many went,
        for each backend that had any."""
        ...


class NetlinkConntrack:
    """The kernel's table, through ctnetlink (pyroute2). The kernel filters the dump by
    sptun's marks and by status (unanswered: 5.15 and later), so its cost does not grow with
    the table; the backend's address is matched here. (pyroute2's reply-tuple filter
    decodes every entry of the backend, its TIME_WAITs included, in Python: 0.35 to 0.66 s
    with 700 to 2,000 entries under the fault tests' load, while the browsers' SYNs still
    went to the backend that left. For IPv6 it finds nothing at all.)"""

    def release_unreplied(self, backends: Collection[str]) -> dict[str, int]:
        from pyroute2 import Conntrack
        from pyroute2.netlink.exceptions import NetlinkError

        targets = {ipaddress.ip_address(b) for b in backends}
        released: Counter[str] = Counter()
        try:
            for version in sorted({t.version for t in targets}):
                with Conntrack(nfgen_family=socket.AF_INET6 if version == 6 else socket.AF_INET) as ct:
                    for entry in (e for mark in (DNAT_MARK, PROXIED_MARK) for e in unreplied(ct, mark)):
                        if not entry.tuple_reply.saddr or entry.status & SEEN_REPLY or not (entry.mark or 0) & OUR_CONNECTIONS:
                            continue
                        backend = ipaddress.ip_address(entry.tuple_reply.saddr)
                        if backend not in targets:
                            continue
                        try:
                            ct.delete(entry)
                            released[str(backend)] += 1
                        except NetlinkError as e:
                            if e.code != errno.ENOENT:  # gone meanwhile (it timed out): as good
                                raise
        except (OSError, NetlinkError) as e:  # no conntrack module, ...: the connections time out as before
            shown = ", ".join(sorted(backends)[:3]) + (", ..." if len(backends) > 3 else "")
            raise SptunError(f"cannot release the unanswered connections to {shown}: {e}") from None
        return dict(released)


def unreplied(ct: Any, mark: int) -> list[Any]:
    """The entries with this mark that never saw a reply, filtered by the kernel (5.15 and
    later): pyroute2's dump_entries filters by mark only, and decoding every marked entry
    (a busy minute's TIME_WAITs) in Python stalled the daemon for seconds, under its lock."""
    from pyroute2.conntrack import ConntrackEntry

    return [ConntrackEntry(m["nfgen_family"], *(m.get_attr(f"CTA_{a}") for a in (
                "TUPLE_ORIG", "TUPLE_REPLY", "STATUS", "TIMEOUT", "PROTOINFO", "MARK", "ID", "USE", "ZONE")))
            for m in ct.dump(mark=mark, mark_mask=mark, status=0, status_mask=SEEN_REPLY)]


def active_connections(table: Path = CONNTRACK) -> Counter[str] | None:
    """Established TCP connections DNATed to each backend, by backend address, from the kernel's
    conntrack table (status time only). Read as text: the kernel writes ~1M entries/s, where
    pyroute2 decodes ~1k/s. UDP has no connections to count. None when the table can't be read,
    or not within CONNTRACK_BUDGET."""
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + CONNTRACK_BUDGET
    try:
        with table.open() as lines:
            for n, line in enumerate(lines):
                if n % 4096 == 0 and time.monotonic() > deadline:
                    return None
                if " tcp " not in line or " ESTABLISHED " not in line:
                    continue
                # ... src= dst= sport= dport= (original) src= dst= sport= dport= (reply) ...
                addresses = [field[4:] for field in line.split() if field.startswith(("src=", "dst="))]
                if len(addresses) == 4 and addresses[2] != addresses[1]:  # replies come from elsewhere: DNAT
                    counts[addresses[2]] += 1
    except OSError as e:  # no conntrack here is not a reason to fail `status`
        log.debug("cannot read %s: %s", table, e)
        return None
    return counts
