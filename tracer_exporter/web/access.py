"""Who may use the control routes, and which requests are cross-site or rebound.

Pure decisions: each takes what the request says and returns None (allowed)
or the reason for a 403. web.routes asks them; nothing here touches a socket.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tracer_exporter.web.peer import normalise


class AccessError(Exception):
    """A user or group of the config that does not exist."""


def resolve_users(entries: Iterable[str | int]) -> frozenset[int]:
    uids = set()
    for entry in entries:
        if isinstance(entry, int) or str(entry).isdigit():
            uids.add(int(entry))
            continue
        try:
            uids.add(pwd.getpwnam(str(entry)).pw_uid)
        except KeyError:
            raise AccessError(f"control.allowed_users: no such user {entry!r}") from None
    return frozenset(uids)


def resolve_groups(entries: Iterable[str | int]) -> frozenset[int]:
    gids = set()
    for entry in entries:
        if isinstance(entry, int) or str(entry).isdigit():
            gids.add(int(entry))
            continue
        try:
            gids.add(grp.getgrnam(str(entry)).gr_gid)
        except KeyError:
            raise AccessError(f"control.allowed_groups: no such group {entry!r}") from None
    return frozenset(gids)


def groups_of(uid: int) -> frozenset[int]:
    """The uid's primary and supplementary groups, from the user database."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))


def user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True)
class ControlPolicy:
    """Who may POST and DELETE /pids."""

    networks: Sequence[Any] = ()  # ip_network: unauthenticated clients must come from one
    uids: frozenset[int] = frozenset({0})  # local socket owners allowed (root always)
    gids: frozenset[int] = frozenset()
    users: frozenset[str] = frozenset()  # basic-auth users allowed from anywhere
    groups_of: Callable[[int], frozenset[int]] = field(default=groups_of, compare=False)
    name_of: Callable[[int], str] = field(default=user_name, compare=False)

    def refusal(self, auth_user: str | None, remote: str, uid: int | None) -> str | None:
        """None when the client may control, else why not.

        uid is the owner of the client's socket when the client is on this host,
        None when it is elsewhere.
        """
        if auth_user is not None and auth_user in self.users:
            return None
        if not in_networks(remote, self.networks):
            return f"control requests from {remote} are not allowed: not in control.allowed_networks{self._hint()}"
        if uid is None:
            return f"control requests from {remote} are not allowed: a client on another host{self._hint()}"
        if uid == 0 or uid in self.uids:
            return None
        if self.gids and self.groups_of(uid) & self.gids:
            return None
        return f"{self.name_of(uid)} may not control: only root, control.allowed_users and control.allowed_groups may"

    def _hint(self) -> str:
        return " and not an authenticated user of control.users"


def in_networks(remote: str, networks: Sequence[Any]) -> bool:
    try:
        addr = normalise(remote)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in networks)


def split_host(host: str) -> str:
    """The name or address of a Host header, without port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_loopback(name: str) -> bool:
    try:
        return normalise(name).is_loopback
    except ValueError:
        return False


def host_refusal(host: str | None, local_addresses: Iterable[str], allowed: Iterable[str]) -> str | None:
    """None when Host names this server, else why not (DNS rebinding).

    local_addresses: the listen host and the address the client connected to.
    """
    if not host:
        return None  # HTTP/1.0 without Host: no browser sends that
    name = split_host(host)
    if name == "localhost" or name.endswith(".localhost") or _is_loopback(name):
        return None
    known = {split_host(a) for a in local_addresses if a and a not in ("0.0.0.0", "::")}
    known |= {split_host(a) for a in allowed}
    if name in known:
        return None
    try:
        if normalise(name) in {normalise(a) for a in known if _is_ip(a)}:
            return None
    except ValueError:
        pass
    return f"Host {host!r} is not this server: add it to --web.allowed-hosts if it is"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def origin_refusal(origin: str | None, host: str | None, scheme: str) -> str | None:
    """None when Origin is absent or the server's own (scheme://Host), else why not."""
    if origin is None:
        return None
    parts = urllib.parse.urlsplit(origin.strip())
    if host and parts.scheme == scheme and parts.netloc.lower() == host.strip().lower() and not parts.path:
        return None
    return f"cross-origin control request refused: Origin {origin!r} is not this server's"


def fetch_site_refusal(site: str | None) -> str | None:
    """Sec-Fetch-Site: a browser's own statement of where the request comes from."""
    if site is None or site.strip().lower() in ("same-origin", "none"):
        return None
    return f"cross-site control request refused: Sec-Fetch-Site is {site!r}"
