"""Run inside a scratch network namespace: the same changes as nftbench.py, made the way the
proposed fix would make them, for a side-by-side figure.

    python bench/nftproposed.py SIZE[,SIZE...] REPEATS   -> one JSON object on stdout

Two changes to sptun's way:
- each forward's DNAT rule lives in a chain of its own (`fwdN`), jumped to from prerouting,
  so a change of the rotation's size is `flush chain` + `add rule`: nft then needs no rule
  handle and no cache of the map's elements (`replace rule ... handle` makes nft 1.0.6 fetch
  every element of every set first: O(backends));
- the transaction goes through libnftables in-process (ctypes; libnftables1 is a dependency
  of the nftables package), not a new `nft` process per change.
Each is timed alone ("chain_process": the first only) and together ("chain_library").
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from nftbench import addresses  # type: ignore[import-not-found]

from sptun import nft

MATCH = 'iifname != "sptun0" ip daddr 198.51.100.10 tcp dport 443'


class Library:
    """A persistent libnftables context: nft_run_cmd_from_buffer() with no fork or exec."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libnftables.so.1")
        self.lib.nft_ctx_new.restype = ctypes.c_void_p
        self.lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        self.lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        self.lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        self.lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        self.lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self.ctx = self.lib.nft_ctx_new(0)
        self.lib.nft_ctx_buffer_output(self.ctx)
        self.lib.nft_ctx_buffer_error(self.ctx)

    def __call__(self, text: str) -> None:
        if self.lib.nft_run_cmd_from_buffer(self.ctx, text.encode()) != 0:
            raise RuntimeError(self.lib.nft_ctx_get_error_buffer(self.ctx).decode())


def process(text: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True, capture_output=True)


def ruleset(backends: list[str]) -> str:
    elements = ", ".join(f"{i} : {ip}" for i, ip in enumerate(backends))
    return f"""table inet sptun {{}}
delete table inet sptun
table inet sptun {{
\tmap rr0 {{
\t\ttypeof numgen inc mod 2 : ip daddr
\t\telements = {{ {elements} }}
\t}}
\tchain fwd0 {{
\t\tdnat ip to numgen inc mod {len(backends)} map @rr0
\t}}
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\t{MATCH} counter jump fwd0
\t}}
}}
"""


def update(current: list[str], new: list[str]) -> str:
    """rotation_update's element changes, with the rule remade in its own chain."""
    gone = [i for i in range(len(current)) if i >= len(new) or current[i] != new[i]]
    came = [i for i in range(len(new)) if i >= len(current) or current[i] != new[i]]
    lines = []
    if gone:
        lines.append(f"delete element inet sptun rr0 {{ {', '.join(map(str, gone))} }}")
    if came:
        lines.append(f"add element inet sptun rr0 {{ {', '.join(f'{i} : {new[i]}' for i in came)} }}")
    if len(new) != len(current):
        lines += ["flush chain inet sptun fwd0", f"add rule inet sptun fwd0 dnat ip to numgen inc mod {len(new)} map @rr0"]
    return "\n".join(lines) + "\n"


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def changes(load: Callable[[str], None], size: int, repeats: int) -> list[float]:
    """Joins, leaves and flips as nftbench makes them; the ms of each."""
    backends = addresses(size)
    spare = addresses(repeats + 1, start=size + 2)
    load(ruleset(backends))
    current = list(backends)
    members = set(backends)
    times = []

    def change() -> None:
        nonlocal current
        new = nft.next_rotation(current, set(members))
        load(update(current, new))
        current = new

    for i in range(repeats):
        members.add(spare[i])
        times.append(timed(change))
        middle = backends[(size // 2 + i) % size]
        if middle in members:
            members.discard(middle)
            times.append(timed(change))
    listing = json.loads(subprocess.run(["nft", "-j", "list", "map", "inet", "sptun", "rr0"], capture_output=True,
                                        text=True, check=True).stdout)
    elems = next(item["map"].get("elem", []) for item in listing["nftables"] if "map" in item)
    assert [str(v) for _, v in sorted(elems, key=lambda kv: int(kv[0]))] == current, "drifted from the kernel"
    return times


def stats(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 2), "max_ms": round(max(values), 2), "n": len(values)}


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    repeats = int(sys.argv[2])
    lib = Library()
    rows = []
    for size in sizes:
        text = ruleset(addresses(size))

        def reload(text: str = text) -> None:
            lib(text)

        rows.append({
            "backends": size,
            "chain_process": stats(changes(process, size, repeats)),
            "chain_library": stats(changes(lib, size, repeats)),
            "full_reload_library": stats([timed(reload) for _ in range(repeats)]),
        })
        process("delete table inet sptun\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
