"""A partition on loopback for tests and benchmarks: drop the packets to and/or from one TCP port with an
nftables table of our own (root only). Loopback never leaves the machine, and the table is deleted on exit,
whatever happened inside.

pysyncobj connects from the server with the larger address to the smaller one, so cutting one server's Raft
port in both directions cuts all of its Raft traffic; one direction is a one-way partition.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

DIRECTIONS = ("both", "in", "out")
_tables = itertools.count()


def available() -> str:
    """Why a cut cannot be made here ('' when it can)."""
    if os.geteuid() != 0:
        return "cutting a port with nftables needs root"
    if shutil.which("nft") is None:
        return "nft (nftables) is not installed"
    return ""


class PortCut:
    """`with PortCut(port, "both"):` drops the port's traffic inside the block. 'in': packets to the port,
    'out': packets from it. The rules go in as one transaction, so the cut starts at once."""

    def __init__(self, port: int | str, direction: str = "both", name: str = "cut"):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
        self.port, self.direction = int(port), direction
        self.table = f"cortex_{name}_{os.getpid()}_{next(_tables)}"

    def __enter__(self) -> PortCut:
        rules = [f"add table inet {self.table}",
                 f"add chain inet {self.table} out {{ type filter hook output priority 0 ; }}"]
        if self.direction in ("both", "in"):
            rules.append(f"add rule inet {self.table} out tcp dport {self.port} drop")
        if self.direction in ("both", "out"):
            rules.append(f"add rule inet {self.table} out tcp sport {self.port} drop")
        try:
            subprocess.run(["nft", "-f", "-"], input="\n".join(rules) + "\n", check=True, capture_output=True,
                           text=True, timeout=30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=30)
