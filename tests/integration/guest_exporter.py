"""Guest side of the host-side integration tests (run through tests/vm/run).

    tests/vm/run --forward HOSTPORT:9867 -- python3 tests/integration/guest_exporter.py DIR

DIR (in the shared checkout) holds what the host wrote: exporter.yaml, web.yml (TLS and
basic auth), pki/ and credentials.json. This script loads the workload module, starts
tracer-exporter on 0.0.0.0:9867 with both files, makes a kernel thread do known work
while it is tracked, and reports on stdout, one JSON object a line:

    {"event": "tracked", "pid": ..., "comm": ..., "tally": {...}, "expected": {...}, "busy_pid": ...}
    {"event": "stopped", "pid": ...}       after the host created DIR/stop
    {"event": "exit", "code": ...}         after the host created DIR/done

stdin is /dev/null in the guest, so the host speaks through those files. Every wait
is bounded; the exporter's log is DIR/exporter.log.
"""

from __future__ import annotations

import base64
import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "workload"))

from workload import Workload, build_and_load, expected  # noqa: E402

PORT = 9867
OPS = "kmalloc:10:100 kfree:all updown:3 mutex:4 schedule:2"
READY_TIMEOUT = 300.0
HOST_TIMEOUT = 600.0  # for the host's stop/done files


def say(**doc: object) -> None:
    print(json.dumps(doc), flush=True)


class Client:
    def __init__(self, pki: Path, user: str, password: str) -> None:
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.auth = f"Basic {token}"

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        req = urllib.request.Request(f"https://127.0.0.1:{PORT}{path}", method=method)
        req.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ctx) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"guest: {path.name} did not appear within {timeout} s")
        time.sleep(0.2)


def main(directory: str) -> int:
    d = (REPO / directory).resolve()
    creds = json.loads((d / "credentials.json").read_text())
    build_and_load(REPO / "tests" / "workload")
    log = open(d / "exporter.log", "wb")  # noqa: SIM115 (kept open for the process)
    exporter = subprocess.Popen(
        [
            "tracer-exporter",
            "--web.listen-address",
            f"0.0.0.0:{PORT}",
            "--config.file",
            str(d / "exporter.yaml"),
            "--web.config.file",
            str(d / "web.yml"),
            "--state.file",
            str(d / "state.json"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    busy = None
    client = Client(d / "pki", creds["user"], creds["password"])
    workload = Workload()
    pid = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if exporter.poll() is not None:
                raise SystemExit(f"guest: exporter exited with {exporter.returncode}")
            try:
                if client.request("GET", "/-/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"guest: exporter not ready after {READY_TIMEOUT} s")
            time.sleep(0.5)
        # Something that keeps working, so that rates are not all zero. Started once the
        # probes are attached: the guest stays quiet while kernel text is being patched.
        busy = subprocess.Popen(["sh", "-c", "while :; do ls -lR /usr/lib/python3 >/dev/null 2>&1; sleep 1; done"])
        pid = workload.spawn(OPS)
        for p in (pid, busy.pid):
            status, body = client.request("POST", f"/pids/{p}")
            if status != 201:
                raise SystemExit(f"guest: POST /pids/{p}: {status} {body!r}")
        workload.start(pid)
        tally = workload.wait(pid, 60000)
        comm = next(e["comm"] for e in json.loads(client.request("GET", "/pids")[1]) if e["pid"] == pid)
        say(
            event="tracked",
            pid=pid,
            comm=comm,
            tally=asdict(tally),
            expected=asdict(expected(OPS, kthread=True)),
            busy_pid=busy.pid,
        )
        wait_for(d / "stop", HOST_TIMEOUT)
        workload.stop(pid)
        pid = None
        say(event="stopped")
        wait_for(d / "done", HOST_TIMEOUT)
    finally:
        if pid is not None:
            workload.stop(pid)
        workload.close()
        if busy is not None:
            busy.kill()
            busy.wait(10)
        if exporter.poll() is None:
            exporter.send_signal(signal.SIGTERM)
            try:
                exporter.wait(60)
            except subprocess.TimeoutExpired:
                exporter.kill()
                exporter.wait(10)
        log.close()
    say(event="exit", code=exporter.returncode)
    return 0 if exporter.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
