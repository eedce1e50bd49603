"""Links, addresses, routes, rules and sysctls through pyroute2 (rtnetlink), in this host's
network namespace."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sptun.errors import SptunError

log = logging.getLogger("sptun")
IFF_UP = 0x1
RTN_LOCAL = 2  # a route of type local (rtnetlink)
RT_SCOPE_LINK = 253  # an address's scope: fe80::/10 (and IPv4's link scope)
IFA_F_NODAD = 0x02  # an address flag: no duplicate address detection (it would leave it tentative)
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_ANY = {4: "0.0.0.0/0", 6: "::/0"}


def family_of(address: str) -> int:
    """4 or 6, of an address or CIDR (IPv6 has colons)."""
    return 6 if ":" in address else 4
RT_SCOPE_HOST = 254


@dataclass(frozen=True)
class LinkInfo:
    index: int
    kind: str  # "wireguard", "tun", ...; "unknown" when the kernel does not say
    up: bool
    mtu: int


def _netlink_error(what: str, e: NetlinkError) -> SptunError:
    if e.code == errno.EPERM:
        return SptunError(f"{what}: operation not permitted", hint="run as root (sptun needs CAP_NET_ADMIN)")
    return SptunError(f"{what}: {e.args[1] if len(e.args) > 1 else e}")


class Links:
    def __init__(self) -> None:
        self.ipr = IPRoute()

    def close(self) -> None:
        self.ipr.close()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        log.debug("[#] %s", what)
        try:
            return fn(*args, **kwargs)
        except NetlinkError as e:
            raise _netlink_error(what, e) from None

    def _get(self, name: str) -> Any | None:
        """The link called name, or None. One RTM_GETLINK by name: pyroute2's link_lookup
        dumps every link, which was most of an idle daemon's netlink time."""
        try:
            (link,) = self.ipr.link("get", ifname=name)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise _netlink_error(f"ip link show {name}", e) from None
        return link

    def info(self, name: str) -> LinkInfo | None:
        link = self._get(name)
        if link is None:
            return None
        linkinfo = link.get_attr("IFLA_LINKINFO")
        kind = (linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None) or "unknown"
        return LinkInfo(int(link["index"]), kind, bool(link["flags"] & IFF_UP), int(link.get_attr("IFLA_MTU") or 0))

    def addresses(self, index: int) -> list[str]:
        """The interface's IPv4 and IPv6 addresses as CIDRs, sorted; not the link-local ones the
        kernel makes for itself."""
        return sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in self.ipr.get_addr(index=index)
                      if a["family"] in (socket.AF_INET, socket.AF_INET6) and a["scope"] != RT_SCOPE_LINK)

    def index(self, name: str) -> int | None:
        link = self._get(name)
        return int(link["index"]) if link is not None else None

    def kind(self, name: str) -> str | None:
        """The link kind ("wireguard", "tun", ...), or None if there is no such link."""
        info = self.info(name)
        return info.kind if info is not None else None

    def names(self, prefix: str) -> list[str]:
        return sorted(name for link in self.ipr.get_links()
                      if (name := link.get_attr("IFLA_IFNAME")) and name.startswith(prefix))

    def add(self, name: str, kind: str) -> None:
        self._call(f"ip link add {name} type {kind}", self.ipr.link, "add", ifname=name, kind=kind)

    def delete(self, name: str) -> bool:
        """Remove a link; False if it was already gone."""
        index = self.index(name)
        if index is None:
            return False
        try:
            self._call(f"ip link delete {name}", self.ipr.link, "del", index=index)
        except SptunError:
            if self.index(name) is not None:
                raise
        return True

    def up(self, name: str, mtu: int) -> None:
        link = self._link_or_fail(name)
        if link["flags"] & IFF_UP and link.get_attr("IFLA_MTU") == mtu:
            return
        self._call(f"ip link set {name} mtu {mtu} up", self.ipr.link, "set", index=link["index"], mtu=mtu, state="up")

    def _link_or_fail(self, name: str) -> Any:
        link = self._get(name)
        if link is None:
            raise SptunError(f"interface {name} disappeared")
        return link

    def _index_or_fail(self, name: str) -> int:
        return int(self._link_or_fail(name)["index"])

    def set_addresses(self, name: str, wanted: list[str]) -> list[str]:
        """Make the interface's addresses exactly `wanted` (CIDRs); return what changed. IPv6
        ones skip duplicate address detection: the overlay's addresses are sptun's to give."""
        index = self._index_or_fail(name)
        have = self.addresses(index)
        changes = []
        for cidr in have:
            if cidr not in wanted:
                address, prefixlen = cidr.split("/")
                self._call(f"ip addr del {cidr} dev {name}", self.ipr.addr, "del", index=index,
                           address=address, prefixlen=int(prefixlen))
                changes.append(f"remove address {cidr} from {name}")
        for cidr in wanted:
            if cidr not in have:
                address, prefixlen = cidr.split("/")
                flags = {"flags": IFA_F_NODAD} if family_of(address) == 6 else {}
                self._call(f"ip addr add {cidr} dev {name}", self.ipr.addr, "add", index=index,
                           address=address, prefixlen=int(prefixlen), **flags)
                changes.append(f"add address {cidr} to {name}")
        return changes

    def overlapping_routes(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, except_dev: str) -> list[str]:
        """Routes of the main table (of network's family) that overlap network, other than
        through except_dev."""
        ours = self.index(except_dev)
        found = []
        for route in self.ipr.get_routes(family=_AF[network.version], table=254):
            if route["dst_len"] == 0 or route.get_attr("RTA_OIF") == ours:
                continue
            dst = ipaddress.ip_network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}", strict=False)
            if dst.overlaps(network):  # the same family: the dump is of network's
                found.append(f"{dst} dev {self.name_of(route.get_attr('RTA_OIF'))}")
        return found

    def local_addresses(self) -> set[str]:
        """Every address of this host (this network namespace), of both families."""
        return {str(a.get_attr("IFA_ADDRESS")) for a in self.ipr.get_addr()
                if a["family"] in (socket.AF_INET, socket.AF_INET6)}

    def name_of(self, index: int | None) -> str:
        links = self.ipr.get_links(index) if index else []
        return str(links[0].get_attr("IFLA_IFNAME")) if links else "?"

    def default_route(self, table: int, family: int = 4) -> int | None:
        """The output interface index of the family's default route in `table`, if any."""
        for route in self.ipr.get_routes(family=_AF[family], table=table):
            if route["dst_len"] == 0 and route.get_attr("RTA_TABLE") == table:
                oif = route.get_attr("RTA_OIF")
                return int(oif) if oif is not None else None
        return None

    def set_default_route(self, table: int, name: str, family: int = 4) -> bool:
        index = self._index_or_fail(name)
        if self.default_route(table, family) == index:
            return False
        self._call(f"ip -{family} route replace default dev {name} table {table}", self.ipr.route, "replace",
                   dst=_ANY[family], oif=index, table=table, family=_AF[family])
        return True

    def local_route(self, table: int, family: int = 4) -> bool:
        """Whether `table` has the family's `local default dev lo`: everything it routes is for this host."""
        return any(route["dst_len"] == 0 and route["type"] == RTN_LOCAL and route.get_attr("RTA_TABLE") == table
                   for route in self.ipr.get_routes(family=_AF[family], table=table))

    def set_local_route(self, table: int, family: int = 4) -> None:
        if not self.local_route(table, family):
            self._call(f"ip -{family} route replace local {_ANY[family]} dev lo table {table}", self.ipr.route,
                       "replace", dst=_ANY[family], type=RTN_LOCAL, scope=RT_SCOPE_HOST, oif=self._index_or_fail("lo"),
                       table=table, family=_AF[family])

    def delete_local_route(self, table: int, family: int = 4) -> None:
        if self.local_route(table, family):
            self._call(f"ip -{family} route del local {_ANY[family]} table {table}", self.ipr.route, "del",
                       dst=_ANY[family], type=RTN_LOCAL, scope=RT_SCOPE_HOST, oif=self._index_or_fail("lo"), table=table,
                       family=_AF[family])

    def flush_table(self, table: int, family: int = 4) -> None:
        for route in self.ipr.get_routes(family=_AF[family], table=table):
            if route.get_attr("RTA_TABLE") == table:
                try:
                    self.ipr.route("del", table=table, family=_AF[family],
                                   dst=f"{route.get_attr('RTA_DST') or _ANY[family].split('/')[0]}/{route['dst_len']}")
                except NetlinkError as e:
                    if e.code not in (errno.ESRCH, errno.ENOENT):
                        raise _netlink_error(f"ip -{family} route flush table {table}", e) from None

    def rules(self, priority: int) -> list[dict[str, Any]]:
        """Our rules of both families: the ones at `priority`, as {fwmark, src, table, family}."""
        found = []
        for family, af in _AF.items():
            for rule in self.ipr.get_rules(family=af):
                if rule.get_attr("FRA_PRIORITY") == priority:
                    table = rule.get_attr("FRA_TABLE") or rule["table"]
                    src = rule.get_attr("FRA_SRC")
                    found.append({"fwmark": rule.get_attr("FRA_FWMARK") or 0, "table": table,
                                  "src": f"{src}/{rule['src_len']}" if src else None, "family": family})
        return found

    def add_rule(self, priority: int, fwmark: int, src: str, table: int) -> None:
        """fwmark 0: a rule for packets of any mark."""
        address, prefixlen = src.split("/")
        family = family_of(src)
        marked = {"fwmark": fwmark, "fwmask": 0xFFFFFFFF} if fwmark else {}
        self._call(f"ip -{family} rule add priority {priority} from {src}{f' fwmark {fwmark:#x}' if fwmark else ''} "
                   f"lookup {table}", self.ipr.rule, "add", priority=priority, src=address, src_len=int(prefixlen),
                   table=table, family=_AF[family], **marked)

    def delete_rule(self, priority: int, fwmark: int, src: str | None, table: int, family: int | None = None) -> None:
        """A rule from src (its family's), or with no src one of `family` (default IPv4)."""
        family = family or (family_of(src) if src else 4)
        spec: dict[str, Any] = {"priority": priority, "table": table, "family": _AF[family]}
        if fwmark:
            spec["fwmark"] = fwmark
        if src and not src.endswith("/0"):
            address, prefixlen = src.split("/")
            spec.update(src=address, src_len=int(prefixlen))
        try:
            self._call(f"ip -{family} rule del priority {priority} fwmark {fwmark:#x} lookup {table}", self.ipr.rule,
                       "del", **spec)
        except SptunError:
            if any(r["table"] == table and r["fwmark"] == fwmark and r["family"] == family for r in self.rules(priority)):
                raise


def read_sysctl(path: str) -> str:
    """A sysctl of this network namespace, "" if there is none (an interface that went)."""
    try:
        return (Path("/proc/sys") / path).read_text().strip()
    except FileNotFoundError:
        return ""


def sysctl(path: str, value: str) -> bool:
    """Write a sysctl of this network namespace ("net/ipv4/ip_forward"); True if it changed.
    Slashes, not dots, because interface names may hold dots."""
    file = Path("/proc/sys") / path
    try:
        if file.read_text().strip() == value:
            return False
        log.debug("[#] sysctl -w %s=%s", path, value)
        file.write_text(value + "\n")
    except FileNotFoundError:
        raise SptunError(f"no sysctl {path}") from None
    except PermissionError:
        raise SptunError(f"cannot set {path}", hint="run as root") from None
    return True
