"""What the kernel side reports about itself: attach results and map health."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Attachment:
    function: str
    symbol: str
    attached: bool
    error: str = ""


@dataclass(frozen=True)
class ProbeMode:
    """The probe mode in use, the one the config asked for, and why they differ ("" when they do not)."""

    mode: str
    requested: str
    reason: str = ""


@dataclass
class Health:
    attachments: list[Attachment] = field(default_factory=list)
    mode: ProbeMode | None = None
    missed: dict[str, int] = field(default_factory=dict)  # function -> calls of tracked threads lost
    # function -> what the kernel says its return probe missed, interrupt context included
    kernel_missed: dict[str, int] = field(default_factory=dict)
    # function or tracepoint -> runs of its programs the kernel skipped, any process
    skipped: dict[str, int] = field(default_factory=dict)
    alloc_entries: int = 0
    alloc_insert_failures: int = 0
    follow_dropped: int = 0
    # processes kept for `run` whose final counters did not fit the exited map
    exited_dropped: int = 0
    cgroup_insert_failures: int = 0  # new cgroups of selected subtrees not remembered
    exec_events_lost: int = 0  # execs the cmdline selectors did not hear of


def unattached(attachments: list[Attachment], functions: tuple[str, ...]) -> list[str]:
    """What keeps the exporter from being ready: failed probes and bare functions."""
    problems = [f"{a.function} at {a.symbol}: {a.error}" for a in attachments if not a.attached]
    covered = {a.function for a in attachments if a.attached}
    problems += [f"{name}: no probe attached" for name in functions if name not in covered]
    return problems
