"""Which of the compiler's pages the exporter gives back after loading its program."""

from __future__ import annotations

from tracer_exporter.kernel.footprint import Mapping, clean_compiler_mappings, parse_smaps, release, rss_kib

SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM.so.19.1
Size:               1024 kB
Rss:                 900 kB
Anonymous:             0 kB
7f0000100000-7f0003000000 r-xp 00100000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM.so.19.1
Rss:               56000 kB
Anonymous:             0 kB
7f0003000000-7f0003200000 r--p 03000000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM.so.19.1
Rss:                2048 kB
Anonymous:          2048 kB
7f0003200000-7f0003300000 rw-p 03200000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libLLVM.so.19.1
Anonymous:           512 kB
7f0004000000-7f0005000000 r-xp 00000000 fe:01 99 /usr/lib/x86_64-linux-gnu/libclang-cpp.so.19.1
Anonymous:             0 kB
7f0006000000-7f0006100000 r-xp 00000000 fe:01 77 /usr/lib/x86_64-linux-gnu/libbcc.so.0.31.0
Anonymous:             0 kB
7f0007000000-7f0007100000 r-xp 00000000 fe:01 55 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0008000000-7f0008100000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
"""


def test_smaps_is_read_mapping_by_mapping():
    maps = parse_smaps(SMAPS)
    assert len(maps) == 8
    assert maps[0] == Mapping(0x7F0000000000, 0x7F0000100000, "r--p", "/usr/lib/x86_64-linux-gnu/libLLVM.so.19.1", 0)
    assert maps[-1].path == "" and maps[-1].anonymous_kb == 1024


def test_only_the_compilers_clean_read_only_pages_are_dropped():
    dropped = [(m.perms, m.path.rsplit("/", 1)[1]) for m in clean_compiler_mappings(parse_smaps(SMAPS))]
    # Not the relocated read-only part (it would lose its relocations), not writable data,
    # not other libraries, not anonymous memory.
    assert dropped == [
        ("r--p", "libLLVM.so.19.1"),
        ("r-xp", "libLLVM.so.19.1"),
        ("r-xp", "libclang-cpp.so.19.1"),
        ("r-xp", "libbcc.so.0.31.0"),
    ]


def test_release_runs_here_and_the_process_goes_on():
    # No compiler here: nothing of it to drop, and nothing breaks.
    before = rss_kib()
    release()
    assert before > 0 and rss_kib() > 0
