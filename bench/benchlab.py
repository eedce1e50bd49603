"""The benchmarks' lab: `sptun lab`'s topology with three tunnel servers, of which DNS lists
two at first (the third is for the DNS-change timing), three clients running nginx on 80
and 443, and sptun publishing both ports. Each server also has a second address, where the
domain shares :443 with two others, routed by SNI (sptun.lab.share_by_sni)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import PY, log, note_command
from sptun.lab import (
    DOMAIN,
    LAB_OVERLAY,
    Host,
    Lab,
    config_path,
    share_by_sni,
    slow,
    sni_address,
    sptun,
    start_daemons,
    status,
    wait_served,
    write_configs,
)

PORTS = ("tcp/443", "tcp/80", "udp/9000")  # udp: bench.ratios.udp
# A UDP socket that never reads (bench.ratios.udp counts and drops the datagrams in nft first),
# gone with the lab or after two hours.
UDP_SERVICE = ("import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
               f"s.bind(('', {PORTS[-1].split('/')[1]})); time.sleep(7200)")
MAX_CLIENTS = 20000  # the domain's cap on each server: room for the 10k-lease benchmarks
OVERLAY = "10.99.0.0/18"  # and addresses for them (the lab's /20 has 4,094); clear of the home LAN, 10.99.100.0/24
WIREGUARD = "auto"  # wireguard-go on this host: the kernel has no module


def in_dns(lab: Lab, n: int = 2) -> Lab:
    """A view of the lab with only the first n servers (those in DNS), for wait_served."""
    view = Lab.__new__(Lab)
    view.__dict__.update(lab.__dict__)
    view.servers = lab.servers[:n]
    return view


def make_room(server: Host, max_clients: int = MAX_CLIENTS) -> None:
    """The server's config, with room for the benchmarks' crowds: the domain's max_clients
    and an overlay with that many addresses."""
    path = Path(config_path(server))
    text = path.read_text().replace(f'name = "{DOMAIN}"\n', f'name = "{DOMAIN}"\nmax_clients = {max_clients}\n', 1)
    path.write_text(text.replace(f'overlay = "{LAB_OVERLAY}"', f'overlay = "{OVERLAY}"', 1))


@contextmanager
def bench_lab(prefix: str) -> Iterator[Lab]:
    lab = Lab(prefix, servers=3, clients=3)
    try:
        started = time.monotonic()
        lab.up()
        lab.set_txt([f"r=superprotocol;ip={s.address}" for s in lab.servers[:2]], a=[s.address for s in lab.servers[:2]])
        for server in lab.servers:
            server.run(["ip", "addr", "add", f"{sni_address(server)}/24", "dev", "eth0"])
        write_configs(lab, WIREGUARD, ports=PORTS)
        for server in lab.servers:
            make_room(server)
        share_by_sni(lab, {}, sni_address)
        for client in lab.clients:  # the UDP service: its agent registers only while every port listens
            client.spawn([PY, "-c", UDP_SERVICE], log=client.dir / "udp-service.log")
        start_daemons(lab)
        for host in lab.servers + lab.clients:
            note_command("lab", sptun("server" if host.spec.role == "server" else "agent", "run", "-c", config_path(host)))
        wait_served(in_dns(lab), timeout=90 * slow())  # an emulated VM starts it slow() times slower
        log(f"lab {prefix} up and served in {time.monotonic() - started:.1f} s")
        yield lab
    finally:
        lab.down()
        log(f"lab {prefix} removed")


def overlay_ips(server: Host, domain: str | None = None) -> dict[str, str]:
    """Client name -> its overlay address on this server, from `sptun status --json`."""
    st = status(server)
    keys: dict[str, str] = {}
    for d in st["domains"]:
        if domain is None or d["name"] == domain:
            for b in d["backends"]:
                keys[b["public_key"]] = b["overlay_ip"]
    return keys


def client_overlay(lab: Lab, server: Host) -> dict[str, str]:
    """Client name -> overlay address on server, matched by each agent's own status."""
    result = {}
    for client in lab.clients:
        for t in status(client)["tunnels"]:
            if t["server"] == server.address and t["overlay_ip"]:
                result[client.name] = t["overlay_ip"]
    return result


def rotation(server: Host, index: int = 0) -> list[str]:
    """The overlay addresses in map @rrINDEX of the server's table, read straight from nft."""
    out = server.run(["nft", "-j", "list", "map", "inet", "sptun", f"rr{index}"], check=False)
    if not out.strip():
        return []
    for item in json.loads(out).get("nftables", []):
        if "map" in item:
            return [str(v) for _, v in sorted(item["map"].get("elem", []), key=lambda kv: int(kv[0]))]
    return []
