"""tracer-exporter: flags, start-up order, signals. The wiring, nothing else."""

from __future__ import annotations

import argparse
import logging
import platform
import signal
import sys
import threading
from types import FrameType

from prometheus_client import CollectorRegistry

from tracer_exporter import __version__
from tracer_exporter.collector import TracerCollector
from tracer_exporter.config import Config, ConfigError, load_config
from tracer_exporter.exposition import MetricsApp
from tracer_exporter.health import Health, unattached
from tracer_exporter.procfs import ProcFS, read_boot_id
from tracer_exporter.server import HTTPServer
from tracer_exporter.state import Saved, StateError, StateFile
from tracer_exporter.symbols import FUNCTION_NAMES, Plan, read_kallsyms, resolve
from tracer_exporter.tracking import Tracker
from tracer_exporter.web import App, parse_networks
from tracer_exporter.web_config import WebConfig, WebConfigError, load_web_config

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
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="TLS and basic auth, in the Prometheus exporter-toolkit format (default: plain HTTP, no auth)",
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
        choices=("debug", "info", "warn", "error"),
        help="logging level (default info)",
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


def plan_for(config: Config) -> Plan:
    return resolve(read_kallsyms(), config.symbol_overrides)


def check(config: Config) -> int:
    plan = plan_for(config)
    print(f"kernel {platform.release()}")
    for name in FUNCTION_NAMES:
        symbols = plan.symbols_of(name)
        print(f"{name:<20} {' '.join(symbols) if symbols else 'MISSING: no known symbol on this kernel'}")
    return 1 if plan.missing else 0


def print_ebpf(config: Config) -> int:
    from tracer_exporter.probes import bpf_source_path, cflags, task_btf

    # What the kprobe mode compiles it with on this kernel.
    print("// cflags: " + " ".join(cflags(config, with_task_btf=task_btf())))
    print(bpf_source_path().read_text(), end="")
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
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.state = StateFile(state_path) if state_path else None
        self.boot_id = read_boot_id()
        self.tracker = Tracker(ProcFS(), self.save_state if self.state else None)
        self.probes = None
        self.loading = "compiling and attaching the BPF program"
        registry = CollectorRegistry(auto_describe=True)
        collector = TracerCollector(self.tracker.rows, self.health, __version__, platform.release(), processes=False)
        registry.register(collector)
        metrics = MetricsApp(registry, collector, self.tracker.rows)
        networks = parse_networks(config.control_allowed_networks)
        app = App(self.tracker, registry, self.not_ready, networks, metrics_app=metrics)
        self.server = HTTPServer(listen, app, web_config)

    def health(self) -> Health | None:
        return self.probes.health() if self.probes is not None else None

    def not_ready(self) -> list[str]:
        if self.probes is None:
            return [self.loading]
        return unattached(self.probes.health().attachments, FUNCTION_NAMES)

    def load_probes(self) -> None:
        from tracer_exporter.probes import KernelProbes

        plan = plan_for(self.config)
        for name in plan.missing:
            log.warning("no kernel symbol for %s on this kernel: it is not counted", name)
        probes = KernelProbes(self.config, plan)
        probes.load()
        attachments = probes.attach()
        self.probes = probes
        self.tracker.attach_backend(probes)
        ok = sum(a.attached for a in attachments)
        log.info("attached %d of %d probes", ok, len(attachments))

    def restore_state(self) -> None:
        """Tracks again the pids the state file kept from the last run."""
        if self.state is None:
            return
        entries: list[Saved] = []
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
        for why in dropped:
            log.info("%s; dropped from the state file", why)
        log.info("restored %d pids from %s: %s", len(restored), self.state.path, restored)

    def save_state(self, entries: list[Saved]) -> None:
        assert self.state is not None
        try:
            self.state.save(self.boot_id, entries)
        except StateError as e:
            # Tracking itself worked; only a restart would forget these pids.
            log.error("%s", e)

    def sync_config_pids(self) -> None:
        for warning in self.tracker.sync_config(self.config.pids, self.config.follow_pids):
            log.warning("%s", warning)

    def reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("config reload failed, keeping the running config:\n%s", e)
            return
        for key in (
            "max_tracked_processes",
            "alloc_map_entries",
            "inflight_map_entries",
            "kretprobe_maxactive",
            "symbol_overrides",
        ):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("config reload: %s changes only on restart", key)
        if new.control_allowed_networks != self.config.control_allowed_networks:
            log.warning("config reload: control.allowed_networks changes only on restart")
        self.config = new
        self.sync_config_pids()
        log.info("config reloaded from %s", self.config_path)

    def close(self) -> None:
        self.server.stop()
        if self.probes is not None:
            self.probes.close()
            self.probes = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from tracer_exporter.run import main as run_main

        return run_main(argv[1:])
    args = build_parser().parse_args(argv)
    level = {"warn": "WARNING"}.get(args.log_level, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    return serve(config, args.config_file, args.listen, web_config, args.state_file)


def serve(
    config: Config,
    config_path: str | None,
    listen: str,
    web_config: WebConfig | None = None,
    state_path: str = "",
) -> int:
    wake = threading.Event()
    pending: set[int] = set()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        pending.add(signum)
        wake.set()

    # Handlers before anything is attached, so a signal never skips the cleanup.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        exporter = Exporter(config, config_path, listen, web_config, state_path)
    except WebConfigError as e:
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
        exporter.restore_state()
        exporter.sync_config_pids()
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
