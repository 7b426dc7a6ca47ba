"""Who is on the other end of a local TCP connection: its socket's owner uid.

The kernel lists every TCP socket of our network namespace in /proc/net/tcp
and /proc/net/tcp6, with the uid that created it. A client on this host has
a socket whose local address is our peer address and whose remote address is
ours; a client elsewhere has none, and is remote.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from typing import Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Endpoint = tuple[Address, int]

PROC_NET = "/proc/net"


def normalise(ip: str | Address) -> Address:
    """An address, with an IPv4 client on a dual-stack socket (::ffff:a.b.c.d) as IPv4."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0]) if isinstance(ip, str) else ip
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped if mapped is not None else addr


def _endpoint(text: str) -> Endpoint:
    """ADDR:PORT as /proc/net/tcp prints it: 32-bit words in host order, then a hex port."""
    hex_addr, _, hex_port = text.partition(":")
    raw = b"".join(int(hex_addr[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_addr), 8))
    return normalise(ipaddress.ip_address(raw)), int(hex_port, 16)


def parse_sockets(text: str) -> Iterable[tuple[Endpoint, Endpoint, int]]:
    """(local, remote, uid) of each socket in a /proc/net/tcp or tcp6 listing."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            yield _endpoint(fields[1]), _endpoint(fields[2]), int(fields[7])
        except ValueError:
            continue


def find_uid(text: str, peer: Endpoint, local: Endpoint) -> int | None:
    """The owner of the socket whose local end is peer and remote end is local."""
    for mine, theirs, uid in parse_sockets(text):
        if mine == peer and theirs == local:
            return uid
    return None


def peer_uid(peer: tuple[str, int], local: tuple[str, int], proc_net: str = PROC_NET) -> int | None:
    """The uid owning the client's socket, or None when the client is not on this host."""
    want_peer = (normalise(peer[0]), int(peer[1]))
    want_local = (normalise(local[0]), int(local[1]))
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc_net}/{name}", encoding="ascii") as f:
                text = f.read()
        except OSError:
            continue
        uid = find_uid(text, want_peer, want_local)
        if uid is not None:
            return uid
    return None
