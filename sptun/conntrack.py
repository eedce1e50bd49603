"""The conntrack edge: connections DNATed to each backend, for `status`."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("sptun")

CONNTRACK = Path("/proc/net/nf_conntrack")  # this network namespace's table, as text
CONNTRACK_BUDGET = 2.0  # s: status must not wait long on a huge table


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
