"""This machine's global addresses, read over netlink; nothing is sent on the network.

Netlink (pyroute2) replaces running `ip -j addr`: a first boot under load once timed out waiting for the
`ip` binary (cold, from a verity-checked /usr under emulation) and the node came up listening on 127.0.0.1
only. A netlink dump is a round trip to the kernel with no process to start.

The order is the one `ip addr show scope global` prints: interfaces by the kernel's link dump, and each
interface's addresses in the kernel's address dump order. Only scope global counts, so host-scoped loopback
(127.0.0.1, ::1) and link-local (fe80::/10, 169.254/16) addresses never appear.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

RT_SCOPE_UNIVERSE = 0  # `scope global`
IFF_LOOPBACK = 0x8


@dataclass(frozen=True)
class InterfaceAddress:
    interface: str
    family: int  # socket.AF_INET or socket.AF_INET6
    address: str
    prefixlen: int
    loopback: bool  # the interface is a loopback device (a global address can be put on `lo`)


def global_addresses(family: int = socket.AF_UNSPEC) -> list[InterfaceAddress]:
    """Every scope-global address of this network namespace, optionally of one family.

    Raises OSError when netlink cannot be read (NetlinkError is turned into one), so callers handle a
    single error type."""
    try:
        with IPRoute() as ipr:
            links = ipr.get_links()
            addrs = ipr.get_addr(family=family) if family else ipr.get_addr()
    except NetlinkError as exc:
        raise OSError(exc.code, f"netlink: {exc}") from exc
    by_index: dict[int, list] = {}
    for msg in addrs:
        if msg["scope"] == RT_SCOPE_UNIVERSE:
            by_index.setdefault(msg["index"], []).append(msg)
    found = []
    for link in links:
        name = link.get("IFLA_IFNAME") or ""
        loopback = bool(link["flags"] & IFF_LOOPBACK)
        for msg in by_index.get(link["index"], []):
            # like `ip`: the local address, which only point-to-point links set apart from IFA_ADDRESS
            local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if local:
                found.append(InterfaceAddress(name, msg["family"], local, msg["prefixlen"], loopback))
    return found
