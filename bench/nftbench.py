"""Run inside a scratch network namespace: time sptun.nft's full reload against its in-place
rotation updates (a join, a leave, a health flip) for domains of N backends.

    python bench/nftbench.py SIZE[,SIZE...] REPEATS   -> one JSON object on stdout
    python bench/nftbench.py domains N REPEATS        -> the same for N domains of 3 backends each

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
FIREWALL = nft.Nft()  # the daemon's own edge: libnftables writes, one JSON listing per read
FORWARD = nft.Forward("app.example.test", "198.51.100.10", Port("tcp", 443))


def addresses(n: int, start: int = 2) -> list[str]:
    base = int(ipaddress.IPv4Address("10.99.0.0"))
    return [str(ipaddress.IPv4Address(base + start + i)) for i in range(n)]


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def full_reload(backends: list[str]) -> float:
    return timed(lambda: FIREWALL.write(nft.render_server(IFACE, [FORWARD], [backends])))


def change(rotation: list[str], wanted: set[str], index: int = 0) -> float:
    """One in-place change of forward `index`, as the server's planner and applier make it;
    updates rotation."""
    def apply() -> None:
        new = nft.next_rotation(rotation, wanted)
        FIREWALL.write("\n".join(nft.rotation_update(index, rotation, new)))
        rotation[:] = new

    return timed(apply)


def bench(size: int, repeats: int) -> dict[str, object]:
    backends = addresses(size)
    spare = addresses(repeats + 1, start=size + 2)  # newcomers
    render_ms = [timed(lambda: nft.render_server(IFACE, [FORWARD], [backends])) for _ in range(repeats)]
    reload_ms = [full_reload(backends) for _ in range(repeats)]
    rotation = FIREWALL.read().rotations([FORWARD])[0]
    assert len(rotation) == size, (size, len(rotation))
    members = set(backends)
    join, leave, flip_down, flip_up = [], [], [], []
    for i in range(repeats):
        newcomer = spare[i]
        members.add(newcomer)
        join.append(change(rotation, set(members)))
        middle = backends[(size // 2 + i) % size]  # one from the middle: its slot takes the last one
        if middle in members:
            members.discard(middle)
            leave.append(change(rotation, set(members)))
        flipper = backends[(size // 3 + 7 * i) % size]
        if flipper in members:
            members.discard(flipper)
            flip_down.append(change(rotation, set(members)))  # its health check failed twice
            members.add(flipper)
            flip_up.append(change(rotation, set(members)))  # and passed twice again
    # The kernel holds what the daemon thinks it holds.
    final = FIREWALL.read().rotations([FORWARD])[0]
    assert final == rotation, "the in-place updates drifted from the kernel"
    assert set(final) == members
    FIREWALL.write(nft.delete_table())
    return {"backends": size, "render": _stats(render_ms), "full_reload": _stats(reload_ms), "join": _stats(join),
            "leave": _stats(leave), "flip_down": _stats(flip_down), "flip_up": _stats(flip_up)}


def domains(n: int, repeats: int, per: int = 3) -> dict[str, object]:
    """n domains on one server, each on its own public address (RFC 2544's benchmark range,
    only ever in this scratch namespace's ruleset) with `per` backends: the whole ruleset's
    load, and one change (a backend joins one domain, then leaves) among them."""
    first = int(ipaddress.IPv4Address("198.18.0.1"))
    forwards = [nft.Forward(f"d{i}.example.test", str(ipaddress.IPv4Address(first + i)), Port("tcp", 443))
                for i in range(n)]
    pool = addresses(n * per + repeats)
    rotations = [pool[i * per:(i + 1) * per] for i in range(n)]
    load_ms = [timed(lambda: FIREWALL.write(nft.render_server(IFACE, forwards, rotations))) for _ in range(repeats)]
    join, leave = [], []
    for i in range(repeats):
        index = (n // 2 + 13 * i) % n
        rotation = list(rotations[index])
        newcomer = pool[n * per + i]
        join.append(change(rotation, {*rotations[index], newcomer}, index))
        leave.append(change(rotation, set(rotations[index]), index))
    final = FIREWALL.read().rotations(forwards)
    assert final == rotations, "the in-place updates drifted from the kernel"
    FIREWALL.write(nft.delete_table())
    return {"domains": n, "backends_each": per, "load": _stats(load_ms), "join": _stats(join), "leave": _stats(leave)}


def _stats(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 2), "max_ms": round(max(values), 2), "n": len(values)}


def main() -> None:
    if sys.argv[1] == "domains":
        print(json.dumps(domains(int(sys.argv[2]), int(sys.argv[3]))))
        return
    sizes = [int(s) for s in sys.argv[1].split(",")]
    repeats = int(sys.argv[2])
    print(json.dumps([bench(size, repeats) for size in sizes]))


if __name__ == "__main__":
    main()
