import json

from fakes import TRACER_HEADER

from tracer_exporter.cli.run import _exit_status, main
from tracer_exporter.model.counters import Counts, Row
from tracer_exporter.views.run_report import Result, render

ROWS = [
    Row(10, "sh", Counts(1, 100, 1, 100, 5, 0, 0, 2, 2)),
    Row(11, "python3", Counts(2, 64, 0, 0, 1, 7, 7, 0, 0), parent=10),
]


def test_table_with_total_row_when_following():
    lines = render(Result(ROWS, 0), "table", follow=True).splitlines()
    assert lines[0].split() == TRACER_HEADER
    assert [line.split() for line in lines[1:]] == [
        ["10", "1", "1", "100", "100", "5", "0", "0", "2", "2"],
        ["11", "2", "0", "64", "0", "1", "7", "7", "0", "0"],
        ["total", "3", "1", "164", "100", "6", "7", "7", "2", "2"],
    ]
    assert "total" not in render(Result(ROWS[:1], 0), "table", follow=False)


def test_json():
    doc = json.loads(render(Result(ROWS, 3), "json", follow=True))
    assert doc["exit_status"] == 3
    assert [(p["pid"], p["parent_pid"], p["comm"]) for p in doc["processes"]] == [(10, None, "sh"), (11, 10, "python3")]
    assert doc["total"]["up_calls"] == 7


def test_openmetrics():
    text = render(Result(ROWS, 0), "openmetrics", follow=True)
    assert 'tracer_up_calls_total{comm="python3",parent_pid="10",pid="11"} 7.0' in text
    assert text.endswith("# EOF\n")


def test_exit_status_like_a_shell():
    assert _exit_status(3 << 8) == 3
    assert _exit_status(15) == 128 + 15  # killed by SIGTERM


def test_missing_command_is_127_before_any_tracing(capsys):
    assert main(["--", "/nonexistent/cmd"]) == 127
    assert "tracer-exporter run: /nonexistent/cmd: No such file or directory" in capsys.readouterr().err
    assert main([]) == 2


def test_a_kernel_that_cannot_trace_exits_2_before_cmd_starts(tmp_path, capsys, monkeypatch):
    from tracer_exporter.kernel import probes
    from tracer_exporter.kernel.errors import ProbeError

    def cannot_load(self):
        raise ProbeError("the bcc Python module is missing")

    monkeypatch.setattr(probes.KernelProbes, "load", cannot_load)
    marker = tmp_path / "ran"
    assert main(["--", "sh", "-c", f"touch {marker}"]) == 2
    assert "cannot trace on this kernel: the bcc Python module is missing" in capsys.readouterr().err
    assert not marker.exists()


def test_a_web_config_needs_listen_and_must_be_valid_before_anything_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    assert main(["--web.config.file", "w.yml", "--", "touch", str(marker)]) == 2
    assert "--web.config.file needs --listen" in capsys.readouterr().err
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_users: [alice]\n")
    assert main(["--listen", "127.0.0.1:0", "--web.config.file", str(bad), "--", "touch", str(marker)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "basic_auth_users" in err
    assert not marker.exists()


def test_missing_processes_are_named_in_json_and_the_warning():
    doc = json.loads(render(Result(ROWS, 0, missing=5), "json", follow=True))
    assert doc["missing_processes"] == 5
    assert json.loads(render(Result(ROWS, 0), "json", follow=True))["missing_processes"] == 0
    from tracer_exporter.views.run_report import missing_warning

    assert missing_warning(5).startswith("tracer-exporter run: 5 processes are missing: ")
