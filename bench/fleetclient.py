"""Run inside one lab client's namespace (with no agent there): N WireGuard clients of one
server in this one namespace, each registered with the real protocol and given its own
interface, overlay address and policy route, as N agents would have them. The client's
nginx listens on every address, so each overlay address answers the server's health checks
and forwarded connections.

    python bench/fleetclient.py SERVER DOMAIN TOKEN_FILE N INFLIGHT KEYDIR

Prints one JSON object: when all N registrations were answered and when all N interfaces
were configured (seconds from the start), and each overlay address.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sptun import proto
from sptun.keys import generate_private_key, public_key

TABLE_BASE = 2000  # each client's routing table: replies from its address leave by its tunnel


def main() -> None:
    server, domain, token_file = sys.argv[1], sys.argv[2], sys.argv[3]
    n, inflight, keydir = int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
    token = Path(token_file).read_text().strip()
    keys = [generate_private_key() for _ in range(n)]
    kernel = Path("/sys/module/wireguard").exists()
    started = time.monotonic()

    def register(key: str) -> proto.Assignment:
        _, assignment = proto.exchange(server, 51821, proto.Request("register", domain, token, public_key(key)), key,
                                       timeout=60)
        assert assignment is not None
        return assignment

    with ThreadPoolExecutor(inflight) as pool:
        assignments = list(pool.map(register, keys))
    registered = time.monotonic() - started
    names = [f"fl{i}" for i in range(n)]
    if kernel:
        batch = "".join(f"link add {name} type wireguard\n" for name in names)
        subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
    else:
        for name in names:  # each forks itself into the background; gone with the namespace. Not
            # to a pipe: its daemon would die of SIGPIPE at its first log line after we are gone.
            subprocess.run(["wireguard-go", name], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keydir.mkdir(mode=0o700, exist_ok=True)
    batch = ""
    for i, (name, key, a) in enumerate(zip(names, keys, assignments, strict=True)):
        keyfile = keydir / name
        keyfile.write_text(key + "\n")
        os.chmod(keyfile, 0o600)
        subprocess.run(["wg", "set", name, "private-key", str(keyfile), "peer", a.server_key, "endpoint",
                        f"{server}:51820", "allowed-ips", "0.0.0.0/0", "persistent-keepalive", "25"], check=True)
        batch += (f"address add {a.overlay_ip}/32 dev {name}\nlink set {name} mtu 1420 up\n"
                  f"route add default dev {name} table {TABLE_BASE + i}\n"
                  f"rule add from {a.overlay_ip} table {TABLE_BASE + i} priority 100\n")
    subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
    configured = time.monotonic() - started
    print(json.dumps({"n": n, "kernel": kernel, "registered_s": round(registered, 3),
                      "configured_s": round(configured, 3), "overlay": [a.overlay_ip for a in assignments]}))


if __name__ == "__main__":
    main()
