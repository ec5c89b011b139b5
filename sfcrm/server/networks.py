"""Addresses and the networks they are checked against: the callback allowlist, the trusted
proxies, the addresses held to no cap on connections."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# This machine: a proxy or tunnel in front of the listener carries everyone's requests from it.
LOOPBACK = ("127.0.0.1", "::1")


def parse_networks(items: Iterable[str]) -> list[Network]:
    """Each address or CIDR network of ``items`` (blank ones skipped); an address is a network
    of one."""
    return [ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip()]


def in_networks(address: str, networks: list[Network]) -> bool:
    """Whether ``address`` lies in one of ``networks``; False for text that is no address."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in net for net in networks)
