"""Network namespaces joined by veth pairs and bridges, over netlink (pyroute2): labs whose links a test can
cut and heal, and whose traffic never leaves the namespaces the test created. Root only."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS, netns

NETNS_DIR = Path(netns.NETNS_RUN_DIR)


def in_netns(name: str, argv: Sequence[str]) -> list[str]:
    """argv prefixed to run inside network namespace `name` (only the network is entered: the files, users
    and mounts stay the host's)."""
    return ["nsenter", f"--net={NETNS_DIR / name}", "--", *argv]


def pids_in(name: str) -> list[int]:
    """The processes whose network namespace is `name`."""
    try:
        target = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry.name))
    return pids


def _index(ns: IPRoute, ifname: str) -> int:
    found = ns.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no link {ifname}")
    return found[0]


class NetLab:
    """Named network namespaces created together and removed together, with whatever runs inside them."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def namespace(self, name: str) -> str:
        """A fresh namespace with its loopback up (one left by a killed earlier run is replaced)."""
        self.remove(name)
        netns.create(name)
        self.namespaces.append(name)
        with NetNS(name) as ns:
            ns.link("set", index=_index(ns, "lo"), state="up")
        return name

    def bridge(self, name: str, ifname: str = "br0", address: str = "") -> None:
        """A bridge in namespace `name`; `address` ("10.0.0.1/24") makes the namespace a host on it too."""
        with NetNS(name) as ns:
            ns.link("add", ifname=ifname, kind="bridge")
            index = _index(ns, ifname)
            if address:
                ip, prefix = address.split("/")
                ns.addr("add", index=index, address=ip, prefixlen=int(prefix))
            ns.link("set", index=index, state="up")

    def plug(self, name: str, bridge_ns: str, port: str, ifname: str = "eth0", address: str = "",
             bridge: str = "br0") -> None:
        """A veth pair from namespace `name` (end `ifname`, at `address`) to `bridge` in `bridge_ns` (end
        `port`, the link to take down to cut `name` off)."""
        with NetNS(bridge_ns) as ns:  # made inside the namespaces: no name is ever taken in the host's
            ns.link("add", ifname=port, kind="veth", peer={"ifname": ifname, "net_ns_fd": name})
        with NetNS(name) as ns:
            index = _index(ns, ifname)
            if address:
                ip, prefix = address.split("/")
                ns.addr("add", index=index, address=ip, prefixlen=int(prefix))
            ns.link("set", index=index, state="up")
        with NetNS(bridge_ns) as ns:
            ns.link("set", index=_index(ns, port), master=_index(ns, bridge), state="up")

    def tap(self, name: str, ifname: str, bridge: str = "br0") -> None:
        """A tap device on `bridge`, for a QEMU running in namespace `name`."""
        with NetNS(name) as ns:
            ns.link("add", ifname=ifname, kind="tuntap", mode="tap")
            ns.link("set", index=_index(ns, ifname), master=_index(ns, bridge), state="up")

    def set_link(self, name: str, ifname: str, up: bool) -> None:
        with NetNS(name) as ns:
            ns.link("set", index=_index(ns, ifname), state="up" if up else "down")

    def route_device(self, name: str, destination: str) -> str:
        """The link namespace `name` sends packets for `destination` out of."""
        with NetNS(name) as ns:
            (route,) = ns.route("get", dst=destination)
            index = route.get("RTA_OIF")
            return ns.get_links(index)[0].get("IFLA_IFNAME")

    def remove(self, name: str) -> None:
        """Kill what runs in namespace `name`, then delete it (its links and bridges go with it)."""
        for pid in pids_in(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if name in netns.listnetns():
            netns.remove(name)
        if name in self.namespaces:
            self.namespaces.remove(name)

    def destroy(self) -> None:
        for name in reversed(list(self.namespaces)):
            self.remove(name)


# --- a namespace that only holds addresses -------------------------------------------------------------------
# Veth pairs whose both ends stay inside, links left down: no packet is ever sent; the namespace only gives
# the kernel a known set of addresses to report. Code under test runs in a child process that enters the
# namespace first (setns is per thread, and the test process must stay in its own).

RT_SCOPE_LINK = 253
IFA_F_NODAD = 0x02

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@dataclass(frozen=True)
class Address:
    interface: str
    cidr: str  # address/prefixlen
    scope: int = 0  # global, unless RT_SCOPE_LINK


@contextlib.contextmanager
def namespace_with(veth_pairs: list[tuple[str, str]], addresses: list[Address]) -> Iterator[str]:
    """A new namespace holding the veth pairs (both ends) and the addresses, in order; yields its name."""
    name = f"cxaddr-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            for ifname, peer in veth_pairs:
                ipr.link("add", ifname=ifname, kind="veth", peer=peer)
            for addr in addresses:
                index = ipr.link_lookup(ifname=addr.interface)[0]
                address, prefixlen = addr.cidr.split("/")
                ipr.addr("add", index=index, address=address, prefixlen=int(prefixlen), scope=addr.scope,
                         **({"flags": IFA_F_NODAD} if ":" in address else {}))
        yield name
    finally:
        netns.remove(name)


def run_in(name: str, code: str):
    """Run Python code in the namespace; the code prints one JSON value, which is returned."""
    prelude = f"from pyroute2 import netns\nnetns.setns({name!r}, flags=0)\n"
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def links_index_order(name: str) -> list[str]:
    """Interface names in the kernel's link dump order (the order `ip addr` prints)."""
    with IPRoute(netns=name) as ipr:
        return [link.get("IFLA_IFNAME") for link in ipr.get_links()]
