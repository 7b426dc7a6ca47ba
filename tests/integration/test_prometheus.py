"""A real Prometheus scrapes the exporter in a QEMU guest, over TLS with basic auth.

Host-side: needs root on the host (for tests/vm/run), Debian's `prometheus` package
(prometheus and promtool) and openssl. `make integration` runs it. One guest
(TRACER_IT_DISTRO, default bookworm) is booted for the whole module:

    host: Prometheus on 127.0.0.1 (1 s scrapes, temporary storage)
      └─ https + basic auth ─> 127.0.0.1:HOSTPORT ─(tests/vm/run --forward)─> guest 0.0.0.0:9867
                                                                              tracer-exporter
                                                                              + workload thread

tests/integration/guest_exporter.py is the guest side; the tests below run in order.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "support"))
from certs import make_pki  # noqa: E402

DASHBOARD = REPO / "grafana" / "provisioning" / "dashboards" / "tracer-exporter.json"
DISTRO = os.environ.get("TRACER_IT_DISTRO", "bookworm")
GUEST_PORT = 9867
SCRAPE = "1s"
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval is for 1 s scrapes, rounded up
GROUP = "busy-ls"  # the workload group of the exporter's config
# Processes tracked by pid: the group's members (the busy shell's `ls` runs) are tracked too.
TRACKED_BY_PID = (
    'tracer_tracked_processes{job="tracer"} - sum by (job, instance) (tracer_group_processes{job="tracer"})'
)
BOOT_TIMEOUT = 900.0  # boot + BCC compile under TCG emulation, on a slow machine
PROM_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0

_MISSING = [t for t in ("prometheus", "promtool", "openssl", "tmux") if not shutil.which(t)]
if _MISSING and os.environ.get("TRACER_REQUIRE_TOOLS"):
    raise RuntimeError(f"missing {', '.join(_MISSING)}: `make setup` installs them")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or bool(_MISSING),
    reason="needs root (QEMU guest), Debian's prometheus package and openssl: run `make integration`",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


class Guest:
    """tests/vm/run with the guest driver; its stdout events arrive on a queue."""

    def __init__(self, workdir: Path, host_port: int) -> None:
        self.workdir = workdir
        self.events: queue.Queue[dict] = queue.Queue()
        self.stdout_lines: list[str] = []
        rel = workdir.relative_to(REPO)
        cmd = [
            str(REPO / "tests" / "vm" / "run"), "--distro", DISTRO, "--timeout", "1500",
            "--forward", f"{host_port}:{GUEST_PORT}", "--", "python3", "tests/integration/guest_exporter.py", str(rel),
        ]  # fmt: skip
        self.stderr = open(workdir / "vm-run.log", "wb")  # noqa: SIM115 (kept open for the process)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=REPO)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put({"event": "eof"})

    def event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"guest: no {name!r} within {timeout} s\n{self.logs()}") from None
            if ev["event"] == name:
                return ev
            if ev["event"] == "eof":
                raise AssertionError(f"guest ended before {name!r} (exit {self.proc.poll()})\n{self.logs()}")

    def signal(self, name: str) -> None:
        (self.workdir / name).write_text("")

    def logs(self) -> str:
        parts = [f"--- guest stdout ---\n{''.join(self.stdout_lines)}"]
        for name in ("vm-run.log", "exporter.log"):
            p = self.workdir / name
            if p.exists():
                parts.append(f"--- {name} ---\n{p.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def close(self, timeout: float = 120.0) -> int | None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)  # run kills QEMU on the way out
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stderr.close()
        return self.proc.returncode


class Prometheus:
    def __init__(self, workdir: Path, config: dict) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (kept open for the process)
        self.storage = tempfile.mkdtemp(prefix="tracer-it-tsdb-")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until("prometheus ready", lambda: self._get("/-/ready")[0] == 200, PROM_TIMEOUT)

    def _get(self, path: str) -> tuple[int, bytes]:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + path, timeout=HTTP_TIMEOUT) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def api(self, path: str, **params: str) -> object:
        status, body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", f"{path} {params}: {status} {body[:500]!r}"
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data  # type: ignore[index]
        return data["result"]  # type: ignore[index]

    def values(self, expr: str) -> dict[str, float]:
        """pid -> value, for per-process results."""
        return {r["metric"].get("pid", ""): float(r["value"][1]) for r in self.query(expr)}

    def targets(self) -> dict[str, dict]:
        data = self.api("targets", state="active")
        return {t["labels"]["job"]: t for t in data["activeTargets"]}  # type: ignore[index]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.storage, ignore_errors=True)


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pki = make_pki(workdir / "pki")
        self.user = "prometheus"
        self.password = secrets.token_urlsafe(12)
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(10)).decode()
        (workdir / "credentials.json").write_text(json.dumps({"user": self.user, "password": self.password}))
        (workdir / "password").write_text(self.password)
        (workdir / "wrong-password").write_text(self.password + "-wrong")
        (workdir / "web.yml").write_text(
            yaml.safe_dump(
                {
                    "tls_server_config": {"cert_file": "pki/server.crt", "key_file": "pki/server.key"},
                    "basic_auth_users": {self.user: hashed},
                }
            )
        )
        # Control from loopback only: the host (10.0.2.2 to the guest) controls by authenticating
        # as a user of control.users.
        # A group: the busy shell's `ls` runs join it at their exec, so its rates are not zero.
        (workdir / "exporter.yaml").write_text(
            f"control:\n  allowed_networks: [127.0.0.0/8]\n  users: [{self.user}]\n"
            f"select:\n  - name: {GROUP}\n    comm: ls\n"
        )
        self.host_port = free_port()
        self.target = f"127.0.0.1:{self.host_port}"
        self.ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        self.guest = Guest(workdir, self.host_port)
        self.prometheus: Prometheus | None = None

    def start_prometheus(self) -> Prometheus:
        def job(name: str, password_file: str) -> dict:
            return {
                "job_name": name,
                "scrape_interval": SCRAPE,
                "scrape_timeout": SCRAPE,
                "scheme": "https",
                "tls_config": {"ca_file": str(self.pki.ca)},
                "basic_auth": {"username": self.user, "password_file": str(self.workdir / password_file)},
                "static_configs": [{"targets": [self.target]}],
            }

        config = {
            "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
            "scrape_configs": [
                job("tracer", "password"),
                job("tracer-wrong-password", "wrong-password"),
                {
                    "job_name": "tracer-plain-http",
                    "scrape_interval": SCRAPE,
                    "scrape_timeout": SCRAPE,
                    "static_configs": [{"targets": [self.target]}],
                },
            ],
        }
        self.prometheus = Prometheus(self.workdir, config)
        return self.prometheus

    def request(self, method: str, path: str, password: str | None = None, user: str | None = None):
        req = urllib.request.Request(f"https://{self.target}{path}", method=method)
        if password is not None:
            token = base64.b64encode(f"{user or self.user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT, context=self.ctx) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def close(self) -> int | None:
        if self.prometheus is not None:
            self.prometheus.close()
        self.guest.signal("stop")
        self.guest.signal("done")
        return self.guest.close()


@pytest.fixture(scope="module")
def stack():
    base = REPO / "build" / "integration"
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-", dir=base))
    s = Stack(workdir)
    try:
        s.tracked = s.guest.event("tracked", BOOT_TIMEOUT)
        s.start_prometheus()
        yield s
    except BaseException:
        sys.stderr.write(s.guest.logs() + "\n")
        raise
    finally:
        if s.prometheus is not None:
            sys.stderr.write(f"--- prometheus log ---\n{s.prometheus.log()}\n")
        code = s.close()
        sys.stderr.write(f"--- guest ---\n{s.guest.logs()[-3000:]}\n")
    assert code == 0, "the guest driver failed (or the exporter did not exit 0 on SIGTERM)"
    shutil.rmtree(workdir, ignore_errors=True)


def _metrics_text(stack: Stack) -> str:
    status, body = stack.request("GET", "/metrics", stack.password)
    assert status == 200
    return body.decode()


def sample_names(text: str) -> set[str]:
    """Names with at least one sample; a family without samples has only its # lines."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def exposed_names(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")} | sample_names(text)


# ---------------------------------------------------------------- the tests, in order


def test_workload_did_exactly_what_was_asked(stack):
    assert stack.tracked["tally"] == stack.tracked["expected"] == {
        "kmalloc": 10, "kmalloc_bytes": 1000, "kfree": 10, "kfree_bytes": 1000,
        "sched": 3, "up": 3, "down": 3, "lock": 4, "unlock": 4, "held": 0,
    }  # fmt: skip


def test_promtool_check_metrics_is_clean(stack):
    text = _metrics_text(stack)
    assert f'pid="{stack.tracked["pid"]}"' in text
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_tls_and_basic_auth_over_the_forward(stack):
    pid = stack.tracked["pid"]
    assert stack.request("GET", "/metrics")[0] == 401
    assert stack.request("GET", "/metrics", "wrong")[0] == 401
    assert stack.request("GET", "/metrics", stack.password, user="mallory")[0] == 401
    # The host is 10.0.2.2 to the guest, outside control.allowed_networks: as a user of control.users,
    # it may control.
    assert stack.request("POST", f"/pids/{pid}", "wrong")[0] == 401
    status, body = stack.request("POST", f"/pids/{pid}", stack.password)
    assert (status, json.loads(body)) == (200, {"pid": pid, "tracked": True, "created": False})
    # Plain HTTP to the TLS port: a clean 400, as Go servers answer it.
    with socket.create_connection(("127.0.0.1", stack.host_port), timeout=HTTP_TIMEOUT) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert reply.endswith(b"\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
    # A client that does not trust the test CA fails its handshake.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://{stack.target}/metrics", timeout=HTTP_TIMEOUT)


def test_prometheus_scrapes_over_tls_only_with_the_right_password(stack):
    prom = stack.prometheus

    def settled():
        t = prom.targets()
        jobs = ("tracer", "tracer-wrong-password", "tracer-plain-http")
        if set(t) != set(jobs) or any(t[j]["health"] == "unknown" for j in jobs) or t["tracer"]["health"] != "up":
            return None
        return t

    targets = wait_until("all three jobs scraped", settled, PROM_TIMEOUT)
    assert targets["tracer"]["health"] == "up", targets["tracer"]
    assert targets["tracer-wrong-password"]["health"] == "down"
    assert "401 Unauthorized" in targets["tracer-wrong-password"]["lastError"]
    assert targets["tracer-plain-http"]["health"] == "down"
    assert "400 Bad Request" in targets["tracer-plain-http"]["lastError"]
    up = {r["metric"]["job"]: float(r["value"][1]) for r in prom.query('up{job=~"tracer.*"}')}
    assert up == {"tracer": 1.0, "tracer-wrong-password": 0.0, "tracer-plain-http": 0.0}


def test_promql_returns_the_exact_counts(stack):
    prom = stack.prometheus
    pid = str(stack.tracked["pid"])
    sel = f'{{job="tracer", pid="{pid}"}}'
    want = {
        "tracer_kmalloc_calls_total": 10,
        "tracer_kmalloc_bytes_total": 1000,
        "tracer_kfree_calls_total": 10,
        "tracer_kfree_bytes_total": 1000,
        "tracer_schedule_calls_total": 3,
        "tracer_up_calls_total": 3,
        "tracer_down_interruptible_calls_total": 3,
        "tracer_mutex_lock_calls_total": 4,
        "tracer_mutex_unlock_calls_total": 4,
    }
    wait_until("the pid's series in Prometheus", lambda: prom.query(f"tracer_kmalloc_bytes_total{sel}"), PROM_TIMEOUT)
    got = {name: prom.values(f"{name}{sel}") for name in want}
    assert got == {name: {pid: float(v)} for name, v in want.items()}
    (series,) = prom.query(f"tracer_kmalloc_bytes_total{sel}")
    assert series["metric"] == {
        "__name__": "tracer_kmalloc_bytes_total",
        "job": "tracer",
        "instance": stack.target,
        "pid": pid,
        "comm": stack.tracked["comm"],
    }  # parent_pid="" is no label at all to Prometheus
    assert prom.values(f"tracer_kmalloc_bytes_total{sel} - tracer_kfree_bytes_total{sel}") == {pid: 0.0}
    assert prom.values(TRACKED_BY_PID) == {"": 2.0}
    # The busy shell keeps allocating: its rate is above zero.
    busy = str(stack.tracked["busy_pid"])
    rates = wait_until(
        "a non-zero kmalloc rate for the busy process",
        lambda: {k: v for k, v in prom.values(f'rate(tracer_kmalloc_calls_total{{job="tracer"}}[{RATE_INTERVAL}])').items() if v > 0},
        PROM_TIMEOUT,
    )  # fmt: skip
    assert busy in rates and pid not in rates


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def test_top_shows_the_processes_live_in_a_terminal(stack):
    """`tracer-exporter top` in a real terminal (tmux), over TLS with basic auth: the
    workload's row with its exact totals, the busy shell's non-zero rate, another sort
    key reordering the rows, and q ending it with status 0."""
    pid, busy = str(stack.tracked["pid"]), str(stack.tracked["busy_pid"])
    session = f"tracer-top-{os.getpid()}"
    cmd = [
        sys.executable, "-m", "tracer_exporter", "top", "--url", f"https://{stack.target}",
        "--ca-file", str(stack.pki.ca), "--user", stack.user, "--password-file", str(stack.workdir / "password"),
        "--interval", "1", "--sort", "kmalloc",
    ]  # fmt: skip
    # An idle pane first, kept when its command ends: then top replaces it, and its exit status stays readable.
    tmux("new-session", "-d", "-s", session, "-x", "220", "-y", "30", "sleep 600")
    try:
        tmux("set-option", "-t", session, "remain-on-exit", "on")
        # No client is attached: fix the size, or tmux may give the pane its default 80 columns.
        tmux("set-option", "-t", session, "window-size", "manual")
        tmux("resize-window", "-t", session, "-x", "220", "-y", "30")
        status = stack.workdir / "top-status"
        env = ["env", "-u", "COLUMNS", "-u", "LINES", f"PYTHONPATH={REPO}"]
        run_top = f"{shlex.join([*env, *cmd])}; echo $? > {shlex.quote(str(status))}"
        tmux("respawn-pane", "-k", "-t", session, run_top)

        def rows() -> list[list[str]]:
            screen = tmux("capture-pane", "-p", "-t", session).splitlines()
            return [line.split() for line in screen if line.split()[:1] in ([pid], [busy])]

        def busy_allocating() -> list[list[str]] | None:
            # Both rows, and a kmalloc rate above zero for the busy shell (it forks every second).
            got = {r[0]: r for r in rows()}
            return [got[busy], got[pid]] if len(got) == 2 and got[busy][2] not in ("-", "0") else None

        busy_row, row = wait_until("top showing both rows, the busy one allocating", busy_allocating, PROM_TIMEOUT)
        screen = tmux("capture-pane", "-p", "-t", session)
        assert "mode " in screen.splitlines()[0], screen
        # PID COMM, then a rate and a total per column: kmalloc kfree kmalloc_mem kfree_mem sched up down lock unlock.
        assert len(row) == 20, screen
        totals = [row[3 + 2 * i] for i in range(9)]
        assert totals == ["10", "10", "1.0k", "1.0k", "3", "3", "3", "4", "4"], row
        assert float(busy_row[2].rstrip("kMG")) > 0
        wait_until("rows sorted by kmalloc", lambda: [r[0] for r in rows()] == [busy, pid] or None, PROM_TIMEOUT)
        for _ in range(5):  # kfree, kmalloc_mem, kfree_mem, sched, up
            tmux("send-keys", "-t", session, ">")
        wait_until("rows sorted by up", lambda: [r[0] for r in rows()] == [pid, busy] or None, PROM_TIMEOUT)
        tmux("send-keys", "-t", session, "q")
        wait_until("top to exit", lambda: (status.exists() and status.read_text().strip()) or None, 30)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=30, check=False)


def dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for t in panel.get("targets", []):
            out.append((f"{panel['title']} / {t['refId']}", t["expr"]))
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", var["definition"]))
    return out


def test_every_dashboard_query_returns_data(stack):
    prom = stack.prometheus
    pids = f"{stack.tracked['pid']}|{stack.tracked['busy_pid']}"

    def grafana_regex(value: str) -> str:
        # As Grafana interpolates a multi-value variable: regex-escaped, then escaped for a PromQL string.
        return re.escape(value).replace("\\", "\\\\")

    subst = {
        "$__rate_interval": RATE_INTERVAL,
        "$job": "tracer",
        "$instance": grafana_regex(stack.target),
        # The workload thread's comm (tw/N), not All: every per-process query must still find
        # that thread's series through the comm filter (the busy shell's pid is filtered out).
        "$comm": grafana_regex(stack.tracked["comm"]),
        "$pid": pids,
        "$topn": "5",
        "$group": grafana_regex(GROUP),
    }
    # Wait for enough samples that every rate() window holds two.
    wait_until("two samples in a rate window", lambda: prom.query(f'rate(tracer_tracked_processes{{job="tracer"}}[{RATE_INTERVAL}]) >= 0'), PROM_TIMEOUT)  # fmt: skip
    text = _metrics_text(stack)
    exposed = exposed_names(text)
    # tracer_probe_skipped_total has samples only where the kernel shows recursion_misses (Linux
    # 5.12+: bookworm and trixie do, bullseye does not). Its panel may be empty there and only
    # there: when the exporter serves samples, Prometheus must return them.
    may_be_empty = {"tracer_probe_skipped_total"} - sample_names(text)
    failures = []
    queries = dashboard_queries()
    assert len(queries) >= 30
    for where, expr in queries:
        for name in re.findall(r"\btracer_[a-z_]+\b", expr):
            if name not in exposed:
                failures.append(f"{where}: {name} is not a metric the exporter exposes")
        for var, value in sorted(subst.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: unsubstituted variable in {expr}"
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", expr)
        if m:
            data = prom.api("series", **{"match[]": m.group(1)})
            values = {s.get(m.group(2)) for s in data} - {None}  # type: ignore[union-attr]
            if not values:
                failures.append(f"{where}: no values for {expr}")
            continue
        if not prom.query(expr) and not may_be_empty & set(re.findall(r"\btracer_[a-z_]+\b", expr)):
            failures.append(f"{where}: no data for {expr}")
    assert not failures, "\n".join(failures)


def test_series_go_stale_when_the_process_exits(stack):
    prom = stack.prometheus
    pid = str(stack.tracked["pid"])
    sel = f'{{job="tracer", pid="{pid}"}}'
    assert prom.values(f"tracer_kmalloc_bytes_total{sel}") == {pid: 1000.0}
    stack.guest.signal("stop")
    stack.guest.event("stopped", 120)
    # The next scrape lacks the series: Prometheus marks them stale, and they are gone at once.
    wait_until("the pid's series to go stale", lambda: not prom.query(f'{{job="tracer", pid="{pid}"}}'), PROM_TIMEOUT)
    assert prom.values(TRACKED_BY_PID) == {"": 1.0}
    # They existed: the last value before the staleness marker is still in the TSDB.
    assert prom.values(f"last_over_time(tracer_kmalloc_bytes_total{sel}[10m])") == {pid: 1000.0}
    assert prom.values('up{job="tracer"}') == {"": 1.0}
