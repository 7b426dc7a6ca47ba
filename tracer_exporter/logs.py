"""--log.format: logfmt or JSON lines on stderr, as Prometheus exporters write them.

Under systemd's journal (JOURNAL_STREAM names our stderr) the journal stamps
every line itself, so the lines carry no timestamp of their own.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO

FORMATS = ("logfmt", "json")
_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error", "CRITICAL": "error"}


def under_journal(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Whether the stream is the journal connection systemd gave us (device:inode match)."""
    dev, _, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's StringIO, a closed stream)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _timestamp(created: float) -> str:
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\t'):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


class Formatter(logging.Formatter):
    """One line per record: ts (unless journald stamps it), level, logger, msg, err."""

    def __init__(self, fmt: str = "logfmt", timestamps: bool = True) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"--log.format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self._json = fmt == "json"
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        fields: list[tuple[str, str]] = []
        if self._timestamps:
            fields.append(("ts", _timestamp(record.created)))
        fields.append(("level", _LEVELS.get(record.levelname, record.levelname.lower())))
        fields.append(("logger", record.name))
        fields.append(("msg", record.getMessage()))
        if record.exc_info:
            fields.append(("err", self.formatException(record.exc_info)))
        if self._json:
            return json.dumps(dict(fields))
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields)


def setup(level: str, fmt: str, stream: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Route every logger to one stderr handler in the given format."""
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    handler = logging.StreamHandler(stream)
    handler.setFormatter(Formatter(fmt, timestamps=not under_journal(stream, environ)))
    logging.basicConfig(level=level, handlers=[handler], force=True)
