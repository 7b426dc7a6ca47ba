from tracer_exporter.model.procfs import ProcFS, parse_stat, parse_tgid

STAT = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 0 0\n"


def test_parse_stat_handles_parentheses_in_comm():
    assert parse_stat(STAT) == ("a (weird) name", "S", 987654)


def test_parse_tgid():
    assert parse_tgid("Name:\tx\nTgid:\t4240\nPid:\t4242\n") == 4240


def test_procfs_reads_fixture_tree(tmp_path):
    d = tmp_path / "4242"
    d.mkdir()
    (d / "stat").write_text(STAT)
    (d / "status").write_text("Name:\tx\nTgid:\t4242\n")
    info = ProcFS(str(tmp_path)).process(4242)
    assert info is not None
    assert (info.pid, info.tgid, info.comm, info.start_time, info.exited) == (
        4242,
        4242,
        "a (weird) name",
        987654,
        False,
    )
    assert ProcFS(str(tmp_path)).process(4243) is None
