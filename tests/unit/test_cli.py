import pytest

from tracer_exporter import __version__
from tracer_exporter.cli import main
from tracer_exporter.server import parse_listen_address


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
    from tracer_exporter.cli import DEFAULT_STATE_FILE, build_parser

    assert build_parser().parse_args([]).state_file == DEFAULT_STATE_FILE == "/var/lib/tracer-exporter/state.json"
    assert build_parser().parse_args(["--state.file", ""]).state_file == ""
    assert build_parser().parse_args(["--state.file=/run/s.json"]).state_file == "/run/s.json"
