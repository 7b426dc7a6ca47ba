"""tracer_exporter_build_info and tracer_kernel_info."""

import platform

from prometheus_client import CollectorRegistry

from tracer_exporter import __version__
from tracer_exporter.views import info


def test_build_and_kernel_info():
    registry = CollectorRegistry()
    registry.register(info.InfoCollector(kernel="6.1.0-57-amd64", rev="abc123"))
    labels = {"version": __version__, "revision": "abc123", "pythonversion": platform.python_version()}
    assert registry.get_sample_value("tracer_exporter_build_info", labels) == 1
    assert registry.get_sample_value("tracer_kernel_info", {"release": "6.1.0-57-amd64"}) == 1
    assert [m.name for m in registry.collect()] == ["tracer_exporter_build_info", "tracer_kernel_info"]


def test_revision_is_unknown_in_a_checkout():
    # Only `make deb` writes REVISION (into its copy); the checkout has none.
    assert info.revision() == "unknown"
