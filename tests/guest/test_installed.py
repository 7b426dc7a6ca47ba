"""The exporter as users install it, counted exactly.

Two routes, each installed in a guest whose root is writable (tests/vm/run
--overlay, which also drops the image's hooks that run the checkout):

- deb: `dpkg -i` of the package `make deb` built (build/deb/);
- venv: the README's route, `python3 -m venv --system-site-packages`, then an
  offline `pip install` of a copy of the checkout (the image has python3-venv,
  python3-setuptools and python3-wheel, as the README's apt line installs).

The exporter under test is the installed one (/usr/bin/tracer-exporter, or the
venv's); only this test's support code comes from the checkout.
"""

from __future__ import annotations

import gzip
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import COLUMNS, HTTP_TIMEOUT, Exporter, row_of
from workload import expected

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)  # type: ignore[union-attr]
DEB = REPO / "build" / "deb" / f"tracer-exporter_{VERSION}_all.deb"
PROGRAM = REPO / "tracer_exporter" / "kernel" / "bpf" / "tracer.bpf.c"
SYSTEM_SITE = Path("/usr/lib/python3/dist-packages")
VENV = Path("/opt/tracer-exporter")
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"
EXE = {"deb": Path("/usr/bin/tracer-exporter"), "venv": VENV / "bin" / "tracer-exporter"}
MODULE = {
    "deb": SYSTEM_SITE / "tracer_exporter" / "__init__.py",
    "venv": VENV / "lib" / f"python{PYVER}" / "site-packages" / "tracer_exporter" / "__init__.py",
}
INSTALL_TIMEOUT = 900.0  # dpkg -i byte-compiles every module, slowly under TCG

OPS = (
    "kmalloc:11:96 kmalloc_const:2 kzalloc:3:40 kmalloc_node:2:512 kmemdup:1:33 "
    "kmalloc:1:16384 kfree:9 kfree_null:2 schedule:6 updown:5 mutex:4",
    "kmalloc:8:128 kfree:5 mutex:13",
)


def root_fstype() -> str:
    with open("/proc/self/mounts") as f:
        return [line.split()[2] for line in f if line.split()[1] == "/"][-1]


def run(*cmd: str | Path, cwd: str = "/") -> str:
    # cwd /: the checkout (/src) must not be on the path of what is checked.
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module", autouse=True)
def writable_root() -> None:
    if root_fstype() != "overlay":
        pytest.skip("installs packages: needs the writable root of tests/vm/run --overlay")


@pytest.fixture(scope="module")
def deb_installed() -> None:
    assert DEB.is_file(), f"no {DEB}: `make deb` builds it"
    run("dpkg", "-i", DEB)


@pytest.fixture(scope="module")
def venv_installed(tmp_path_factory) -> None:
    # What the build reads (pyproject.toml names README.md and the package), copied: pip
    # builds in place, and the checkout stays clean.
    src = tmp_path_factory.mktemp("checkout")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "tracer_exporter", src / "tracer_exporter", ignore=shutil.ignore_patterns("__pycache__"))
    run("python3", "-m", "venv", "--system-site-packages", VENV)
    pip = VENV / "bin" / "pip"
    run(pip, "install", "--disable-pip-version-check", "--no-index", "--no-deps", "--no-build-isolation", src)


@pytest.fixture(scope="module", params=sorted(EXE))
def installed(request):
    """(route, exporter): one exporter of the installed copy per route."""
    route = request.param
    request.getfixturevalue(f"{route}_installed")
    exp = Exporter("--state.file", "", exe=str(EXE[route]), log_name=f"installed-{route}")
    try:
        exp.wait_ready()
        yield route, exp
    finally:
        code = exp.stop()
        sys.stderr.write(f"--- {route} exporter log ({exp.log_path}) ---\n{exp.log()[-4000:]}\n")
    assert code == 0


def interpreter(exe: Path) -> str:
    first = exe.read_text().splitlines()[0]
    assert first.startswith("#!"), first
    return first[2:].strip()


def test_the_package_installs_what_it_should(deb_installed):
    assert run("dpkg-query", "-W", "-f", "${Status} ${Version}", "tracer-exporter") == f"install ok installed {VERSION}"
    conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}", "tracer-exporter").split()[::2]
    assert conffiles == ["/etc/default/tracer-exporter", "/etc/tracer-exporter/config.yaml"]
    assert Path("/etc/tracer-exporter/config.yaml").read_text() == (REPO / "config.yaml").read_text()
    assert Path("/etc/default/tracer-exporter").read_text().splitlines()[-1] == 'ARGS=""'
    files = run("dpkg-query", "-L", "tracer-exporter").split()
    (unit,) = [f for f in files if f.endswith("/systemd/system/tracer-exporter.service")]
    lines = Path(unit).read_text().splitlines()
    assert "EnvironmentFile=-/etc/default/tracer-exporter" in lines
    want = "ExecStart=/usr/bin/tracer-exporter --config.file /etc/tracer-exporter/config.yaml --web.listen-address :9867 $ARGS"
    assert [ln for ln in lines if ln.startswith("ExecStart=")] == [want]
    # Installed, not enabled (nor started: the guest has no systemd to start it).
    assert not Path("/etc/systemd/system/multi-user.target.wants/tracer-exporter.service").exists()
    assert (SYSTEM_SITE / "tracer_exporter" / "kernel" / "bpf" / "tracer.bpf.c").read_bytes() == PROGRAM.read_bytes()
    assert (SYSTEM_SITE / "tracer_exporter" / "kernel" / "bpf" / "tracer.h").read_bytes() == (
        PROGRAM.parent / "tracer.h"
    ).read_bytes()
    assert interpreter(EXE["deb"]) == "/usr/bin/python3"


def test_the_installed_copy_is_what_runs(installed):
    route, exporter = installed
    python = interpreter(EXE[route])
    assert run(python, "-c", "import tracer_exporter; print(tracer_exporter.__file__)") == f"{MODULE[route]}\n"
    # The program comes from the installed package data, unchanged.
    out = run(EXE[route], "--ebpf")
    assert out.split("\n", 1)[1] == PROGRAM.read_text()
    # make deb records the commit it built; the venv route has none to record.
    if route == "deb":
        rev = (MODULE[route].parent / "REVISION").read_text().strip()
        assert re.fullmatch("[0-9a-f]{40}", rev), rev
    else:
        rev = "unknown"
    build = [dict(labels) for (name, labels) in exporter.metrics() if name == "tracer_exporter_build_info"]
    assert build == [{"version": VERSION, "revision": rev, "pythonversion": platform.python_version()}]


@pytest.mark.parametrize("ops", OPS)
def test_exact_counts(installed, workload, ops):
    _, exporter = installed
    pid = workload.spawn(ops)
    try:
        exporter.track(pid)
        workload.start(pid)
        tally = workload.wait(pid, 30000)
        assert tally == expected(ops, kthread=True)
        want = row_of(tally)
        assert exporter.tracer()[pid] == want
        labels = frozenset({("pid", str(pid)), ("comm", exporter.comm(pid)), ("parent_pid", "")})
        metrics = exporter.metrics()
        assert [metrics.get((metric, labels)) for _, metric in COLUMNS] == want
    finally:
        workload.stop(pid)
    assert pid not in exporter.tracer()


def scrape(exporter: Exporter, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    req = urllib.request.Request(exporter.url + "/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
        return dict(r.headers), r.read()


def samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_metrics_gzipped_on_request_with_the_exporters_own_process(installed):
    route, exporter = installed
    headers, body = scrape(exporter, {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    got = samples(gzip.decompress(body).decode())
    plain_headers, plain = scrape(exporter, {})
    assert "Content-Encoding" not in plain_headers
    assert set(samples(plain.decode())) == set(got)
    # The exporter's own process, as /proc says.
    pid = exporter.proc.pid
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    btime = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
    assert got["process_start_time_seconds"] == btime + float(stat[19]) / os.sysconf("SC_CLK_TCK")
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    (soft,) = [ln.split()[3] for ln in limits if ln.startswith("Max open files")]
    assert got["process_max_fds"] == float(soft)
    rss = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
    page = os.sysconf("SC_PAGE_SIZE")
    # RSS moves a little between the scrape and this read: same magnitude, whole pages.
    assert got["process_resident_memory_bytes"] % page == 0
    assert rss / 2 <= got["process_resident_memory_bytes"] <= rss * 2, (got["process_resident_memory_bytes"], rss)
