"""A floating address: the address a service is reached at, held by whichever node runs the service.

`claim` adds the address to the local interface whose network contains it and announces it: IPv4 with
gratuitous ARP (a request and a reply whose sender and target are both the address, broadcast from the
interface's MAC), IPv6 with unsolicited neighbour advertisements (override flag, to all nodes), so switches
and neighbours send to the new holder at once instead of after their entries expire. `release` removes it. Both are idempotent: a takeover that is retried claims nothing twice. They act in
the network namespace of the calling process, over netlink (pyroute2, imported on first use: most nodes
never hold a floating address) and an AF_PACKET socket, so they need CAP_NET_ADMIN and CAP_NET_RAW.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

ARP_REQUEST, ARP_REPLY = 1, 2
NEIGHBOR_ADVERTISEMENT = 136
NA_OVERRIDE = 0x20000000
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
DAD_WAIT = 10.0  # seconds IPv6 duplicate address detection may take (1 s per probe by default)
ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


class FloatingAddressError(Exception):
    """A floating address that cannot be claimed or released; the message says what to do."""


def parse(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError:
        raise FloatingAddressError(f"{cidr!r} is not an address with a prefix length, such as 192.168.1.50/24") \
            from None
    if "/" not in cidr:
        raise FloatingAddressError(f"{cidr!r}: give the prefix length of its network, such as {cidr}/24")
    return iface


def family(vip) -> int:
    return socket.AF_INET if vip.version == 4 else socket.AF_INET6


def neighbour_advertisement(mac: bytes, address: ipaddress.IPv6Address) -> bytes:
    """An unsolicited ICMPv6 neighbour advertisement for `address` at `mac`, override flag set (the kernel
    fills in the checksum)."""
    return struct.pack("!BBHI16s", NEIGHBOR_ADVERTISEMENT, 0, 0, NA_OVERRIDE, address.packed) + \
        struct.pack("!BB6s", 2, 1, mac)  # option: target link-layer address


def gratuitous_arp(mac: bytes, address: ipaddress.IPv4Address, op: int) -> bytes:
    """An Ethernet frame carrying an ARP packet whose sender and target address are both `address`."""
    ip = address.packed
    target_mac = b"\x00" * 6 if op == ARP_REQUEST else BROADCAST
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, ip, target_mac, ip)
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def parse_arp(frame: bytes) -> dict | None:
    """The fields of an ARP frame (None for anything else): what a capture compares."""
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
        return None
    _, _, _, _, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
    return {"op": op, "sender_mac": sha.hex(":"), "sender_ip": str(ipaddress.IPv4Address(spa)),
            "target_mac": tha.hex(":"), "target_ip": str(ipaddress.IPv4Address(tpa))}


class LinuxFloatingAddress:
    """Before a claim adds the address, an ARP probe waits `probe_wait` seconds for another holder to answer
    (0: no probe). After it, `announcements` rounds of gratuitous ARP go out `interval` seconds apart: one
    frame may be lost, and a neighbour ignores an update within its locktime (1 s by default) of the last."""

    def __init__(self, announcements: int = 3, interval: float = 0.5, probe_wait: float = 0.5):
        self.announcements = announcements
        self.interval = interval
        self.probe_wait = probe_wait

    def _ipr(self):
        from pyroute2 import IPRoute  # netlink, on first use

        return IPRoute()

    def _links(self, ipr) -> dict[int, str]:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}

    def _holders(self, ipr, vip) -> list[tuple[int, int]]:
        """(interface index, prefix length) of every local address equal to the floating one."""
        return [(a["index"], a["prefixlen"]) for a in ipr.get_addr(family=family(vip))
                if ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) == vip.ip]

    def interface_for(self, cidr: str) -> str | None:
        """The interface whose network holds the address: the one holding it already, else the first whose
        own address's network contains it (None: no local network does)."""
        vip = parse(cidr)
        with self._ipr() as ipr:
            links = self._links(ipr)
            holders = self._holders(ipr, vip)
            if holders:
                return links.get(holders[0][0])
            for addr in ipr.get_addr(family=family(vip)):
                network = ipaddress.ip_interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}").network
                if vip.ip in network and network.prefixlen < network.max_prefixlen \
                        and not links.get(addr["index"], "").startswith("lo"):
                    return links.get(addr["index"])
        return None

    def claim(self, cidr: str, interface: str | None = None, probe: bool = True) -> str:
        """`probe=False` skips the IPv4 probe for another holder: for a takeover from a holder known to be
        stopped, whose machine may still carry the address it could not remove (its agent was killed)."""
        vip = parse(cidr)
        ifname = interface or self.interface_for(cidr)
        if not ifname:
            raise FloatingAddressError(f"no local interface is on the network of {cidr}; give the interface to "
                                       "claim it on, or check the node's addresses (`ip addr`)")
        with self._ipr() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise FloatingAddressError(f"{cidr}: this node has no interface {ifname!r} (`ip link` lists them)")
            index = found[0]
            links = self._links(ipr)
            holders = self._holders(ipr, vip)
            elsewhere = [links.get(i, str(i)) for i, _ in holders if i != index]
            if elsewhere:
                raise FloatingAddressError(f"{vip.ip} is already on {', '.join(elsewhere)} of this node; release "
                                           f"it there first (a node holds a floating address on one interface)")
            link = ipr.get_links(index)[0]
            mac = bytes.fromhex((link.get_attr("IFLA_ADDRESS") or "").replace(":", ""))
            if vip.version == 6:
                if not holders:  # the kernel's duplicate address detection is the probe
                    self._add(ipr, index, ifname, vip)
                self._wait_dad(ipr, index, ifname, vip)
            elif not holders:
                other = self.probe(ifname, mac, vip.ip) if probe else None
                if other:
                    raise FloatingAddressError(f"{vip.ip} answers from {other} on {ifname}'s network: another machine "
                                               "holds it; release it there (or fence that node) and claim again")
                self._add(ipr, index, ifname, vip)
        if vip.version == 6:
            self.advertise(ifname, index, mac, vip.ip)
        else:
            self.announce(ifname, mac, vip.ip)
        return ifname

    def _add(self, ipr, index: int, ifname: str, vip) -> None:
        try:
            ipr.addr("add", index=index, address=str(vip.ip), prefixlen=vip.network.prefixlen)
        except Exception as exc:  # pyroute2's NetlinkError: EEXIST from a concurrent claim is fine
            if getattr(exc, "code", None) != 17:
                raise FloatingAddressError(f"cannot add {vip} to {ifname}: {exc}; the agent needs "
                                           "CAP_NET_ADMIN") from None

    def _wait_dad(self, ipr, index: int, ifname: str, vip) -> None:
        """Until the kernel's duplicate address detection for the IPv6 address is done: tentative addresses
        cannot be used, and a failed detection means another machine holds it (the address is removed)."""
        deadline = time.monotonic() + DAD_WAIT
        while True:
            found = [a for a in ipr.get_addr(family=socket.AF_INET6, index=index)
                     if ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) == vip.ip]
            if not found:
                raise FloatingAddressError(f"{vip} vanished from {ifname} while it was being claimed; claim again")
            flags = found[0].get_attr("IFA_FLAGS") or found[0]["flags"]
            if flags & IFA_F_DADFAILED:
                self.release(str(vip))
                raise FloatingAddressError(f"{vip.ip}: another machine on {ifname}'s network answers for it "
                                           "(duplicate address detection failed); release it there (or fence that "
                                           "node) and claim again")
            if not flags & IFA_F_TENTATIVE:
                return
            if time.monotonic() > deadline:
                raise FloatingAddressError(f"{vip.ip} on {ifname} is still tentative after {DAD_WAIT:g} s; is the "
                                           "link up (`ip link`)? claim again once it is")
            time.sleep(0.1)

    def advertise(self, ifname: str, index: int, mac: bytes, address: ipaddress.IPv6Address) -> None:
        """Unsolicited neighbour advertisements for `address` to all nodes on `ifname`, from the address
        itself, hop limit 255 (neighbours ignore any other)."""
        if len(mac) != 6:
            return
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        except PermissionError:
            raise FloatingAddressError(f"{address} on {ifname}: advertising it needs CAP_NET_RAW") from None
        with sock:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
                sock.bind((str(address), 0, 0, index))
                packet = neighbour_advertisement(mac, address)
                for round_ in range(self.announcements):
                    if round_:
                        time.sleep(self.interval)
                    sock.sendto(packet, ("ff02::1", 0, 0, index))
            except OSError as exc:
                raise FloatingAddressError(f"{address} is on {ifname} but cannot be advertised ({exc.strerror}); "
                                           "is the link up (`ip link`)? claim again once it is") from None

    def _packet_socket(self, address, ifname: str, doing: str) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        except PermissionError:
            raise FloatingAddressError(f"{address} on {ifname}: {doing} needs CAP_NET_RAW") from None
        try:
            sock.bind((ifname, ETH_P_ARP))
        except OSError as exc:
            sock.close()
            raise FloatingAddressError(f"{address} on {ifname}: {doing} failed ({exc.strerror})") from None
        return sock

    def probe(self, ifname: str, mac: bytes, address: ipaddress.IPv4Address) -> str | None:
        """The MAC of another machine that uses `address` on `ifname`'s network, if one answers an ARP probe
        (RFC 5227: sender address 0.0.0.0) or announces it within `probe_wait` seconds; None otherwise. Two
        holders of one address would split its clients between them."""
        if len(mac) != 6 or self.probe_wait <= 0:
            return None
        own = mac.hex(":")
        probe = BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + struct.pack(
            "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, ARP_REQUEST, mac, b"\0" * 4, b"\0" * 6, address.packed)
        with self._packet_socket(address, ifname, "probing the address") as sock:
            deadline = time.monotonic() + self.probe_wait
            resend = time.monotonic()
            while (now := time.monotonic()) < deadline:
                if now >= resend:
                    try:
                        sock.send(probe)
                    except OSError as exc:
                        raise FloatingAddressError(f"cannot probe for {address} on {ifname} ({exc.strerror}); is "
                                                   "the link up (`ip link`)?") from None
                    resend = now + self.probe_wait / 2
                sock.settimeout(max(0.01, min(deadline, resend) - now))
                try:
                    arp = parse_arp(sock.recv(2048))
                except TimeoutError:
                    continue
                if arp and arp["sender_ip"] == str(address) and arp["sender_mac"] != own:
                    return arp["sender_mac"]
        return None

    def announce(self, ifname: str, mac: bytes, address: ipaddress.IPv4Address) -> None:
        """Gratuitous ARP for `address` from `mac` on `ifname`, as a request and as a reply (neighbours differ
        in which one they accept)."""
        if len(mac) != 6:
            return  # no Ethernet address (a tunnel, a point-to-point link): nothing to announce
        with self._packet_socket(address, ifname, "announcing the address") as sock:
            for round_ in range(self.announcements):
                if round_:
                    time.sleep(self.interval)
                for op in (ARP_REQUEST, ARP_REPLY):
                    try:
                        sock.send(gratuitous_arp(mac, address, op))
                    except OSError as exc:  # ENETDOWN: the link is down; the address stays, claim again later
                        raise FloatingAddressError(f"{address} is on {ifname} but cannot be announced "
                                                   f"({exc.strerror}); is the link up (`ip link`)? claim again "
                                                   "once it is") from None

    def release(self, cidr: str) -> None:
        vip = parse(cidr)
        with self._ipr() as ipr:
            for index, prefixlen in self._holders(ipr, vip):
                try:
                    ipr.addr("del", index=index, address=str(vip.ip), prefixlen=prefixlen)
                except Exception as exc:  # EADDRNOTAVAIL: released meanwhile, as wanted
                    if getattr(exc, "code", None) != 99:
                        raise FloatingAddressError(f"cannot remove {vip.ip}: {exc}; the agent needs "
                                                   "CAP_NET_ADMIN") from None
