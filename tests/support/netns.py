"""A throwaway network namespace with addresses on veth pairs whose both ends stay inside it.

Nothing is routed out of the namespace and the links stay down, so no packet is ever sent: the namespace
only gives the kernel a known set of addresses to report. Code under test runs in a child process that
enters the namespace first (setns is per thread and the test process must stay in its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

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
    from pyroute2 import IPRoute, netns

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
    from pyroute2 import IPRoute

    with IPRoute(netns=name) as ipr:
        return [link.get("IFLA_IFNAME") for link in ipr.get_links()]


def ip_json(name: str, *argv: str) -> list[dict]:
    """`ip -j` in the namespace, for comparing with what `ip` itself reports (skips without iproute2)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 not installed")
    out = subprocess.run(["ip", "-n", name, "-j", *argv], capture_output=True, text=True, timeout=60,
                         check=True)
    return json.loads(out.stdout or "[]")
