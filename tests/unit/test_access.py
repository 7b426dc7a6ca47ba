"""Who may control, and which requests are cross-site or rebound: the pure decisions."""

import os

import pytest

from tracer_exporter.web.access import (
    AccessError,
    ControlPolicy,
    fetch_site_refusal,
    groups_of,
    host_refusal,
    origin_refusal,
    resolve_groups,
    resolve_users,
    split_host,
)
from tracer_exporter.web.routes import parse_networks

LOCAL = ["127.0.0.1", "127.0.0.1"]


@pytest.mark.parametrize(
    "host",
    [None, "", "127.0.0.1:9867", "127.0.0.1", "localhost:9867", "LOCALHOST", "localhost.", "[::1]:9867", "127.8.9.1"],
)
def test_hosts_of_this_server_pass(host):
    assert host_refusal(host, LOCAL, ()) is None


@pytest.mark.parametrize("host", ["rebind.evil.example:9867", "evil.example", "[2001:db8::1]:9867", "10.1.2.3"])
def test_foreign_hosts_are_refused(host):
    assert host_refusal(host, LOCAL, ()) == f"Host {host!r} is not this server: add it to --web.allowed-hosts if it is"


def test_the_listen_host_the_connected_address_and_allowed_hosts_pass():
    # Listening on all interfaces, the client connected to 10.0.2.15.
    assert host_refusal("10.0.2.15:9867", ["0.0.0.0", "10.0.2.15"], ()) is None
    assert host_refusal("0.0.0.0:9867", ["0.0.0.0", "10.0.2.15"], ()) is not None
    assert host_refusal("node1.example:9867", ["node1.example", "10.0.2.15"], ()) is None
    assert host_refusal("Tracer.Example:9867", LOCAL, ("tracer.example",)) is None
    assert host_refusal("[fd00::5]:9867", ["::", "fd00:0:0::5"], ()) is None


def test_split_host():
    assert [split_host(h) for h in ("a.example:1", "[::1]:2", "::1", "A.EXAMPLE.")] == [
        "a.example",
        "::1",
        "::1",
        "a.example",
    ]


def test_origin_must_be_the_servers_own():
    assert origin_refusal(None, "127.0.0.1:9867", "http") is None
    assert origin_refusal("http://127.0.0.1:9867", "127.0.0.1:9867", "http") is None
    for origin, scheme in (
        ("http://evil.example", "http"),
        ("null", "http"),
        ("https://127.0.0.1:9867", "http"),
        ("http://127.0.0.1:9868", "http"),
    ):
        assert origin_refusal(origin, "127.0.0.1:9867", scheme) == (
            f"cross-origin control request refused: Origin {origin!r} is not this server's"
        )


def test_sec_fetch_site():
    assert [fetch_site_refusal(s) for s in (None, "same-origin", "none", "None")] == [None] * 4
    for site in ("cross-site", "same-site"):
        assert fetch_site_refusal(site) == f"cross-site control request refused: Sec-Fetch-Site is {site!r}"


def policy(**kw):
    kw.setdefault("networks", parse_networks(["127.0.0.0/8", "::1/128"]))
    kw.setdefault("name_of", lambda uid: f"uid {uid}")
    return ControlPolicy(**kw)


def test_root_over_loopback_only_by_default():
    p = policy()
    assert p.refusal(None, "127.0.0.1", 0) is None
    assert p.refusal(None, "::ffff:127.0.0.1", 0) is None
    assert p.refusal(None, "127.0.0.1", 1000) == (
        "uid 1000 may not control: only root, control.allowed_users and control.allowed_groups may"
    )
    hint = " and not an authenticated user of control.users"
    assert p.refusal(None, "10.0.2.2", None) == (
        f"control requests from 10.0.2.2 are not allowed: not in control.allowed_networks{hint}"
    )
    # An address in allowed_networks whose client is not on this host: remote, needs a user.
    wide = policy(networks=parse_networks(["10.0.0.0/8"]))
    assert wide.refusal(None, "10.0.2.2", None) == (
        f"control requests from 10.0.2.2 are not allowed: a client on another host{hint}"
    )


def test_users_groups_and_control_users():
    p = policy(
        uids=frozenset({0, 1000}),
        gids=frozenset({44}),
        users=frozenset({"ops"}),
        groups_of=lambda uid: frozenset({44}) if uid == 2000 else frozenset(),
    )
    assert p.refusal(None, "127.0.0.1", 1000) is None
    assert p.refusal(None, "127.0.0.1", 2000) is None
    assert p.refusal(None, "127.0.0.1", 3000) is not None
    # A control user from anywhere; a scrape-only user is judged as anyone else.
    assert p.refusal("ops", "192.0.2.7", None) is None
    assert p.refusal("prometheus", "192.0.2.7", None) is not None
    assert p.refusal("prometheus", "127.0.0.1", 0) is None


def test_names_resolve_and_unknown_names_are_errors():
    assert resolve_users(["root", 1000, "65534"]) == frozenset({0, 1000, 65534})
    assert resolve_groups(["root", 5]) == frozenset({0, 5})
    with pytest.raises(AccessError, match=r"control\.allowed_users: no such user .no-such-user-x."):
        resolve_users(["no-such-user-x"])
    with pytest.raises(AccessError, match=r"control\.allowed_groups: no such group .no-such-group-x."):
        resolve_groups(["no-such-group-x"])


def test_groups_of_a_user_include_primary_and_supplementary():
    import pwd

    me = pwd.getpwuid(os.getuid())
    assert groups_of(os.getuid()) == frozenset(os.getgrouplist(me.pw_name, me.pw_gid))
    assert me.pw_gid in groups_of(os.getuid())
    assert groups_of(4_000_000) == frozenset()
