#!/usr/bin/env python3
"""Writes grafana/provisioning/dashboards/tracer-exporter.json, the exporter's dashboard.

The JSON is generated so that its dozens of near-identical panels stay consistent;
edit this file and run it (`python3 grafana/make_dashboard.py`), then commit both.
tests/unit/test_grafana.py fails when the JSON is not what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "provisioning" / "dashboards" / "tracer-exporter.json"

UID = "tracer-exporter"
# Grafana 12's. Since 39, v40 makes refresh a string (it is) and v41 drops timepicker.time_options (none here).
SCHEMA_VERSION = 41
DS = {"type": "prometheus", "uid": "${datasource}"}

SEL = 'job=~"$job", instance=~"$instance"'
# Per-process series: the Top row narrows by comm only, the per-process row by comm and pid.
CSEL = SEL + ', comm=~"$comm"'
PSEL = CSEL + ', pid=~"$pid"'
BY = "instance, pid, comm"
LEGEND = "{{comm}} ({{pid}}) on {{instance}}"
# Per workload group series (config select): labelled group, never pid or comm.
GSEL = SEL + ', group=~"$group"'
GBY = "instance, group"
GLEGEND = "{{group}} on {{instance}}"
BY_FUNCTION = "{{function}} on {{instance}}"
# up as words, and red when a scrape failed.
UP_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "down", "color": "red", "index": 0},
            "1": {"text": "up", "color": "green", "index": 1},
        },
    }
]

# (metric without _total, title) of the per-process call counters, /tracer's order.
CALLS = (
    ("tracer_kmalloc_calls", "kmalloc"),
    ("tracer_kfree_calls", "kfree"),
    ("tracer_schedule_calls", "schedule"),
    ("tracer_up_calls", "up"),
    ("tracer_down_interruptible_calls", "down_interruptible"),
    ("tracer_mutex_lock_calls", "mutex_lock"),
    ("tracer_mutex_unlock_calls", "mutex_unlock"),
)
BYTES = (("tracer_kmalloc_bytes", "kmalloc bytes"), ("tracer_kfree_bytes", "kfree bytes"))


def group_metric(metric: str) -> str:
    """The per-group counter of a per-process one: tracer_kmalloc_calls is tracer_group_kmalloc_calls."""
    return "tracer_group_" + metric.removeprefix("tracer_")


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "id": len(self.panels) + 1,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        t.update(instant=True, range=False, format="time_series")
    return t


def timeseries(title: str, unit: str, targets: list[dict[str, Any]], description: str = "") -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {"unit": unit, "min": 0, "custom": {"drawStyle": "line", "fillOpacity": 10}},
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def stat(title: str, unit: str, expr: str, description: str = "", legend: str = "{{instance}}") -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
        },
        "targets": [target(expr, legend)],
    }


def bargauge(title: str, unit: str, expr: str, description: str = "", legend: str = LEGEND) -> dict[str, Any]:
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {
            "displayMode": "basic",
            "orientation": "horizontal",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showUnfilled": True,
        },
        "targets": [target(expr, legend, instant=True)],
    }


def rate(metric: str, selector: str = PSEL) -> str:
    return f"rate({metric}_total{{{selector}}}[$__rate_interval])"


def top(expr: str) -> str:
    """The $topn largest series: a host with thousands of tracked processes stays readable."""
    return f"topk($topn, {expr})"


# Said by every per-process panel: topk picks anew at each step, so a graph may show more than N.
TOP_NOTE = " The $topn largest at each moment (variable Top N) among the chosen comm and pid."
# Said by every per-group panel: a group's counters keep what its members that exited or left did.
GROUP_NOTE = (
    " Summed over every member the group ever had, those that exited or left included. The $topn largest at"
    " each moment (variable Top N) among the chosen groups."
)


def variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str, multi: bool, all_value: str | None = ".*") -> dict[str, Any]:
        var: dict[str, Any] = {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"},
            "definition": query,
            "refresh": 2,
            "sort": 3 if name == "pid" else 1,
            "multi": multi,
            "includeAll": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "hide": 0,
        }
        # Without allValue, Grafana's All is the listed values, e.g. (a|b).
        if all_value is not None:
            var["allValue"] = all_value
        return var

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "regex": "",
            "current": {},
            "options": [],
            "hide": 0,
            "refresh": 1,
        },
        # All is the jobs that have the exporter: up{job=~".*"} would be every target Prometheus scrapes.
        query_var("job", "Job", "label_values(tracer_build_info, job)", True, all_value=None),
        query_var("instance", "Instance", 'label_values(tracer_build_info{job=~"$job"}, instance)', True),
        # pid's query depends on comm, so comm comes first: pid lists only the processes of the chosen comms.
        query_var("comm", "Command", f"label_values(tracer_kmalloc_calls_total{{{SEL}}}, comm)", True),
        query_var("pid", "PID", f"label_values(tracer_kmalloc_calls_total{{{CSEL}}}, pid)", True),
        # The config's select groups: they have no comm or pid, so only job and instance narrow them.
        query_var("group", "Group", f"label_values(tracer_group_processes{{{SEL}}}, group)", True),
        {
            "name": "topn",
            "label": "Top N",
            "type": "custom",
            "query": "5,10,20",
            "current": {"selected": True, "text": "5", "value": "5"},
            "options": [{"selected": v == "5", "text": v, "value": v} for v in ("5", "10", "20")],
            "multi": False,
            "includeAll": False,
            "hide": 0,
        },
    ]


def groups(lay: Layout) -> None:
    """The Workload groups row: every query narrows by $group, $job and $instance."""
    lay.row("Workload groups")
    for metric, name in CALLS:
        lay.add(
            timeseries(
                f"Group {name} calls/s",
                "ops",
                [target(top(f"sum by ({GBY}) ({rate(group_metric(metric), GSEL)})"), GLEGEND)],
                f"Calls of {name}() per second, per workload group." + GROUP_NOTE,
            ),
            8,
            8,
        )
    kmalloc, kfree = (group_metric(metric) for metric, _ in BYTES)
    lay.add(
        timeseries(
            "Group kmalloc vs kfree bytes/s",
            "Bps",
            [
                target(top(f"sum by ({GBY}) ({rate(kmalloc, GSEL)})"), "kmalloc " + GLEGEND, "A"),
                target("-" + top(f"sum by ({GBY}) ({rate(kfree, GSEL)})"), "kfree " + GLEGEND, "B"),
            ],
            "Bytes kmalloc handed out (up) and kfree gave back (down), per second, per workload group." + GROUP_NOTE,
        ),
        8,
        8,
    )
    lay.add(
        bargauge(
            "Top groups by kmalloc bytes/s",
            "Bps",
            top(f"sum by ({GBY}) ({rate(kmalloc, GSEL)})"),
            "The $topn workload groups with the most kmalloc bytes per second now, among the chosen groups.",
            GLEGEND,
        ),
        8,
        8,
    )
    lay.add(
        timeseries(
            "Group members and members dropped/s",
            "none",
            [
                target(top(f"sum by ({GBY}) (tracer_group_processes{{{GSEL}}})"), "members of " + GLEGEND, "A"),
                target(
                    top(f"sum by ({GBY}) ({rate('tracer_group_dropped', GSEL)})"),
                    "dropped/s of " + GLEGEND,
                    "B",
                ),
            ],
            "tracer_group_processes: the group's members now. tracer_group_dropped_total, per second: processes"
            " that matched the group's selector but were not tracked because limits.max_tracked_processes was"
            " reached; should stay 0. The $topn largest at each moment (variable Top N) among the chosen groups.",
        ),
        24,
        8,
    )


def dashboard() -> dict[str, Any]:
    lay = Layout()
    lay.row("Tracked processes (top $topn)")
    for metric, name in CALLS:
        lay.add(
            timeseries(
                f"{name} calls/s",
                "ops",
                [target(top(f"sum by ({BY}) ({rate(metric)})"), LEGEND)],
                f"Calls of {name}() per second, per tracked process." + TOP_NOTE,
            ),
            8,
            8,
        )
    lay.add(
        timeseries(
            "kmalloc vs kfree bytes/s",
            "Bps",
            [
                target(top(f"sum by ({BY}) ({rate('tracer_kmalloc_bytes')})"), "kmalloc " + LEGEND, "A"),
                target("-" + top(f"sum by ({BY}) ({rate('tracer_kfree_bytes')})"), "kfree " + LEGEND, "B"),
            ],
            "Bytes kmalloc handed out (up) and kfree gave back (down), per second, per tracked process." + TOP_NOTE,
        ),
        8,
        8,
    )
    lay.add(
        timeseries(
            "Outstanding kmalloc bytes",
            "bytes",
            [
                target(
                    top(f"sum by ({BY}) (tracer_kmalloc_bytes_total{{{PSEL}}} - tracer_kfree_bytes_total{{{PSEL}}})"),
                    LEGEND,
                )
            ],
            "kmalloc_bytes - kfree_bytes since tracking began: memory still held (or freed by another process)."
            + TOP_NOTE,
        ),
        8,
        8,
    )
    lay.row("Top $topn processes")
    for metric, name in CALLS:
        lay.add(
            bargauge(
                f"Top {name} calls/s",
                "ops",
                top(f"sum by ({BY}) ({rate(metric, CSEL)})"),
                f"The $topn processes calling {name}() most now, among the chosen comm, whatever the pid choice.",
            ),
            6,
            8,
        )
    for metric, name in BYTES:
        lay.add(
            bargauge(
                f"Top {name}/s",
                "Bps",
                top(f"sum by ({BY}) ({rate(metric, CSEL)})"),
                f"The $topn processes with the most {name} per second now, among the chosen comm, whatever the pid"
                " choice.",
            ),
            6,
            8,
        )
    groups(lay)
    lay.row("Exporter health")
    lay.add(
        stat(
            "Targets up",
            "none",
            f"min by (instance) (up{{{SEL}}})",
            "Prometheus's up for each chosen target: 1 when its last scrape succeeded, 0 when it failed (exporter"
            " down or unreachable, TLS or credentials refused, timeout). A target that is down has no fresh"
            " tracer_* series: the other panels go blank for it.",
        )
        | {"fieldConfig": {"defaults": {"unit": "none", "mappings": UP_MAPPINGS}, "overrides": []}},
        3,
        5,
    )
    lay.add(
        stat(
            "Probes attached",
            "none",
            f"sum by (instance) (tracer_probe_attached{{{SEL}}})",
            "Kernel symbols with an attached probe.",
        ),
        3,
        5,
    )
    lay.add(
        stat(
            "Probes failed",
            "none",
            f"sum by (instance) (1 - tracer_probe_attached{{{SEL}}})",
            "Symbols where attaching failed: should be 0.",
        ),
        3,
        5,
    )
    lay.add(stat("Tracked processes", "none", f"sum by (instance) (tracer_tracked_processes{{{SEL}}})"), 3, 5)
    lay.add(
        stat("Alloc map entries", "none", f"sum by (instance) (tracer_alloc_map_entries{{{SEL}}})",
             "Live allocations whose size is remembered for kfree (limits.alloc_map_entries bounds it)."),
        3,
        5,
    )  # fmt: skip
    lay.add(
        stat("Last scrape duration", "s", f"max by (instance) (tracer_scrape_duration_seconds{{{SEL}}})"),
        3,
        5,
    )
    lay.add(
        stat(
            "Build",
            "none",
            f"sum by (instance, version, kernel) (tracer_build_info{{{SEL}}})",
            "The exporter's version and the kernel it runs on, per instance.",
            # textMode name shows the legend, not the value (always 1): the legend is the build.
            "{{instance}}: {{version}}, kernel {{kernel}}",
        )
        | {"options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "textMode": "name", "colorMode": "none"}},
        6,
        5,
    )
    lay.add(
        timeseries(
            "Tracked calls lost to the counts/s",
            "ops",
            [target(f"sum by (instance, function) ({rate('tracer_probe_missed', SEL)})", BY_FUNCTION)],
            "tracer_probe_missed_total: the exporter's own count, kept by its BPF program, of tracked threads'"
            " kmalloc calls it could not count: a call whose return it never saw (still open at the thread's next"
            " kmalloc or at its exit, e.g. when every probes.kretprobe_maxactive return instance was in use), or an"
            " entry it could not record because the in-flight map (limits.inflight_map_entries) was full. Those"
            " calls are missing from tracer_kmalloc_calls_total, their bytes from tracer_kmalloc_bytes_total."
            " Should stay 0.",
        ),
        8,
        8,
    )
    lay.add(
        timeseries(
            "Kernel kprobe misses/s",
            "ops",
            [target(f"sum by (instance, function) ({rate('tracer_kprobe_missed', SEL)})", BY_FUNCTION)],
            "tracer_kprobe_missed_total: the kernel's own count (the misses column of tracefs kprobe_profile) of"
            " hits its kmalloc return probes missed, for any process: mostly interrupts that arrived while another"
            " probe ran on that CPU, which are never counted. Informational: the tracked threads' kmalloc calls"
            " the counts lost are in tracer_probe_missed_total. Always 0 in probes.mode fentry (no return probes).",
        ),
        8,
        8,
    )
    lay.add(
        timeseries(
            "BPF runs skipped/s",
            "ops",
            [target(f"sum by (instance, function) ({rate('tracer_probe_skipped', SEL)})", BY_FUNCTION)],
            "tracer_probe_skipped_total: runs of each function's BPF programs (and of the sched_process_exit and"
            " sched_process_fork tracepoint programs) the kernel skipped because BPF was already busy on that CPU"
            " (the programs' recursion_misses), for any process. Informational: mostly calls in interrupts, which"
            " are never counted; the README's Probe modes says when a skip can be a tracked thread's call. Counted"
            " from Linux 5.12 (kprobe programs from 6.7); no series before 5.12.",
        ),
        8,
        8,
    )
    lay.add(
        timeseries(
            "Alloc map fill and overflow",
            "none",
            [
                target(f"sum by (instance) (tracer_alloc_map_entries{{{SEL}}})", "entries on {{instance}}", "A"),
                target(
                    f"sum by (instance) ({rate('tracer_alloc_map_insert_failures', SEL)})",
                    "insert failures/s on {{instance}}",
                    "B",
                ),
            ],
            "Remembered allocations, and allocations not remembered because the map was full.",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Scrape duration",
            "s",
            [target(f"max by (instance) (tracer_scrape_duration_seconds{{{SEL}}})", "{{instance}}")],
            "Time each scrape spent reading the kernel maps.",
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Tracked processes and scrape errors",
            "none",
            [
                target(f"sum by (instance) (tracer_tracked_processes{{{SEL}}})", "tracked on {{instance}}", "A"),
                target(
                    f"sum by (instance, part) ({rate('tracer_scrape_errors', SEL)})",
                    "{{part}} errors/s on {{instance}}",
                    "B",
                ),
            ],
        ),
        12,
        8,
    )
    lay.add(
        timeseries(
            "Children not followed (limit reached)/s",
            "ops",
            [target(f"sum by (instance) ({rate('tracer_follow_dropped', SEL)})", "{{instance}}")],
            "New children of followed processes not tracked: limits.max_tracked_processes was reached.",
        ),
        12,
        8,
    )
    return {
        "uid": UID,
        "title": "tracer_exporter",
        "description": "Kernel work per tracked process and workload group (kmalloc, kfree, schedule, locks) and the"
        " exporter's health.",
        "tags": ["tracer_exporter", "ebpf"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": variables()},
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
