"""The VMs' private L2 network: a bridge inside a network namespace that only this test session uses.

Each VM gets a tap device on the bridge; QEMU runs inside the namespace, so the taps (root-only
/dev/net/tun) live there too. The bridge has no uplink: nothing sent on it can leave the machine, and the
host reaches the VMs only from inside the namespace (SSH, the gRPC probes).
"""

from __future__ import annotations

import os

from tests.qemu.hostcmd import run

SUBNET = "10.233.0"  # /24 inside the namespace only; the partition tests use 10.231.x
GATEWAY = f"{SUBNET}.1"


class LabNetwork:
    def __init__(self, name: str | None = None):
        self.name = name or f"cxvm-{os.getpid()}"
        self.taps: list[str] = []
        self.peers: list[str] = []
        self.up = False

    def create(self) -> LabNetwork:
        run(["ip", "netns", "add", self.name])
        self.up = True
        ip = ["ip", "-n", self.name]
        run([*ip, "link", "set", "lo", "up"])
        run([*ip, "link", "add", "br0", "type", "bridge"])
        run([*ip, "addr", "add", f"{GATEWAY}/24", "dev", "br0"])
        run([*ip, "link", "set", "br0", "up"])
        # Guard: inside the namespace the lab subnet must route to the bridge and nowhere else.
        route = run([*ip, "route", "get", f"{SUBNET}.11"]).stdout
        if "dev br0" not in route:
            raise RuntimeError(f"lab route check failed in {self.name}: {route.strip()}")
        return self

    def add_tap(self) -> str:
        tap = f"tap{len(self.taps)}"
        ip = ["ip", "-n", self.name]
        run([*ip, "tuntap", "add", "dev", tap, "mode", "tap"])
        run([*ip, "link", "set", tap, "master", "br0"])
        run([*ip, "link", "set", tap, "up"])
        self.taps.append(tap)
        return tap

    def add_peer(self, suffix: str, address: str) -> str:
        """Another host on the lab's LAN: its own namespace, plugged into the bridge with a veth pair, at
        `address` (/24). Returns the namespace's name. E.g. a home router with its own DHCP server."""
        name = f"{self.name}-{suffix}"
        run(["ip", "netns", "add", name])
        self.peers.append(name)
        ip = ["ip", "-n", self.name]
        veth = f"veth{len(self.peers) - 1}"
        run([*ip, "link", "add", veth, "type", "veth", "peer", "name", "lan0", "netns", name])
        run([*ip, "link", "set", veth, "master", "br0"])
        run([*ip, "link", "set", veth, "up"])
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{address}/24", "dev", "lan0"],
                    ["link", "set", "lan0", "up"]):
            run(["ip", "-n", name, *cmd])
        return name

    def remove_peer(self, name: str) -> None:
        """Unplug a peer (its processes must be gone first): the veth pair goes with its namespace."""
        if name in self.peers:
            run(["ip", "netns", "del", name], check=False)
            self.peers.remove(name)

    def destroy(self) -> None:
        """Deleting the namespace removes the bridge and the taps with it (QEMU must be gone first)."""
        for peer in list(self.peers):
            self.remove_peer(peer)
        if self.up:
            run(["ip", "netns", "del", self.name], check=False)
            self.up = False
