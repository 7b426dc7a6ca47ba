from tracer_exporter.kernel.tracefs import bcc_event_name, parse_kprobe_profile


def test_parse_kprobe_profile():
    text = (
        "  r___kmalloc_bcc_77                                      1200               3\n"
        "  p_kfree_bcc_77                                           50               0\n"
    )
    assert parse_kprobe_profile(text) == {"r___kmalloc_bcc_77": (1200, 3), "p_kfree_bcc_77": (50, 0)}


def test_bcc_event_name_replaces_dots():
    assert bcc_event_name("r", "foo.isra.0", 9) == "r_foo_isra_0_bcc_9"


def test_stale_bcc_events_only_dead_instances_on_our_symbols():
    from tracer_exporter.kernel.tracefs import stale_bcc_events

    text = (
        "r1024:kprobes/r___kmalloc_bcc_77 __kmalloc\n"
        "r1024:kprobes/r___kmalloc_bcc_88 __kmalloc\n"
        "r:kprobes/r_vfs_read_bcc_77 vfs_read\n"
        "p:kprobes/p_kfree_bcc_77 kfree\n"
        "p:kprobes/myprobe kfree\n"
    )
    alive = {88}.__contains__
    assert stale_bcc_events(text, {"__kmalloc", "kfree"}, alive) == ["r___kmalloc_bcc_77", "p_kfree_bcc_77"]
