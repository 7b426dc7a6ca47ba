"""The command line: `tracer-exporter` (serve), `tracer-exporter run -- CMD`, `tracer-exporter top`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Another program than the package's: for debugging, and for testing what a program that does not compile does.
BPF_SOURCE_ENV = "TRACER_EXPORTER_BPF_SOURCE"
LOG_LEVELS = ("debug", "info", "warn", "error")


def log_level(name: str) -> str:
    """A --log.level value as logging spells it."""
    return {"warn": "WARNING"}.get(name, name.upper())


def bpf_source() -> Path:
    """The BPF program to load: the package's, or the one TRACER_EXPORTER_BPF_SOURCE names."""
    from tracer_exporter.kernel.program import bpf_source_path

    return bpf_source_path(os.environ.get(BPF_SOURCE_ENV))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from tracer_exporter.cli.run import main as run_main

        return run_main(argv[1:])
    if argv[:1] == ["top"]:
        from tracer_exporter.cli.top import main as top_main

        return top_main(argv[1:])
    from tracer_exporter.cli.serve import main as serve_main

    return serve_main(argv)
