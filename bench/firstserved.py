"""Run inside the browser namespace: new plain-HTTP connections to HOST:80, one after another
(each with a 1 s connect), until one is answered by CLIENT (the lab's nginx says which client
it is); prints that moment (CLOCK_MONOTONIC, the same in every namespace) as JSON.

    python bench/firstserved.py HOST CLIENT TIMEOUT
"""

from __future__ import annotations

import json
import socket
import sys
import time


def main() -> None:
    host, client, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    want = f"client={client} ".encode()
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        try:
            with socket.create_connection((host, 80), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if want in s.recv(4096):
                    print(json.dumps({"served_at": time.monotonic(), "tries": tries}))
                    return
        except OSError:
            pass
        time.sleep(0.005)
    print(json.dumps({"served_at": None, "tries": tries}))


if __name__ == "__main__":
    main()
