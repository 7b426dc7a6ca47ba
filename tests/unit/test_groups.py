"""Workload selectors and groups: the config's checks, matching, the start-up scan and totals."""

from __future__ import annotations

import pytest
from fakes import FakeBackend, FakeGroupBackend, FakeIdentity, FakeProcesses, proc

from tracer_exporter.model.config import ConfigError, parse_config
from tracer_exporter.model.counters import Counts, Row
from tracer_exporter.model.groups import Groups
from tracer_exporter.model.selectors import match, parse_select, unit_path
from tracer_exporter.model.tracking import Tracker
from tracer_exporter.views.collector import group_families
from tracer_exporter.views.tables import group_table


def test_a_good_select_parses_with_its_defaults():
    config = parse_config(
        {
            "select": [
                {"name": "web", "comm": "nginx"},
                {"name": "api", "cgroup": "/system.slice/api.service", "per_process": True},
                {"name": "sshd", "exe": "/usr/sbin/sshd", "follow_forks": False},
                {"name": "etl", "cmdline": r"python3 .*etl\.py"},
                {"name": "db", "systemd_unit": "postgresql.service"},
            ]
        }
    )
    web, api, sshd, etl, db = config.select
    assert (web.kind, web.value, web.follow_forks, web.per_process) == ("comm", "nginx", True, False)
    assert api.per_process and api.by_cgroup and db.by_cgroup and not sshd.follow_forks
    assert etl.pattern is not None and not etl.in_kernel and web.in_kernel


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"comm": "x"}, "select[0].name: missing"),
        ({"name": "a"}, "select[0]: no matcher: give one of comm, exe, cmdline, cgroup, systemd_unit"),
        ({"name": "a", "comm": "x", "exe": "/x"}, "select[0]: comm and exe: give exactly one matcher"),
        ({"name": "a", "comm": "sixteen-chars-xx"}, "select[0].comm: 'sixteen-chars-xx' is longer than a task name"),
        ({"name": "a", "cmdline": "(unclosed"}, "select[0].cmdline: the regex does not compile"),
        ({"name": "a", "cgroup": "system.slice"}, "select[0].cgroup: 'system.slice' is a relative path"),
        ({"name": "a", "exe": "sshd"}, "select[0].exe: 'sshd' is a relative path"),
        ({"name": "a", "comm": "x", "colour": 1}, "select[0].colour: unknown key"),
        ({"name": "a b", "comm": "x"}, "select[0].name: 'a b' is not 1 to 64 of"),
        ({"name": "a", "comm": "x", "per_process": "yes"}, "select[0].per_process: expected true or false"),
        ({"name": "a", "cgroup": "/"}, "select[0].cgroup: '/' is not a cgroup below the root"),
    ],
)
def test_a_bad_selector_names_the_field(item, message):
    with pytest.raises(ConfigError) as e:
        parse_config({"select": [item]}, "c")
    assert f"c: {message}" in str(e.value)


def test_every_select_problem_is_one_line_and_duplicates_are_named():
    with pytest.raises(ConfigError) as e:
        parse_config({"select": [{"name": "a", "comm": "x"}, {"name": "a", "comm": "y"}, {"name": "b"}]}, "c")
    assert str(e.value).splitlines() == [
        "c: select[1].name: 'a' is the name of another group",
        "c: select[2]: no matcher: give one of comm, exe, cmdline, cgroup, systemd_unit",
    ]


def test_more_groups_than_the_limit_is_refused():
    items = [{"name": f"g{i}", "comm": f"c{i}"} for i in range(3)]
    with pytest.raises(ConfigError) as e:
        parse_config({"select": items, "limits": {"max_groups": 2}}, "c")
    assert "c: select: 3 groups, more than limits.max_groups (2)" in str(e.value)
    assert len(parse_config({"select": items, "limits": {"max_groups": 3}}).select) == 3


def test_a_units_cgroup_is_systemds_or_its_slices():
    assert unit_path("db.service", "/system.slice/db.service") == "/system.slice/db.service"
    assert unit_path("db.service") == "/system.slice/db.service"
    assert unit_path("x.service", slice_name="a-b.slice") == "/a.slice/a-b.slice/x.service"


def test_the_first_matching_selector_wins_and_cgroups_cover_their_subtree():
    problems: list[str] = []
    sels = list(
        parse_select(
            [
                {"name": "web", "comm": "nginx"},
                {"name": "api", "cgroup": "/system.slice/api.service"},
                {"name": "etl", "cmdline": r"etl\.py"},
            ],
            10,
            problems,
        )
    )
    assert problems == []
    assert match(sels, "nginx", "", "", "/system.slice/api.service") == 0
    assert match(sels, "sh", "", "", "/system.slice/api.service/worker") == 1
    assert match(sels, "sh", "", "", "/system.slice/api.service2") == -1
    assert match(sels, "python3", "", "python3 /opt/etl.py", "/") == 2
    assert match(sels, "python3", "", "python3 /opt/etlxpy", "/") == -1


def configured(procs, select):
    backend = FakeBackend()
    tracker = Tracker(FakeProcesses(*(proc(p, v[0]) for p, v in procs.items())))
    tracker.attach_backend(backend)
    groups = Groups(tracker, FakeIdentity(procs), resolve_unit=lambda u: f"/system.slice/{u}")
    kernel = FakeGroupBackend()
    groups.attach_backend(kernel)
    warnings = groups.configure(parse_config({"select": select}).select)
    return tracker, groups, backend, kernel, warnings


def test_the_scan_enrols_what_matches_now_and_the_kernel_gets_every_selector():
    procs = {
        10: ("nginx", "/usr/sbin/nginx", "nginx: master", "/"),
        11: ("sh", "/bin/sh", "sh", "/system.slice/db.service"),
        12: ("python3", "/usr/bin/python3", "python3 etl.py", "/"),
        13: ("bash", "/bin/bash", "bash", "/"),
    }
    tracker, groups, backend, kernel, warnings = configured(
        procs,
        [
            {"name": "web", "comm": "nginx"},
            {"name": "db", "systemd_unit": "db.service"},
            {"name": "etl", "cmdline": r"etl\.py"},
        ],
    )
    assert warnings == []
    assert {r.pid: r.group for r in tracker.rows()} == {10: "web", 11: "db", 12: "etl"}
    assert [(s.id, s.selector.name, s.cgroup) for s in kernel.specs] == [
        (1, "web", ""),
        (2, "db", "/system.slice/db.service"),
        (3, "etl", ""),
    ]
    assert kernel.cmdline and groups.cmdline_wanted


def test_group_totals_add_members_that_left_and_never_go_back():
    procs = {10: ("nginx", "", "", "/"), 11: ("nginx", "", "", "/")}
    tracker, groups, backend, kernel, _ = configured(procs, [{"name": "web", "comm": "nginx"}])
    backend.maps[10] = Counts(up_calls=3)
    backend.maps[11] = Counts(up_calls=4)
    kernel.left[1] = Counts(up_calls=10)
    (g,) = groups.rows(tracker.rows)
    assert (g.name, g.counts.up_calls, g.processes, g.dropped) == ("web", 17, 2, 0)
    # 11 exited: the kernel deleted its row before folding it in; a scrape in between reads it short.
    del backend.maps[11]
    (g,) = groups.rows(tracker.rows)
    assert g.counts.up_calls == 17 and g.processes == 1
    kernel.left[1] = Counts(up_calls=14)
    backend.maps[10] = Counts(up_calls=5)
    (g,) = groups.rows(tracker.rows)
    assert g.counts.up_calls == 19


def test_members_have_per_process_series_only_with_per_process():
    procs = {10: ("nginx", "", "", "/"), 20: ("redis", "", "", "/")}
    tracker, groups, *_ = configured(
        procs, [{"name": "web", "comm": "nginx"}, {"name": "cache", "comm": "redis", "per_process": True}]
    )
    assert [r.pid for r in groups.metric_rows(tracker.rows())] == [20]


def test_a_reload_keeps_ids_by_name_and_stops_counting_removed_groups():
    procs = {10: ("nginx", "", "", "/"), 20: ("redis", "", "", "/")}
    tracker, groups, backend, kernel, _ = configured(
        procs, [{"name": "web", "comm": "nginx"}, {"name": "cache", "comm": "redis"}]
    )
    groups.configure(parse_config({"select": [{"name": "cache", "comm": "redis"}]}).select)
    assert [(s.id, s.selector.name) for s in kernel.specs] == [(2, "cache")]
    assert {r.pid: r.group for r in tracker.rows()} == {20: "cache"}
    assert [g.name for g in groups.rows(tracker.rows)] == ["cache"]


def test_the_group_table_and_families():
    rows = [Row(7, "x", Counts(up_calls=1)), Row(5, "nginx", Counts(up_calls=2), group="web")]
    lines = group_table(rows).splitlines()
    assert lines[0].split() == [
        "GROUP",
        "PID",
        "kmalloc",
        "kfree",
        "kmalloc_mem",
        "kfree_mem",
        "sched",
        "up",
        "down",
        "lock",
        "unlock",
    ]
    assert [line.split()[:2] for line in lines[1:]] == [["web", "5"], ["-", "7"]]
    from tracer_exporter.model.groups import GroupRow

    names = {f.name: f for f in group_families([GroupRow("web", Counts(up_calls=2), 1, 0)])}
    assert set(names) == {
        "tracer_group_kmalloc_calls",
        "tracer_group_kmalloc_bytes",
        "tracer_group_kfree_calls",
        "tracer_group_kfree_bytes",
        "tracer_group_schedule_calls",
        "tracer_group_up_calls",
        "tracer_group_down_interruptible_calls",
        "tracer_group_mutex_lock_calls",
        "tracer_group_mutex_unlock_calls",
        "tracer_group_processes",
        "tracer_group_dropped",
    }
    assert [s.value for s in names["tracer_group_up_calls"].samples if s.name.endswith("_total")] == [2]
