import json

from fakes import TRACER_HEADER

from tracer_exporter.model.counters import Counts, Row
from tracer_exporter.views.tables import pids_json, tracer_table


def test_tracer_table_columns_and_order():
    rows = [
        Row(42, "a", Counts(12, 2048, 12, 2048, 124, 2, 2, 9, 9)),
        Row(1337, "b", Counts(123, 125952, 99, 101376, 193821, 992, 81921, 7421, 6392)),
    ]
    lines = tracer_table(rows).splitlines()
    assert lines[0].split() == TRACER_HEADER
    assert lines[1].split() == ["42", "12", "12", "2048", "2048", "124", "2", "2", "9", "9"]
    assert lines[2].split() == ["1337", "123", "99", "125952", "101376", "193821", "992", "81921", "7421", "6392"]


def test_empty_table_is_the_header():
    assert tracer_table([]) == "PID kmalloc kfree kmalloc_mem kfree_mem sched up down lock unlock\n"


def test_pids_json():
    doc = json.loads(pids_json([Row(7, "x", Counts(kfree_calls=3))]))
    assert doc == [{"pid": 7, "comm": "x", "group": None, "counters": dict(Counts(kfree_calls=3)._asdict())}]
