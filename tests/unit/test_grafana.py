"""The Grafana dashboard's conventions, checked on the host.

Whether every query returns data is checked against a real Prometheus in
tests/integration/test_prometheus.py.
"""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tracer_exporter.model.counters import FIELDS, Counts, Row
from tracer_exporter.model.groups import GroupRow
from tracer_exporter.model.health import Attachment, Health
from tracer_exporter.views.collector import TracerCollector

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "provisioning" / "dashboards" / "tracer-exporter.json"
PER_PROCESS = {f.metric for f in FIELDS}  # the counters labelled pid and comm, without _total
# The per workload group series (labelled group), as the exporter publishes them.
GROUP_COUNTERS = {
    f"tracer_group_{x}_total"
    for x in (
        "kmalloc_calls",
        "kmalloc_bytes",
        "kfree_calls",
        "kfree_bytes",
        "schedule_calls",
        "up_calls",
        "down_interruptible_calls",
        "mutex_lock_calls",
        "mutex_unlock_calls",
    )
}
GROUP_METRICS = GROUP_COUNTERS | {"tracer_group_processes", "tracer_group_dropped_total"}


@pytest.fixture(scope="module")
def doc():
    return json.loads(DASHBOARD.read_text())


def panels(doc):
    return [p for p in doc["panels"] if p["type"] != "row"]


def exprs(doc):
    return [(p["title"], t["expr"]) for p in panels(doc) for t in p["targets"]]


def row_panels(doc, title):
    """The panels under the row called title, up to the next row."""
    out, inside = [], False
    for p in doc["panels"]:
        if p["type"] == "row":
            inside = p["title"] == title
        elif inside:
            out.append(p)
    return out


def exposed_metric_names():
    """Every sample name the real collector produces, with one row and full health."""
    registry = CollectorRegistry()
    rows = [Row(42, "worker", Counts(*range(1, 10)), 0)]
    health = Health(
        attachments=[Attachment("kmalloc", "__kmalloc", True)],
        missed={"kmalloc": 0},
        kernel_missed={"kmalloc": 0},
        skipped={"kmalloc": 0},
    )
    groups = [GroupRow("web", Counts(*range(1, 10)), 2, 1)]
    registry.register(TracerCollector(lambda: rows, lambda: health, "0", "6.1", groups=lambda: groups))
    text = generate_latest(registry).decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}


def test_json_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_dashboard", GRAFANA / "make_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run python3 grafana/make_dashboard.py"


def test_fixed_uid_and_schema_version(doc):
    assert doc["uid"] == "tracer-exporter"
    assert doc["schemaVersion"] == 41
    # What Grafana's migrations to 40 and 41 would otherwise rewrite on load.
    assert isinstance(doc["refresh"], str)
    assert "time_options" not in doc.get("timepicker", {})


def test_template_variables(doc):
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert set(variables) >= {"datasource", "job", "instance", "comm", "pid", "topn"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pid"]["multi"] is True
    for name in ("job", "instance", "comm", "pid"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variables[name]["definition"] == variables[name]["query"]["query"]


def test_comm_filters_the_pid_list_and_the_panels(doc):
    names = [v["name"] for v in doc["templating"]["list"]]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    comm, pid = variables["comm"], variables["pid"]
    assert comm["multi"] is True and comm["includeAll"] is True
    assert re.fullmatch(r"label_values\(tracer_\w+_total\{[^}]*\}, comm\)", comm["definition"])
    assert 'instance=~"$instance"' in comm["definition"]
    # pid lists only the chosen comms' processes, so comm must resolve first.
    assert 'comm=~"$comm"' in pid["definition"]
    assert names.index("comm") < names.index("pid")
    # Every selector of a per-process counter, in any panel, narrows by comm.
    selectors = [
        (title, sel)
        for title, expr in exprs(doc)
        for name, sel in re.findall(r"\b(tracer_\w+_total)\{([^}]*)\}", expr)
        if name.removesuffix("_total") in PER_PROCESS
    ]
    assert len(selectors) >= 18
    for title, sel in selectors:
        assert 'comm=~"$comm"' in sel, (title, sel)


def test_per_process_panels_show_the_top_n(doc):
    # A host may track thousands of processes: each per-process query keeps the $topn largest.
    per_process = [(t, e) for t, e in exprs(doc) if re.search(r"\bby \([^)]*\bpid\b", e)]
    # 7 call rates, kmalloc and kfree bytes, outstanding bytes; then the Top row's 9 bar gauges.
    assert len(per_process) >= 7 + 2 + 1 + len(PER_PROCESS)
    for title, expr in per_process:
        assert re.fullmatch(r"-?topk\(\$topn, .*\)", expr), (title, expr)
        assert expr.count("topk(") == 1, (title, expr)
    topn = {v["name"]: v for v in doc["templating"]["list"]}["topn"]
    assert topn["type"] == "custom" and topn["current"]["value"] in topn["query"].split(",")


def test_group_variable(doc):
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    group = variables["group"]
    assert group["type"] == "query"
    assert group["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert group["multi"] is True and group["includeAll"] is True
    assert group["definition"] == group["query"]["query"]
    m = re.fullmatch(r"label_values\(tracer_group_processes\{([^}]*)\}, group\)", group["definition"])
    assert m, group["definition"]
    assert 'job=~"$job"' in m.group(1) and 'instance=~"$instance"' in m.group(1)
    names = [v["name"] for v in doc["templating"]["list"]]
    assert names.index("instance") < names.index("group")


def test_workload_groups_row(doc):
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert "Workload groups" in rows
    group_panels = row_panels(doc, "Workload groups")
    titles = {p["title"] for p in group_panels}
    for fn in ("kmalloc", "kfree", "schedule", "up", "down_interruptible", "mutex_lock", "mutex_unlock"):
        assert f"Group {fn} calls/s" in titles
    assert {
        "Group kmalloc vs kfree bytes/s",
        "Top groups by kmalloc bytes/s",
        "Group members and members dropped/s",
    } <= titles
    (top,) = [p for p in group_panels if p["title"] == "Top groups by kmalloc bytes/s"]
    assert top["type"] == "bargauge"
    assert re.fullmatch(r"topk\(\$topn, .*tracer_group_kmalloc_bytes_total.*\)", top["targets"][0]["expr"])
    assert "{{group}}" in top["targets"][0]["legendFormat"]
    named = set()
    for p in group_panels:
        for t in p["targets"]:
            expr = t["expr"]
            names = re.findall(r"\btracer_[a-z_]+\b", expr)
            assert names and set(names) <= GROUP_METRICS, (p["title"], expr)
            named |= set(names)
            # Every series selector of the row narrows by group, job and instance.
            selectors = re.findall(r"\btracer_[a-z_]+\{([^}]*)\}", expr)
            assert len(selectors) == len(names), (p["title"], expr)
            for sel in selectors:
                for want in ('group=~"$group"', 'job=~"$job"', 'instance=~"$instance"'):
                    assert want in sel, (p["title"], expr)
            # Group series have no pid or comm: those variables must not empty the row.
            assert "$comm" not in expr and "$pid" not in expr, (p["title"], expr)
            assert re.search(r"\bby \(instance, group\)", expr), (p["title"], expr)
            if re.search(r"_total\b", expr):
                assert "[$__rate_interval])" in expr, (p["title"], expr)
    # Each counter's rate, the members gauge and the dropped counter are all shown.
    assert named == GROUP_METRICS, GROUP_METRICS - named
    # Nowhere else are group series queried.
    outside = {p["title"] for p in panels(doc)} - titles
    for title, expr in exprs(doc):
        if title in outside:
            assert "tracer_group_" not in expr and "$group" not in expr, (title, expr)


def test_no_hard_coded_datasource_uid(doc):
    found = []

    def walk(node):
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict):
                found.append(ds.get("uid"))
            elif ds is not None:
                found.append(ds)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert found and set(found) == {"${datasource}"}


def test_every_panel_has_a_unit_and_queries(doc):
    assert len(panels(doc)) >= 20
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels(doc):
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p["targets"], p["title"]


def test_counters_only_through_rate_over_rate_interval(doc):
    for title, expr in exprs(doc):
        for window in re.findall(r"\b(?:rate|irate|increase)\([^\[]*\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", (title, expr)
        # A counter outside rate() is only the outstanding-bytes difference.
        bare = re.sub(r"\brate\([^\[]*\[\$__rate_interval\]\)", "", expr)
        if title != "Outstanding kmalloc bytes":
            assert not re.search(r"tracer_\w+_total", bare), (title, expr)


def test_required_content(doc):
    titles = {p["title"] for p in panels(doc)}
    for fn in ("kmalloc", "kfree", "schedule", "up", "down_interruptible", "mutex_lock", "mutex_unlock"):
        assert f"{fn} calls/s" in titles
        assert f"Top {fn} calls/s" in titles
    assert {
        "kmalloc vs kfree bytes/s",
        "Outstanding kmalloc bytes",
        "Top kmalloc bytes/s",
        "Top kfree bytes/s",
    } <= titles
    assert {"Probes attached", "Tracked calls lost to the counts/s", "Alloc map fill and overflow"} <= titles
    assert {"Targets up", "Kernel kprobe misses/s", "BPF runs skipped/s"} <= titles
    assert {"Tracked processes", "Scrape duration"} <= titles
    (build,) = [p for p in panels(doc) if p["title"] == "Build"]
    assert build["options"]["textMode"] == "name"  # so the legend must carry the build
    assert {"{{version}}", "{{kernel}}"} <= set(re.findall(r"\{\{\w+\}\}", build["targets"][0]["legendFormat"]))
    outstanding = dict(exprs(doc))["Outstanding kmalloc bytes"]
    assert "tracer_kmalloc_bytes_total" in outstanding and "- tracer_kfree_bytes_total" in outstanding
    assert all("topk($topn," in e for t, e in exprs(doc) if t.startswith("Top "))


def test_scrape_health_and_probe_loss_panels(doc):
    by_metric = {}
    for p in panels(doc):
        for t in p["targets"]:
            for name in re.findall(r"\b(up|tracer_(?:probe_missed|kprobe_missed|probe_skipped)_total)\{", t["expr"]):
                by_metric[name] = p
    assert set(by_metric) == {
        "up",
        "tracer_probe_missed_total",
        "tracer_kprobe_missed_total",
        "tracer_probe_skipped_total",
    }
    (up,) = by_metric["up"]["targets"]
    assert 'job=~"$job"' in up["expr"] and 'instance=~"$instance"' in up["expr"]
    # All must not be .*, or up{job=~"$job"} is every target Prometheus scrapes.
    job = {v["name"]: v for v in doc["templating"]["list"]}["job"]
    assert job["includeAll"] is True and "allValue" not in job
    # Each description names its metric and says whether it is the exporter's loss or informational.
    for name in ("tracer_probe_missed_total", "tracer_kprobe_missed_total", "tracer_probe_skipped_total"):
        assert by_metric[name]["description"].startswith(name + ": "), name
    assert "Should stay 0" in by_metric["tracer_probe_missed_total"]["description"]
    for name in ("tracer_kprobe_missed_total", "tracer_probe_skipped_total"):
        assert "any process" in by_metric[name]["description"] and "Informational" in by_metric[name]["description"]


def test_every_metric_named_is_exposed(doc):
    exposed = exposed_metric_names()
    queries = [e for _, e in exprs(doc)] + [v.get("definition", "") for v in doc["templating"]["list"]]
    named = {n for e in queries for n in re.findall(r"\btracer_[a-z_]+\b", e)}
    assert named and named <= exposed, named - exposed


def test_provisioning_files():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert [d["type"] for d in ds["datasources"]] == ["prometheus"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tracer-exporter.yaml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/provisioning/dashboards"


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian: prometheus) not installed")
@pytest.mark.parametrize("path", ["grafana/prometheus.yml"])
def test_example_prometheus_config_is_valid(path):
    done = subprocess.run(["promtool", "check", "config", str(REPO / path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
