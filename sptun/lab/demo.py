"""`sptun lab up|demo|down`: sptun servers and agents on top of the namespace lab (sptun.lab.net)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sptun.attest import Tpm2Prover
from sptun.agent.registration import REGISTER_EVERY
from sptun.control import control_request
from sptun.errors import SptunError
from sptun.keys import new_token, write_file_atomic
from sptun.lab.net import DNS6, DNS_ADDRESS, DOMAIN, SNI_DOMAINS, ZONE, Host, Lab, destroy, slow

LAB_OVERLAY = "10.99.0.0/20"  # clear of the home LAN behind the lab's NAT (10.99.100.0/24)
LAB_OVERLAY6 = "fd99::/64"  # each server's IPv6 overlay: each client's IPv4 lease mirrored in it
REQUESTS_PER_SERVER = 12
METRICS_PORT = 9586

SERVER_TOML = """\
# sptun server {name} of lab {prefix}
interface = "sptun0"
listen_port = 51820
api_port = 51821
overlay = "{overlay}"
{overlay6}state_dir = "{home}/state"
wireguard = "{wireguard}"

[[domains]]
name = "{domain}"
listen = {listen}
ports = {ports}
token_file = "{home}/tokens/{domain}"
"""

AGENT_TOML = """\
# sptun agent {name} of lab {prefix}
domain = "{domain}"
token_file = "{home}/tokens/token"
ports = {ports}
nameservers = ["{dns}"]
state_dir = "{home}/state"
wireguard = "{wireguard}"
"""


def sptun(*args: str) -> list[str]:
    """argv running this very sptun (same interpreter) on a lab host."""
    return [sys.executable, "-m", "sptun", *args]


def config_path(host: Host) -> str:
    return str(host.dir / ("server.toml" if host.spec.role == "server" else "agent.toml"))


EXTRA_DOMAIN_TOML = """
[[domains]]
name = "{domain}"
listen = ["{address}"]
ports = ["tcp/{port}"]
token_file = "{home}/tokens/{domain}"
"""


DNS_TOML = """
[dns]
server = "{dns}"
zone = "{zone}"
tsig_key_file = "{home}/tsig.key"
ttl = {ttl}
hold_down = {hold_down}
"""
LAB_HOLD_DOWN = 5  # s: the lab's servers withdraw a domain's addresses this soon (30 s by default)


def write_configs(lab: Lab, wireguard: str = "auto", extra_domains: tuple[str, ...] = (),
                  ports: tuple[str, ...] = ("tcp/443",), metrics: bool = False, publish: bool = False,
                  ipv6_first: tuple[str, ...] = ()) -> None:
    """Role configs for every server and client, and one join token for the domain on all.
    Extra domains (tests) are served on ports 8443, 8444, ... with tokens of their own.
    publish: the servers publish their own records (after lab.allow_updates()); ipv6_first: the
    servers that list their IPv6 address first, which their TXT record then announces."""
    for host in lab.servers + lab.clients:
        template = SERVER_TOML if host.spec.role == "server" else AGENT_TOML
        (host.dir / "tokens").mkdir(mode=0o700, exist_ok=True)
        # Servers are dual stack (clients' listen is not used).
        listen = [host.address] + ([host.address6] if host.address6 else [])
        if host.name in ipv6_first:
            listen.reverse()
        dns = DNS_ADDRESS if host.spec.gateway else DNS6  # an IPv6-only client asks over IPv6
        text = template.format(name=host.name, prefix=lab.prefix, overlay=LAB_OVERLAY, home=host.dir,
                               wireguard=wireguard, domain=DOMAIN, listen=json.dumps(listen), dns=dns,
                               ports=json.dumps(list(ports)),
                               overlay6=f'overlay6 = "{LAB_OVERLAY6}"\n' if host.address6 else "")
        if metrics:  # each host is its own network namespace: the same address everywhere
            text = f'metrics = "127.0.0.1:{METRICS_PORT}"\n' + text
        if host.spec.role == "server":
            text += "".join(EXTRA_DOMAIN_TOML.format(domain=d, address=host.address, port=8443 + i, home=host.dir)
                            for i, d in enumerate(extra_domains))
            text += DNS_TOML.format(dns=DNS_ADDRESS, zone=ZONE, home=host.dir, ttl=lab.ttl,
                                    hold_down=LAB_HOLD_DOWN) if publish else ""
        (host.dir / config_path(host).rsplit("/", 1)[1]).write_text(text)
    # The domain's token by `sptun token new`, as an operator makes it; the rest (copies,
    # and the extra domains' own) written here: each command is a Python start in the lab.
    first = lab.servers[0]
    token = first.run(sptun("token", "new", DOMAIN, "-c", config_path(first))).strip()
    for host in lab.servers:
        for domain in extra_domains:
            write_file_atomic(host.dir / "tokens" / domain, new_token() + "\n")
        if host is not first:
            write_file_atomic(host.dir / "tokens" / DOMAIN, token + "\n")
    for host in lab.clients:
        write_file_atomic(host.dir / "tokens" / "token", token + "\n")


def share_by_sni(lab: Lab, client_domains: dict[str, str], address: Callable[[Host], str] = lambda s: s.address) -> None:
    """After write_configs: every server also serves SNI_DOMAINS on address(server), port 443,
    and DOMAIN there too, so all three share it (routed by SNI), each with a token of its
    own; on the server's own address, its IPv6 address as well. client_domains: the clients
    that join another domain than DOMAIN, by name."""
    tokens = {d: new_token() for d in SNI_DOMAINS}
    for server in lab.servers:
        path = server.dir / "server.toml"
        text = path.read_text()
        if address(server) != server.address:  # a second public address: DOMAIN there as well
            text = text.replace(f'"{server.address}"', f'"{server.address}", "{address(server)}"', 1)
        # On the server's own address, its IPv6 one is shared too (routed by SNI in both families).
        shared = [address(server)] + ([server.address6] if address(server) == server.address and server.address6 else [])
        text += "".join(f'\n[[domains]]\nname = "{d}"\nlisten = {json.dumps(shared)}\nports = ["tcp/443"]\n'
                        f'token_file = "{server.dir}/tokens/{d}"\n' for d in SNI_DOMAINS)
        path.write_text(text)
        for d, token in tokens.items():
            write_file_atomic(server.dir / "tokens" / d, token + "\n")
    for client in lab.clients:
        if (d := client_domains.get(client.name, DOMAIN)) != DOMAIN:
            path = client.dir / "agent.toml"
            path.write_text(path.read_text().replace(f'domain = "{DOMAIN}"', f'domain = "{d}"'))
            write_file_atomic(client.dir / "tokens" / "token", tokens[d] + "\n")


def start_daemons(lab: Lab, hosts: list[Host] | None = None) -> None:
    for host in hosts or lab.servers + lab.clients:
        role = host.spec.role if host.spec.role == "server" else "agent"
        tpm = tpm_socket(host)  # with attest_lab(): the host's own TPM, as tpm2-tools find it
        env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:path={tpm}"} if tpm.exists() else None
        host.spawn(sptun(role, "run", "-c", config_path(host)), log=host.dir / "sptun.log", env=env)


# --- attested joins ---------------------------------------------------------------------


ATTESTED_PCRS = (0, 16)  # a fresh swtpm has measured nothing: PCR 16 (debug) is the one the lab extends


def tpm_socket(host: Host) -> Path:
    return host.dir / "tpm" / "tpm.sock"


def attest_lab(lab: Lab) -> dict[int, str]:
    """After write_configs: each server and client gets its own software TPM (swtpm, in its
    namespace), and sptun's attestation key in it. Each client presents tpm2 evidence, which
    each server requires; each server presents its own, which each agent requires. The keys
    are enrolled as an operator would: each host's attestation-key.pem copied into the other
    side's enrolled directory. The reference PCR values are read from the first client's
    TPM (all alike, fresh). Returns them."""
    for host in lab.servers + lab.clients:
        (host.dir / "tpm").mkdir(mode=0o700)
        sock = tpm_socket(host)
        host.spawn(["swtpm", "socket", "--tpmstate", f"dir={sock.parent}", "--tpm2", "--server",
                    f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl",
                    "--flags", "not-need-init,startup-clear"], log=host.dir / "swtpm.log")
        deadline = time.monotonic() + 10 * slow()
        while not Path(f"{sock}.ctrl").exists():
            if time.monotonic() > deadline:
                raise SptunError(f"{host.name}: swtpm did not start (see {host.dir / 'swtpm.log'})")
            time.sleep(0.02)
        (host.dir / "state").mkdir(mode=0o700, exist_ok=True)
        Tpm2Prover(host.dir / "state", tcti=f"swtpm:path={sock}").provision()
    reference = read_pcrs(lab.clients[0])
    pcrs = "{ " + ", ".join(f'{i} = "{v}"' for i, v in reference.items()) + " }"
    for server in lab.servers:
        enrolled = server.dir / "enrolled"
        enrolled.mkdir(mode=0o700)
        for client in lab.clients:
            shutil.copy(client.dir / "state" / "attestation-key.pem", enrolled / f"{client.name}.pem")
        with open(server.dir / "server.toml", "a") as f:
            f.write(f'\n[attestation]\nrequire = true\nverify = "tpm2"\nenrolled = "{enrolled}"\n'
                    f'pcrs = {pcrs}\nevidence = "tpm2"\n')
    for client in lab.clients:
        enrolled = client.dir / "enrolled-servers"
        enrolled.mkdir(mode=0o700)
        for server in lab.servers:
            shutil.copy(server.dir / "state" / "attestation-key.pem", enrolled / f"{server.name}.pem")
        path = client.dir / "agent.toml"  # a top-level key, before any table
        path.write_text('attestation = "tpm2"\n' + path.read_text() +
                        f'\n[server_attestation]\nrequire = true\nenrolled = "{enrolled}"\npcrs = {pcrs}\n')
    return reference


def tpm2(host: Host, *argv: str) -> str:
    """A tpm2-tools command against the host's own TPM."""
    return host.run(["env", f"TPM2TOOLS_TCTI=swtpm:path={tpm_socket(host)}", *argv])


def read_pcrs(host: Host) -> dict[int, str]:
    out = tpm2(host, "tpm2_pcrread", "sha256:" + ",".join(map(str, ATTESTED_PCRS)))
    values = {int(m.group(1)): m.group(2).lower() for m in re.finditer(r"(\d+)\s*:\s*0x([0-9A-Fa-f]{64})", out)}
    assert sorted(values) == list(ATTESTED_PCRS), out
    return values


def extend_pcr(host: Host, pcr: int = 16) -> None:
    """What a changed boot chain or kernel does to the host's measurements."""
    tpm2(host, "tpm2_pcrextend", f"{pcr}:sha256={'ab' * 32}")


def status(host: Host) -> dict[str, Any]:
    """The host's status, as `sptun status --json` prints it. Asked of the running daemon
    in this process when one answers: what the CLI would print, without the cost of a
    Python start in the lab host (seconds in the VM tier, and the lab polls it)."""
    reply = control_request(host.dir / "state", "status", timeout=30 * slow())
    if reply is not None and reply["ok"]:
        return {**reply["status"], "daemon": True}
    return status_cli(host)


def status_cli(host: Host) -> dict[str, Any]:
    """`sptun status --json` itself, run on the lab host."""
    out = host.run(sptun("status", "--json", "-c", config_path(host)), timeout=30 * slow())
    result: dict[str, Any] = json.loads(out)
    return result


def wait_served(lab: Lab, timeout: float | None = None, expected: dict[str, int] | None = None) -> None:
    """Until every server forwards every client's domain to it: healthy, and in the rotation
    the kernel (or the SNI proxy) holds. expected: how many clients each server (by name)
    should have, if not all. timeout defaults to 120 s (times slow())."""
    if timeout is None:
        timeout = 120 * slow()
    deadline = time.monotonic() + timeout
    expected = expected or {}
    while True:
        counts = {}
        for server in lab.servers:
            try:
                domains = status(server)["domains"]
                counts[server.name] = sum(b["healthy"] and b["in_rotation"] for d in domains for b in d["backends"])
            except (SptunError, ValueError, KeyError):
                counts[server.name] = 0
        want = {server.name: expected.get(server.name, len(lab.clients)) for server in lab.servers}
        if counts == want:
            return
        if time.monotonic() > deadline:
            shown = ", ".join(f"{name}: {n}/{want[name]}" for name, n in counts.items())
            raise SptunError(f"the domain was not served in {timeout:g} s ({shown} backends healthy and in rotation)",
                             hint=f"see the logs in {lab.dir}/*/sptun.log")
        time.sleep(0.5)


@dataclass(frozen=True)
class Hit:
    server: str
    ok: bool
    client: str
    source: str
    subject: str
    error: str


def parse_body(body: str) -> dict[str, str]:
    """The lab page: `client=c1 remote=203.0.113.10`."""
    return dict(part.split("=", 1) for part in body.split() if "=" in part)


def browse(lab: Lab, server: Host, n: int, domain: str = DOMAIN, address: str | None = None) -> list[Hit]:
    """n requests to domain through server (at address, by default its own)."""
    address = address or server.address
    hits = []
    for _ in range(n):
        r = lab.curl(address, domain=domain)
        page = parse_body(r.body)
        hits.append(Hit(address, r.ok, page.get("client", "-"), page.get("remote", "-"), r.subject or "-", r.error))
    return hits


# The demo's clients of the SNI domains (the others join DOMAIN), and each server's second
# public address, where DOMAIN and SNI_DOMAINS share port 443: s1 198.51.100.110, s2 .111.
DEMO_SNI_CLIENTS = {"c3": SNI_DOMAINS[0], "c4": SNI_DOMAINS[1]}
# c5 (DOMAIN's) is on an IPv6-only network. The last server lists its IPv6 address first, so
# the TXT record it publishes announces that one: c5 tunnels to it, over IPv6, and to no other.
DEMO_IPV6_ONLY = 1


def ipv6_first(lab: Lab) -> tuple[str, ...]:
    return (lab.servers[-1].name,)


def reaches(lab: Lab, client: Host, server: Host) -> bool:
    """Whether the client can tunnel to the server: an IPv6-only client (no IPv4 gateway)
    only to a server whose TXT record announces its IPv6 address."""
    return client.spec.gateway is not None or server.name in ipv6_first(lab)


def sni_address(server: Host) -> str:
    a, b, c, d = server.address.split(".")
    return f"{a}.{b}.{c}.{int(d) + 100}"


def show_sni(lab: Lab, console: Console, server: Host) -> bool:
    """Three domains through the server's one SNI address: each answered by a client of its
    own, with that client's certificate, the browser's address seen."""
    address = sni_address(server)
    table = Table("domain", "answering client", "source seen by client", "certificate subject",
                  title=f"three domains through {server.name}'s one address {address}:443, routed by SNI")
    ok = True
    for domain in (DOMAIN, *SNI_DOMAINS):
        mine = [c.name for c in lab.clients if DEMO_SNI_CLIENTS.get(c.name, DOMAIN) == domain]
        for h in browse(lab, server, len(mine), domain, address):
            good = h.ok and h.client in mine and h.source == lab.browser.address and f"OU={h.client}" in h.subject
            table.add_row(domain, h.client if h.ok else f"[red]failed: {h.error}[/]", h.source, h.subject)
            ok = ok and good
    console.print(table)
    console.print(f"{server.name} {address}: " + ("each domain answered by its own clients, with their certificates; "
                                                  "browser address kept" if ok else "[red]SNI routing failed[/]"))
    return ok


def show_ipv6_only(lab: Lab, console: Console) -> bool:
    """Each IPv6-only client's tunnels: WireGuard endpoints over IPv6 only."""
    ok = True
    for client in (c for c in lab.clients if c.spec.gateway is None):
        endpoints = [t["server"] for t in status(client)["tunnels"] if t["healthy"]]
        want = [s.address6 for s in lab.servers if s.address6 and reaches(lab, client, s)]
        good = sorted(endpoints) == sorted(want) and all(":" in e for e in endpoints)
        console.print(f"{client.name} has no IPv4 uplink: it tunnels over IPv6 to "
                      + (", ".join(f"[{e}]:51820" for e in endpoints) or "nothing")
                      + ("" if good else f" [red](expected {want})[/]"))
        ok = ok and good
    return ok


def show_zone(lab: Lab, console: Console) -> bool:
    """The records the servers published for the domains: a TXT record (with pk=) and the
    addresses of each server."""
    ok = True
    for domain in (DOMAIN, *SNI_DOMAINS):
        records = lab.zone_records(domain)
        console.print(f"[bold]{domain}[/], published by the servers (RFC 2136, TSIG):")
        console.print("\n".join(f"  {r}" for r in records), markup=False)
        ok = ok and sum("pk=" in r for r in records) == len(lab.servers)
    return ok


def show_attestation(lab: Lab, console: Console) -> bool:
    """Each server's clients with their verified measurements, and each agent's check of its
    servers; then one client's measurements change while the others are served: it leaves
    every rotation at its next registration, and the others keep serving."""
    ok = True
    for server in lab.servers:
        table = Table("client", "domain", "attested", "measurements (sha256 bank)",
                      title=f"{server.name}: its clients' evidence (tpm2 quotes by enrolled attestation keys)")
        for d in status(server)["domains"]:
            for b in d["backends"]:
                shown = ", ".join(f"{k.split(':')[1]}={v[:16]}…" for k, v in (b.get("measurements") or {}).items())
                table.add_row(b["overlay_ip"], d["name"], "yes" if b.get("attested") else f"[red]no: {b.get('attestation')}[/]",
                              shown)
                ok = ok and bool(b.get("attested"))
        console.print(table)
    for client in lab.clients:
        agent = status(client)
        checked = [t for t in agent["tunnels"] if t["registered"]]
        ok = ok and all(t.get("server_attested") for t in checked)
        console.print(f"{client.name} (attestation key {(agent.get('attestation_key') or '?')[:16]}…) verified "
                      + ", ".join(f"{t['server']}: {'yes' if t.get('server_attested') else 'NO'}" for t in checked))
    victim = lab.clients[0]
    key = status(victim)["public_key"]
    servers = [s for s in lab.servers if reaches(lab, victim, s)]
    extend_pcr(victim)
    started = time.monotonic()
    deadline = started + (REGISTER_EVERY + 10) * slow()
    left: dict[str, float] = {}
    while len(left) < len(servers) and time.monotonic() < deadline:
        for server in servers:
            if server.name not in left and not any(b["public_key"] == key and b["in_rotation"]
                                                   for d in status(server)["domains"] for b in d["backends"]):
                left[server.name] = time.monotonic() - started
        time.sleep(0.2)
    refusals = status(servers[0])["attestation"]["refusals"]
    why = next((r["reason"] for r in reversed(refusals) if r["public_key"] == key), "no refusal recorded")
    console.print(f"{victim.name}'s PCR 16 extended (its boot chain changed): out of "
                  + ", ".join(f"{s.name} after {left[s.name]:.1f} s" for s in servers if s.name in left)
                  + f" (it re-registers every {REGISTER_EVERY:g} s); {servers[0].name} says: {why}")
    ok = ok and len(left) == len(servers)
    for server in servers:
        hits = browse(lab, server, REQUESTS_PER_SERVER)
        served = Counter(h.client for h in hits if h.ok)
        failed = sum(not h.ok for h in hits)
        console.print(f"{server.name}: {len(hits) - failed}/{len(hits)} ok, by " + ", ".join(f"{c}={n}" for c, n in sorted(served.items()))
                      + ("" if victim.name not in served else f" [red]({victim.name} still served)[/]"))
        ok = ok and not failed and victim.name not in served
    return ok


def even(hits: list[Hit], clients: list[str]) -> bool:
    counts = Counter(h.client for h in hits if h.ok)
    return len(hits) % len(clients) == 0 and all(counts[c] == len(hits) // len(clients) for c in clients)


def demo(prefix: str, wireguard: str = "auto", attest: bool = False) -> int:
    console = Console(width=120)
    lab = Lab(prefix, clients=3 + len(DEMO_SNI_CLIENTS), ipv6_only=DEMO_IPV6_ONLY)
    try:
        console.print(f"[bold]building lab {prefix}[/]: DNS (knot), {len(lab.servers)} dual-stack tunnel servers, "
                      f"{len(lab.clients)} clients with nginx ({DEMO_IPV6_ONLY} on an IPv6-only network, the others "
                      "behind IPv4 NAT), a dual-stack browser")
        lab.up()
        lab.allow_updates()  # the servers publish their own records: the zone starts without them
        for server in lab.servers:  # a second public address, shared by three domains
            server.run(["ip", "addr", "add", f"{sni_address(server)}/24", "dev", "eth0"])
        write_configs(lab, wireguard, publish=True, ipv6_first=ipv6_first(lab))
        share_by_sni(lab, DEMO_SNI_CLIENTS, sni_address)
        if attest:
            attest_lab(lab)
        start_daemons(lab)
        started = time.monotonic()
        wait_served(lab, expected={s.name: sum(reaches(lab, c, s) for c in lab.clients) for s in lab.servers})
        console.print(f"served through every server after {time.monotonic() - started:.1f} s")
        ok = show_zone(lab, console)
        ok = show_ipv6_only(lab, console) and ok
        for server in lab.servers:
            names = [c.name for c in lab.clients if c.name not in DEMO_SNI_CLIENTS and reaches(lab, c, server)]  # DOMAIN's
            # Both families: IPv4 first, then IPv6 (a dual-stack browser, the server's AAAA address).
            for address, browser in ((server.address, lab.browser.address), (server.address6, lab.browser.address6)):
                if address is None:
                    continue
                hits = browse(lab, server, REQUESTS_PER_SERVER, address=address)
                table = Table("#", "server", "answering client", "source seen by client", "certificate subject",
                              title=f"{REQUESTS_PER_SERVER} HTTPS requests to {DOMAIN} through {server.name} "
                                    f"({address}: kernel DNAT)")
                for i, h in enumerate(hits, 1):
                    table.add_row(str(i), h.server, h.client if h.ok else f"[red]failed: {h.error}[/]", h.source, h.subject)
                console.print(table)
                counts = Counter(h.client for h in hits if h.ok)
                balanced = even(hits, names)
                failed = sum(not h.ok for h in hits)
                sources_ok = all(h.source == browser for h in hits if h.ok)
                console.print(f"{server.name} {address}: {len(hits) - failed}/{len(hits)} ok; split "
                              + ", ".join(f"{c}={counts[c]}" for c in names)
                              + (" [green](even)[/]" if balanced else " [red](uneven)[/]")
                              + ("; browser address kept" if sources_ok else " [red]; browser address NOT kept[/]"))
                ok = ok and not failed and balanced and sources_ok
        for server in lab.servers:
            ok = show_sni(lab, console, server) and ok
        if attest:
            ok = show_attestation(lab, console) and ok
        console.print("[bold green]demo passed[/]" if ok else "[bold red]demo failed[/]")
        return 0 if ok else 1
    except SptunError as e:
        console.print(f"[red]sptun: {e}[/]")
        for host in lab.servers + lab.clients:
            log = host.dir / "sptun.log"
            if log.exists():
                console.print(f"--- {host.name}: last lines of sptun.log")
                console.print("\n".join(log.read_text(errors="replace").splitlines()[-8:]), markup=False)
        return 1
    finally:
        lab.down()
        console.print(f"lab {prefix} removed")


def main(action: str, prefix: str, wireguard: str = "auto", attest: bool = False) -> int:
    if action == "down":
        destroy(prefix)
        print(f"lab {prefix} removed")
        return 0
    if action == "demo":
        return demo(prefix, wireguard, attest)
    lab = Lab(prefix)
    lab.up()
    try:
        write_configs(lab, wireguard)
        if attest:
            attest_lab(lab)
        start_daemons(lab)
        wait_served(lab)
    except BaseException:
        lab.down()
        raise
    print(f"lab {prefix} is up: https://{DOMAIN} through " + ", ".join(s.address for s in lab.servers))
    print(f"  try:  ip netns exec {lab.browser.netns} curl --cacert {lab.ca_cert} "
          f"--resolve {DOMAIN}:443:{lab.servers[0].address} https://{DOMAIN}/")
    print(f"  state, configs and logs: {lab.dir};  remove with: sptun lab down --prefix {prefix}")
    return 0
