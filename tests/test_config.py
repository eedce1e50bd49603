"""sptun.config: the contract's TOML files, their defaults, and one clear error for every mistake."""

from __future__ import annotations

import ipaddress
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from textwrap import dedent

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sptun import config
from sptun.config import AgentConfig, Domain, Port, ServerConfig, load, load_agent, load_server
from sptun.errors import ConfigError

# The examples of CONTRACT.md, verbatim (comments included).
SERVER_EXAMPLE = """\
interface = "sptun0"            # the server's WireGuard interface
listen_port = 51820             # WireGuard, UDP
api_port = 51821                # registration, TCP
overlay = "10.99.0.0/16"        # the server takes the first address; clients lease the rest
state_dir = "/var/lib/sptun"    # keys and leases; created 0700
wireguard = "auto"              # auto | kernel | userspace

[[domains]]
name = "app.example.test"
listen = ["198.51.100.10"]      # public addresses to forward; omitted = any local address
ports = ["tcp/443"]             # also "udp/443", "tcp/80", ...
token_file = "/etc/sptun/tokens/app.example.test"
"""

AGENT_EXAMPLE = """\
domain = "app.example.test"
token_file = "/etc/sptun/token"
ports = ["tcp/443"]             # local service; the agent registers only while it is listening
nameservers = ["192.0.2.53"]    # optional; default: the system resolver
realm = "superprotocol"         # optional
state_dir = "/var/lib/sptun"
wireguard = "auto"
"""

DOMAIN = '[[domains]]\nname = "app.example.test"\n'


def write(tmp_path: Path, text: str, name: str = "sptun.toml") -> Path:
    path = tmp_path / name
    path.write_text(dedent(text))
    return path


def config_error(loader: Callable[[Path], object], path: Path | None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loader(path)  # type: ignore[arg-type]  # load(None) too
    return info.value


def assert_clear(error: ConfigError, path: Path, key: str) -> None:
    """One line that names the file and the key, a hint with the fix, exit code 2."""
    assert error.exit_code == 2
    assert str(path) in error.message
    assert key in error.message, error.message
    assert error.hint, "no hint"
    assert "\n" not in str(error)


# --- the contract's examples and the defaults -------------------------------------------------


def test_server_example_loads_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, SERVER_EXAMPLE)
    assert load_server(path) == ServerConfig(
        path=path,
        interface="sptun0",
        listen_port=51820,
        api_port=51821,
        overlay=ipaddress.IPv4Network("10.99.0.0/16"),
        state_dir=Path("/var/lib/sptun"),
        wireguard="auto",
        domains=(Domain("app.example.test", (ipaddress.IPv4Address("198.51.100.10"),), (Port("tcp", 443),),
                        Path("/etc/sptun/tokens/app.example.test")),),
    )


def test_an_ipv6_overlay_mirrors_each_ipv4_lease(tmp_path: Path) -> None:
    cfg = load_server(write(tmp_path, 'overlay = "10.7.0.0/24"\noverlay6 = "fd99:7::/120"\n' + DOMAIN +
                            'listen = ["198.51.100.10", "2001:db8::10"]\n'))
    assert cfg.families == (4, 6) and cfg.server_ip6 == ipaddress.IPv6Address("fd99:7::1")
    assert cfg.domains[0].listen == (ipaddress.IPv4Address("198.51.100.10"), ipaddress.IPv6Address("2001:db8::10"))
    assert cfg.ip6_of("10.7.0.2") == "fd99:7::2" and cfg.ip6_of("10.7.0.255") == "fd99:7::ff"
    assert cfg.ip4_of("fd99:7::2") == "10.7.0.2" and cfg.ip4_of("fd99:7::1:0") is None  # outside the mirror
    v4 = load_server(write(tmp_path, DOMAIN, "v4.toml"))
    assert v4.families == (4,) and v4.overlay6 is None and v4.ip6_of("10.99.0.2") is None


def test_server_ip_is_the_first_overlay_address(tmp_path: Path) -> None:
    cfg = load_server(write(tmp_path, 'overlay = "10.7.0.0/24"\n'))
    assert cfg.server_ip == ipaddress.IPv4Address("10.7.0.1")
    assert cfg.role == "server"


def test_agent_example_loads_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, AGENT_EXAMPLE)
    assert load_agent(path) == AgentConfig(
        path=path,
        domain="app.example.test",
        token_file=Path("/etc/sptun/token"),
        ports=(Port("tcp", 443),),
        nameservers=("192.0.2.53",),
        realm="superprotocol",
        state_dir=Path("/var/lib/sptun"),
        wireguard="auto",
        keepalive=15,
    )


def test_server_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    cfg = load_server(path)
    assert cfg == ServerConfig(path)
    assert (cfg.interface, cfg.listen_port, cfg.api_port, str(cfg.overlay), cfg.state_dir, cfg.wireguard, cfg.domains) == (
        "sptun0", 51820, 51821, "10.99.0.0/16", Path("/var/lib/sptun"), "auto", ())


def test_the_examples_health_block_is_the_defaults(tmp_path: Path) -> None:
    """examples/server.toml documents [health] commented out: uncommented, it changes nothing."""
    example = (Path(__file__).parent.parent / "examples" / "server.toml").read_text()
    block = example[example.index("#[health]"):]
    text = "\n".join(line.removeprefix("#") for line in block.splitlines())
    health = load_server(write(tmp_path, text)).health
    assert health == config.HealthConfig() == load_server(write(tmp_path, "")).health
    assert health.interval + health.fall * health.timeout <= 2.5  # what the README promises for a dead client


def test_domain_defaults(tmp_path: Path) -> None:
    cfg = load_server(write(tmp_path, DOMAIN))
    assert cfg.domains == (Domain("app.example.test", (), (Port("tcp", 443),), Path("/etc/sptun/tokens/app.example.test")),)
    assert cfg.domain("app.example.test") is cfg.domains[0]
    assert cfg.domain("other.example.test") is None


def test_agent_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, 'domain = "app.example.test"\n')
    cfg = load_agent(path)
    assert cfg == AgentConfig(path, "app.example.test")
    assert (cfg.token_file, cfg.ports, cfg.nameservers, cfg.realm, cfg.state_dir, cfg.wireguard, cfg.keepalive) == (
        Path("/etc/sptun/token"), (Port("tcp", 443),), (), "superprotocol", Path("/var/lib/sptun"), "auto", 15)
    assert cfg.role == "agent"


def test_values_are_normalised(tmp_path: Path) -> None:
    cfg = load_server(write(tmp_path, """\
        [[domains]]
        name = "App.Example.TEST."
        listen = ["198.51.100.10", "203.0.113.7"]
        ports = [" TCP/443 ", "udp/443", "tcp/80"]
        """))
    (d,) = cfg.domains
    assert d.name == "app.example.test"
    assert d.listen == (ipaddress.IPv4Address("198.51.100.10"), ipaddress.IPv4Address("203.0.113.7"))
    assert d.ports == (Port("tcp", 443), Port("udp", 443), Port("tcp", 80))
    assert [str(p) for p in d.ports] == ["tcp/443", "udp/443", "tcp/80"]


@pytest.mark.parametrize("mode", ["auto", "kernel", "userspace"])
def test_wireguard_modes(tmp_path: Path, mode: str) -> None:
    assert load_server(write(tmp_path, f'wireguard = "{mode}"\n')).wireguard == mode
    assert load_agent(write(tmp_path, f'domain = "a.test"\nwireguard = "{mode}"\n')).wireguard == mode


@pytest.mark.parametrize("keepalive", [1, 25, 3600])
def test_agent_keepalive_range(tmp_path: Path, keepalive: int) -> None:
    assert load_agent(write(tmp_path, f'domain = "a.test"\nkeepalive = {keepalive}\n')).keepalive == keepalive


@pytest.mark.parametrize("overlay", ["10.99.0.0/29", "10.0.0.0/8", "192.168.4.0/24"])
def test_overlay_sizes_that_work(tmp_path: Path, overlay: str) -> None:
    assert str(load_server(write(tmp_path, f'overlay = "{overlay}"\n')).overlay) == overlay


# --- domains that may and may not share an address and port -------------------------------------


def two_domains(first: str, second: str) -> str:
    return f'[[domains]]\nname = "a.example.test"\n{first}\n[[domains]]\nname = "b.example.test"\n{second}\n'


@pytest.mark.parametrize("first, second", [
    ('listen = ["198.51.100.10"]\nports = ["tcp/443"]', 'listen = ["198.51.100.10"]\nports = ["tcp/80"]'),
    ('listen = ["198.51.100.10"]', 'listen = ["198.51.100.11"]'),
    ('ports = ["tcp/443"]', 'ports = ["tcp/80"]'),
    ('ports = ["tcp/443"]', 'ports = ["udp/443"]'),
    ('listen = ["198.51.100.10"]\nports = ["tcp/443"]', 'ports = ["tcp/8443"]'),
    ('listen = ["198.51.100.10"]', 'listen = ["198.51.100.10"]'),
    ('listen = ["198.51.100.10", "198.51.100.11"]\nports = ["tcp/80", "tcp/443"]',
     'listen = ["198.51.100.11"]\nports = ["tcp/443"]'),
    ('', ''),
], ids=["same-address-other-port", "other-address-same-port", "any-address-other-ports",
        "any-address-tcp-vs-udp", "any-and-specific-other-ports", "shared-by-sni", "shared-in-lists-by-sni",
        "shared-any-address-by-sni"])
def test_domains_that_do_not_clash(tmp_path: Path, first: str, second: str) -> None:
    cfg = load_server(write(tmp_path, two_domains(first, second)))
    assert [d.name for d in cfg.domains] == ["a.example.test", "b.example.test"]


@pytest.mark.parametrize("first, second, shown, hint", [
    ('', 'listen = ["198.51.100.10"]', "any address", "same listen addresses"),
    ('listen = ["198.51.100.10"]', '', "any address", "same listen addresses"),
    ('listen = ["198.51.100.10"]\nports = ["udp/443"]', 'listen = ["198.51.100.10"]\nports = ["udp/443"]',
     "198.51.100.10", "UDP port cannot be shared"),
    ('ports = ["tcp/443", "udp/443"]', 'ports = ["udp/443"]', "any address", "UDP port cannot be shared"),
], ids=["any-then-specific", "specific-then-any", "udp-shared", "udp-shared-any-address"])
def test_domains_that_clash(tmp_path: Path, first: str, second: str, shown: str, hint: str) -> None:
    path = write(tmp_path, two_domains(first, second))
    error = config_error(load_server, path)
    assert_clear(error, path, "domains[1]")
    assert "a.example.test" in error.message and "b.example.test" in error.message
    assert shown in error.message and hint in (error.hint or "")


def test_sni_sharing_of_any_address_on_a_dual_stack_server_is_refused_for_now(tmp_path: Path) -> None:
    path = write(tmp_path, 'overlay6 = "fd99::/64"\n' + two_domains("", ""))
    error = config_error(load_server, path)
    assert "dual-stack" in error.message and error.hint and "\n" not in str(error)
    shared6 = 'overlay6 = "fd99::/64"\n' + two_domains('listen = ["2001:db8::10"]', 'listen = ["2001:db8::10"]')
    assert len(load_server(write(tmp_path, shared6, "six.toml")).domains) == 2  # an IPv6 address: routed by SNI


def test_duplicate_domain_names(tmp_path: Path) -> None:
    path = write(tmp_path, two_domains('listen = ["198.51.100.10"]', 'listen = ["198.51.100.11"]').replace(
        "b.example.test", "A.example.test."))
    error = config_error(load_server, path)
    assert_clear(error, path, "domains[1].name")
    assert "twice" in error.message


# --- every invalid server file --------------------------------------------------------------------

SERVER_ERRORS = [
    # (id, file, the key the message must name)
    ("unknown-top-key", "interfaces = \"sptun0\"\n", "interfaces"),
    ("unknown-domain-key", DOMAIN + "port = 443\n", "domains[0].port"),
    ("unknown-domain-key-second", DOMAIN + '[[domains]]\nname = "b.test"\nlisten_on = []\n', "domains[1].listen_on"),
    ("port-string", 'listen_port = "51820"\n', "listen_port"),
    ("port-bool", "listen_port = true\n", "listen_port"),
    ("port-float", "api_port = 51821.0\n", "api_port"),
    ("port-zero", "listen_port = 0\n", "listen_port"),
    ("port-negative", "api_port = -1\n", "api_port"),
    ("port-too-big", "api_port = 65536\n", "api_port"),
    ("interface-type", "interface = 0\n", "interface"),
    ("interface-too-long", 'interface = "sptun0123456789ab"\n', "interface"),
    ("interface-slash", 'interface = "a/b"\n', "interface"),
    ("interface-empty", 'interface = ""\n', "interface"),
    ("overlay-garbage", 'overlay = "ten.99/16"\n', "overlay"),
    ("overlay-host-bits", 'overlay = "10.99.0.1/16"\n', "overlay"),
    ("overlay-too-small", 'overlay = "10.99.0.0/30"\n', "overlay"),
    ("overlay-single", 'overlay = "10.99.0.1/32"\n', "overlay"),
    ("overlay-ipv6", 'overlay = "fd00::/64"\n', "overlay"),
    ("overlay-type", "overlay = [\"10.99.0.0/16\"]\n", "overlay"),
    ("state-dir-relative", 'state_dir = "var/lib/sptun"\n', "state_dir"),
    ("state-dir-type", "state_dir = 1\n", "state_dir"),
    ("wireguard-mode", 'wireguard = "boringtun"\n', "wireguard"),
    ("wireguard-type", "wireguard = true\n", "wireguard"),
    ("domains-not-list", 'domains = "app.example.test"\n', "domains"),
    ("domains-entry-not-table", "domains = [1]\n", "domains"),
    ("domain-no-name", '[[domains]]\nports = ["tcp/443"]\n', "domains[0].name"),
    ("domain-name-type", "[[domains]]\nname = 5\n", "domains[0].name"),
    ("domain-name-empty", '[[domains]]\nname = ""\n', "domains[0].name"),
    ("domain-name-space", '[[domains]]\nname = "app example.test"\n', "domains[0].name"),
    ("domain-name-underscore", '[[domains]]\nname = "app_1.example.test"\n', "domains[0].name"),
    ("domain-name-leading-dash", '[[domains]]\nname = "-app.example.test"\n', "domains[0].name"),
    ("domain-name-empty-label", '[[domains]]\nname = "app..example.test"\n', "domains[0].name"),
    ("domain-name-long-label", f'[[domains]]\nname = "{"a" * 64}.test"\n', "domains[0].name"),
    ("domain-name-too-long", f'[[domains]]\nname = "{".".join(["a" * 63] * 4)}"\n', "domains[0].name"),
    ("domain-name-ip-port", '[[domains]]\nname = "198.51.100.10:443"\n', "domains[0].name"),
    ("listen-string", DOMAIN + 'listen = "198.51.100.10"\n', "domains[0].listen"),
    ("listen-ipv6-without-overlay6", DOMAIN + 'listen = ["2001:db8::1"]\n', "domains[0].listen"),
    ("listen-in-overlay6", 'overlay6 = "fd99::/64"\n' + DOMAIN + 'listen = ["fd99::5"]\n', "domains[0].listen"),
    ("listen-link-local", 'overlay6 = "fd99::/64"\n' + DOMAIN + 'listen = ["fe80::1"]\n', "domains[0].listen"),
    ("listen-v4-mapped", 'overlay6 = "fd99::/64"\n' + DOMAIN + 'listen = ["::ffff:198.51.100.1"]\n', "domains[0].listen"),
    ("overlay6-garbage", 'overlay6 = "fd99::/ab"\n', "overlay6"),
    ("overlay6-ipv4", 'overlay6 = "10.98.0.0/16"\n', "overlay6"),
    ("overlay6-host-bits", 'overlay6 = "fd99::1/64"\n', "overlay6"),
    ("overlay6-smaller-than-overlay", 'overlay6 = "fd99::/113"\n', "overlay6"),
    ("overlay6-multicast", 'overlay6 = "ff05::/64"\n', "overlay6"),
    ("overlay6-type", "overlay6 = 64\n", "overlay6"),
    ("listen-garbage", DOMAIN + 'listen = ["example.test"]\n', "domains[0].listen"),
    ("listen-cidr", DOMAIN + 'listen = ["198.51.100.0/24"]\n', "domains[0].listen"),
    ("listen-int", DOMAIN + "listen = [3325256714]\n", "domains[0].listen"),
    ("listen-in-overlay", DOMAIN + 'listen = ["10.99.3.4"]\n', "domains[0].listen"),
    ("listen-in-custom-overlay", 'overlay = "192.168.0.0/16"\n' + DOMAIN + 'listen = ["192.168.1.1"]\n', "domains[0].listen"),
    ("ports-string", DOMAIN + 'ports = "tcp/443"\n', "domains[0].ports"),
    ("ports-empty", DOMAIN + "ports = []\n", "domains[0].ports"),
    ("ports-not-a-number", DOMAIN + 'ports = ["tcp/abc"]\n', "domains[0].ports"),
    ("ports-sctp", DOMAIN + 'ports = ["sctp/1"]\n', "domains[0].ports"),
    ("ports-bare-number", DOMAIN + 'ports = ["443"]\n', "domains[0].ports"),
    ("ports-int", DOMAIN + "ports = [443]\n", "domains[0].ports"),
    ("ports-zero", DOMAIN + 'ports = ["tcp/0"]\n', "domains[0].ports"),
    ("ports-too-big", DOMAIN + 'ports = ["udp/65536"]\n', "domains[0].ports"),
    ("ports-range", DOMAIN + 'ports = ["tcp/80-90"]\n', "domains[0].ports"),
    ("ports-duplicate", DOMAIN + 'ports = ["tcp/443", "udp/443", "TCP/443"]\n', "domains[0].ports"),
    ("token-file-relative", DOMAIN + 'token_file = "tokens/app"\n', "domains[0].token_file"),
    ("token-file-tilde", DOMAIN + 'token_file = "~/token"\n', "domains[0].token_file"),
    ("token-file-type", DOMAIN + "token_file = true\n", "domains[0].token_file"),
    ("health-not-table", "health = 1\n", "health"),
    ("health-interval-zero", "[health]\ninterval = 0\n", "health.interval"),
    ("health-timeout-type", '[health]\ntimeout = "1s"\n', "health.timeout"),
    ("health-fall-zero", "[health]\nfall = 0\n", "health.fall"),
    ("health-rise-float", "[health]\nrise = 1.5\n", "health.rise"),
    ("health-unknown", "[health]\nintervall = 1\n", "health.intervall"),
]


@pytest.mark.parametrize("text, key", [(t, k) for _, t, k in SERVER_ERRORS], ids=[i for i, _, _ in SERVER_ERRORS])
def test_invalid_server_config(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    assert_clear(config_error(load_server, path), path, key)


def test_wrong_type_message_shows_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, "listen_port = true\n")
    error = config_error(load_server, path)
    assert "True" in error.message and "type" in error.message
    assert "1 to 65535" in error.hint


# --- every invalid agent file ---------------------------------------------------------------------

AGENT = 'domain = "app.example.test"\n'
AGENT_ERRORS = [
    ("domain-missing", 'token_file = "/etc/sptun/token"\n', "domain"),
    ("domain-type", "domain = 1\n", "domain"),
    ("domain-invalid", 'domain = "app.example.test/x"\n', "domain"),
    ("unknown-key", AGENT + "domains = []\n", "domains"),
    ("unknown-key-typo", AGENT + 'nameserver = ["192.0.2.53"]\n', "nameserver"),
    ("unknown-key-interface-prefix", AGENT + 'interface_prefix = "wg-"\n', "interface_prefix"),  # an old, dead option
    ("nameservers-string", AGENT + 'nameservers = "192.0.2.53"\n', "nameservers"),
    ("nameservers-hostname", AGENT + 'nameservers = ["ns1.example.test"]\n', "nameservers"),
    ("nameservers-with-port", AGENT + 'nameservers = ["192.0.2.53:53"]\n', "nameservers"),
    ("nameservers-int", AGENT + "nameservers = [3221226037]\n", "nameservers"),
    ("realm-empty", AGENT + 'realm = ""\n', "realm"),
    ("realm-semicolon", AGENT + 'realm = "a;b"\n', "realm"),
    ("realm-equals", AGENT + 'realm = "r=x"\n', "realm"),
    ("realm-spaces", AGENT + 'realm = " superprotocol"\n', "realm"),
    ("realm-type", AGENT + "realm = 1\n", "realm"),
    ("keepalive-zero", AGENT + "keepalive = 0\n", "keepalive"),
    ("keepalive-too-big", AGENT + "keepalive = 3601\n", "keepalive"),
    ("keepalive-bool", AGENT + "keepalive = true\n", "keepalive"),
    ("keepalive-string", AGENT + 'keepalive = "15"\n', "keepalive"),
    ("ports-empty", AGENT + "ports = []\n", "ports"),
    ("ports-bad", AGENT + 'ports = ["tcp/abc"]\n', "ports"),
    ("ports-duplicate", AGENT + 'ports = ["tcp/443", "tcp/443"]\n', "ports"),
    ("token-file-relative", AGENT + 'token_file = "token"\n', "token_file"),
    ("state-dir-relative", AGENT + 'state_dir = "./state"\n', "state_dir"),
    ("wireguard-mode", AGENT + 'wireguard = "Kernel"\n', "wireguard"),
]


@pytest.mark.parametrize("text, key", [(t, k) for _, t, k in AGENT_ERRORS], ids=[i for i, _, _ in AGENT_ERRORS])
def test_invalid_agent_config(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    assert_clear(config_error(load_agent, path), path, key)


@pytest.mark.parametrize("nameserver", ["192.0.2.53", "2001:db8::53"])
def test_agent_nameservers(tmp_path: Path, nameserver: str) -> None:
    cfg = load_agent(write(tmp_path, AGENT + f'nameservers = ["{nameserver}"]\n'))
    assert cfg.nameservers == (nameserver,)


# --- files that cannot be read as TOML ------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    for loader in (load_server, load_agent, load):
        error = config_error(loader, path)
        assert error.exit_code == 2 and str(path) in error.message and "no such file" in error.message
        assert "-c" in error.hint


def test_directory(tmp_path: Path) -> None:
    error = config_error(load_server, tmp_path)
    assert error.exit_code == 2 and str(tmp_path) in error.message and "directory" in error.message and error.hint


@pytest.mark.parametrize("data", [
    b'interface = "sptun0\n',
    b"listen_port = \n",
    b"[[domains]\nname = 'x'\n",
    b'interface = "a"\ninterface = "b"\n',
], ids=["unterminated-string", "no-value", "bad-table", "duplicate-key"])
def test_invalid_toml(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(data)
    error = config_error(load_server, path)
    assert error.exit_code == 2 and str(path) in error.message and "not valid TOML" in error.message
    assert error.hint and "\n" not in str(error)


def test_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('interface = "sptun\xe9"\n'.encode("latin-1"))
    error = config_error(load_agent, path)
    assert error.exit_code == 2 and str(path) in error.message and "not valid TOML" in error.message
    assert "\n" not in str(error)


# --- load(): which role, and which default file ------------------------------------------------


def test_load_picks_the_role_from_the_file(tmp_path: Path) -> None:
    assert isinstance(load(write(tmp_path, SERVER_EXAMPLE, "s.toml")), ServerConfig)
    assert isinstance(load(write(tmp_path, AGENT_EXAMPLE, "a.toml")), AgentConfig)


@pytest.fixture
def defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    server, agent = tmp_path / "etc" / "server.toml", tmp_path / "etc" / "agent.toml"
    server.parent.mkdir()
    monkeypatch.setattr(config, "SERVER_CONFIG", server)
    monkeypatch.setattr(config, "AGENT_CONFIG", agent)
    return server, agent


def test_load_default_server(defaults: tuple[Path, Path]) -> None:
    server, _ = defaults
    server.write_text(SERVER_EXAMPLE)
    cfg = load(None)
    assert isinstance(cfg, ServerConfig) and cfg.path == server


def test_load_default_agent(defaults: tuple[Path, Path]) -> None:
    _, agent = defaults
    agent.write_text(AGENT_EXAMPLE)
    cfg = load(None)
    assert isinstance(cfg, AgentConfig) and cfg.path == agent


def test_load_default_neither(defaults: tuple[Path, Path]) -> None:
    server, agent = defaults
    error = config_error(load, None)
    assert error.exit_code == 2 and str(server) in error.message and str(agent) in error.message and "-c" in error.hint


def test_load_default_both(defaults: tuple[Path, Path]) -> None:
    server, agent = defaults
    server.write_text(SERVER_EXAMPLE)
    agent.write_text(AGENT_EXAMPLE)
    error = config_error(load, None)
    assert error.exit_code == 2 and "both" in error.message and "-c" in error.hint


def test_load_default_broken_file_names_it(defaults: tuple[Path, Path]) -> None:
    _, agent = defaults
    agent.write_text(AGENT_EXAMPLE + "colour = 1\n")
    assert_clear(config_error(load, None), agent, "colour")


# --- token files: checked where a daemon or `sptun up` starts ---------------------------------


def token_configs(tmp_path: Path, data: str | None, mode: int = 0o600) -> list[tuple[ServerConfig | AgentConfig, str, Path]]:
    """A server (its second domain's token file as given) and an agent (its token file as given),
    with the key that names the file; data None: the file does not exist."""
    from sptun.keys import new_token, write_file_atomic

    good, token = tmp_path / "good.token", tmp_path / "x.token"
    write_file_atomic(good, new_token() + "\n")
    if data is not None:
        write_file_atomic(token, data, mode)
    server = load_server(write(tmp_path, f"""\
        [[domains]]
        name = "app.example.test"
        listen = ["198.51.100.10"]
        token_file = "{good}"
        [[domains]]
        name = "x.example.test"
        listen = ["198.51.100.11"]
        token_file = "{token}"
        """, "server.toml"))
    agent = load_agent(write(tmp_path, f'domain = "x.example.test"\ntoken_file = "{token}"\n', "agent.toml"))
    return [(server, "domains[1].token_file", token), (agent, "token_file", token)]


@pytest.mark.parametrize("data, mode, problem, fix", [
    (None, 0o600, "does not exist", "sptun token new x.example.test`"),
    ("0123456789abcdefghijklmnopqrstuvwxyzABCDEF\n", 0o644, "is open to other users (mode 0644)", "chmod 600 "),
    ("0123456789abcdefghijklmnopqrstuvwxyzABCDEF\n", 0o660, "is open to other users (mode 0660)", "chmod 600 "),
    ("0123456789abcdefghij_\n", 0o600, "holds a token shorter than 22", "sptun token new x.example.test --force"),
    ("\n", 0o600, "does not hold a token", "sptun token new x.example.test --force"),
], ids=["missing", "0644", "0660", "short", "empty"])
def test_check_token_files_refuses(tmp_path: Path, data: str | None, mode: int, problem: str, fix: str) -> None:
    for cfg, key, token in token_configs(tmp_path, data, mode):
        with pytest.raises(ConfigError) as info:
            config.check_token_files(cfg)
        error = info.value
        assert_clear(error, cfg.path, key)
        assert f"{cfg.path}: {key}: {token} {problem}" in error.message and fix in error.hint
        secret = (data or "").strip()
        assert not secret or secret not in str(error)


def test_check_token_files_passes_good_files(tmp_path: Path) -> None:
    for cfg, _, _ in token_configs(tmp_path, "0123456789abcdefghijkl\n"):  # 22 characters: just enough
        config.check_token_files(cfg)
    config.check_token_files(ServerConfig(tmp_path / "none.toml"))  # no domains, no token files


# --- fuzz: whatever the file holds, the loaders answer with a config or a ConfigError -----------

# Config examples are costly to draw (nested tables, a file each): an eighth of the profile's count.
FUZZ = settings(settings.get_profile("sptun"), max_examples=settings.get_profile("sptun").max_examples // 8)

SERVER_KEYS = ["interface", "listen_port", "api_port", "overlay", "state_dir", "wireguard", "bogus"]
DOMAIN_KEYS = ["name", "listen", "ports", "token_file", "bogus"]
AGENT_KEYS = ["domain", "token_file", "ports", "nameservers", "realm", "state_dir", "wireguard", "keepalive", "bogus"]
PLAUSIBLE = ["sptun0", "10.99.0.0/16", "10.99.0.0/29", "/var/lib/sptun", "auto", "kernel", "app.example.test",
             "198.51.100.10", "10.99.0.5", "tcp/443", "udp/443", "192.0.2.53", "superprotocol", "", "a;b"]
scalars = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(PLAUSIBLE), st.text(max_size=12))
values = st.one_of(scalars, st.lists(scalars, max_size=4))


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else "-inf" if value == -float("inf") else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML's (a lone surrogate makes bad TOML: fine too)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"  # type: ignore[attr-defined]


def toml_table(table: dict[str, object]) -> str:
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(top=st.dictionaries(st.sampled_from(SERVER_KEYS), values, max_size=4),
       domains=st.lists(st.dictionaries(st.sampled_from(DOMAIN_KEYS), values, max_size=4), max_size=3))
def test_fuzz_server_config_only_raises_config_error(fuzz_dir: Path, top: dict[str, object],
                                                   domains: list[dict[str, object]]) -> None:
    path = fuzz_dir / "server.toml"
    path.write_text(toml_table(top) + "".join("[[domains]]\n" + toml_table(d) for d in domains), errors="surrogatepass")
    try:
        cfg = load_server(path)
    except ConfigError as e:
        assert e.exit_code == 2 and str(path) in e.message and "\n" not in str(e)
        return
    assert 1 <= cfg.listen_port <= 65535 and 1 <= cfg.api_port <= 65535
    assert all(isinstance(a, ipaddress.IPv4Address) and a not in cfg.overlay for d in cfg.domains for a in d.listen)
    assert all(d.ports and d.token_file.is_absolute() for d in cfg.domains)


@FUZZ
@given(table=st.dictionaries(st.sampled_from(AGENT_KEYS), values, max_size=6))
def test_fuzz_agent_config_only_raises_config_error(fuzz_dir: Path, table: dict[str, object]) -> None:
    path = fuzz_dir / "agent.toml"
    path.write_text(toml_table(table), errors="surrogatepass")
    try:
        cfg = load_agent(path)
    except ConfigError as e:
        assert e.exit_code == 2 and str(path) in e.message and "\n" not in str(e)
        return
    assert all(isinstance(ns, str) for ns in cfg.nameservers)
    assert 1 <= cfg.keepalive <= 3600 and cfg.ports
