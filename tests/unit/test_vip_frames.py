"""The gratuitous ARP frame a claim sends, byte for byte, and the address forms a claim accepts. The frame
on a real wire, and what neighbours make of it, is tests/system/test_vip.py."""

from __future__ import annotations

import ipaddress

import pytest

from cortex.ha.vip import (
    ARP_REPLY,
    ARP_REQUEST,
    FloatingAddressError,
    gratuitous_arp,
    neighbour_advertisement,
    parse,
    parse_arp,
)


def test_gratuitous_arp_names_the_address_as_sender_and_target():
    mac = bytes.fromhex("020000000a0b")
    frame = gratuitous_arp(mac, ipaddress.IPv4Address("192.168.1.50"), ARP_REQUEST)
    assert len(frame) == 42 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    assert parse_arp(frame) == {"op": 1, "sender_mac": "02:00:00:00:0a:0b", "sender_ip": "192.168.1.50",
                                "target_mac": "00:00:00:00:00:00", "target_ip": "192.168.1.50"}
    reply = parse_arp(gratuitous_arp(mac, ipaddress.IPv4Address("192.168.1.50"), ARP_REPLY))
    assert reply["op"] == 2 and reply["target_mac"] == "ff:ff:ff:ff:ff:ff"
    assert parse_arp(b"\x00" * 60) is None


@pytest.mark.parametrize(("cidr", "problem"), [("192.168.1.50", "prefix length"), ("fd00::5", "prefix length"),
                                               ("not-an-address/24", "not an address")])
def test_addresses_a_claim_refuses(cidr, problem):
    with pytest.raises(FloatingAddressError, match=problem):
        parse(cidr)
    assert str(parse("192.168.1.50/24").network) == "192.168.1.0/24"


def test_neighbour_advertisement_overrides_and_names_the_mac():
    mac = bytes.fromhex("020000000a0b")
    packet = neighbour_advertisement(mac, ipaddress.IPv6Address("fd00::50"))
    assert packet[0] == 136 and packet[1] == 0  # type, code (the kernel computes the checksum)
    assert packet[4] & 0x20 and not packet[4] & 0xC0  # override, neither router nor solicited
    assert packet[8:24] == ipaddress.IPv6Address("fd00::50").packed
    assert packet[24:] == b"\x02\x01" + mac  # target link-layer address option, 8 bytes
