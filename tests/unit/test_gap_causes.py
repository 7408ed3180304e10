"""The garbage collector's pauses and the causes of a long gap between two passes of the Raft
loop, as a node measures them (``kvstore.node.gc_pauses``, ``kvstore.node.gap_causes``)."""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from kvstore.node import gap_causes, gc_pauses
from kvstore.node.health import TickGaps


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``install`` as in a node, undone afterwards (this process's collections stay quiet)."""
    monkeypatch.setattr(gc_pauses, "_installed", None)
    saved = list(gc.callbacks)
    yield
    gc.callbacks[:] = saved


@pytest.mark.usefixtures("installed")
def test_every_collection_is_timed_by_generation() -> None:
    pauses = gc_pauses.install()
    assert gc_pauses.install() is pauses, "installed twice: each collection counted twice"
    assert gc.callbacks.count(pauses.on_collection) == 1
    before = list(pauses.count), pauses.seconds
    gc.collect(2)
    gc.collect(0)
    assert pauses.count[2] == before[0][2] + 1 and pauses.count[0] == before[0][0] + 1
    assert pauses.seconds > before[1]
    assert pauses.longest_pause() == max(pauses.longest) > 0


def test_a_long_collection_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """At INFO: a command that fails says so in one line, whatever the collector did."""
    pauses = gc_pauses.GcPauses()
    with caplog.at_level(logging.INFO, "kvstore.node.gc"):
        pauses.on_collection("start", {"generation": 1})
        time.sleep(gc_pauses.LONG_PAUSE)
        pauses.on_collection("stop", {"generation": 1, "collected": 3})
    assert pauses.count == [0, 1, 0] and pauses.longest[1] >= gc_pauses.LONG_PAUSE
    assert "garbage collection of generation 1 took" in caplog.text
    assert f"on thread {threading.current_thread().name})" in caplog.text
    assert [record.levelname for record in caplog.records] == ["INFO"]


def test_a_long_gap_is_logged_with_what_the_tick_thread_did(
        caplog: pytest.LogCaptureFixture) -> None:
    gaps = TickGaps()
    spent = {"gc": 0.0, "io": 0.0}
    gaps.causes = lambda: gap_causes.Causes(lambda: spent["gc"], lambda: spent["io"])
    gaps.on_tick()
    deadline = time.thread_time() + 0.06
    while time.thread_time() < deadline:  # 60 ms of the tick thread's own CPU
        pass
    spent["gc"] += 0.03
    spent["io"] += 0.05
    time.sleep(0.05)
    with caplog.at_level(logging.WARNING, "kvstore.node.health"):
        gaps.on_tick()
    line = caplog.records[-1].getMessage()
    assert line.startswith("the tick thread made no pass for")
    fields = dict(part.rsplit(" ", 1) for part in line.split("(", 1)[1].rstrip(")").split(", "))
    assert int(fields["cpu"]) >= 55 and fields["gc"] == "30" and fields["io"] == "50"
    assert ("runq" in fields) == sys.platform.startswith("linux")


def test_the_io_clock_stands_still_only_while_the_thread_waits_for_a_core() -> None:
    causes = gap_causes.Causes(lambda: 0.0, lambda: 0.0)
    start = causes.wall_less_runq()
    time.sleep(0.05)  # asleep, not waiting for a core: the clock runs
    assert causes.wall_less_runq() - start >= 0.045


def test_the_recent_gap_never_exceeds_the_longest_since_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both figures come from one clock reading: with the clock moving between two readings,
    a gap still open would count longer in the second figure than in the first."""
    from kvstore.node import health

    clock = iter(1000.0 + i * 0.001 for i in range(1000))
    monkeypatch.setattr(health.time, "monotonic", lambda: next(clock))
    gaps = TickGaps()
    gaps.on_tick()
    figures = gaps.figures()
    assert figures.recent == figures.since_start > 0


def test_objects_alive_at_start_up_are_frozen_out_of_every_later_collection() -> None:
    """``freeze_start_up``: a collection of the oldest generation no longer visits what the
    process held when the node started serving (cycles among it included); it still visits and
    frees what came after."""
    class Node:
        pass
    old = Node()
    old.me = old  # a cycle: only the collector could ever free it
    try:
        frozen = gc_pauses.freeze_start_up()
        assert frozen >= 1 and gc.get_freeze_count() == frozen
        assert not any(o is old for o in gc.get_objects())
        new = Node()
        new.me = new
        assert any(o is new for o in gc.get_objects())
    finally:
        gc.unfreeze()
