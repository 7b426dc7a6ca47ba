import os
import platform

import pytest

from tracer_exporter import __version__
from tracer_exporter.cli import main
from tracer_exporter.web.server import parse_listen_address


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"tracer-exporter {__version__}"


def test_bad_config_exits_2_with_one_line_naming_the_field(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("limits:\n  max_tracked_processes: lots\n")
    assert main(["--config.file", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}: limits.max_tracked_processes: expected an integer, got 'lots'"]


def test_ebpf_prints_the_program_with_its_settings(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("limits: {max_tracked_processes: 10}\n")
    assert main(["--config.file", str(path), "--ebpf"]) == 0
    out = capsys.readouterr().out
    assert "-DMAX_TRACKED=10" in out
    assert "TRACEPOINT_PROBE(sched, sched_process_exit)" in out


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:9867", ("127.0.0.1", 9867)), (":80", ("", 80)), ("[::1]:9", ("::1", 9))],
)
def test_parse_listen_address(text, parsed):
    assert parse_listen_address(text) == parsed


@pytest.mark.parametrize("text", ["localhost", "host:port", "h:70000"])
def test_parse_listen_address_rejects(text):
    with pytest.raises(ValueError, match="listen address"):
        parse_listen_address(text)


def test_state_file_flag_defaults_to_var_lib_and_can_be_turned_off():
    from tracer_exporter.cli.serve import DEFAULT_STATE_FILE, build_parser

    assert build_parser().parse_args([]).state_file == DEFAULT_STATE_FILE == "/var/lib/tracer-exporter/state.json"
    assert build_parser().parse_args(["--state.file", ""]).state_file == ""
    assert build_parser().parse_args(["--state.file=/run/s.json"]).state_file == "/run/s.json"


def test_bad_telemetry_path_exits_2_naming_it(capsys):
    assert main(["--web.telemetry-path", "/pids"]) == 2
    assert capsys.readouterr().err == "--web.telemetry-path '/pids': that path is already a route of its own\n"


def test_the_exporters_registry_has_process_and_python_metrics():
    from tracer_exporter.cli.serve import Exporter
    from tracer_exporter.model.config import load_config

    exporter = Exporter(load_config(None), None, "127.0.0.1:0")
    try:
        names = {m.name for m in exporter.registry.collect()}
        fds = len(os.listdir("/proc/self/fd"))
        assert exporter.registry.get_sample_value("process_open_fds") == fds
        info = {"implementation": platform.python_implementation(), "version": platform.python_version()}
        info.update(zip(("major", "minor", "patchlevel"), platform.python_version_tuple()))
        assert exporter.registry.get_sample_value("python_info", info) == 1
    finally:
        exporter.close()
    assert {n for n in names if n.startswith(("process_", "python_"))} == {
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_cpu_seconds",
        "process_open_fds",
        "process_max_fds",
        "python_info",
        "python_gc_objects_collected",
        "python_gc_objects_uncollectable",
        "python_gc_collections",
    }


def test_control_users_must_be_users_of_the_web_config(tmp_path, capsys):
    import bcrypt

    config = tmp_path / "c.yaml"
    config.write_text("control:\n  users: [alice, bob]\n  allowed_users: [no-such-user-x]\n")
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  alice: '{bcrypt.hashpw(b'pw', bcrypt.gensalt(4)).decode()}'\n")
    args = ["--config.file", str(config), "--web.listen-address", "127.0.0.1:0", "--state.file", ""]
    assert main([*args, "--web.config.file", str(web)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{config}: control.users: bob not in the basic_auth_users of {web}",
        f"{config}: control.allowed_users: no such user 'no-such-user-x'",
    ]
    config.write_text("control:\n  users: [alice]\n")
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{config}: control.users: alice not in basic_auth_users (no --web.config.file given)"
    ]


def test_web_flags():
    from tracer_exporter.cli.serve import build_parser, split_hosts

    args = build_parser().parse_args(["--web.allowed-hosts", "a.example,b.example", "--web.allowed-hosts", "c"])
    assert split_hosts(args.allowed_hosts) == ("a.example", "b.example", "c")
    assert build_parser().parse_args([]).max_requests == 40
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--web.max-requests", "0"])
