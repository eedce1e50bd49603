"""`sptun export`: a live interface as a wg-quick config (wgconfig). The renderer is pure; the
I/O around it runs here against fake links and a fake WireGuard backend, so nothing needs root."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from test_cli_unit import one_error_line, sptun
from wgconfig import WGConfig

from sptun import cli
from sptun import export as export_mod
from sptun.config import AgentConfig, ServerConfig
from sptun.errors import SptunError, UsageError
from sptun.export import LEFT_OUT, export, pick_interface, render
from sptun.keys import generate_private_key, load_or_create_private_key, load_private_key, public_key
from sptun.links import LinkInfo
from sptun.wg import Device, Peer, PeerState

PRIVATE = generate_private_key()
OWN = public_key(PRIVATE)
ROAMING = public_key(generate_private_key())  # a server's client: no endpoint known, no keepalive
PINNED = public_key(generate_private_key())
DEVICE = Device(OWN, 51820, {
    ROAMING: PeerState(Peer(ROAMING, ("10.99.0.2/32",)), last_handshake=1.0e9, rx_bytes=10, tx_bytes=20),
    PINNED: PeerState(Peer(PINNED, ("10.99.0.3/32", "fd99::3/128"), "[2001:db8::7]:40123", 25)),
})


def parse(text: str) -> WGConfig:
    conf = WGConfig()
    conf.read_from_fileobj(io.StringIO(text))
    return conf


# --- the renderer -------------------------------------------------------------------------------


def test_render_round_trips_through_wgconfig() -> None:
    text = render("sptun0", DEVICE, ["10.99.0.1/16"], 1420)
    conf = parse(text)
    assert conf.get_interface() == {"ListenPort": 51820, "Address": "10.99.0.1/16", "MTU": 1420}
    assert sorted(conf.get_peers()) == sorted([ROAMING, PINNED])
    assert conf.get_peer(ROAMING) == {"PublicKey": ROAMING, "AllowedIPs": "10.99.0.2/32"}
    assert conf.get_peer(PINNED) == {"PublicKey": PINNED, "AllowedIPs": ["10.99.0.3/32", "fd99::3/128"],
                                     "Endpoint": "[2001:db8::7]:40123", "PersistentKeepalive": 25}
    assert text.startswith("# sptun0")
    assert text == render("sptun0", DEVICE, ["10.99.0.1/16"], 1420)  # deterministic


def test_render_leaves_out_what_is_unset() -> None:
    quiet = Device(OWN, 0, {ROAMING: PeerState(Peer(ROAMING, ()))})
    conf = parse(render("sptun-0a000001", quiet, ["10.99.0.2/32", "10.99.0.9/32"], None))
    assert conf.get_interface() == {"Address": ["10.99.0.2/32", "10.99.0.9/32"]}
    assert conf.get_peer(ROAMING) == {"PublicKey": ROAMING}
    empty = render("sptun0", Device(), [], None)
    assert parse(empty).get_interface() == {} and parse(empty).get_peers() == []
    assert LEFT_OUT in empty


def test_private_key_only_when_asked() -> None:
    without = render("sptun0", DEVICE, ["10.99.0.1/16"], 1420)
    assert PRIVATE not in without
    assert "PrivateKey" not in parse(without).get_interface()
    assert LEFT_OUT in without.splitlines()
    assert "sptun export --private" in without

    with_key = render("sptun0", DEVICE, ["10.99.0.1/16"], 1420, private_key=PRIVATE)
    assert parse(with_key).get_interface()["PrivateKey"] == PRIVATE
    assert LEFT_OUT not in with_key
    assert with_key.count(PRIVATE) == 1


def test_render_is_linear_in_peers() -> None:
    """wgconfig re-parses on every add: built naively, a server's 10k peers took minutes."""
    keys = [public_key(generate_private_key()) for _ in range(3000)]
    device = Device(OWN, 51820, {k: PeerState(Peer(k, (f"10.99.{i // 250}.{i % 250 + 2}/32",))) for i, k in enumerate(keys)})
    start = time.monotonic()
    conf = parse(render("sptun0", device, ["10.99.0.1/16"], 1420))
    assert time.monotonic() - start < 10
    assert sorted(conf.get_peers()) == sorted(keys)


# --- which interface ----------------------------------------------------------------------------

SERVER = ServerConfig(Path("/etc/sptun/server.toml"), interface="sptun7")
AGENT = AgentConfig(Path("/etc/sptun/agent.toml"), "app.example.test")


def test_pick_interface_server() -> None:
    assert pick_interface(SERVER, None, []) == "sptun7"
    assert pick_interface(SERVER, "sptun7", []) == "sptun7"
    with pytest.raises(UsageError, match="sptun0 is not the interface of /etc/sptun/server.toml"):
        pick_interface(SERVER, "sptun0", [])


def test_pick_interface_agent() -> None:
    assert pick_interface(AGENT, None, ["sptun-c6336401"]) == "sptun-c6336401"
    assert pick_interface(AGENT, "sptun-c6336402", ["sptun-c6336401"]) == "sptun-c6336402"  # checked later: exists?
    with pytest.raises(UsageError) as info:
        pick_interface(AGENT, None, ["sptun-c6336401", "sptun-c6336402"])
    assert "sptun-c6336401" in info.value.message and "sptun-c6336402" in info.value.message
    assert info.value.exit_code == 2 and "INTERFACE" in info.value.hint
    with pytest.raises(SptunError) as gone:
        pick_interface(AGENT, None, [])
    assert gone.value.exit_code == 1 and "sptun up" in gone.value.hint
    for bad in ("eth0", "sptun-a/../b", "sptun-0123456789abcdef"):
        with pytest.raises(UsageError):
            pick_interface(AGENT, bad, ["sptun-c6336401"])


# --- the I/O around it, against fakes -----------------------------------------------------------


class FakeLinks:
    def __init__(self, links: dict[str, tuple[str, int, list[str]]]) -> None:
        self.links = links  # name: (kind, mtu, addresses)
        self.closed = False

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.links if n.startswith(prefix))

    def info(self, name: str) -> LinkInfo | None:
        if name not in self.links:
            return None
        kind, mtu, _ = self.links[name]
        return LinkInfo(list(self.links).index(name) + 10, kind, True, mtu)

    def addresses(self, index: int) -> list[str]:
        return list(self.links.values())[index - 10][2]

    def close(self) -> None:
        self.closed = True


class FakeWireGuard:
    kind = "kernel"

    def __init__(self, links: FakeLinks, devices: dict[str, Device]) -> None:
        self.links, self.devices = links, devices

    def is_ours(self, ifname: str) -> bool:
        info = self.links.info(ifname)
        return info is not None and info.kind == "wireguard"

    def device(self, ifname: str) -> Device:
        return self.devices[ifname]


def fake_host(monkeypatch: pytest.MonkeyPatch, links: dict[str, tuple[str, int, list[str]]],
              devices: dict[str, Device]) -> FakeLinks:
    fake = FakeLinks(links)
    monkeypatch.setattr(export_mod, "Links", lambda: fake)
    monkeypatch.setattr(export_mod, "backend", lambda mode, links: FakeWireGuard(fake, devices))
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)  # cli.main's, in process: would outlive the test
    return fake


def test_export_reads_the_live_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = fake_host(monkeypatch, {"sptun0": ("wireguard", 1420, ["10.99.0.1/16"])}, {"sptun0": DEVICE})
    cfg = ServerConfig(tmp_path / "server.toml", state_dir=tmp_path / "state")
    text = export(cfg)
    assert text == render("sptun0", DEVICE, ["10.99.0.1/16"], 1420)
    assert fake.closed
    assert not cfg.state_dir.exists()  # without --private, the state dir is not even looked at


def test_export_private_reads_the_state_dir_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_host(monkeypatch, {"sptun-c6336401": ("wireguard", 1420, ["10.99.0.2/32"]), "eth0": ("veth", 1500, [])},
              {"sptun-c6336401": DEVICE})
    cfg = AgentConfig(tmp_path / "agent.toml", "app.example.test", state_dir=tmp_path / "state")
    with pytest.raises(SptunError, match="no private key at"):
        export(cfg, private=True)
    assert not cfg.state_dir.exists()

    assert load_or_create_private_key(cfg.state_dir) != PRIVATE  # another key than the interface's
    mode = (cfg.state_dir / "private.key").stat().st_mode
    with pytest.raises(SptunError) as info:
        export(cfg, private=True)
    assert "not the one sptun-c6336401 runs with" in info.value.message
    assert PRIVATE not in str(info.value) and (cfg.state_dir / "private.key").read_text().strip() not in str(info.value)

    (cfg.state_dir / "private.key").write_text(PRIVATE + "\n")
    text = export(cfg, "sptun-c6336401", private=True)
    assert parse(text).get_interface()["PrivateKey"] == PRIVATE
    assert PRIVATE not in export(cfg)
    assert (cfg.state_dir / "private.key").stat().st_mode == mode


def test_export_missing_or_foreign_interface(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = fake_host(monkeypatch, {"sptun0": ("veth", 1500, [])}, {})
    with pytest.raises(SptunError) as info:
        export(ServerConfig(tmp_path / "server.toml", interface="sptun1"))
    assert (info.value.message, info.value.hint, info.value.exit_code) == (
        "interface sptun1 does not exist here", "is sptun up?", 1)
    assert fake.closed
    with pytest.raises(SptunError, match="sptun0 is not a WireGuard device"):
        export(ServerConfig(tmp_path / "server.toml"))


# --- keys: reading never creates --------------------------------------------------------------


def test_load_private_key_only_reads(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert load_private_key(state) is None
    assert not state.exists()
    key = load_or_create_private_key(state)
    assert load_private_key(state) == key == load_or_create_private_key(state)
    (state / "private.key").write_text("not a key\n")
    with pytest.raises(SptunError, match="does not hold a WireGuard private key"):
        load_private_key(state)
    (state / "private.key").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SptunError, match="does not hold a WireGuard private key"):
        load_private_key(state)


# --- the command line -------------------------------------------------------------------------


def server_toml(tmp_path: Path, interface: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'interface = "{interface}"\nstate_dir = "{tmp_path / "state"}"\n')
    return path


@pytest.mark.parametrize("private", [False, True])
def test_cli_missing_interface(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               tmp_path: Path, private: bool) -> None:
    """In process, as if root: one `sptun:` line, exit 1, and no state dir made."""
    fake_host(monkeypatch, {}, {})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    code = cli.main(["export", "-c", str(server_toml(tmp_path, "sptun0")), *(["--private"] if private else [])])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err == "sptun: interface sptun0 does not exist here (hint: is sptun up?)\n"
    assert not (tmp_path / "state").exists()


def test_cli_export_subprocess(tmp_path: Path) -> None:
    """As a user runs it. As root it reads this host's (real) links; otherwise it needs root."""
    name = f"sptunx{os.getpid() % 100000}"
    proc = sptun("export", "-c", str(server_toml(tmp_path, name)))
    line = one_error_line(proc, 1)
    assert proc.stdout == ""
    assert (f"interface {name} does not exist here" if os.geteuid() == 0 else "needs root") in line
    assert "(hint: " in line
    assert not (tmp_path / "state").exists()


def test_cli_export_usage(tmp_path: Path) -> None:
    proc = sptun("export", "--help")
    assert proc.returncode == 0 and "--private" in proc.stdout and "INTERFACE" in proc.stdout.upper()
    assert "export" in sptun("--help").stdout
    one_error_line(sptun("export", "a", "b"), 2)


def test_cli_prints_the_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               tmp_path: Path) -> None:
    fake_host(monkeypatch, {"sptun0": ("wireguard", 1420, ["10.99.0.1/16"])}, {"sptun0": DEVICE})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["export", "-c", str(server_toml(tmp_path, "sptun0"))]) == 0
    out, err = capsys.readouterr()
    assert out == render("sptun0", DEVICE, ["10.99.0.1/16"], 1420) and err == ""
    assert PRIVATE not in out


def test_an_agent_tunnel_exports_with_table_off() -> None:
    """Its peer allows 0.0.0.0/0: without `Table = off`, `wg-quick up` would route the host through it."""
    agent = render("sptun-0a000001", DEVICE, ["10.99.0.2/32"], 1420, own_routing=True)
    assert parse(agent).interface["Table"] == "off"
    assert "Table" not in parse(render("sptun0", DEVICE, ["10.99.0.1/16"], 1420)).interface
