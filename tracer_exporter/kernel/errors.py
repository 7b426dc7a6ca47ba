"""Errors of the kernel side. No HTTP here: the model gives its own errors a kind, and web maps kinds."""

from __future__ import annotations


class ProbeError(Exception):
    """The BPF program could not be built or loaded."""


class MapFull(Exception):
    """The tracked map has no room for another process (limits.max_tracked_processes)."""
