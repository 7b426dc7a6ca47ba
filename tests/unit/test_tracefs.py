from tracer_exporter.tracefs import bcc_event_name, our_kprobe_events, parse_kprobe_profile


def test_parse_kprobe_profile():
    text = (
        "  r___kmalloc_bcc_77                                      1200               3\n"
        "  p_kfree_bcc_77                                           50               0\n"
    )
    assert parse_kprobe_profile(text) == {"r___kmalloc_bcc_77": (1200, 3), "p_kfree_bcc_77": (50, 0)}


def test_bcc_event_name_replaces_dots():
    assert bcc_event_name("r", "foo.isra.0", 9) == "r_foo_isra_0_bcc_9"


def test_our_kprobe_events_filters_by_pid():
    text = "r64:kprobes/r___kmalloc_bcc_77 __kmalloc\nr64:kprobes/r___kmalloc_bcc_770 __kmalloc\n"
    assert our_kprobe_events(text, 77) == ["r64:kprobes/r___kmalloc_bcc_77 __kmalloc"]
