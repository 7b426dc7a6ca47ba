from tracer_exporter.kernel.symbols import (
    FUNCTION_NAMES,
    PreemptCount,
    parse_kallsyms,
    parse_preempt_count,
    parse_vmalloc_base,
    resolve,
)

BASE = {"kfree", "schedule", "up", "down_interruptible", "mutex_unlock"}
LINUX_5_10 = BASE | {
    "mutex_lock",
    "__kmalloc",
    "kmem_cache_alloc_trace",
    "kmalloc_order_trace",
    "__kmalloc_node",
    "kmem_cache_alloc_node_trace",
    "__kmalloc_track_caller",
}
LINUX_6_1 = BASE | {
    "mutex_lock",
    "__kmalloc",
    "kmalloc_trace",
    "kmalloc_large",
    "__kmalloc_node",
    "kmalloc_node_trace",
    "kmalloc_large_node",
    "__kmalloc_node_track_caller",
}
LINUX_6_12 = BASE | {
    "mutex_lock",
    "__kmalloc_noprof",
    "__kmalloc_cache_noprof",
    "__kmalloc_node_noprof",
    "__kmalloc_cache_node_noprof",
    "__kmalloc_large_noprof",
    "__kmalloc_large_node_noprof",
    "__kmalloc_node_track_caller_noprof",
    "krealloc_noprof",
}


def handlers(plan, function):
    return {p.symbol: (p.entry_handler, p.return_handler) for p in plan.probes if p.function == function}


def test_6_12_kmalloc_symbols_and_size_positions():
    plan = resolve(LINUX_6_12)
    assert plan.missing == ()
    assert handlers(plan, "kmalloc") == {
        "__kmalloc_noprof": ("kmalloc_enter_arg1", "kmalloc_return"),
        "__kmalloc_node_noprof": ("kmalloc_enter_arg1", "kmalloc_return"),
        "__kmalloc_node_track_caller_noprof": ("kmalloc_enter_arg1", "kmalloc_return"),
        "__kmalloc_cache_noprof": ("kmalloc_enter_arg3", "kmalloc_return"),
        "__kmalloc_cache_node_noprof": ("kmalloc_enter_arg4", "kmalloc_return"),
        "__kmalloc_large_noprof": ("kmalloc_enter_arg1", "kmalloc_return"),
        "__kmalloc_large_node_noprof": ("kmalloc_enter_arg1", "kmalloc_return"),
    }


def test_6_1_and_5_10_kmalloc_symbols():
    assert set(handlers(resolve(LINUX_6_1), "kmalloc")) == LINUX_6_1 - BASE - {"mutex_lock"}
    h = handlers(resolve(LINUX_5_10), "kmalloc")
    assert set(h) == LINUX_5_10 - BASE - {"mutex_lock"}
    assert h["kmem_cache_alloc_trace"][0] == "kmalloc_enter_arg3"
    assert h["kmem_cache_alloc_node_trace"][0] == "kmalloc_enter_arg4"


def test_other_functions_have_entry_probes_only():
    plan = resolve(LINUX_6_1)
    for name in FUNCTION_NAMES[1:]:
        (probe,) = [p for p in plan.probes if p.function == name]
        assert probe.return_handler == ""
        assert probe.entry_handler == f"{name}_enter"


def test_lockdep_kernel_probes_both_nested_variants():
    have = (LINUX_6_1 - {"mutex_lock"}) | {"mutex_lock_nested", "_mutex_lock_nest_lock"}
    plan = resolve(have)
    assert plan.symbols_of("mutex_lock") == ["mutex_lock_nested", "_mutex_lock_nest_lock"]
    assert plan.missing == ()


def test_plain_mutex_lock_wins_over_nested():
    plan = resolve(LINUX_6_1 | {"mutex_lock_nested"})
    assert plan.symbols_of("mutex_lock") == ["mutex_lock"]


def test_missing_function_is_reported_and_others_proceed():
    plan = resolve(LINUX_6_1 - {"up"})
    assert plan.missing == ("up",)
    assert plan.symbols_of("kfree") == ["kfree"]


def test_override_replaces_candidates():
    plan = resolve(LINUX_6_1, {"up": ["no_such_symbol"], "kfree": ["kfree"]})
    assert plan.missing == ("up",)
    assert plan.symbols_of("kfree") == ["kfree"]


def test_parse_kallsyms_keeps_core_text_symbols():
    text = (
        "ffffffff81000000 T _stext\n"
        "ffffffff81234560 T __kmalloc\n"
        "ffffffff81234570 t kmalloc_large\n"
        "ffffffff82000000 D some_data\n"
        "ffffffffc0000000 t helper\t[tracer_workload]\n"
    )
    syms = parse_kallsyms(text)
    assert all(name in syms for name in ("_stext", "__kmalloc", "kmalloc_large"))
    # Data, a module's function, a prefix or suffix of a name: not core text symbols.
    assert not any(name in syms for name in ("some_data", "helper", "__kmal", "kmalloc", "large", "_text"))
    assert "_stext" in parse_kallsyms(text + "ffffffff81000010 T last_without_newline")
    assert "last_without_newline" in parse_kallsyms(text + "ffffffff81000010 T last_without_newline")


def test_missing_records_what_was_tried():
    plan = resolve(LINUX_6_1, {"up": ["no_such_symbol"]})
    assert plan.tried == (("up", "no_such_symbol"),)
    assert "kfree" in plan.symbols and "no_such_symbol" not in plan.symbols


KALLSYMS_6_1 = """\
0000000000000000 A __per_cpu_start
00000000000199e8 A this_cpu_off
000000000001fb40 A __preempt_count
ffffffff8241cb60 D __per_cpu_offset
ffffffff81000000 T _stext
ffffffff82e0e8a8 D vmalloc_base
"""
KALLSYMS_6_12 = """\
0000000000032000 D pcpu_hot
ffffffff83a1d7e0 D __per_cpu_offset
"""


def test_preempt_count_is_the_per_cpu_variable_up_to_6_1_and_from_6_15():
    found = parse_preempt_count(KALLSYMS_6_1)
    assert found == PreemptCount(per_cpu_offset=0xFFFFFFFF8241CB60, variable=0x1FB40, in_pcpu_hot=False)
    assert found.describe() == "__preempt_count at 0x1fb40 + __per_cpu_offset[cpu] (0xffffffff8241cb60)"


def test_preempt_count_is_in_pcpu_hot_from_6_2_to_6_14():
    found = parse_preempt_count(KALLSYMS_6_12)
    assert found == PreemptCount(per_cpu_offset=0xFFFFFFFF83A1D7E0, variable=0x32000, in_pcpu_hot=True)
    assert found.describe().startswith("pcpu_hot.preempt_count at 0x32000")


def test_no_preempt_count_where_addresses_are_hidden_or_absent():
    hidden = KALLSYMS_6_1.replace("ffffffff8241cb60", "0000000000000000").replace(
        "000000000001fb40", "0000000000000000"
    )
    assert parse_preempt_count(hidden) is None
    assert parse_preempt_count("ffffffff8241cb60 D __per_cpu_offset\n") is None
    assert parse_preempt_count("000000000001fb40 A __preempt_count\n") is None


def test_vmalloc_base_is_read_where_the_layout_is_randomized():
    assert parse_vmalloc_base(KALLSYMS_6_1) == 0xFFFFFFFF82E0E8A8
    assert parse_vmalloc_base(KALLSYMS_6_12) == 0


def test_kvmalloc_and_kmalloc_flags_are_kmalloc_entry_points_where_they_exist():
    plan = resolve(LINUX_6_12 | {"__kvmalloc_node_noprof", "__kmalloc_flags_noprof"})
    assert handlers(plan, "kmalloc")["__kvmalloc_node_noprof"] == ("kmalloc_enter_arg1", "kmalloc_return")
    assert handlers(plan, "kmalloc")["__kmalloc_flags_noprof"] == ("kmalloc_enter_arg1", "kmalloc_return")
