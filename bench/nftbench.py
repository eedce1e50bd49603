"""Run inside a scratch network namespace: time sptun.nft's full reload against its in-place
rotation updates (a join, a leave, a health flip) for domains of N backends.

    python bench/nftbench.py SIZE[,SIZE...] REPEATS   -> one JSON object on stdout

Each timing is what the server daemon does for that change: the Python (render_server, or
next_rotation + rotation_update) and the transaction (libnftables), together.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import sys
import time

from sptun import nft
from sptun.config import Port

IFACE = "sptun0"
FORWARD = nft.Forward("app.example.test", "198.51.100.10", Port("tcp", 443))


def addresses(n: int, start: int = 2) -> list[str]:
    base = int(ipaddress.IPv4Address("10.99.0.0"))
    return [str(ipaddress.IPv4Address(base + start + i)) for i in range(n)]


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def full_reload(backends: list[str]) -> float:
    return timed(lambda: nft.transaction([nft.render_server(IFACE, [FORWARD], [backends])]))


def change(table: nft.ServerTable, wanted: set[str]) -> float:
    """One in-place change, as Server.sync_table makes it; updates table."""
    def apply() -> None:
        current = table.rotations[0]
        new = nft.next_rotation(current, wanted)
        lines = nft.rotation_update(0, current, new)
        nft.transaction(lines)
        table.rotations[0] = new

    return timed(apply)


def bench(size: int, repeats: int) -> dict[str, object]:
    backends = addresses(size)
    spare = addresses(repeats + 1, start=size + 2)  # newcomers
    render_ms = [timed(lambda: nft.render_server(IFACE, [FORWARD], [backends])) for _ in range(repeats)]
    reload_ms = [full_reload(backends) for _ in range(repeats)]
    table = nft.read_server_table([FORWARD])
    assert len(table.rotations[0]) == size, (size, len(table.rotations[0]))
    members = set(backends)
    join, leave, flip_down, flip_up = [], [], [], []
    for i in range(repeats):
        newcomer = spare[i]
        members.add(newcomer)
        join.append(change(table, set(members)))
        middle = backends[(size // 2 + i) % size]  # one from the middle: its slot takes the last one
        if middle in members:
            members.discard(middle)
            leave.append(change(table, set(members)))
        flipper = backends[(size // 3 + 7 * i) % size]
        if flipper in members:
            members.discard(flipper)
            flip_down.append(change(table, set(members)))  # its health check failed twice
            members.add(flipper)
            flip_up.append(change(table, set(members)))  # and passed twice again
    # The kernel holds what the daemon thinks it holds.
    final = nft.read_server_table([FORWARD])
    assert final.rotations[0] == table.rotations[0], "the in-place updates drifted from the kernel"
    assert set(final.rotations[0]) == members
    nft.delete()

    def stats(values: list[float]) -> dict[str, float]:
        return {"median_ms": round(statistics.median(values), 2), "max_ms": round(max(values), 2), "n": len(values)}

    return {"backends": size, "render": stats(render_ms), "full_reload": stats(reload_ms), "join": stats(join),
            "leave": stats(leave), "flip_down": stats(flip_down), "flip_up": stats(flip_up)}


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    repeats = int(sys.argv[2])
    print(json.dumps([bench(size, repeats) for size in sizes]))


if __name__ == "__main__":
    main()
