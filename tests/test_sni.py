"""Domains that share an address and port, routed by SNI (sptun.sni): the pure parts (groups,
HAProxy's config, its stats, the runtime commands), and a server role that drives the proxy,
against the fakes (tests/fakes.py's FakeProxy answers as HAProxy 2.6 does). The real proxy,
with real browsers, is tests/test_e2e_sni.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakes import FakeKernel
from sptun import sni
from sptun.config import Port, load_server
from sptun.keys import ensure_private_dir, new_token, write_file_atomic
from sptun.server import Server
from sptun.server.health import Health
from sptun.snapshot import RegistrationCounts

A, B, C = "a.example.test", "b.example.test", "c.example.test"
STAT_HEADER = ("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,"
               "weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,"
               "rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,"
               "hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,"
               "comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,"
               "agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,"
               "agent_health,addr,cookie,mode,algo")


def config(tmp_path: Path, domains: str) -> Path:
    token = tmp_path / "secrets" / "token"
    if not token.exists():
        ensure_private_dir(token.parent)
        write_file_atomic(token, new_token() + "\n")
    path = tmp_path / "server.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n' + domains.replace("TOKEN", str(token)))
    return path


def domain(name: str, listen: str) -> str:
    return f'[[domains]]\nname = "{name}"\nlisten = ["{listen}"]\ntoken_file = "TOKEN"\n'


SHARED = domain(A, "198.51.100.10") + domain(B, "198.51.100.10") + domain(C, "198.51.100.11")


# --- pure ----------------------------------------------------------------------------------------


def test_groups_are_the_shared_tcp_ports_only(tmp_path: Path) -> None:
    cfg = load_server(config(tmp_path, SHARED + f'[[domains]]\nname = "d.example.test"\nlisten = ["198.51.100.10"]\n'
                                                'ports = ["tcp/8443"]\ntoken_file = "TOKEN"\n'))
    assert sni.groups(cfg) == [sni.SniGroup("198.51.100.10", Port("tcp", 443), (A, B))]


def test_the_digest_covers_the_structure_not_who_is_in_rotation() -> None:
    groups = [sni.SniGroup("198.51.100.10", Port("tcp", 443), (A, B))]
    sock = Path("/run/x.sock")
    empty, one = sni.render(groups, {}, sock), sni.render(groups, {"g0_" + A: ["10.99.0.2"]}, sock)
    assert sni.digest_of(empty) == sni.digest_of(one) is not None
    assert "    server c10_99_0_2 10.99.0.2:443" in one and "server" not in empty.replace("stats", "").split("backend", 1)[1]
    other = sni.render([sni.SniGroup("198.51.100.10", Port("tcp", 443), (A, B, C))], {}, sock)
    assert sni.digest_of(other) != sni.digest_of(empty)
    # Routed by SNI only: no default backend (an unknown name is closed), checks by sptun only.
    assert "default_backend" not in one and " check" not in one
    assert f"use_backend g0_{A} if {{ req.ssl_sni -i {A} }}" in one and "usesrc clientip" in one


def stat_line(backend: str, server: str, scur: int, status: str, addr: str, total: int = 0) -> str:
    fields = STAT_HEADER[2:].split(",")
    row = dict.fromkeys(fields, "")
    row.update(pxname=backend, svname=server, scur=str(scur), stot=str(total), status=status, addr=addr)
    return ",".join(row[f] for f in fields)


def test_stats_parse_into_servers_by_backend() -> None:
    text = "\n".join([STAT_HEADER, stat_line("g0_a", "c10_99_0_2", 3, "no check", "10.99.0.2:443"),
                      stat_line("g0_a", "c10_99_0_3", 0, "MAINT", "10.99.0.3:443"),
                      stat_line("g0_a", "BACKEND", 3, "UP", "", total=17),
                      stat_line("g0_b", "c10_99_0_4", 1, "DRAIN", "10.99.0.4:443")]) + "\n"
    assert sni.parse_stat(text) == ({
        "g0_a": {"c10_99_0_2": sni.ProxyServer("10.99.0.2", True, 3), "c10_99_0_3": sni.ProxyServer("10.99.0.3", False, 0)},
        "g0_b": {"c10_99_0_4": sni.ProxyServer("10.99.0.4", False, 1)}}, {"g0_a": 17})


def test_ipv6_servers_parse_without_their_brackets() -> None:
    text = "\n".join([STAT_HEADER, stat_line("g0_a", "c6_fd99__2", 1, "no check", "[fd99::2]:443")]) + "\n"
    assert sni.parse_stat(text)[0] == {"g0_a": {"c6_fd99__2": sni.ProxyServer("fd99::2", True, 1)}}
    assert sni.server_name("fd99::2") == "c6_fd99__2" and sni.server_name("10.99.0.2") == "c10_99_0_2"


def test_rotation_commands_add_enable_retire_and_delete_only_when_idle() -> None:
    current = {"c10_99_0_2": sni.ProxyServer("10.99.0.2", True, 5),  # stays
               "c10_99_0_3": sni.ProxyServer("10.99.0.3", True, 2),  # leaves: maintenance, its connections go on
               "c10_99_0_4": sni.ProxyServer("10.99.0.4", False, 1),  # left, a connection still open: kept
               "c10_99_0_5": sni.ProxyServer("10.99.0.5", False, 0),  # left and idle: deleted
               "c10_99_0_6": sni.ProxyServer("10.99.0.6", False, 0)}  # comes back
    assert sni.rotation_commands("be", 443, current, ["10.99.0.2", "10.99.0.6", "10.99.0.7"]) == [
        "set server be/c10_99_0_6 state ready",
        "add server be/c10_99_0_7 10.99.0.7:443", "enable server be/c10_99_0_7",
        "set server be/c10_99_0_3 state maint",
        "del server be/c10_99_0_5"]
    assert sni.rotation_commands("be", 443, {"c10_99_0_2": sni.ProxyServer("10.99.0.2", True, 0)}, ["10.99.0.2"]) == []


# --- a server role that drives it ---------------------------------------------------------------


def make_server(tmp_path: Path, k: FakeKernel, domains: str = SHARED) -> Server:
    server = Server(load_server(config(tmp_path, domains)), edges=k.edges(), conntrack=lambda: k.connections)
    server.daemon = True
    return server


def healthy(server: Server, key: str, name: str) -> str:
    lease, _ = server.leases.acquire(key, name)
    server.health.by_key[key], server.health.by_key6[key] = Health(up=True), Health(up=True)
    return lease.overlay_ip


def test_a_server_starts_the_proxy_for_shared_addresses_and_dnats_the_rest(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    changes = server.reconcile()
    assert changes[-3:] == [f"load table inet sptun ({C} tcp/443: 0)", str_routing(),
                            "start the SNI proxy (198.51.100.10:443: 2 domains)"]
    assert len(k.proxy_starts) == 1 and f"backend g0_{A}" in k.proxy_config and C not in k.proxy_config
    assert k.local_routes == {sni.PROXY_TABLE} and k.rules[0]["fwmark"] == sni.PROXY_MARK
    assert "socket transparent 1 meta mark set 0x04000000" in k.writes[-1]
    assert server.reconcile() == []  # converged: no restart, no command


def str_routing() -> str:
    return f"add rule fwmark {sni.PROXY_MARK:#x} lookup {sni.PROXY_TABLE}, and a local route there (replies to the SNI proxy)"


def test_the_rotation_changes_through_the_runtime_api_without_a_reload(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    ip = healthy(server, "A" * 43 + "=", A)
    # One that joins first loses its stale unanswered connections (their ports come round
    # again, and a reuse would look like a retransmission to the passive check).
    assert server.reconcile()[-2:] == [f"release the unanswered connections to {ip}",
                                       f"SNI proxy: add server g0_{A}/c{ip.replace('.', '_')} {ip}:443; "
                                       f"enable server g0_{A}/c{ip.replace('.', '_')}"]
    assert k.released == [ip]
    assert len(k.proxy_starts) == 1 and k.proxy_servers[f"g0_{A}"]["c" + ip.replace(".", "_")].ready
    status = server.status_of(server.make_view(), {}, None, RegistrationCounts(0, {}))
    (backend,) = next(d for d in status.domains if d.name == A).backends
    assert backend.in_rotation
    # Down, with a connection open: out of rotation, kept until it is idle, then deleted.
    name = "c" + ip.replace(".", "_")
    k.proxy_servers[f"g0_{A}"][name] = sni.ProxyServer(ip, True, 1)
    server.health.by_key["A" * 43 + "="] = Health(up=False)
    assert server.reconcile() == [f"SNI proxy: set server g0_{A}/{name} state maint",
                                  f"release the unanswered connections to {ip}"]
    assert server.reconcile() == [] and k.released == [ip, ip]
    k.proxy_servers[f"g0_{A}"][name] = sni.ProxyServer(ip, False, 0)
    assert server.reconcile() == [f"SNI proxy: del server g0_{A}/{name}"]
    assert len(k.proxy_starts) == 1  # never a reload


def test_a_restarted_server_adopts_the_proxy_and_its_rotation(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    ip = healthy(server, "A" * 43 + "=", A)
    server.store.save(server.leases)
    server.reconcile()
    again = make_server(tmp_path, k)
    assert again.reconcile() == []  # nobody taken out of the proxy's rotation while checks start
    assert again.health.is_up("A" * 43 + "=") and k.proxy_servers[f"g0_{A}"]["c" + ip.replace(".", "_")].ready


def test_a_new_structure_reloads_the_proxy_with_the_rotation_in_its_config(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    ip = healthy(server, "A" * 43 + "=", A)
    server.reconcile()
    pid = k.proxy_pid
    server.cfg = load_server(config(tmp_path, SHARED.replace("198.51.100.11", "198.51.100.10")))  # c shares too
    assert server.reconcile()[-1] == "reload the SNI proxy (198.51.100.10:443: 3 domains)"
    assert k.proxy_pid != pid and f"server c{ip.replace('.', '_')} {ip}:443" in k.proxy_config
    assert server.reconcile() == []


def test_unsharing_stops_the_proxy_and_down_removes_everything(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    server.cfg = load_server(config(tmp_path, SHARED.replace('listen = ["198.51.100.10"]\ntoken_file = "TOKEN"\n'
                                                             '[[domains]]\nname = "b', 'listen = ["198.51.100.12"]\n'
                                                             'token_file = "TOKEN"\n[[domains]]\nname = "b')))
    assert sni.groups(server.cfg) == []
    changes = server.reconcile()
    assert "stop the SNI proxy" in changes and k.proxy_pid is None and k.local_routes == set() and k.rules == []
    server.cfg = load_server(config(tmp_path, SHARED))
    server.reconcile()
    assert k.proxy_pid is not None
    assert server.teardown()[:3] == ["stop the SNI proxy", "delete table inet sptun",
                                     f"delete rule fwmark {sni.PROXY_MARK:#x} lookup {sni.PROXY_TABLE}, and its table"]
    assert k.proxy_pid is None and k.local_routes == set() and k.rules == [] and k.table is None


@pytest.mark.parametrize("shared", ['ports = ["udp/443"]'])
def test_a_shared_udp_port_is_a_config_error(tmp_path: Path, shared: str) -> None:
    from sptun.errors import ConfigError
    with pytest.raises(ConfigError, match="udp/443"):
        load_server(config(tmp_path, domain(A, "198.51.100.10") + shared + "\n" + domain(B, "198.51.100.10") + shared))


def test_an_ipv6_address_is_shared_by_sni_with_upstreams_in_the_ipv6_overlay(tmp_path: Path) -> None:
    """HAProxy 2.6's spelling (checked with haproxy -c): bind [2001:db8::10]:443, source [::]
    usesrc clientip; the servers are the clients' IPv6 twins; replies come back by a rule
    and a local route of each family."""
    k = FakeKernel()
    server = make_server(tmp_path, k, 'overlay6 = "fd99::/64"\n' + domain(A, "2001:db8::10") + domain(B, "2001:db8::10"))
    changes = server.reconcile()
    assert f"{str_routing()} (IPv4 and IPv6)" in changes
    assert "    bind [2001:db8::10]:443" in k.proxy_config and "    source [::] usesrc clientip" in k.proxy_config
    assert k.local_routes == k.local_routes6 == {sni.PROXY_TABLE}
    assert sorted(r["src"] for r in k.rules) == ["0.0.0.0/0", "::/0"]
    ip = healthy(server, "A" * 43 + "=", A)
    assert server.reconcile()[-1] == f"SNI proxy: add server g0_{A}/c6_fd99__2 fd99::2:443; enable server g0_{A}/c6_fd99__2"
    assert ip == "10.99.0.2"
    status = server.status_of(server.make_view(), {}, None, RegistrationCounts(0, {}))
    (backend,) = next(d for d in status.domains if d.name == A).backends
    assert backend.in_rotation and backend.overlay_ip6 == "fd99::2"  # the proxy's IPv6 server is this lease
    assert server.reconcile() == []
