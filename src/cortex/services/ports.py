"""The narrow interfaces the services plugin calls for what lives outside it: copying a service's volume from
another node, a floating address, and a hardware fence. Implementations come from cortex.ha; the plugin
constructs them in one place (plugin.py, `build_ports`), and each is optional: without VolumeSync a volume is
not replicated (a takeover says so), without FloatingAddress a VIP is not claimed (the report says so),
without FenceAgent fencing rests on leases alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SyncReport:
    files_changed: int
    bytes_copied: int
    seconds: float
    source_mtime: float  # newest modification time seen in the source volume (unix seconds)


class VolumeSync(Protocol):
    def pull(self, service: str, source_node: str, dest: Path) -> SyncReport:
        """Make `dest` equal to source_node's <data_dir>/services/<service>/volume (incremental,
        checksummed, over the cluster's mutual-TLS gRPC)."""


class FloatingAddress(Protocol):
    def claim(self, cidr: str, interface: str | None = None, probe: bool = True) -> str:
        """Add the address and send gratuitous ARP; idempotent. Returns the interface. `probe=False`: do not
        first ask whether another machine answers for it (a takeover from a holder known to be stopped)."""

    def release(self, cidr: str) -> None:
        """Remove the address; idempotent."""

    def interface_for(self, cidr: str) -> str | None:
        """The local interface whose network holds the address."""


class FenceAgent(Protocol):
    """An optional hardware fence (Redfish and the like)."""

    def power_off(self, node: str) -> None: ...

    def power_on(self, node: str) -> None: ...


@dataclass(frozen=True)
class Ports:
    volume_sync: VolumeSync | None = None
    floating: FloatingAddress | None = None
    fence: FenceAgent | None = None
