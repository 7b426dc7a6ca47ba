"""The daemon: its flags, start-up order and signals. app.build does the wiring."""

from __future__ import annotations

import argparse
import logging
import platform
import signal
import sys
import threading
from types import FrameType

from tracer_exporter import __version__, app, logs, privileges
from tracer_exporter.cli import LOG_LEVELS, bpf_source, log_level
from tracer_exporter.kernel.symbols import FUNCTION_NAMES, kernel_plan, read_kernel_data
from tracer_exporter.model.config import Config, ConfigError, load_config
from tracer_exporter.model.groups import Groups
from tracer_exporter.model.health import Health, unattached
from tracer_exporter.model.procfs import ProcFS, read_boot_id
from tracer_exporter.model.state import Saved, StateError, StateFile
from tracer_exporter.model.state_writer import StateWriter
from tracer_exporter.model.tracking import Tracker
from tracer_exporter.web.access import AccessError, ControlPolicy, resolve_groups, resolve_users
from tracer_exporter.web.auth import WebConfig, WebConfigError, load_web_config
from tracer_exporter.web.routes import DEFAULT_TELEMETRY_PATH, check_telemetry_path, parse_networks
from tracer_exporter.web.server import DEFAULT_MAX_REQUESTS, raise_nofile_limit

log = logging.getLogger("tracer_exporter")

DEFAULT_LISTEN = ":9867"
DEFAULT_STATE_FILE = "/var/lib/tracer-exporter/state.json"
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tracer-exporter",
        description="Prometheus exporter of per-process kernel work: kmalloc, kfree, schedule, "
        "up, down_interruptible, mutex_lock and mutex_unlock.",
    )
    p.add_argument("--config.file", dest="config_file", metavar="PATH", help="YAML config (default: none)")
    p.add_argument(
        "--web.listen-address",
        dest="listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address for /metrics, /tracer and the control API (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default=DEFAULT_TELEMETRY_PATH,
        metavar="PATH",
        help=f"path of the Prometheus metrics (default {DEFAULT_TELEMETRY_PATH})",
    )
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="TLS and basic auth, in the Prometheus exporter-toolkit format (default: plain HTTP, no auth)",
    )
    p.add_argument(
        "--web.allowed-hosts",
        dest="allowed_hosts",
        action="append",
        default=[],
        metavar="HOST[,HOST...]",
        help="host names control requests may carry in Host besides the listen address, localhost and "
        "loopback addresses (repeatable, or comma-separated); against DNS rebinding",
    )
    p.add_argument(
        "--web.max-requests",
        dest="max_requests",
        type=_positive,
        default=DEFAULT_MAX_REQUESTS,
        metavar="N",
        help=f"requests served at once; past it 503 (default {DEFAULT_MAX_REQUESTS})",
    )
    p.add_argument(
        "--state.file",
        dest="state_file",
        default=DEFAULT_STATE_FILE,
        metavar="PATH",
        help="where the pids tracked at run time are kept, so a restart tracks them again; "
        f'"" keeps none (default {DEFAULT_STATE_FILE})',
    )
    p.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        choices=LOG_LEVELS,
        help="logging level (default info)",
    )
    p.add_argument(
        "--log.format",
        dest="log_format",
        default="logfmt",
        choices=logs.FORMATS,
        help="log line format (default logfmt); under journald the lines carry no timestamp of their own",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config, print the kernel symbol each function would be probed at, and exit",
    )
    p.add_argument("--version", action="version", version=f"tracer-exporter {__version__}")
    # For debugging: the BPF program exactly as it would be compiled.
    p.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    return p


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def split_hosts(values: list[str]) -> tuple[str, ...]:
    return tuple(h.strip() for v in values for h in v.split(",") if h.strip())


def control_policy(config: Config) -> ControlPolicy:
    """Raises AccessError for a user or group name the system does not know."""
    return ControlPolicy(
        networks=parse_networks(config.control_allowed_networks),
        uids=frozenset({0}) | resolve_users(config.control_allowed_users),
        gids=resolve_groups(config.control_allowed_groups),
        users=frozenset(config.control_users),
    )


def check_control_users(config: Config, web_config: WebConfig, config_path: str | None, web_path: str | None) -> str:
    """A problem line when control.users names someone the web config does not know, else ''."""
    unknown = [u for u in config.control_users if u not in web_config.users]
    if not unknown:
        return ""
    where = f"the basic_auth_users of {web_path}" if web_path else "basic_auth_users (no --web.config.file given)"
    return f"{config_path}: control.users: {', '.join(unknown)} not in {where}"


def check(config: Config) -> int:
    plan = kernel_plan(config.symbol_overrides)
    print(f"kernel {platform.release()}")
    for name in FUNCTION_NAMES:
        symbols = plan.symbols_of(name)
        print(f"{name:<20} {' '.join(symbols) if symbols else 'MISSING: no known symbol on this kernel'}")
    preempt = read_kernel_data().preempt_count
    where = preempt.describe() if preempt else "NOT FOUND: interrupt work in user mode may be charged"
    print(f"{'interrupts':<20} {where}")
    print(f"{'probes.mode':<20} {probe_mode_line(config.probe_mode)}")
    for sel in config.select:
        print(f"{'group ' + sel.name:<20} {sel.kind} {sel.value}")
    return 1 if plan.missing else 0


def probe_mode_line(requested: str) -> str:
    """The mode the exporter would start in, and why (the load may still fall back)."""
    from tracer_exporter.kernel.program import choose_mode, fentry_unsupported

    try:
        unsupported = fentry_unsupported() if requested != "kprobe" else ""
    except ImportError as e:
        return f"{requested}: cannot tell without the bcc module ({e})"
    mode, why = choose_mode(requested, unsupported)
    return f"{requested}: {mode}" + (f" ({why})" if why else "")


def print_ebpf(config: Config) -> int:
    from tracer_exporter.kernel.program import cflags, task_btf

    # What the kprobe mode compiles it with on this kernel.
    flags = cflags(config, with_task_btf=task_btf(), kernel=read_kernel_data())
    print("// cflags: " + " ".join(flags))
    print(bpf_source().read_text(), end="")
    return 0


class Exporter:
    """The running exporter: HTTP first, then the probes, then the config's pids."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        listen: str,
        web_config: WebConfig | None = None,
        state_path: str = "",
        metrics_path: str = DEFAULT_TELEMETRY_PATH,
        allowed_hosts: tuple[str, ...] = (),
        max_requests: int = DEFAULT_MAX_REQUESTS,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.state = StateFile(state_path) if state_path else None
        self.boot_id = read_boot_id()
        # Saves happen in the writer's thread: a scrape never waits for the disk.
        self.writer = StateWriter(self.save_state) if self.state else None
        self.tracker = Tracker(ProcFS(), self.writer.submit if self.writer else None)
        self.groups = Groups(self.tracker)
        self.probes = None
        self.loading = "compiling and attaching the BPF program"
        # Ready only once the state file's and the config's pids are tracked too.
        self.started = False
        self.server, self.registry = app.build(
            self.tracker,
            self.health,
            self.not_ready,
            listen,
            web_config,
            policy=control_policy(config),
            metrics_path=metrics_path,
            allowed_hosts=allowed_hosts,
            max_requests=max_requests,
            groups=self.groups,
        )

    def health(self) -> Health | None:
        return self.probes.health() if self.probes is not None else None

    def not_ready(self) -> list[str]:
        if self.probes is None:
            return [self.loading]
        problems = unattached(self.probes.health().attachments, FUNCTION_NAMES)
        return problems if self.started else [*problems, "tracking the state file's and the config's pids"]

    def load_probes(self) -> None:
        from tracer_exporter.kernel.probes import KernelProbes

        plan = kernel_plan(self.config.symbol_overrides)
        for name in plan.missing:
            log.warning("no kernel symbol for %s on this kernel: it is not counted", name)
        probes = KernelProbes(self.config, plan, source=bpf_source())
        probes.load()
        attachments = probes.attach()
        self.probes = probes
        self.tracker.attach_backend(probes)
        assert probes.groups is not None
        self.groups.attach_backend(probes.groups)
        ok = sum(a.attached for a in attachments)
        log.info("attached %d of %d probes", ok, len(attachments))

    def open_follow_drops(self) -> None:
        """The perf buffer of dropped children, while perf_event_open is still allowed."""
        assert self.probes is not None
        try:
            self.probes.open_follow_drops()
        except Exception as e:
            log.warning("cannot open the perf buffer of untracked children (%s): following will fail", e)

    def drop_privileges(self) -> None:
        """Keeps only the capabilities serving still uses (privileges.KEEP), in every thread."""
        try:
            permitted = privileges.current("CapPrm")
        except (OSError, ValueError) as e:
            log.warning("cannot read this thread's capabilities: %s", e)
            return
        keep = privileges.to_keep(permitted, privileges.last_cap())
        if permitted == keep:
            return
        failures: list[str] = []

        def drop() -> None:
            try:
                privileges.drop(keep)
            except OSError as e:
                failures.append(str(e))

        drop()
        if not self.server.run_in_threads(drop):
            failures.append("the HTTP threads did not answer")
        if failures:
            log.warning(
                "dropping capabilities failed (%s); running with %s",
                "; ".join(failures),
                " ".join(privileges.names(permitted)) or "none",
            )
            return
        log.info("capabilities after attaching: %s", " ".join(privileges.names(keep)) or "none")

    def restore_state(self) -> None:
        """Tracks again the pids the state file kept from the last run."""
        if self.state is None:
            return
        entries: list[Saved] = []
        warning = self.state.directory_warning()
        if warning:
            log.warning("%s", warning)
        try:
            saved = self.state.load()
        except StateError as e:
            log.error("%s; starting with no runtime pids (the file is rewritten on the next change)", e)
            saved = None
        if saved is not None:
            boot_id, entries = saved
            if boot_id != self.boot_id:
                log.info(
                    "state file %s is from another boot: none of its %d pids is restored", self.state.path, len(entries)
                )
                entries = []
        restored, dropped = self.tracker.restore(entries)
        if self.writer is not None:
            self.writer.flush()  # on disk before ready: what was not restored is gone from the file
        for why in dropped:
            log.info("%s; dropped from the state file", why)
        log.info("restored %d pids from %s: %s", len(restored), self.state.path, restored)

    def save_state(self, entries: list[Saved]) -> None:
        assert self.state is not None
        try:
            self.state.save(self.boot_id, self.tracker.start_times(entries))
        except StateError as e:
            # Tracking itself worked; only a restart would forget these pids.
            log.error("%s", e)

    def select_workloads(self) -> None:
        """The config's groups: into the kernel's maps, and the processes that match now.
        Before dropping privileges: an exe selector reads /proc/PID/exe of any process."""
        for warning in self.groups.configure(self.config.select):
            log.warning("%s", warning)

    def watch_execs(self) -> None:
        """The cmdline selectors hear of every exec (a thread: after dropping privileges)."""
        assert self.probes is not None and self.probes.execs is not None
        if self.groups.cmdline_wanted:
            self.probes.execs.watch(self.groups.on_exec)

    def sync_config_pids(self) -> None:
        for warning in self.tracker.sync_config(self.config.pids, self.config.follow_pids):
            log.warning("%s", warning)

    def reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("config reload failed, keeping the running config:\n%s", e)
            return
        if len(new.select) > self.config.max_groups:
            log.error(
                "config reload failed, keeping the running config: select has %d groups, more than the"
                " running limits.max_groups (%d), which changes only on restart",
                len(new.select),
                self.config.max_groups,
            )
            return
        for key in (
            "max_tracked_processes",
            "alloc_map_entries",
            "inflight_map_entries",
            "kretprobe_maxactive",
            "symbol_overrides",
            "max_groups",
            "cgroup_map_entries",
        ):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("config reload: %s changes only on restart", key)
        for key in ("allowed_networks", "allowed_users", "allowed_groups", "users"):
            if getattr(new, f"control_{key}") != getattr(self.config, f"control_{key}"):
                log.warning("config reload: control.%s changes only on restart", key)
        self.config = new
        self.select_workloads()
        self.watch_execs()
        self.sync_config_pids()
        log.info("config reloaded from %s", self.config_path)

    def close(self) -> None:
        self.server.stop()
        if self.writer is not None:
            self.writer.close()  # the last change of the runtime set, written before exit
        if self.probes is not None:
            self.probes.close()
            self.probes = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.setup(log_level(args.log_level), args.log_format)
    try:
        config = load_config(args.config_file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    if args.ebpf:
        return print_ebpf(config)
    if args.check:
        return check(config)
    try:
        web_config = load_web_config(args.web_config_file)
    except WebConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    problems = [check_control_users(config, web_config, args.config_file, args.web_config_file)]
    try:
        control_policy(config)
    except AccessError as e:
        problems.append(f"{args.config_file}: {e}")
    try:
        check_telemetry_path(args.telemetry_path)
    except ValueError as e:
        problems.append(str(e))
    if any(problems):
        print("\n".join(p for p in problems if p), file=sys.stderr)
        return EXIT_CONFIG
    return serve(
        config,
        args.config_file,
        args.listen,
        web_config,
        args.state_file,
        args.telemetry_path,
        split_hosts(args.allowed_hosts),
        args.max_requests,
    )


def serve(
    config: Config,
    config_path: str | None,
    listen: str,
    web_config: WebConfig | None = None,
    state_path: str = "",
    metrics_path: str = DEFAULT_TELEMETRY_PATH,
    allowed_hosts: tuple[str, ...] = (),
    max_requests: int = DEFAULT_MAX_REQUESTS,
) -> int:
    wake = threading.Event()
    pending: set[int] = set()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        pending.add(signum)
        wake.set()

    # Handlers before anything is attached, so a signal never skips the cleanup.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    # Every connection is an fd: the default soft limit of 1024 would be the server's limit.
    raise_nofile_limit()
    try:
        exporter = Exporter(
            config, config_path, listen, web_config, state_path, metrics_path, allowed_hosts, max_requests
        )
    except (WebConfigError, AccessError) as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except (OSError, ValueError) as e:
        log.error("cannot listen on %s: %s", listen, e)
        return 1
    exporter.server.start()
    log.info("listening on %s%s", listen, " (TLS)" if exporter.server.tls else "")
    try:
        try:
            exporter.load_probes()
        except Exception as e:
            log.error("%s", e)
            return 1
        # Before any other thread starts (a followed process starts one): they inherit the drop.
        exporter.open_follow_drops()
        exporter.select_workloads()
        exporter.drop_privileges()
        exporter.watch_execs()
        exporter.restore_state()
        exporter.sync_config_pids()
        exporter.started = True
        log.info("ready")
        while not pending & {signal.SIGTERM, signal.SIGINT}:
            # Sleeps until a signal arrives: no polling between scrapes.
            wake.wait()
            wake.clear()
            if signal.SIGHUP in pending:
                pending.discard(signal.SIGHUP)
                exporter.reload()
    finally:
        exporter.close()
    log.info("stopped; every probe detached")
    return 0
