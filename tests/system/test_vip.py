"""A floating address moved between network namespaces (root only, as CI runs): claimed in A it answers HTTP
from C, its gratuitous ARP is seen on C's wire and updates C's neighbour entry, and moved to B it leads C to
B without C asking anyone.

Topology: a bridge namespace and namespaces A, B, C joined by veth pairs on 10.232.7.0/24. The claims, the
capture and the HTTP client all run inside those namespaces (nsenter); the root namespace sends nothing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
from pyroute2 import NetNS

from tests.support import procs
from tests.support.netlab import NetLab, in_netns, run_in
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NET = "10.232.7"
VIP = f"{NET}.100"
CIDR = f"{VIP}/24"
NET6 = "fd00:232:7:"
VIP6 = f"{NET6}:100"
CIDR6 = f"{VIP6}/64"
IFA_F_NODAD = 0x02
# the lab's own duplicate address detection at lab speed: 0.1 s per probe, no initial random delay
FAST_DAD = ["sysctl", "-q", "-w", "net.ipv6.neigh.eth0.retrans_time_ms=100",
            "net.ipv6.conf.eth0.router_solicitation_delay=0"]
PORT = 8080

CAPTURE = """
import json, socket, sys
from cortex.ha.vip import ETH_P_ARP, parse_arp
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
sock.bind(("eth0", 0))
print("ready", flush=True)
while True:
    arp = parse_arp(sock.recv(2048))
    if arp and arp["sender_ip"] == arp["target_ip"] == sys.argv[1]:
        print(json.dumps(arp), flush=True)
"""


class Capture:
    """Gratuitous ARP for the floating address as namespace C's interface receives it."""

    def __init__(self, ns: str):
        self.frames: list[dict] = []
        self.proc = procs.popen(in_netns(ns, [sys.executable, "-c", CAPTURE, VIP]), stdout=subprocess.PIPE,
                                text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.frames.append(json.loads(line))

    def ops_from(self, mac: str) -> set[int]:
        return {f["op"] for f in list(self.frames) if f["sender_mac"] == mac}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tag = f"vip{uuid.uuid4().hex[:4]}"
    lab = NetLab()
    names = {k: f"{tag}-{k}" for k in ("a", "b", "c")}
    try:
        lab.namespace(f"{tag}-br")
        lab.bridge(f"{tag}-br")
        for i, (key, ns) in enumerate(names.items(), start=11):
            lab.namespace(ns)
            lab.plug(ns, f"{tag}-br", f"{tag}p{key}", address=f"{NET}.{i}/24")
            with NetNS(ns) as ipr:  # usable at once: the lab's own addresses need no detection
                ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=f"{NET6}:{i}", prefixlen=64,
                         flags=IFA_F_NODAD)
            procs.run(in_netns(ns, FAST_DAD), check=True, timeout=30)
        for key in ("a", "b"):  # each serves its own name, on every address it has or will have
            site = tmp_path_factory.mktemp(f"site-{key}")
            (site / "who").write_text(key)
            procs.popen(in_netns(names[key], [sys.executable, "-m", "http.server", "--bind", "::",
                                              "--directory", str(site), str(PORT)]),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield names
    finally:
        lab.destroy()


def mac_of(ns: str) -> str:
    with NetNS(ns) as ipr:
        return ipr.get_links(ifname="eth0")[0].get_attr("IFLA_ADDRESS")


def neighbour_mac(ns: str, address: str = VIP) -> str | None:
    with NetNS(ns) as ipr:
        for entry in ipr.get_neighbours():
            if entry.get_attr("NDA_DST") and ipaddress.ip_address(entry.get_attr("NDA_DST")) == \
                    ipaddress.ip_address(address):
                return entry.get_attr("NDA_LLADDR")
    return None


def holders(ns: str, address: str = VIP) -> list[str]:
    with NetNS(ns) as ipr:
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr()
                if ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) == ipaddress.ip_address(address)]


def vip(ns: str, *calls: str) -> list:
    """What each call of LinuxFloatingAddress returns, made in order in one process inside namespace `ns`."""
    # announcements 0.2 s apart instead of 0.5: every neighbour update below comes > 1 s (the locktime) after
    # the one before it anyway, and the suite's time is scarce
    return run_in(ns, "import json\nfrom cortex.ha.vip import LinuxFloatingAddress\n"
                      "v = LinuxFloatingAddress(interval=0.2, probe_wait=0.3)\n"
                      f"print(json.dumps([{', '.join('v.' + c for c in calls)}]))")


def http_who(ns: str, host: str = VIP) -> str:
    return run_in(ns, f"import json, urllib.request\n"
                      f"print(json.dumps(urllib.request.urlopen('http://{host}:{PORT}/who', timeout=5).read().decode()))")


PING = """
import os, socket, struct, time
def checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
def ping(address):
    ident = os.getpid() & 0xFFFF
    body = struct.pack("!HH", ident, 1) + b"cortex-vip"
    packet = struct.pack("!BBH", 8, 0, checksum(struct.pack("!BBH", 8, 0, 0) + body)) + body
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(5)
        s.sendto(packet, (address, 0))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data, (source, _) = s.recvfrom(2048)
            icmp = data[(data[0] & 0x0F) * 4:]
            if source == address and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    return False
"""


def reach(ns: str) -> tuple[str, bool]:
    """From namespace `ns`: who answers HTTP at the floating address, and whether it answers an ICMP echo
    within 5 s (one process for both)."""
    code = (f"import json, urllib.request\n{PING}\n"
            f"who = urllib.request.urlopen('http://{VIP}:{PORT}/who', timeout=5).read().decode()\n"
            f"print(json.dumps([who, ping({VIP!r})]))")
    return tuple(run_in(ns, code))


def test_root_namespace_has_no_part_in_the_lab():
    route = subprocess.run(["ip", "-j", "route", "get", VIP], capture_output=True, text=True, check=False)
    if route.returncode == 0:  # off the machine via the default route, if anything: never into the lab
        assert not json.loads(route.stdout)[0].get("dev", "").startswith("vip")


def test_a_floating_address_moves_and_neighbours_follow(lab):
    a, b, c = lab["a"], lab["b"], lab["c"]
    mac_a, mac_b = mac_of(a), mac_of(b)
    assert vip(c, f"interface_for({CIDR!r})", "interface_for('10.99.0.1/24')") == ["eth0", None]
    capture = Capture(c)
    try:
        assert vip(a, f"claim({CIDR!r})", f"claim({CIDR!r})") == ["eth0", "eth0"]  # again: nothing added twice
        assert holders(a) == [CIDR]
        wait_until(lambda: capture.ops_from(mac_a) >= {1, 2}, 30, "A's gratuitous ARP request and reply in C")
        assert wait_until(lambda: reach(c), 30, "HTTP and ICMP from C to the address",
                          ignore=(AssertionError,)) == ("a", True)
        assert neighbour_mac(c) == mac_a

        with pytest.raises(AssertionError, match=f"answers from {mac_a}.*another machine holds it"):
            vip(b, f"claim({CIDR!r})")  # A still holds it: B's probe hears A, and B adds nothing
        assert holders(b) == []
        vip(a, f"release({CIDR!r})", f"release({CIDR!r})")  # again: already gone, no error
        assert holders(a) == []
        assert vip(b, f"claim({CIDR!r})") == ["eth0"]
        wait_until(lambda: capture.ops_from(mac_b) >= {1, 2}, 30, "B's gratuitous ARP in C")
        # C learnt the move from the announcement alone: it sent nothing since it last reached A
        wait_until(lambda: neighbour_mac(c) == mac_b, 30, "C's neighbour entry for the address to name B",
                   detail=lambda: f"entry: {neighbour_mac(c)}, A {mac_a}, B {mac_b}")
        assert reach(c) == ("b", True)
    finally:
        capture.close()
        vip(b, f"release({CIDR!r})")


def test_an_ipv6_floating_address_moves_and_neighbours_follow(lab):
    a, b, c = lab["a"], lab["b"], lab["c"]
    mac_a, mac_b = mac_of(a), mac_of(b)
    try:
        assert vip(a, f"claim({CIDR6!r})") == ["eth0"]
        assert holders(a, VIP6) == [CIDR6]
        assert wait_until(lambda: http_who(c, f"[{VIP6}]"), 30, "HTTP from C to the IPv6 address",
                          ignore=(AssertionError,)) == "a"
        assert neighbour_mac(c, VIP6) == mac_a
        # A still holds it: B's duplicate address detection hears A, and B keeps nothing
        with pytest.raises(AssertionError, match="duplicate address detection failed"):
            vip(b, f"claim({CIDR6!r})")
        assert holders(b, VIP6) == []
        vip(a, f"release({CIDR6!r})", f"release({CIDR6!r})")
        assert vip(b, f"claim({CIDR6!r})") == ["eth0"]
        # C learnt the move from the unsolicited advertisement alone
        wait_until(lambda: neighbour_mac(c, VIP6) == mac_b, 30, "C's neighbour entry for the IPv6 address to name B",
                   detail=lambda: f"entry: {neighbour_mac(c, VIP6)}, A {mac_a}, B {mac_b}")
        assert http_who(c, f"[{VIP6}]") == "b"
    finally:
        vip(a, f"release({CIDR6!r})")
        vip(b, f"release({CIDR6!r})")


def test_claims_that_cannot_work_say_why(lab):
    code = ("import json\nfrom cortex.ha.vip import LinuxFloatingAddress, FloatingAddressError\n"
            "out = []\n"
            "for call in ({calls}):\n"
            "    try:\n"
            "        call(LinuxFloatingAddress())\n"
            "        out.append('')\n"
            "    except FloatingAddressError as exc:\n"
            "        out.append(str(exc))\n"
            "print(json.dumps(out))")
    calls = ("lambda v: v.claim('10.99.0.1/24'), lambda v: v.claim('fd00:99::5/64'), "
             "lambda v: v.claim('10.232.7.100'), lambda v: v.claim('10.232.7.100/24', 'nosuch0'),")
    out = run_in(lab["c"], code.format(calls=calls))
    assert "no local interface is on the network" in out[0]
    assert "no local interface is on the network of fd00:99::5/64" in out[1]
    assert "prefix length" in out[2]
    assert "no interface 'nosuch0'" in out[3]
    assert holders(lab["c"]) == []
