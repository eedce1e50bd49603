"""Run inside the browser namespace: UDP datagrams as fast as one Python thread sends them,
for SECONDS, round-robin over FLOWS sockets (each its own source port, so each is its own
flow for DNAT round-robin) to DEST[,DEST...]:PORT; prints how many were sent, as JSON.

    python bench/udpblast.py DEST[,DEST...] PORT SECONDS FLOWS SIZE
"""

from __future__ import annotations

import json
import socket
import sys
import time


def main() -> None:
    dests, port, seconds = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])
    flows, size = int(sys.argv[4]), int(sys.argv[5])
    socks = []
    for i in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect((dests[i % len(dests)], port))
        socks.append(s)
    payload = b"x" * size
    sent = dropped = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for s in socks:  # a burst over every flow between clock reads
            try:
                s.send(payload)
                sent += 1
            except BlockingIOError:  # the sender's own queue is full: not sent, not counted
                dropped += 1
    print(json.dumps({"sent": sent, "not_sent": dropped, "seconds": seconds}))


if __name__ == "__main__":
    main()
