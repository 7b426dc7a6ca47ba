"""`tracer-exporter top`: a live, sorted view of a running exporter, over its HTTP API.

It reads /pids (counters per process) and /metrics (version, kernel, probe
mode, what was lost) of any exporter, local or remote, and shows each
column as a rate per second and a total. The standard library only, plus
PyYAML for a web config: it runs with no kernel support and no bcc.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer_exporter.model.counters import FIELDS

# (/tracer column, /pids counter name), in /tracer's order.
COLUMNS = tuple((f.column, f.name) for f in FIELDS)
# A workload group's counter (tracer_group_*_total) -> its /pids counter name.
GROUP_METRICS = {"tracer_group_" + f.metric.removeprefix("tracer_") + "_total": f.name for f in FIELDS}
SORT_KEYS = ("pid", "comm", *(name for name, _ in COLUMNS))
DEFAULT_URL = "http://127.0.0.1:9867"
FETCH_TIMEOUT = 10.0
CELL = 18  # "RATE TOTAL" per column, under a name and "/s total"
KEYS_HELP = "q quit  s/</> sort column  p pause  / filter by comm  h help"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Snapshot:
    at: float
    rows: dict[int, tuple[str, dict[str, int]]]  # pid -> (comm, counters)
    info: dict[str, str] = field(default_factory=dict)  # version, kernel, mode
    lost: dict[str, float] = field(default_factory=dict)  # what makes the numbers not exact


def parse_pids(body: bytes) -> dict[int, tuple[str, dict[str, int]]]:
    return {int(e["pid"]): (str(e["comm"]), {k: int(v) for k, v in e["counters"].items()}) for e in json.loads(body)}


def parse_groups(text: str) -> dict[str, dict[str, int]]:
    """Each workload group's counters, from the tracer_group_*_total samples of an exposition."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m[1] in GROUP_METRICS:
            name = dict(_LABEL.findall(m[2] or "")).get("group", "")
            out.setdefault(name, dict.fromkeys(GROUP_METRICS.values(), 0))[GROUP_METRICS[m[1]]] = int(float(m[3]))
    return out


def parse_metrics(text: str) -> tuple[dict[str, str], dict[str, float]]:
    """The header's facts from an exposition: build and kernel info, the mode, and the loss counters."""
    info: dict[str, str] = {}
    lost = {"missed": 0.0, "kprobe_missed": 0.0, "skipped": 0.0}
    sums = {"tracer_probe_missed_total": "missed", "tracer_kprobe_missed_total": "kprobe_missed"}
    sums["tracer_probe_skipped_total"] = "skipped"
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or line.startswith("#"):
            continue
        name, labels = m[1], dict(_LABEL.findall(m[2] or ""))
        if name == "tracer_exporter_build_info":
            info["version"] = labels.get("version", "?")
        elif name == "tracer_kernel_info":
            info["kernel"] = labels.get("release", labels.get("kernel", "?"))
        elif name == "tracer_build_info" and "kernel" not in info:
            info["kernel"] = labels.get("kernel", "?")
        elif name == "tracer_probe_mode_info":
            info["mode"] = labels.get("mode", "?")
        elif name in sums:
            lost[sums[name]] += float(m[3])
    return info, lost


def rates(prev: Snapshot | None, cur: Snapshot) -> dict[int, dict[str, float | None]]:
    """Per pid and column, calls (or bytes) per second since the last snapshot; None where
    there is no earlier value for the pid, or its counter went down (a reused pid)."""
    out: dict[int, dict[str, float | None]] = {}
    dt = cur.at - prev.at if prev else 0.0
    for pid, (comm, counters) in cur.rows.items():
        before = prev.rows.get(pid) if prev and dt > 0 else None
        row: dict[str, float | None] = {}
        for name, key in COLUMNS:
            if before is None or before[0] != comm or counters[key] < before[1].get(key, 0):
                row[name] = None
            else:
                row[name] = (counters[key] - before[1][key]) / dt
        out[pid] = row
    return out


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}" if n == int(n) else f"{n:.1f}"


@dataclass
class View:
    sort: str = "kmalloc"
    descending: bool = True
    paused: bool = False
    comm_filter: str = ""
    by: str = "pid"  # or "group": a row per workload group
    help: bool = False
    message: str = ""  # a fetch error, shown until the next good fetch

    def cycle_sort(self, step: int = 1) -> None:
        self.sort = SORT_KEYS[(SORT_KEYS.index(self.sort) + step) % len(SORT_KEYS)]


def render(cur: Snapshot | None, prev: Snapshot | None, view: View, width: int, height: int, url: str) -> list[str]:
    """The screen as lines, each at most width long, at most height of them."""
    lines: list[str] = []
    if cur is None:
        lines.append(f"tracer-exporter top: {url}")
    else:
        i = cur.info
        count = f"{len(cur.rows)} groups" if view.by == "group" else f"{len(cur.rows)} tracked"
        lines.append(
            f"tracer-exporter {i.get('version', '?')}  kernel {i.get('kernel', '?')}  mode {i.get('mode', '?')}"
            f"  {count}  {url}" + ("  [paused]" if view.paused else "")
        )
        lost = cur.lost
        where = "  NOT EXACT: tracked calls were lost" if lost.get("missed") else ""
        lines.append(
            f"missed {human(lost.get('missed', 0))}  kernel kprobe missed {human(lost.get('kprobe_missed', 0))}"
            f"  skipped {human(lost.get('skipped', 0))}{where}"
        )
    if view.message:
        lines.append(view.message)
    if view.help:
        lines.append(KEYS_HELP)
    if view.comm_filter:
        lines.append(f"filter: comm contains {view.comm_filter!r}")
    mark = "v" if view.descending else "^"
    head = f"{'PID' + (mark if view.sort == 'pid' else ''):>8} {'COMM' + (mark if view.sort == 'comm' else ''):<16}"
    if view.by == "group":
        head = f"{'GROUP' + (mark if view.sort in ('pid', 'comm') else ''):<25}"
    units = " " * 25
    for name, _ in COLUMNS:
        head += f"{name + (mark if view.sort == name else ''):>{CELL}}"
        units += f"{'/s total':>{CELL}}"
    lines += [head, units]
    if cur is not None:
        per_second = rates(prev, cur)
        pids = [p for p in cur.rows if view.comm_filter.lower() in cur.rows[p][0].lower()]
        by_group = view.by == "group"
        lines += [_row(p, cur.rows[p], per_second[p], by_group) for p in _sorted(pids, cur, per_second, view)]
    return [line[:width] for line in lines[:height]]


def _row(pid: int, entry: tuple[str, dict[str, int]], per_second: dict[str, float | None], group: bool) -> str:
    comm, counters = entry
    out = f"{comm[:24]:<25}" if group else f"{pid:>8} {comm[:16]:<16}"
    for name, key in COLUMNS:
        rate = per_second[name]
        cell = f"{'-' if rate is None else human(rate)} {human(counters[key])}"
        out += f"{cell:>{CELL}}"
    return out


def _sorted(pids: list[int], cur: Snapshot, per_second: dict[int, dict[str, float | None]], view: View) -> list[int]:
    def key(pid: int) -> tuple[Any, ...]:
        if view.sort == "pid":
            return (pid,)
        if view.sort == "comm":
            return (cur.rows[pid][0], pid)
        rate = per_second[pid][view.sort]
        total = cur.rows[pid][1][dict(COLUMNS)[view.sort]]
        return (rate if rate is not None else -1.0, total, -pid)

    return sorted(pids, key=key, reverse=view.descending)


class Client:
    """GETs from the exporter, with basic auth and TLS as configured; every request has a timeout."""

    def __init__(self, url: str, user: str = "", password: str = "", context: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self._headers = {}
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._context = context
        self._group_ids: dict[str, int] = {}  # a group's row key, kept between snapshots for its rates

    def get(self, path: str) -> bytes:
        req = urllib.request.Request(self.url + path, headers=self._headers)
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT, context=self._context) as r:
            return bytes(r.read())

    def snapshot(self, clock: Callable[[], float] = time.monotonic, by: str = "pid") -> Snapshot:
        if by == "group":
            text = self.get("/metrics").decode(errors="replace")
            at = clock()
            rows = {}
            for name, counters in sorted(parse_groups(text).items()):
                key = self._group_ids.setdefault(name, len(self._group_ids) + 1)
                rows[key] = (name, counters)
        else:
            rows = parse_pids(self.get("/pids"))
            at = clock()
            text = self.get("/metrics").decode(errors="replace")
        info, lost = parse_metrics(text)
        return Snapshot(at, rows, info, lost)


def fetch_error(url: str, e: Exception) -> str:
    """One clear line for a failed fetch: the view keeps it and retries."""
    if isinstance(e, urllib.error.HTTPError):
        if e.code == 401:
            return (
                f"{url}: 401 Unauthorized: give --user and --password-file (or a web config's client section); retrying"
            )
        return f"{url}: HTTP {e.code} {e.reason}; retrying"
    if isinstance(e, urllib.error.URLError):
        return f"{url}: cannot connect: {e.reason}; retrying"
    if isinstance(e, (ValueError, KeyError)):
        return f"{url}: not an exporter's answer ({e}); retrying"
    return f"{url}: {e}; retrying"


def client_settings(path: str) -> dict[str, Any]:
    """The `client` section of a web config: basic_auth {username, password | password_file},
    tls_config {ca_file, insecure_skip_verify}."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    client = doc.get("client") or {}
    if not isinstance(client, dict):
        raise ValueError(f"{path}: client must be a mapping")
    return client


def build_client(args: argparse.Namespace) -> Client:
    user, password, ca, insecure = args.user, "", args.ca_file, args.insecure
    if args.password_file:
        password = Path(args.password_file).read_text().strip()
    if args.web_config_file:
        c = client_settings(args.web_config_file)
        auth, tls = c.get("basic_auth") or {}, c.get("tls_config") or {}
        user = user or auth.get("username", "")
        if not password and auth.get("password_file"):
            password = Path(auth["password_file"]).read_text().strip()
        password = password or str(auth.get("password", ""))
        ca = ca or tls.get("ca_file", "")
        insecure = insecure or bool(tls.get("insecure_skip_verify", False))
    context = None
    if args.url.startswith("https:"):
        context = ssl.create_default_context(cafile=ca or None)
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    return Client(args.url, user, password, context)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tracer-exporter top", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=DEFAULT_URL, help=f"the exporter (default {DEFAULT_URL})")
    p.add_argument("--web.config.file", dest="web_config_file", default="", help="a web config with a client section")
    p.add_argument("--user", default="", help="basic auth user")
    p.add_argument("--password-file", default="", help="file holding the basic auth password")
    p.add_argument("--ca-file", default="", help="CA bundle for an https URL")
    p.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--sort", default="kmalloc", choices=SORT_KEYS, help="the sort column (default kmalloc)")
    p.add_argument("--by", default="pid", choices=("pid", "group"), help="a row per process or per workload group")
    p.add_argument("--once", action="store_true", help="print one snapshot as text and exit (also without a TTY)")
    args = p.parse_args(argv)
    if not 0.1 <= args.interval <= 3600:
        p.error(f"--interval {args.interval:g}: must be from 0.1 to 3600 seconds")
    return args


def once(client: Client, view: View, interval: float, out: Any, width: int = 400) -> int:
    """Two snapshots interval apart, the second printed with the rates between them."""
    try:
        prev = client.snapshot(by=view.by)
        time.sleep(interval)
        cur = client.snapshot(by=view.by)
    except (OSError, ValueError, KeyError) as e:
        print(f"tracer-exporter top: {fetch_error(client.url, e)[: -len('; retrying')]}", file=sys.stderr)
        return 1
    out.write("\n".join(render(cur, prev, view, width, 10**6, client.url)) + "\n")
    return 0


def live(client: Client, view: View, interval: float) -> int:
    import curses

    def loop(screen: Any) -> None:
        curses.curs_set(0)
        screen.timeout(int(interval * 1000))
        prev: Snapshot | None = None
        cur: Snapshot | None = None
        next_fetch = 0.0
        while True:
            if not view.paused and time.monotonic() >= next_fetch:
                try:
                    snap = client.snapshot(by=view.by)
                    prev, cur, view.message = cur, snap, ""
                except (OSError, ValueError, KeyError) as e:
                    view.message = fetch_error(client.url, e)
                next_fetch = time.monotonic() + interval
            height, width = screen.getmaxyx()
            screen.erase()
            for y, line in enumerate(render(cur, prev, view, width - 1, height, client.url)):
                screen.addstr(y, 0, line)
            screen.refresh()
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == ord("s") or key == ord(">"):
                view.cycle_sort(1)
            elif key == ord("<"):
                view.cycle_sort(-1)
            elif key == ord("p"):
                view.paused = not view.paused
            elif key == ord("h"):
                view.help = not view.help
            elif key == ord("/"):
                view.comm_filter = _prompt(screen, height - 1, "comm contains: ")
                screen.timeout(int(interval * 1000))

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it like q
        curses.wrapper(loop)
    return 0


def _prompt(screen: Any, y: int, label: str) -> str:
    import curses

    screen.timeout(-1)
    screen.addstr(y, 0, label)
    curses.echo()
    try:
        return screen.getstr(y, len(label), 64).decode(errors="replace").strip()
    finally:
        curses.noecho()


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        client = build_client(args)
    except (OSError, ValueError) as e:
        print(f"tracer-exporter top: {e}", file=sys.stderr)
        return 2
    view = View(sort=args.sort, descending=args.sort not in ("pid", "comm"), by=args.by)
    if args.once or not sys.stdout.isatty():
        return once(client, view, args.interval, sys.stdout)
    return live(client, view, args.interval)
