"""The kernel's per-program skip counts, and which function each program counts for."""

from __future__ import annotations

import os

from tracer_exporter.kernel.progstats import parse_recursion_misses, program_labels, recursion_misses

FDINFO = """pos:\t0
flags:\t02000002
mnt_id:\t16
ino:\t1057
prog_type:\t26
prog_jited:\t1
prog_tag:\t5e8ad5d8ba2c1a0b
memlock:\t4096
prog_id:\t42
run_time_ns:\t0
run_cnt:\t0
recursion_misses:\t194
verified_insns:\t31
"""


def test_recursion_misses_come_from_the_fdinfo_line():
    assert parse_recursion_misses(FDINFO) == 194
    # Before 5.12 the kernel has no such line: unknown, not 0.
    assert parse_recursion_misses(FDINFO.replace("recursion_misses:\t194\n", "")) is None


def test_an_fd_that_is_not_a_program_reads_as_unknown(tmp_path):
    with open(tmp_path / "f", "w") as f:
        assert recursion_misses(f.fileno()) is None
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert recursion_misses(r) is None  # closed


def test_each_program_is_labelled_with_its_function():
    handlers = {"kmalloc_arg1": "kmalloc", "kmalloc_return": "kmalloc", "schedule_enter": "schedule"}
    symbols = {"__kmalloc": "kmalloc", "kfree": "kfree", "schedule": "schedule"}
    names = [
        "kmalloc_arg1",
        "kmalloc_return",
        "schedule_enter",
        "kfunc__vmlinux____kmalloc",  # bcc 0.25+
        "kretfunc__vmlinux____kmalloc",
        "kfunc__kfree",  # older bcc
        "tracepoint__sched__sched_process_exit",
        "raw_tracepoint__sched_process_fork",
        "tracepoint__cgroup__cgroup_attach_task",
        "kfunc__vmlinux__vfs_read",  # not ours
        "a_helper",
    ]
    assert program_labels(names, handlers, symbols) == {
        "kmalloc_arg1": "kmalloc",
        "kmalloc_return": "kmalloc",
        "schedule_enter": "schedule",
        "kfunc__vmlinux____kmalloc": "kmalloc",
        "kretfunc__vmlinux____kmalloc": "kmalloc",
        "kfunc__kfree": "kfree",
        "tracepoint__sched__sched_process_exit": "sched_process_exit",
        "raw_tracepoint__sched_process_fork": "sched_process_fork",
        "tracepoint__cgroup__cgroup_attach_task": "cgroup_attach_task",
    }
