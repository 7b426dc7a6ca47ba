"""tracer_exporter: per-process kernel work counters for Prometheus, on BCC."""

__version__ = "0.1.0"
