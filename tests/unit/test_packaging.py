"""The BPF program is package data: the wheel carries it and an installed copy finds it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tracer_exporter.cli import bpf_source
from tracer_exporter.kernel import program

REPO = Path(__file__).resolve().parents[2]
PROGRAM = "tracer_exporter/kernel/bpf/tracer.bpf.c"
HEADER = "tracer_exporter/kernel/bpf/tracer.h"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # A copy, so that setuptools' build/ and egg-info stay out of the checkout.
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", "*.egg-info", ".*_cache")
    )
    out = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q", "--no-index", "--no-deps"]
    subprocess.run(
        [*pip, "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
        timeout=300,
    )
    (whl,) = out.glob("*.whl")
    return whl


def test_the_wheel_carries_the_bpf_program_unchanged(wheel):
    with zipfile.ZipFile(wheel) as z:
        assert z.read(PROGRAM) == (REPO / PROGRAM).read_bytes()
        assert z.read(HEADER) == (REPO / HEADER).read_bytes()  # its #include "tracer.h"
        names = z.namelist()
    # Package data only: no data-files under share/ that an installed copy would not look for.
    assert [n for n in names if ".data/" in n] == []
    assert wheel.name == "tracer_exporter-0.1.0-py3-none-any.whl"


def test_the_wheel_has_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        entry_points = z.read("tracer_exporter-0.1.0.dist-info/entry_points.txt").decode()
    assert entry_points.split() == ["[console_scripts]", "tracer-exporter", "=", "tracer_exporter.cli:main"]


def test_the_program_is_found_beside_the_package(monkeypatch):
    monkeypatch.delenv("TRACER_EXPORTER_BPF_SOURCE", raising=False)
    assert program.bpf_source_path() == REPO / PROGRAM


def test_the_header_is_found_beside_the_package_whatever_the_program():
    assert program.bpf_include_dir() / "tracer.h" == REPO / HEADER


def test_the_override_names_another_program(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACER_EXPORTER_BPF_SOURCE", str(tmp_path / "x.bpf.c"))
    assert bpf_source() == tmp_path / "x.bpf.c"


def test_the_debian_package_has_the_version_of_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    changelog = (REPO / "debian" / "changelog").read_text()
    assert '\nversion = "0.1.0"\n' in pyproject
    assert changelog.startswith("tracer-exporter (0.1.0) unstable; urgency=medium\n")


def test_the_debian_unit_is_the_deploy_unit_run_from_usr_bin():
    rules = (REPO / "debian" / "rules").read_text()
    assert "\tsed 's#/usr/local/bin/tracer-exporter#/usr/bin/tracer-exporter#g' $< >$@\n" in rules
    assert "\tdh_installsystemd --no-enable --no-start\n" in rules
    assert (REPO / "debian" / "tracer-exporter.default").read_text().splitlines()[-1] == 'ARGS=""'
