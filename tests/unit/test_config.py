from pathlib import Path

import pytest

from tracer_exporter.model.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_no_file_means_defaults():
    assert load_config(None) == Config()


def test_shipped_example_is_valid():
    config = load_config(str(REPO / "config.yaml"))
    assert config.pids == ()
    assert config.max_tracked_processes == 16384
    assert config.control_allowed_networks == ("127.0.0.0/8", "::1/128")


def test_full_config():
    config = parse_config(
        {
            "pids": [1, 42],
            "limits": {"max_tracked_processes": 10, "alloc_map_entries": 100, "inflight_map_entries": 32},
            "probes": {"kretprobe_maxactive": 64, "symbols": {"up": ["up"]}},
            "control": {"allowed_networks": ["10.0.2.2/32"]},
        }
    )
    assert config == Config(
        pids=(1, 42),
        max_tracked_processes=10,
        alloc_map_entries=100,
        inflight_map_entries=32,
        kretprobe_maxactive=64,
        control_allowed_networks=("10.0.2.2/32",),
        symbol_overrides={"up": ("up",)},
    )


def test_empty_document_is_defaults():
    assert parse_config(None) == Config()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"pid": [1]}, "c: pid: unknown key (known: control, follow_forks, limits, pids, probes, select)"),
        ({"pids": "1"}, "c: pids: expected a list of process ids, got str"),
        ({"pids": [1, "x"]}, "c: pids[1]: expected an integer, got 'x'"),
        ({"pids": [0]}, "c: pids[0]: must be from 1 to 4194304, got 0"),
        ({"pids": [7, 7]}, "c: pids[1]: pid 7 is listed twice"),
        ({"pids": [True]}, "c: pids[0]: expected an integer, got True"),
        (
            {"limits": {"max_tracked_processes": -1}},
            "c: limits.max_tracked_processes: must be from 1 to 1048576, got -1",
        ),
        ({"limits": {"alloc_map_entries": 10**12}}, "c: limits.alloc_map_entries: must be from 1 to 16777216"),
        ({"limits": {"inflight_map_entries": 0}}, "c: limits.inflight_map_entries: must be from 1 to 1048576, got 0"),
        ({"limits": {"bogus": 1}}, "c: limits.bogus: unknown key"),
        ({"limits": [1]}, "c: limits: expected a mapping, got list"),
        ({"probes": {"kretprobe_maxactive": 5000}}, "c: probes.kretprobe_maxactive: must be from 1 to 4096"),
        ({"probes": {"symbols": {"nope": ["x"]}}}, "c: probes.symbols.nope: unknown function"),
        (
            {"control": {"allowed_networks": ["nonsense"]}},
            "c: control.allowed_networks[0]: 'nonsense' is not a network",
        ),
    ],
)
def test_bad_config_names_the_field(doc, message):
    with pytest.raises(ConfigError) as e:
        parse_config(doc, "c")
    assert message in str(e.value)


def test_every_problem_is_reported_once_per_line():
    with pytest.raises(ConfigError) as e:
        parse_config({"x": 1, "pids": ["a"], "limits": {"max_tracked_processes": "many"}}, "c")
    assert str(e.value).splitlines() == [
        "c: x: unknown key (known: control, follow_forks, limits, pids, probes, select)",
        "c: pids[0]: expected an integer, got 'a'",
        "c: limits.max_tracked_processes: expected an integer, got 'many'",
    ]


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="c: expected a mapping at the top level, got list"):
        parse_config([1, 2], "c")


def test_not_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pids: [1, 2\nlimits: {")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML at line \d+, column \d+"):
        load_config(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file: No such file or directory"):
        load_config(str(tmp_path / "absent.yaml"))


def test_unreadable_file(tmp_path):
    # A directory cannot be read as a file, even by root (who ignores file modes).
    with pytest.raises(ConfigError, match="cannot read the config file: Is a directory"):
        load_config(str(tmp_path))
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"pids: [\xff\xfe]\n")
    with pytest.raises(ConfigError, match=r"binary.yaml: not UTF-8 text \(byte 7\)"):
        load_config(str(path))


def test_empty_file_is_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(str(path)) == Config()


def test_follow_forks_globally_and_per_entry():
    config = parse_config({"pids": [1, {"pid": 2, "follow_forks": True}, {"pid": 3}]})
    assert (config.pids, config.follow_pids) == ((1, 2, 3), (2,))
    config = parse_config({"follow_forks": True, "pids": [1, {"pid": 2, "follow_forks": False}]})
    assert (config.pids, config.follow_pids) == ((1, 2), (1,))


def test_control_users_and_groups():
    config = parse_config(
        {"control": {"allowed_users": ["alice", 1000, "1001"], "allowed_groups": ["adm", 4], "users": ["ops"]}}
    )
    assert config.control_allowed_users == ("alice", 1000, 1001)
    assert config.control_allowed_groups == ("adm", 4)
    assert config.control_users == ("ops",)
    with pytest.raises(ConfigError) as e:
        parse_config({"control": {"allowed_users": "alice", "allowed_groups": [-1], "users": [7]}}, "c")
    assert str(e.value).splitlines() == [
        "c: control.allowed_users: expected a list of names or ids",
        "c: control.allowed_groups[0]: expected a name or a non-negative id, got -1",
        "c: control.users[0]: expected a user name, got 7",
    ]
