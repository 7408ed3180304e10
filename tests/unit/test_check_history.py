"""The history record: validation, files, filtering and the thread-safe recorder."""

from __future__ import annotations

import math
import threading
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from kvstore.check.history import (
    HistoryError,
    Op,
    Recorder,
    by_key,
    completion_time,
    describe,
    dump,
    for_key,
    load,
    validate,
)


def op(index: int = 0, kind: str = "put", value: Any = "a", status: str = "ok",
       result: Any = None, call_ns: int = 0, return_ns: int | None = 10, key: str = "x",
       process: int = 0) -> Op:
    return Op(index, process, kind, key, value, call_ns, return_ns, status, result)


WELL_FORMED = [
    op(0, "put", "a"),
    op(1, "get", None, result="a"),
    op(2, "get", None, result=None),
    op(3, "cas", [None, "b"], result=True),
    op(4, "cas", ["a", "b"], result=False),
    op(5, "append", "v1"),
    op(6, "read", None, result=["v1", "v2"]),
    op(7, "read", None, result=[]),
    op(8, "incr", 3, result=3),
    op(9, "put", "c", status="fail"),
    op(10, "incr", 1, status="unknown", return_ns=None),
    op(11, "get", None, status="unknown", result=None, return_ns=5),
]


def test_every_kind_in_its_documented_shape_is_valid() -> None:
    validate(WELL_FORMED)


@pytest.mark.parametrize("bad, complaint", [
    (op(kind="delete"), "unknown op kind"),
    (op(status="info"), "unknown status"),
    (op(key=b"x"), "key must be a str"),
    (op(kind="put", value=1), "cannot have the value"),
    (op(kind="cas", value=["a"]), "cannot have the value"),
    (op(kind="cas", value=["a", None]), "cannot have the value"),
    (op(kind="incr", value=True), "cannot have the value"),
    (op(kind="get", value="a"), "cannot have the value"),
    (op(kind="get", value=None, result=5), "cannot have the result"),
    (op(kind="read", value=None, result=None), "cannot have the result"),
    (op(kind="read", value=None, result=["a", 1]), "cannot have the result"),
    (op(kind="cas", value=["a", "b"], result=None), "cannot have the result"),
    (op(kind="incr", value=1, result=None), "cannot have the result"),
    (op(return_ns=None), "needs its return time"),
    (op(status="fail", return_ns=None), "needs its return time"),
    (op(call_ns=10, return_ns=9), r"returned \(9\) before it was called \(10\)"),
])
def test_a_malformed_op_is_refused_with_its_index(bad: Op, complaint: str) -> None:
    bad.index = 7
    with pytest.raises(HistoryError, match=complaint) as error:
        validate([bad])
    assert "#7" in str(error.value)


def test_an_ok_read_without_a_result_is_invalid_input() -> None:
    with pytest.raises(HistoryError):
        validate([op(kind="read", value=None, result=None)])


def test_results_of_unfinished_ops_are_not_checked() -> None:
    validate([op(kind="get", value=None, status="unknown", result=object()),
              op(1, kind="read", value=None, status="fail", result="junk")])


def test_two_ops_with_one_index_are_refused() -> None:
    with pytest.raises(HistoryError, match="two ops have the index 3"):
        validate([op(3), op(3)])


def test_completion_time_is_the_return_of_an_ok_op_and_infinite_otherwise() -> None:
    assert completion_time(op(return_ns=10)) == 10
    assert completion_time(op(status="fail", return_ns=10)) == math.inf
    assert completion_time(op(status="unknown", return_ns=10)) == math.inf
    assert completion_time(op(status="unknown", return_ns=None)) == math.inf


def test_describe_gives_index_kind_value_result_and_process() -> None:
    assert describe(op(7, "get", None, result="a", process=3)) == "#7 get -> 'a' (p3)"
    assert describe(op(1, "cas", ["a", "b"], result=True)) == "#1 cas 'a'->'b' = True (p0)"
    assert describe(op(2, "put", "a", status="unknown")) == "#2 put 'a' (p0, unknown)"
    assert describe(op(3, "incr", 2, result=9)) == "#3 incr +2 -> 9 (p0)"
    long_read = op(4, "read", None, result=[f"v{i}" for i in range(10)])
    assert describe(long_read) == "#4 read -> ['v0', 'v1', ..., 'v8', 'v9'] (10 values) (p0)"


def test_dump_then_load_gives_the_same_ops(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    dump(WELL_FORMED, path)
    assert load(path) == WELL_FORMED
    assert len(path.read_text().splitlines()) == len(WELL_FORMED)


def test_load_skips_blank_lines_and_names_the_line_of_a_damaged_record(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    dump(WELL_FORMED[:1], path)
    path.write_text(path.read_text() + "\n" + '{"index": 1}\n')
    with pytest.raises(HistoryError, match=r"history.jsonl:3: expected an object"):
        load(path)
    path.write_text("not json\n")
    with pytest.raises(HistoryError, match=r":1: not JSON"):
        load(path)


def test_by_key_groups_ops_in_order_and_for_key_selects_one_key() -> None:
    ops = [op(0, key="b"), op(1, key="a"), op(2, key="b")]
    assert {k: [o.index for o in group] for k, group in by_key(ops).items()} == {
        "a": [1], "b": [0, 2]}
    assert list(by_key(ops)) == ["a", "b"]
    assert [o.index for o in for_key(ops, "b")] == [0, 2]


# --- the recorder ------------------------------------------------------------------------------


def test_an_open_op_is_unknown_with_no_return_time_until_completed() -> None:
    recorder = Recorder()
    opened = recorder.invoke(4, "put", "x", "a")
    assert (opened.index, opened.process) == (0, 4)
    assert (opened.status, opened.return_ns) == ("unknown", None)
    assert recorder.history()[0].status == "unknown"
    recorder.complete(opened, "ok")
    done = recorder.history()[0]
    assert done.status == "ok" and done.return_ns is not None
    assert done.call_ns <= done.return_ns
    validate(recorder.history())


def test_the_recorder_refuses_a_second_open_op_for_one_process() -> None:
    recorder = Recorder()
    recorder.invoke(1, "get", "x", None)
    with pytest.raises(HistoryError, match="still open"):
        recorder.invoke(1, "get", "x", None)


def test_the_recorder_refuses_to_complete_an_op_twice_or_with_a_bad_status() -> None:
    recorder = Recorder()
    opened = recorder.invoke(1, "get", "x", None)
    with pytest.raises(HistoryError, match="unknown status"):
        recorder.complete(opened, "info")
    recorder.complete(opened, "ok", "a")
    with pytest.raises(HistoryError, match="not open"):
        recorder.complete(opened, "ok", "a")


def test_the_recorder_refuses_a_malformed_invocation() -> None:
    with pytest.raises(HistoryError):
        Recorder().invoke(1, "incr", "x", "one")


def test_history_is_a_copy() -> None:
    recorder = Recorder()
    opened = recorder.invoke(1, "get", "x", None)
    snapshot = recorder.history()
    recorder.complete(opened, "ok", "a")
    assert snapshot[0].status == "unknown"


def test_the_recorder_takes_ops_from_many_threads() -> None:
    recorder = Recorder()

    def client(process: int) -> None:
        for n in range(200):
            opened = recorder.invoke(process, "append", f"k{n % 3}", f"p{process}-{n}")
            recorder.complete(opened, "ok")

    threads = [threading.Thread(target=client, args=(p,)) for p in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ops = recorder.history()
    validate(ops)
    assert [o.index for o in ops] == list(range(1600))
    assert all(a.call_ns <= b.call_ns for a, b in pairwise(ops))
    for process in range(8):  # one op at a time per process
        mine = [o for o in ops if o.process == process]
        assert all(a.return_ns <= b.call_ns for a, b in pairwise(mine))
