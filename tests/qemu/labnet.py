"""The VMs' private L2 network: a bridge inside a network namespace that only this test session uses.

Each VM gets a tap device on the bridge; QEMU runs inside the namespace, so the taps (root-only
/dev/net/tun) live there too. The bridge has no uplink: nothing sent on it can leave the machine, and the
host reaches the VMs only from inside the namespace (SSH, the gRPC probes).
"""

from __future__ import annotations

import os

from tests.support.netlab import NetLab

SUBNET = "10.233.0"  # /24 inside the namespace only; the partition tests use 10.231.x
GATEWAY = f"{SUBNET}.1"


class LabNetwork:
    def __init__(self, name: str | None = None):
        self.name = name or f"cxvm-{os.getpid()}"
        self.taps: list[str] = []
        self.peers: list[str] = []
        self.up = False
        self._lab = NetLab()

    def create(self) -> LabNetwork:
        self._lab.namespace(self.name)
        self.up = True
        self._lab.bridge(self.name, "br0", f"{GATEWAY}/24")
        # Guard: inside the namespace the lab subnet must route to the bridge and nowhere else.
        device = self._lab.route_device(self.name, f"{SUBNET}.11")
        if device != "br0":
            raise RuntimeError(f"lab route check failed in {self.name}: {SUBNET}.11 goes out of {device}")
        return self

    def add_tap(self) -> str:
        tap = f"tap{len(self.taps)}"
        self._lab.tap(self.name, tap)
        self.taps.append(tap)
        return tap

    def add_peer(self, suffix: str, address: str) -> str:
        """Another host on the lab's LAN: its own namespace, plugged into the bridge with a veth pair, at
        `address` (/24). Returns the namespace's name. E.g. a home router with its own DHCP server."""
        name = self._lab.namespace(f"{self.name}-{suffix}")
        self.peers.append(name)
        self._lab.plug(name, self.name, f"veth{len(self.peers) - 1}", ifname="lan0", address=f"{address}/24")
        return name

    def remove_peer(self, name: str) -> None:
        """Unplug a peer (its processes must be gone first): the veth pair goes with its namespace."""
        if name in self.peers:
            self._lab.remove(name)
            self.peers.remove(name)

    def destroy(self) -> None:
        """Deleting the namespace removes the bridge and the taps with it (QEMU must be gone first)."""
        for peer in list(self.peers):
            self.remove_peer(peer)
        if self.up:
            self._lab.remove(self.name)
            self.up = False
