"""--log.format: logfmt and JSON lines, and no second timestamp under journald."""

import io
import json
import logging
import os

import pytest

from tracer_exporter.logs import Formatter, setup, under_journal


def record(msg: str, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    r = logging.LogRecord("tracer_exporter.cli", level, __file__, 1, msg, (), exc_info)
    r.created = 1764621000.25
    return r


def test_logfmt_quotes_only_what_needs_it():
    f = Formatter("logfmt")
    assert f.format(record("ready")) == "ts=2025-12-01T20:30:00.250Z level=info logger=tracer_exporter.cli msg=ready"
    assert (
        f.format(record('config reload failed:\nbogus: "x" \\ y', logging.WARNING))
        == 'ts=2025-12-01T20:30:00.250Z level=warn logger=tracer_exporter.cli msg="config reload failed:\\nbogus: \\"x\\" \\\\ y"'
    )
    assert Formatter("logfmt", timestamps=False).format(record("")) == 'level=info logger=tracer_exporter.cli msg=""'


def test_json_lines():
    line = Formatter("json").format(record("attached 9 of 9 probes", logging.ERROR))
    assert json.loads(line) == {
        "ts": "2025-12-01T20:30:00.250Z",
        "level": "error",
        "logger": "tracer_exporter.cli",
        "msg": "attached 9 of 9 probes",
    }


def test_an_exception_is_one_field():
    try:
        raise OSError("map gone")
    except OSError:
        import sys

        r = record("reading failed", exc_info=sys.exc_info())
    doc = json.loads(Formatter("json", timestamps=False).format(r))
    assert sorted(doc) == ["err", "level", "logger", "msg"]
    assert doc["err"].splitlines()[-1] == "OSError: map gone"


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match=r"^--log.format 'xml': expected one of logfmt, json$"):
        Formatter("xml")


def test_journald_is_recognised_by_its_stream(tmp_path):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        assert under_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) is True
        # Inherited by a child whose stderr goes elsewhere: not the journal.
        assert under_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}) is False
        assert under_journal(stream, {"JOURNAL_STREAM": "junk"}) is False
        assert under_journal(stream, {}) is False
    assert under_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"}) is False


def test_setup_under_journald_writes_no_timestamp(tmp_path):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        setup("INFO", "logfmt", stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        try:
            logging.getLogger("tracer_exporter.cli").info("listening on :9867")
            logging.getLogger("tracer_exporter.cli").debug("not at info")
        finally:
            logging.basicConfig(force=True, handlers=[logging.NullHandler()])
    assert path.read_text() == 'level=info logger=tracer_exporter.cli msg="listening on :9867"\n'
