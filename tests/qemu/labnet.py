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

    def destroy(self) -> None:
        """Deleting the namespace removes the bridge and the taps with it (QEMU must be gone first)."""
        if self.up:
            run(["ip", "netns", "del", self.name], check=False)
            self.up = False
