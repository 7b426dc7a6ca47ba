"""The <exporter>_build_info convention, and the kernel release as an info metric of its own."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from importlib import resources

from prometheus_client.core import GaugeMetricFamily, Metric

from tracer_exporter import __version__

UNKNOWN = "unknown"


def revision() -> str:
    """The commit `make deb` built from (package data REVISION); unknown elsewhere."""
    try:
        text = (resources.files("tracer_exporter") / "REVISION").read_text().strip()
    except OSError:
        return UNKNOWN
    return text or UNKNOWN


class InfoCollector:
    """tracer_exporter_build_info and tracer_kernel_info: constant, always 1."""

    def __init__(self, kernel: str | None = None, rev: str | None = None) -> None:
        self._kernel = platform.release() if kernel is None else kernel
        self._build = (__version__, revision() if rev is None else rev, platform.python_version())

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "tracer_exporter_build_info",
            "A metric with a constant '1' value labeled by version, revision and pythonversion of tracer_exporter.",
            labels=("version", "revision", "pythonversion"),
        )
        build.add_metric(self._build, 1)
        yield build
        kernel = GaugeMetricFamily(
            "tracer_kernel_info",
            "A metric with a constant '1' value labeled by the running kernel's release.",
            labels=("release",),
        )
        kernel.add_metric((self._kernel,), 1)
        yield kernel
