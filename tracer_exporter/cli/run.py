"""`tracer-exporter run -- CMD`: trace one command from its first instruction.

The child is forked, waits on a pipe until its pid is in the tracked map,
then execs CMD; so nothing CMD does is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys

from tracer_exporter import app
from tracer_exporter.cli import LOG_LEVELS, bpf_source, log_level
from tracer_exporter.model.config import ConfigError, load_config
from tracer_exporter.model.counters import Entry, Row
from tracer_exporter.model.procfs import ProcFS
from tracer_exporter.model.tracking import Tracker
from tracer_exporter.views.run_report import FORMATS, Result, missing_warning, render
from tracer_exporter.web.auth import WebConfig, WebConfigError, load_web_config
from tracer_exporter.web.server import HTTPServer

log = logging.getLogger(__name__)

EXIT_CANNOT_TRACE = 2
EXIT_INCOMPLETE = 3  # CMD succeeded, but rows are missing (the exited map was full)
EXIT_CANNOT_START = 127
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tracer-exporter run",
        description="Run CMD, counting its kernel work from its first instruction, and print the table.",
    )
    p.add_argument("--follow-forks", action="store_true", help="count CMD's child processes too, one row each")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--output", metavar="FILE", help="write the result here instead of stdout")
    p.add_argument("--listen", metavar="HOST:PORT", help="also serve /metrics and /tracer while CMD runs")
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="TLS and basic auth for --listen (the same file as the exporter's)",
    )
    p.add_argument("--config.file", dest="config_file", metavar="PATH", help="limits and probe settings")
    p.add_argument("--log.level", dest="log_level", default="warn", choices=LOG_LEVELS)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return p


def _exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    # Killed by a signal: 128 + its number, as a shell reports it.
    return 128 - code if code < 0 else code


class _Interrupted(Exception):
    pass


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(level=log_level(args.log_level), format="tracer-exporter: %(levelname)s %(message)s")
    if not command:
        print("tracer-exporter run: no command given: tracer-exporter run [options] -- CMD [ARGS...]", file=sys.stderr)
        return EXIT_CANNOT_TRACE
    if args.web_config_file and not args.listen:
        print("tracer-exporter run: --web.config.file needs --listen", file=sys.stderr)
        return EXIT_CANNOT_TRACE
    try:
        config = load_config(args.config_file)
        web_config = load_web_config(args.web_config_file)
    except (ConfigError, WebConfigError) as e:
        print(e, file=sys.stderr)
        return EXIT_CANNOT_TRACE
    # Say so before seconds of compiling, as a shell would; exec still reports later failures.
    if shutil.which(command[0]) is None:
        reason = "No such file or directory" if "/" in command[0] else "command not found"
        print(f"tracer-exporter run: {command[0]}: {reason}", file=sys.stderr)
        return EXIT_CANNOT_START

    from tracer_exporter.kernel.probes import KernelProbes
    from tracer_exporter.kernel.symbols import kernel_plan

    try:
        plan = kernel_plan(config.symbol_overrides)
        probes = KernelProbes(config, plan, keep_exited=True, source=bpf_source())
        probes.load()
        attachments = probes.attach()
    except Exception as e:
        print(f"tracer-exporter run: cannot trace on this kernel: {e}", file=sys.stderr)
        return EXIT_CANNOT_TRACE
    failed = [a for a in attachments if not a.attached]
    if failed or plan.missing:
        what = [f"{a.function} at {a.symbol}: {a.error}" for a in failed] + [f"{m}: no symbol" for m in plan.missing]
        print("tracer-exporter run: cannot trace on this kernel: " + "; ".join(what), file=sys.stderr)
        probes.close()
        return EXIT_CANNOT_TRACE
    try:
        return _trace(args, command, probes, web_config)
    finally:
        probes.close()


def _trace(args: argparse.Namespace, command: list[str], probes: object, web_config: WebConfig) -> int:
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: wait to be tracked, then become CMD
        os.close(go_w)
        os.close(err_r)
        try:
            os.read(go_r, 1)
            os.close(go_r)
            os.execvp(command[0], command)
        except OSError as e:
            os.write(err_w, f"{e.errno}".encode())
        finally:
            os._exit(EXIT_CANNOT_START)
    os.close(go_r)
    os.close(err_w)
    probes.track(pid, follow=args.follow_forks)  # type: ignore[attr-defined]
    os.close(go_w)  # CMD starts now, already tracked
    failed = os.read(err_r, 32)
    os.close(err_r)
    if failed:
        os.waitpid(pid, 0)
        print(f"tracer-exporter run: {command[0]}: {os.strerror(int(failed))}", file=sys.stderr)
        return EXIT_CANNOT_START

    server = _serve(args.listen, probes, web_config) if args.listen else None
    interrupts = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts >= 2:
                raise _Interrupted
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    try:
        _, status = os.waitpid(pid, 0)
    except _Interrupted:
        print("tracer-exporter run: interrupted twice: stopped waiting", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if server is not None:
            server.stop()
    rows = _rows(probes, pid)
    result = Result(rows, _exit_status(status), probes.health().exited_dropped)  # type: ignore[attr-defined]
    out = render(result, args.format, args.follow_forks)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(out)
    else:
        sys.stdout.write(out)
        sys.stdout.flush()
    if result.missing:
        print(missing_warning(result.missing), file=sys.stderr)
        return result.status or EXIT_INCOMPLETE
    return result.status


def _rows(probes: object, root: int) -> list[Row]:
    """CMD and, when followed, its descendants: those that exited and those still running."""
    entries: dict[int, Entry] = {**probes.read_all(), **probes.pop_exited()}  # type: ignore[attr-defined]
    comm_of_root = entries[root].comm if root in entries else ""
    return [Row(pid, e.comm or comm_of_root, e.counts, e.parent) for pid, e in sorted(entries.items())]


def _serve(listen: str, probes: object, web_config: WebConfig) -> HTTPServer:
    """A read-only view of the same maps while CMD runs: the daemon's wiring, without control routes."""
    tracker = Tracker(ProcFS())
    tracker.attach_backend(probes)  # type: ignore[arg-type]
    health = probes.health  # type: ignore[attr-defined]
    server, _ = app.build(tracker, health, lambda: [], listen, web_config, control=False)
    server.start()
    return server
