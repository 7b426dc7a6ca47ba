"""The Prometheus collector: fresh metric families from the maps on every scrape."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tracer_exporter.model.counters import FIELDS, Row
from tracer_exporter.model.groups import GroupRow
from tracer_exporter.model.health import Health

log = logging.getLogger(__name__)


def process_families(rows: list[Row]) -> Iterator[Metric]:
    """The per-process counters, and how many processes there are."""
    for f in FIELDS:
        fam = CounterMetricFamily(f.metric, f.help, labels=("pid", "comm", "parent_pid"), unit=f.unit)
        for r in rows:
            # parent_pid is empty (absent, to Prometheus) unless tracked by following a fork.
            parent = str(r.parent) if r.parent else ""
            fam.add_metric((str(r.pid), r.comm, parent), getattr(r.counts, f.name))
        yield fam
    tracked = GaugeMetricFamily("tracer_tracked_processes", "Processes being tracked.")
    tracked.add_metric((), len(rows))
    yield tracked


def group_families(groups: list[GroupRow]) -> Iterator[Metric]:
    """Per workload group: its counters (exited members included), members now, members dropped."""
    for f in FIELDS:
        name = "tracer_group_" + f.metric.removeprefix("tracer_")
        fam = CounterMetricFamily(
            name, f.help.replace("the process", "the group's processes"), labels=("group",), unit=f.unit
        )
        for g in groups:
            fam.add_metric((g.name,), getattr(g.counts, f.name))
        yield fam
    members = GaugeMetricFamily("tracer_group_processes", "Processes now in the group.", labels=("group",))
    dropped = CounterMetricFamily(
        "tracer_group_dropped",
        "Processes that matched the group's selector but were not tracked: the limit of tracked processes.",
        labels=("group",),
    )
    for g in groups:
        members.add_metric((g.name,), g.processes)
        dropped.add_metric((g.name,), g.dropped)
    yield members
    yield dropped


def by_function(name: str, help_text: str, counts: dict[str, int]) -> Metric:
    """A counter family with one sample per function."""
    fam = CounterMetricFamily(name, help_text, labels=("function",))
    for function, n in sorted(counts.items()):
        fam.add_metric((function,), n)
    return fam


class TracerCollector:
    def __init__(
        self,
        rows: Callable[[], list[Row]],
        health: Callable[[], Health | None],
        version: str,
        kernel: str,
        processes: bool = True,
        groups: Callable[[], list[GroupRow]] | None = None,
    ) -> None:
        self._rows = rows
        self._groups = groups
        self._health = health
        self._version = version
        self._kernel = kernel
        self._errors: dict[str, int] = {"processes": 0, "probes": 0, "groups": 0}
        # False: the per-process families are written by exposition.MetricsApp,
        # which reports here the seconds it spent reading them.
        self._processes = processes
        self.extra_seconds = 0.0

    def count_error(self, part: str) -> None:
        self._errors[part] += 1

    def describe(self) -> Iterator[Metric]:
        # Registering must never touch kernel maps: describe from empty families.
        if self._processes:
            yield from self._process_families()
        yield from group_families([])
        yield from self._health_families(Health())
        yield from self._self_families(0.0)

    def collect(self) -> Iterator[Metric]:
        start = time.perf_counter()
        # One failing part is logged and counted; the rest is still served.
        try:
            if self._processes:
                yield from self._process_families(self._rows())
        except Exception:
            log.exception("reading the tracked processes failed")
            self._errors["processes"] += 1
        try:
            yield from group_families(self._groups() if self._groups else [])
        except Exception:
            log.exception("reading the workload groups failed")
            self._errors["groups"] += 1
        try:
            health = self._health()
            if health is not None:
                yield from self._health_families(health)
        except Exception:
            log.exception("reading probe health failed")
            self._errors["probes"] += 1
        took = time.perf_counter() - start + (0.0 if self._processes else self.extra_seconds)
        yield from self._self_families(took)

    def _process_families(self, rows: list[Row] | None = None) -> Iterator[Metric]:
        yield from process_families(rows or [])

    def _health_families(self, h: Health) -> Iterator[Metric]:
        mode = GaugeMetricFamily(
            "tracer_probe_mode_info",
            "The probe mode in use (kprobe or fentry), the one the config requested, and why they differ.",
            labels=("mode", "requested", "reason"),
        )
        if h.mode is not None:
            mode.add_metric((h.mode.mode, h.mode.requested, h.mode.reason), 1)
        yield mode
        attached = GaugeMetricFamily(
            "tracer_probe_attached",
            "1 when the function's probe is attached at this kernel symbol, 0 when attaching failed.",
            labels=("function", "symbol"),
        )
        for a in h.attachments:
            attached.add_metric((a.function, a.symbol), 1 if a.attached else 0)
        yield attached
        yield by_function(
            "tracer_probe_missed",
            "Calls of tracked threads lost to the counts: kmalloc returns never seen, or entries not recorded.",
            h.missed,
        )
        yield by_function(
            "tracer_kprobe_missed",
            "Hits the kernel's return probes missed, any process, including interrupts that arrived while"
            " another probe ran (never a tracked thread's own call).",
            h.kernel_missed,
        )
        yield by_function(
            "tracer_probe_skipped",
            "Runs of the function's BPF programs the kernel skipped because BPF was already busy on that CPU"
            " (recursion_misses; kprobe programs from Linux 6.7), any process. Mostly calls in interrupts, which"
            " are never counted; see the README for when a skip can be a tracked thread's call.",
            h.skipped,
        )
        entries = GaugeMetricFamily(
            "tracer_alloc_map_entries", "Live kmalloc blocks of tracked processes whose size is remembered."
        )
        entries.add_metric((), h.alloc_entries)
        yield entries
        failures = CounterMetricFamily(
            "tracer_alloc_map_insert_failures",
            "Allocations not remembered because the address map was full; their kfree adds no bytes.",
        )
        failures.add_metric((), h.alloc_insert_failures)
        yield failures
        dropped = CounterMetricFamily(
            "tracer_follow_dropped",
            "New children of followed processes not tracked because the tracked-process limit was reached.",
        )
        dropped.add_metric((), h.follow_dropped)
        yield dropped
        cgroups = CounterMetricFamily(
            "tracer_cgroup_map_insert_failures",
            "New cgroups of selected subtrees not remembered because the cgroup map was full.",
        )
        cgroups.add_metric((), h.cgroup_insert_failures)
        yield cgroups
        lost = CounterMetricFamily(
            "tracer_exec_events_lost", "Execs the cmdline selectors did not hear of: the perf buffer was full."
        )
        lost.add_metric((), h.exec_events_lost)
        yield lost
        exited = CounterMetricFamily(
            "tracer_exited_dropped",
            "Processes traced by `run` whose final counters were lost because the exited map was full.",
        )
        exited.add_metric((), h.exited_dropped)
        yield exited

    def _self_families(self, duration: float) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "tracer_build_info", "The exporter's version and the kernel it runs on.", labels=("version", "kernel")
        )
        info.add_metric((self._version, self._kernel), 1)
        yield info
        errors = CounterMetricFamily(
            "tracer_scrape_errors", "Scrape-time failures reading a part of the state.", labels=("part",)
        )
        for part, n in sorted(self._errors.items()):
            errors.add_metric((part,), n)
        yield errors
        took = GaugeMetricFamily("tracer_scrape_duration_seconds", "Time this scrape spent reading the maps.")
        took.add_metric((), duration)
        yield took
