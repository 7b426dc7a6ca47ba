#!/usr/bin/env python3
"""What each part of the tracked path costs: workload B under variants of
tracer_exporter/kernel/bpf/tracer.bpf.c, each with one thing taken out or changed, interleaved in one
boot. A measuring tool, not a product: the variants are not exact.

usage (as root in a guest): python3 bench/variants.py [REPS]
e.g.  tests/vm/run --distro trixie -- python3 bench/variants.py 5
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "workload"))

from workload import build_and_load  # noqa: E402

from bench.run import Worker  # noqa: E402
from tracer_exporter.kernel.probes import KernelProbes  # noqa: E402
from tracer_exporter.kernel.symbols import read_kallsyms, resolve  # noqa: E402
from tracer_exporter.model.config import Config  # noqa: E402

NO_STAT = [("stat_add(STAT_ALLOC_ENTRIES, 1);", ";"), ("stat_add(STAT_ALLOC_ENTRIES, -1);", ";")]
NO_PREALLOC = [
    ("BPF_HASH(allocs, u64, u64, MAX_ALLOCS);", 'BPF_F_TABLE("hash", u64, u64, allocs, MAX_ALLOCS, BPF_F_NO_PREALLOC);')
]
PLAIN_ADDS = [
    (f"__sync_fetch_and_add(&c->{f}, {n})", f"c->{f} += {n}")
    for f, n in (("kmalloc_calls", 1), ("kmalloc_bytes", "size"), ("kfree_calls", 1), ("kfree_bytes", "*size"))
] + [("__sync_fetch_and_add(&c->field, 1)", "c->field += 1")]
TASK_CONTEXT = "static __always_inline bool task_context(u64 sp)\n{\n\tu64 cpu"
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "as shipped": [],
    "no alloc-count stat": NO_STAT,
    "allocs not preallocated": NO_PREALLOC,
    "plain adds, not atomic": PLAIN_ADDS,
    # The interrupt check: the preempt count as shipped, the stack range it replaced, none.
    "stack check only (before the preempt count)": [("#ifdef PREEMPT_COUNT_VAR\n", "#ifdef PREEMPT_COUNT_VAR_UNSET\n")],
    "no interrupt check": [(TASK_CONTEXT, TASK_CONTEXT.replace("{\n", "{\n\treturn true;\n"))],
    "no address map (wrong kfree bytes)": [("\tremember_alloc(addr, size);", "")],
}


def write_variant(index: int, subs: list[tuple[str, str]]) -> Path:
    text = (REPO / "tracer_exporter" / "kernel" / "bpf" / "tracer.bpf.c").read_text()
    for old, new in subs:
        if old not in text:
            raise SystemExit(f"variants: {old!r} is no longer in tracer_exporter/kernel/bpf/tracer.bpf.c")
        text = text.replace(old, new)
    path = Path(f"/tmp/tracer-variant-{index}.c")
    path.write_text(text)
    return path


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    build_and_load(REPO / "tests" / "workload")
    plan = resolve(read_kallsyms())
    worker = Worker()
    loaded: dict[str, KernelProbes] = {}
    try:
        for i, (name, subs) in enumerate(VARIANTS.items()):
            probes = KernelProbes(Config(probe_mode="kprobe"), plan, source=write_variant(i, subs))
            probes.load()
            probes.attach()
            probes.track(worker.pid)
            probes.program.detach()
            loaded[name] = probes
        none: list[float] = []
        times: dict[str, list[float]] = {name: [] for name in loaded}
        for _ in range(reps):
            none.append(worker.run())
            for name, probes in loaded.items():
                probes.attach()
                times[name].append(worker.run())
                probes.program.detach()
    finally:
        worker.close()
        for probes in loaded.values():
            probes.close()
    base = statistics.median(none)
    print(f"workload B, CPU seconds, {reps} repetitions; no probes: median {base:.3f}")
    print("| variant | overhead: median (min to max) |\n|---|---|")
    for name, t in times.items():
        over = [x - base for x in t]
        print(f"| {name} | {statistics.median(over):.3f} ({min(over):.3f} to {max(over):.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
