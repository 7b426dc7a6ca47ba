"""The bpftrace side of the benchmark: the exporter's accounting, written in bpftrace.

An allow-list map of pids (given as $1), per-process counts and bytes, the
in-flight kmalloc size per thread and the address->size map that any
process's kfree retires: what tracer_exporter/kernel/bpf/tracer.bpf.c does, on the same symbols.
"""

from __future__ import annotations

from tracer_exporter.kernel.symbols import Kind, Plan

COUNTED = {
    "schedule": "sched",
    "up": "up",
    "down_interruptible": "down",
    "mutex_lock": "lock",
    "mutex_unlock": "unlock",
}
MAPS = ("kmalloc", "kmalloc_bytes", "kfree", "kfree_bytes", *COUNTED.values())


def script(plan: Plan) -> str:
    lines = ['BEGIN { @tracked[$1] = 1; printf("ready\\n"); }']
    by_arg: dict[str, list[str]] = {}
    returns = []
    for p in plan.probes:
        if p.return_handler:
            arg = p.size_arg - 1
            by_arg.setdefault(f"arg{arg}", []).append(f"kprobe:{p.symbol}")
            returns.append(f"kretprobe:{p.symbol}")
    for arg, probes in sorted(by_arg.items()):
        # size + 1, so that kmalloc(0) is told from no record.
        lines.append(f"{','.join(probes)} /@tracked[pid]/ {{ @sz[tid] = {arg} + 1; }}")
    lines.append(
        f"{','.join(returns)} /@sz[tid]/ {{ $s = @sz[tid] - 1; delete(@sz[tid]); @kmalloc[pid] = count();"
        " if (retval > 16) { @kmalloc_bytes[pid] = sum($s); @allocs[retval] = $s; } }"
    )
    for p in plan.probes:
        if p.kind is Kind.KFREE:
            lines.append(
                f"kprobe:{p.symbol} {{ $t = @tracked[pid]; if ($t) {{ @kfree[pid] = count(); }}"
                " if (arg0 > 16) { $s = @allocs[arg0];"
                " if ($s) { if ($t) { @kfree_bytes[pid] = sum($s); } delete(@allocs[arg0]); } } }"
            )
        elif p.function in COUNTED:
            lines.append(f"kprobe:{p.symbol} /@tracked[pid]/ {{ @{COUNTED[p.function]}[pid] = count(); }}")
    lines.append("END { clear(@tracked); clear(@sz); clear(@allocs); }")
    return "\n".join(lines) + "\n"


def parse_counts(output: str, pid: int) -> dict[str, int]:
    """The tracked pid's counters from the maps bpftrace prints at exit."""
    out = dict.fromkeys(MAPS, 0)
    for line in output.splitlines():
        line = line.strip()
        for name in MAPS:
            prefix = f"@{name}[{pid}]:"
            if line.startswith(prefix):
                out[name] = int(line[len(prefix) :])
    return out
