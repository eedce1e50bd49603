"""`sptun export`: a live interface as a wg-quick config, built with wgconfig.

render() is pure; export() reads the kernel (and, only for --private, the key in the state
dir) and writes nothing anywhere.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from wgconfig import WGConfig

from sptun.config import Config, ServerConfig
from sptun.errors import SptunError, UsageError
from sptun.keys import PRIVATE_KEY_FILE, load_private_key, public_key
from sptun.links import Links
from sptun.nft import CLIENT_PREFIX
from sptun.wg import Device, backend

LEFT_OUT = "# PrivateKey left out: `sptun export --private` prints it"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def render(interface: str, device: Device, addresses: Sequence[str], mtu: int | None,
           private_key: str | None = None, own_routing: bool = False) -> str:
    """The wg-quick config of `interface` as `device` describes it. The private key appears
    only if it is given; otherwise a comment says how to get it. own_routing (an agent's
    tunnel, whose peer allows 0.0.0.0/0): `Table = off`, so that `wg-quick up` does not
    take over the host's default route; sptun routes replies by its own rules."""
    conf = WGConfig()  # no file: nothing is read from or written to /etc/wireguard
    conf.initialize_file(leading_comment=f"# {interface}, exported by `sptun export`")
    attrs: list[tuple[str, object]] = []
    if private_key is not None:
        attrs.append(("PrivateKey", private_key))
    if device.listen_port:
        attrs.append(("ListenPort", device.listen_port))
    if addresses:
        attrs.append(("Address", ", ".join(addresses)))
    if mtu:
        attrs.append(("MTU", mtu))
    if own_routing:
        attrs.append(("Table", "off"))
    comment = LEFT_OUT if private_key is None else None
    if comment is not None and not attrs:  # nothing to put it before: above the section, then
        conf.initialize_file(leading_comment=comment)
    for attr, value in attrs:
        conf.add_attr(None, attr, value, leading_comment=comment)
        comment = None
    for key in sorted(device.peers):
        # Each peer is built on its own and its lines appended: wgconfig re-parses the whole
        # file on every add_*, which is quadratic (a server's thousand peers took 15 s).
        peer = device.peers[key].peer
        one = WGConfig()
        one.add_peer(key)
        if peer.allowed_ips:
            one.add_attr(key, "AllowedIPs", ", ".join(peer.allowed_ips))
        if peer.endpoint:
            one.add_attr(key, "Endpoint", peer.endpoint)
        if peer.keepalive:
            one.add_attr(key, "PersistentKeepalive", peer.keepalive)
        conf.lines.extend(one.lines[1:])  # without its own (empty) [Interface]
    conf.invalidate_data()
    out = io.StringIO()
    conf.write_to_fileobj(out)
    return out.getvalue()


def pick_interface(cfg: Config, given: str | None, existing: Sequence[str]) -> str:
    """The interface to export: a server's own; for an agent the one given, or the only
    one of `existing` (its tunnels' interfaces here)."""
    if isinstance(cfg, ServerConfig):
        if given is not None and given != cfg.interface:
            raise UsageError(f"{given} is not the interface of {cfg.path} (that is {cfg.interface})",
                             hint=f"leave INTERFACE out, or pass {cfg.interface}")
        return cfg.interface
    if given is not None:
        if not given.startswith(CLIENT_PREFIX) or not _IFNAME.match(given):
            raise UsageError(f"{given} is not an sptun agent interface (those are named {CLIENT_PREFIX}...)",
                             hint=f"pick one of: {', '.join(existing)}" if existing else "`sptun status` lists the tunnels")
        return given
    if not existing:
        raise SptunError(f"no {CLIENT_PREFIX}* interface exists here", hint="is sptun up?")
    if len(existing) > 1:
        raise UsageError(f"this agent has {len(existing)} interfaces: {', '.join(existing)}",
                         hint="pass the one to export: sptun export INTERFACE")
    return existing[0]


def export(cfg: Config, interface: str | None = None, private: bool = False) -> str:
    """The wg-quick config of one of this host's live sptun interfaces."""
    links = Links()
    try:
        existing = [] if isinstance(cfg, ServerConfig) else links.names(CLIENT_PREFIX)
        name = pick_interface(cfg, interface, existing)
        if links.info(name) is None:
            raise SptunError(f"interface {name} does not exist here", hint="is sptun up?")
        wg = backend(cfg.wireguard, links)
        if not wg.is_ours(name):
            raise SptunError(f"interface {name} is not a WireGuard device of the {wg.kind} backend",
                             hint=f"check wireguard = in {cfg.path}")
        device = wg.device(name)
        info = links.info(name)
        if info is None:
            raise SptunError(f"interface {name} disappeared", hint="is sptun going down?")
        addresses = links.addresses(info.index)
    finally:
        links.close()
    key = _private_key(cfg, name, device) if private else None
    return render(name, device, addresses, info.mtu, key, own_routing=not isinstance(cfg, ServerConfig))


def _private_key(cfg: Config, name: str, device: Device) -> str:
    """The key in the state dir, if it is the one the interface runs with. Only reads."""
    path = cfg.state_dir / PRIVATE_KEY_FILE
    key = load_private_key(cfg.state_dir)
    if key is None:
        raise SptunError(f"there is no private key at {path}", hint=f"check state_dir in {cfg.path}")
    if device.public_key is None:
        raise SptunError(f"interface {name} has no private key set", hint="is sptun up?")
    if public_key(key) != device.public_key:
        raise SptunError(f"the private key at {path} is not the one {name} runs with (public key {device.public_key})",
                         hint="the key file changed since sptun set up the interface; restart sptun to use it")
    return key
