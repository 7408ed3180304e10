"""Snapshots taken and installed off the tick thread (``kvstore.node.snapshotter``, defect D11).

The snapshotter stands in for PySyncObj's ``Serializer``; these tests call its methods as
PySyncObj's tick thread does (``serialize``/``checkSerializing`` for a dump, ``deserialize`` and
``on_tick`` for an install, the transmission methods for streaming a dump), with a real state
machine and real files, and check the claims of its docstring: a snapshot is the state at its
index however many entries are applied while it is written; a crash mid-write leaves the
previous dump; a restore happens while entries keep arriving and is swapped in whole; a newer
snapshot supersedes one still being restored; a dump sent in pieces arrives byte for byte.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.node import TCPNode

from kvstore import StateMachine, encode_entry, ops, snapshot
from kvstore.node import dump_file, recovery, send_pacing, snapshotter
from kvstore.node.raft_node import dump_meta, raft_meta_of
from kvstore.node.snapshotter import Snapshotter
from session import Session, new_noop_session
from tests.support import wait_for

CLUSTER = 3
LOGGER = "kvstore.node.snapshot"
MEMBERS = {TCPNode("127.0.0.1:7001"), TCPNode("127.0.0.1:7002")}


def raft_data(index: int) -> tuple[None, Any, Any, Any]:
    """What PySyncObj passes to ``serialize``: (data, last entry, previous entry, members)."""
    return None, (b"last", index, 2), (b"prev", index - 1, 2), MEMBERS


def make(path: Path, sm: StateMachine, fatal: list[str] | None = None,
         keepalives: list[float] | None = None) -> Snapshotter:
    return Snapshotter(str(path / "raft.dump"), 4096, sm, Counter(), dump_meta, raft_meta_of,
                       (fatal if fatal is not None else []).append,
                       lambda: (keepalives if keepalives is not None else []).append(
                           time.monotonic()))


def logged(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    """What the snapshotter logged at ``level`` or above (what an operator reads)."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


def stepping_clock(monkeypatch: pytest.MonkeyPatch, step: float) -> None:
    """The snapshotter's clock (only its own: the tests' deadlines keep the real one) advances
    ``step`` seconds at each reading."""
    now = [0.0]

    def monotonic() -> float:
        now[0] += step
        return now[0]
    monkeypatch.setattr(snapshotter, "time", types.SimpleNamespace(
        monotonic=monotonic, thread_time=time.thread_time, sleep=time.sleep))


def put(sm: StateMachine, key: bytes, value: bytes) -> None:
    sm.apply(encode_entry(new_noop_session(CLUSTER), ops.put(key, value)))


def loaded(n: int, sessions: int = 3) -> StateMachine:
    sm = StateMachine(CLUSTER, session_capacity=8)
    for client_id in range(1, sessions + 1):
        sm.apply(encode_entry(Session(CLUSTER, client_id, series_id=2**64 - 2)))
        sm.apply(encode_entry(Session(CLUSTER, client_id, series_id=1), ops.incr(b"c")))
    for i in range(n):
        put(sm, b"k%06d" % (i * 7919 % n), b"v%d" % i)
    return sm


def finish_write(s: Snapshotter) -> int:
    """Polls ``checkSerializing`` as PySyncObj's tick does, until the write is over."""
    def over() -> int | None:
        state, _ = s.checkSerializing()
        return None if state == SERIALIZER_STATE.SERIALIZING else state
    return wait_for(over, 30, "the snapshot write to end")


def install(s: Snapshotter) -> None:
    """``deserialize`` as PySyncObj calls it, then ticks until the restore is swapped in."""
    s.deserialize()
    assert s.restoring
    wait_for(lambda: (s.on_tick(), not s.restoring)[1], 30, "the restore to be swapped in")


@pytest.fixture
def slow_pieces(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Makes the writer stop after its first piece until the event is set."""
    release = threading.Event()

    def held(frozen: snapshot.Frozen) -> Iterator[bytes]:
        for n, piece in enumerate(snapshot.encode_pieces(frozen)):
            if n == 1:
                release.wait(30)
            yield piece
    monkeypatch.setattr(snapshotter, "snapshot",
                        types.SimpleNamespace(**{**vars(snapshot), "encode_pieces": held}))
    yield release
    release.set()


def test_a_dump_is_the_state_at_its_index_while_applies_go_on(tmp_path: Path,
                                                              slow_pieces: threading.Event) -> None:
    sm = loaded(3000)
    at_index = sm.snapshot()
    s = make(tmp_path, sm)
    s.serialize(raft_data(100), 99)
    assert s.checkSerializing()[0] == SERIALIZER_STATE.SERIALIZING
    assert s.activity() == ["writing"] and s.writes_to_disk  # a follower's syncs: not inline
    for i in range(500):  # the tick thread applies more entries while the writer works
        put(sm, b"k%06d" % i, b"changed")
    put(sm, b"new", b"key")
    sm.apply(encode_entry(Session(CLUSTER, 1, series_id=2), ops.incr(b"c")))
    slow_pieces.set()
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    assert not s.writes_to_disk
    dump = dump_file.read(str(tmp_path / "raft.dump"))
    assert dump.snapshot == at_index != sm.snapshot()
    assert dump.meta["last"] == [b"last".hex(), 100, 2]
    assert dump.meta["digest"] == hashlib_digest(at_index)


def hashlib_digest(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()[:16]


def test_the_background_dump_has_the_bytes_and_digest_of_the_old_path(tmp_path: Path) -> None:
    """Determinism: the file holds ``StateMachine.snapshot()`` (the old path's bytes), and its
    digest is ``StateMachine.digest()`` (what the old path put in the meta)."""
    sm = loaded(2000)
    s = make(tmp_path, sm)
    s.serialize(raft_data(10), 9)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    dump = dump_file.read(str(tmp_path / "raft.dump"))
    assert dump.snapshot == sm.snapshot() and dump.meta["digest"] == sm.digest()


def test_a_crash_mid_snapshot_leaves_the_previous_dump_usable(tmp_path: Path,
                                                              slow_pieces: threading.Event) -> None:
    sm = loaded(1000)
    first = make(tmp_path, sm)
    slow_pieces.set()
    first.serialize(raft_data(50), 49)
    assert finish_write(first) == SERIALIZER_STATE.SUCCESS
    state_at_50 = sm.snapshot()
    file_at_50 = (tmp_path / "raft.dump").read_bytes()
    slow_pieces.clear()
    put(sm, b"later", b"write")
    first.serialize(raft_data(60), 59)  # the process "dies" while this one is half written
    wait_for(lambda: (tmp_path / "raft.dump.tmp").exists(), 10, "a partial dump")
    assert (tmp_path / "raft.dump").read_bytes() == file_at_50, "the dump in place is untouched"
    restarted = StateMachine(CLUSTER)
    install(make(tmp_path, restarted))
    assert restarted.snapshot() == state_at_50
    slow_pieces.set()
    first.stop()


def test_a_failed_write_keeps_the_dump_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    sm = loaded(100)
    s = make(tmp_path, sm)
    s.serialize(raft_data(5), 4)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    before = (tmp_path / "raft.dump").read_bytes()

    def broken(frozen: snapshot.Frozen) -> Iterator[bytes]:
        yield b"x"
        raise OSError("disk full")
    monkeypatch.setattr(snapshotter, "snapshot",
                        types.SimpleNamespace(**{**vars(snapshot), "encode_pieces": broken}))
    s.serialize(raft_data(9), 8)
    assert finish_write(s) == SERIALIZER_STATE.FAILED  # PySyncObj keeps its log, tries later
    assert logged(caplog, logging.ERROR) == ["snapshot write failed: OSError: disk full"]
    assert (tmp_path / "raft.dump").read_bytes() == before
    assert not (tmp_path / "raft.dump.tmp").exists()


def test_a_restore_runs_while_entries_arrive_and_is_swapped_in_whole(tmp_path: Path) -> None:
    """Applies wait until the restored state is in; then the state is the snapshot's and the
    held entries apply on top of it, as on a replica that applied the whole log."""
    leader = loaded(5000)
    s = make(tmp_path, leader)
    s.serialize(raft_data(70), 69)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    follower = StateMachine(CLUSTER)
    put(follower, b"stale", b"state")
    f = make(tmp_path, follower)
    _, last, prev, members = f.deserialize()
    assert (last[1], prev[1], members) == (70, 69, MEMBERS)
    assert f.restoring and "restoring" in f.activity()
    held = [b"k000001", b"brand-new"]  # entries that arrive meanwhile: stored, not applied
    assert follower.data == {b"stale": b"state"}, "nothing is swapped in before it is whole"
    wait_for(lambda: (f.on_tick(), not f.restoring)[1], 30, "the restore")
    assert follower.snapshot() == leader.snapshot()
    for key in held:
        put(follower, key, b"after")
        put(leader, key, b"after")
    assert follower.snapshot() == leader.snapshot()


def test_a_newer_snapshot_supersedes_one_being_restored(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    leader = loaded(2000)
    s = make(tmp_path, leader)
    s.serialize(raft_data(10), 9)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    old_file = (tmp_path / "raft.dump").read_bytes()
    put(leader, b"newer", b"state")
    s.serialize(raft_data(20), 19)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    new_file = (tmp_path / "raft.dump").read_bytes()
    (tmp_path / "raft.dump").write_bytes(old_file)

    follower = StateMachine(CLUSTER)
    f = make(tmp_path, follower)
    gate = threading.Event()
    decode = snapshot.decode_steps

    def slow(data: bytes) -> Any:
        gate.wait(30)
        return decode(data)
    monkeypatch.setattr(snapshot, "decode_steps", slow)
    f.deserialize()  # the older one starts restoring, and is held
    (tmp_path / "raft.dump").write_bytes(new_file)  # the newer one arrives (renamed into place)
    monkeypatch.setattr(snapshot, "decode_steps", decode)
    f.deserialize()
    gate.set()
    wait_for(lambda: (f.on_tick(), not f.restoring)[1], 30, "the newer restore")
    assert follower.snapshot() == leader.snapshot()
    assert f._counters["snapshots_loaded"] == 1, "the superseded restore was never swapped in"


def test_no_snapshot_is_taken_while_one_is_restored(tmp_path: Path) -> None:
    """The state is not at PySyncObj's applied index until the restore is in."""
    sm = loaded(500)
    s = make(tmp_path, sm)
    s.serialize(raft_data(10), 9)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    s.deserialize()
    s.serialize(raft_data(11), 10)
    assert s.checkSerializing()[0] in (SERIALIZER_STATE.NOT_SERIALIZING,)
    wait_for(lambda: (s.on_tick(), not s.restoring)[1], 30, "the restore")


def test_a_corrupt_dump_stops_the_node(tmp_path: Path) -> None:
    sm = loaded(200)
    s = make(tmp_path, sm)
    s.serialize(raft_data(10), 9)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    data = bytearray((tmp_path / "raft.dump").read_bytes())
    data[100] ^= 1
    (tmp_path / "raft.dump").write_bytes(bytes(data))
    fatal: list[str] = []
    follower = StateMachine(CLUSTER)
    f = make(tmp_path, follower, fatal)
    f.deserialize()
    wait_for(lambda: (f.on_tick(), fatal)[1], 30, "the failure to be reported")
    assert "checksum" in fatal[0] and follower.data == {}
    assert str(tmp_path / "raft.dump") in fatal[0], "the message names the file"


def test_a_follower_receiving_a_dump_keeps_the_connection_alive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PySyncObj drops a connection with no input for 3.5 s, and a follower acknowledges nothing
    while a dump streams in: it sends a keepalive every ``KEEPALIVE_EVERY`` instead (the first
    with the first piece: the monotonic clock counts from boot, so that is long after 0)."""
    clock = [100.0]
    monkeypatch.setattr(snapshotter, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    keepalives: list[float] = []
    receiver = Snapshotter(str(tmp_path / "raft.dump"), 4096, StateMachine(CLUSTER), Counter(),
                           dump_meta, raft_meta_of, [].append,
                           lambda: keepalives.append(clock[0]))
    for now, first in ((100.0, True), (100.5, False), (101.0, False), (101.75, False),
                       (102.0, False), (104.5, False)):
        clock[0] = now
        assert not receiver.setTransmissionData((b"x", first, False))
    assert keepalives == [100.0, 101.0, 102.0, 104.5], "one at KEEPALIVE_EVERY exactly, not later"


def test_a_dump_streamed_in_pieces_arrives_byte_for_byte(tmp_path: Path) -> None:
    leader_dir, follower_dir = tmp_path / "a", tmp_path / "b"
    leader_dir.mkdir()
    follower_dir.mkdir()
    sm = loaded(3000)
    sender = make(leader_dir, sm)
    sender.serialize(raft_data(10), 9)
    assert finish_write(sender) == SERIALIZER_STATE.SUCCESS
    receiver = make(follower_dir, StateMachine(CLUSTER))
    node = TCPNode("127.0.0.1:7002")
    complete = False
    for _ in range(10_000):
        data = sender.getTransmissionData(node)
        assert data
        if receiver.setTransmissionData(data):
            complete = True
            break
        assert receiver.activity() == ["receiving"]
    assert complete
    assert (follower_dir / "raft.dump").read_bytes() == (leader_dir / "raft.dump").read_bytes()
    assert not sender.sending


def test_a_new_dump_waits_for_the_transmission_in_flight(tmp_path: Path) -> None:
    """The follower being sent the old dump needs the log entries after it: the new dump is
    put in place (and the log compacted) only once the old one has been sent whole."""
    sm = loaded(3000)
    s = make(tmp_path, sm)
    s.serialize(raft_data(10), 9)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    old_file = (tmp_path / "raft.dump").read_bytes()
    node = TCPNode("127.0.0.1:7002")
    first = s.getTransmissionData(node)
    assert first and first[1] and not first[2]
    sent = first[0]
    put(sm, b"newer", b"state")
    s.serialize(raft_data(20), 19)
    wait_for(lambda: s._writing is not None and s._writing.done, 30, "the new dump written")
    for _ in range(5):
        assert s.checkSerializing()[0] == SERIALIZER_STATE.SERIALIZING, "held for the follower"
    assert s.getTransmissionData(TCPNode("127.0.0.1:7003")) is None, "no new transmission starts"
    while True:
        data = s.getTransmissionData(node)
        assert data and not data[1]
        sent += data[0]
        if data[2]:
            break
    assert sent == old_file, "the follower got the whole old dump, consistent"
    assert s.checkSerializing() == (SERIALIZER_STATE.SUCCESS, 19)
    assert (tmp_path / "raft.dump").read_bytes() != old_file


def test_the_tick_gate_holds_background_work_during_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshotter, "MAX_WAIT_FOR_IDLE", 5.0)
    gate = snapshotter.TickGate()
    gate.pass_starts()
    passed = threading.Event()
    waiter = threading.Thread(target=lambda: (gate.wait(), passed.set()))
    waiter.start()
    time.sleep(0.05)
    assert not passed.is_set(), "a job waits while the tick thread is in a pass"
    gate.pass_ends()
    waiter.join(5)
    assert passed.is_set()


def test_a_member_starts_a_snapshot_only_in_its_turn_unless_forced(tmp_path: Path) -> None:
    """``serialize`` asks ``my_turn`` and, declined, starts nothing: PySyncObj asks again at
    its next pass (``checkSerializing`` says not serializing). A backup forces one."""
    sm = loaded(50)
    asked: list[tuple[int, set[str]]] = []
    turn = {"mine": False}

    def my_turn(index: int, cluster: Any) -> bool:
        asked.append((index, {n.address for n in cluster}))
        return turn["mine"]
    s = Snapshotter(str(tmp_path / "raft.dump"), 4096, sm, Counter(), dump_meta, raft_meta_of,
                    [].append, lambda: None, my_turn=my_turn)
    s.serialize(raft_data(10), 10)
    assert s.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)
    assert asked == [(10, {"127.0.0.1:7001", "127.0.0.1:7002"})]
    s.force()
    s.serialize(raft_data(11), 11)
    assert s.activity() == ["writing"], "forced: started out of turn"
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS, "a forced snapshot waited for its turn"
    s.serialize(raft_data(12), 12)  # forced once only
    assert s.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)
    turn["mine"] = True
    s.serialize(raft_data(13), 13)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread policy: Linux")
def test_a_snapshot_job_runs_as_batch_at_the_nodes_priority(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SCHED_BATCH: it never preempts a waking thread. Its nice value stays the node's: a thread
    holding the interpreter lock at a lower priority is descheduled for long, and the tick
    thread waits for the lock meanwhile."""
    seen: list[tuple[int, int, int]] = []
    encode = snapshot.encode_pieces

    def watched(frozen: snapshot.Frozen) -> Iterator[bytes]:
        me = threading.get_native_id()
        seen.append((me, os.sched_getscheduler(me), os.getpriority(os.PRIO_PROCESS, me)))
        return encode(frozen)
    monkeypatch.setattr(snapshot, "encode_pieces", watched)
    s = make(tmp_path, loaded(20))
    s.serialize(raft_data(5), 5)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    (thread, policy, nice), = seen
    assert thread != threading.get_native_id()
    assert policy == os.SCHED_BATCH
    assert nice == os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_written_snapshot_lets_go_of_its_frozen_state_on_the_jobs_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not on the tick thread when it drops the finished job: by then writes have copied most
    shards, and the frozen view alone holds the old ones (at 1M keys, tens of milliseconds to
    let go of at once). The job lets go of it in steps (``FrozenData.release``)."""
    sm = loaded(20)
    keys = dict(sm.data.items())
    frozen: list[snapshot.Frozen] = []
    real = sm.freeze
    monkeypatch.setattr(sm, "freeze", lambda: frozen.append(real()) or frozen[-1])
    s = make(tmp_path, sm)
    s.serialize(raft_data(5), 5)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    (view,) = frozen
    assert view.data.shards == []
    assert dict(sm.data.items()) == keys


def test_a_job_takes_at_most_its_share_of_a_core(tmp_path: Path) -> None:
    """It rests between pieces (twice the CPU time each took): at a full share, the snapshot
    threads kept the Raft loops of a busy machine waiting for a core."""
    def busy(job: snapshotter._Job) -> float:
        for _ in range(40):
            until = time.thread_time() + 0.003
            while time.thread_time() < until:
                pass
            job.pause()
        return time.thread_time()

    started = time.monotonic()
    job = snapshotter._Job("busy", busy, snapshotter.TickGate())
    job.join(30)
    assert job.error is None and job.done
    assert time.monotonic() - started >= 0.12 / snapshotter.BACKGROUND_SHARE * 0.95


def test_a_job_rests_twice_the_cpu_time_it_used_and_carries_short_rests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake CPU clock: each rest is owed twice the CPU time used since the last one; a rest
    of MIN_REST or more is slept at once and paid off, a shorter one is carried to the next."""
    cpu = [0.0]
    slept: list[float] = []

    def mine() -> bool:  # other tests' jobs may still be running: they keep the real clock
        return threading.current_thread().name == "resting"
    monkeypatch.setattr(snapshotter, "time", types.SimpleNamespace(
        monotonic=time.monotonic,
        thread_time=lambda: cpu[0] if mine() else time.thread_time(),
        sleep=lambda s: slept.append(s) if mine() else time.sleep(s)))

    def work(job: snapshotter._Job) -> None:
        for used_until in (0.0005, 0.0008, 0.0011, 0.0011):
            cpu[0] = used_until
            job.pause()
    job = snapshotter._Job("resting", work, snapshotter.TickGate())
    job.join(10)
    assert job.done and job.error is None
    # owed 0.001 (exactly MIN_REST: slept), 0.0006 (carried), 0.0006 + 0.0006, nothing
    assert slept == [0.001, pytest.approx(0.0012)]


# -- the small rules, one test each (quick: a few dozen keys) -----------------------------------

def written_dump(tmp_path: Path, sm: StateMachine | None = None, index: int = 10) -> Snapshotter:
    s = make(tmp_path, sm if sm is not None else loaded(20))
    s.serialize(raft_data(index), index - 1)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    return s


def test_a_written_dump_is_counted_timed_and_asks_for_the_directory_fsync(tmp_path: Path) -> None:
    """The rename that puts a dump in place is durable only once the directory is fsynced
    (defect D3): the node does that when ``fsync_dir_pending`` says so."""
    before = time.monotonic()
    s = make(tmp_path, loaded(20))
    assert not s.fsync_dir_pending
    s.serialize(raft_data(10), 9)
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    took = time.monotonic() - before
    assert s.fsync_dir_pending and s._counters["snapshots_written"] == 1
    assert 0 < s.last_write_seconds <= took and 0 <= s.last_freeze_seconds <= s.last_write_seconds
    assert not (tmp_path / "raft.dump.tmp").exists()
    assert s.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)


def test_an_installed_snapshot_is_counted_and_timed(tmp_path: Path) -> None:
    leader = loaded(20)
    written_dump(tmp_path, leader)
    follower = StateMachine(CLUSTER)
    f = make(tmp_path, follower)
    before = time.monotonic()
    install(f)
    assert 0 < f.last_restore_seconds <= time.monotonic() - before
    assert f._counters["snapshots_loaded"] == 1 and follower.snapshot() == leader.snapshot()
    f.on_tick()  # nothing more to swap in
    assert f._counters["snapshots_loaded"] == 1


def test_the_state_an_install_replaces_is_let_go_of_on_a_jobs_thread(tmp_path: Path) -> None:
    """Not on the tick thread, where the swap happens: a follower's 1M keys took tens of
    milliseconds to free there. A job lets go of them in steps (``data.release_of``)."""
    written_dump(tmp_path, loaded(20))
    follower = loaded(50)
    replaced = follower.data
    install(make(tmp_path, follower))
    assert follower.data is not replaced
    wait_for(lambda: replaced._shards == [], 10, "the replaced state to be let go of")


def test_a_missing_dump_stops_the_node_before_pysyncobj_goes_on(tmp_path: Path) -> None:
    fatal: list[str] = []
    s = make(tmp_path, StateMachine(CLUSTER), fatal)
    with pytest.raises(FileNotFoundError):
        s.deserialize()
    assert fatal == [f"snapshot load failed: FileNotFoundError: {fatal[0].split(': ', 2)[2]}"]
    assert "raft.dump" in fatal[0] and not s.restoring


def test_a_dump_with_a_bad_meta_stops_the_node_and_is_closed(tmp_path: Path) -> None:
    (tmp_path / "raft.dump").write_bytes(b"not a dump at all, but long enough to be one" * 2)
    fatal: list[str] = []
    s = make(tmp_path, StateMachine(CLUSTER), fatal)
    with pytest.raises(dump_file.DumpCorrupt):
        s.deserialize()
    assert fatal == [f"snapshot load failed: DumpCorrupt: {tmp_path / 'raft.dump'}: bad magic"]
    assert not [fd for fd in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{fd}") == str(tmp_path / "raft.dump")]


def test_a_snapshot_of_another_cluster_is_refused(tmp_path: Path) -> None:
    written_dump(tmp_path, loaded(20))
    fatal: list[str] = []
    other = StateMachine(CLUSTER + 1)
    f = make(tmp_path, other, fatal)
    f.deserialize()
    wait_for(lambda: (f.on_tick(), fatal)[1], 30, "the refusal")
    assert fatal == [f"snapshot load failed: SnapshotError: snapshot of cluster {CLUSTER}, "
                     f"this is {CLUSTER + 1}"]
    assert other.data == {} and not f.restoring


def test_past_the_send_budget_a_follower_gets_no_more_of_the_dump_in_this_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dump's batches are held to the send step's budget (``kvstore.node.send_pacing``):
    the first batch of a pass always goes; past the budget the follower is parked (which ends
    PySyncObj's loop for it) and gets nothing more until the next pass."""
    s = written_dump(tmp_path, loaded(500))  # several batches
    node = TCPNode("127.0.0.1:7002")
    next_index = {node: 7}
    monkeypatch.setattr(send_pacing, "SEND_BUDGET", 2**-7)  # exact in binary, as are the sums
    clock = [1.0]
    pacer = send_pacing.SendPacer(next_index, [(b"", 40, 2), (b"", 41, 2)], lambda: clock[0])
    s.attach(pacer)
    send = pacer.wrap(lambda to, message: None)
    seen: list[Any] = []

    def step() -> None:
        for _ in range(3):
            data = s.getTransmissionData(node)
            seen.append(data)
            send(node, {"type": "append_entries", "serialized": data})
            seen.append(next_index[node])
            clock[0] += send_pacing.SEND_BUDGET  # the second batch is sent past the budget
    pacer.step(step)
    assert seen[0] and seen[0][1] and seen[2] and not seen[2][1]
    assert seen[1] == seen[3] == 7 and seen[4:] == [None, 42]
    assert next_index == {node: 7}, "put back when the step ends"
    seen.clear()
    pacer.step(lambda: seen.append(s.getTransmissionData(node)))
    assert seen[0] and not seen[0][1], "a new pass: sent again, where it left off"


def test_outside_a_send_step_the_budget_is_not_enforced(tmp_path: Path) -> None:
    s = written_dump(tmp_path)
    clock = [100.0]
    s.attach(send_pacing.SendPacer({}, [(b"", 1, 1)], lambda: clock[0]))
    node = TCPNode("127.0.0.1:7002")
    assert s.getTransmissionData(node)
    clock[0] += 1.0
    assert s.getTransmissionData(node)


def test_sending_is_shown_counted_and_ends_with_the_file_closed(tmp_path: Path) -> None:
    s = written_dump(tmp_path)
    node, other = TCPNode("127.0.0.1:7002"), TCPNode("127.0.0.1:7003")
    size = (tmp_path / "raft.dump").stat().st_size
    first = s.getTransmissionData(node)
    assert first and len(first[0]) == min(4096, size) and first[1]
    assert s.getTransmissionData(other)
    assert s.sending and s.activity() == ["sending:127.0.0.1:7002", "sending:127.0.0.1:7003"]
    assert not s.writes_to_disk  # sending reads the dump
    assert s._counters["snapshots_sent_started"] == 2
    s.cancelTransmisstion(other)
    s.cancelTransmisstion(other)  # cancelling one not in flight: nothing to do
    sent = first[0]
    while True:
        data = s.getTransmissionData(node)
        assert data
        sent += data[0]
        if data[2]:
            break
    assert data[0] == b"" and sent == (tmp_path / "raft.dump").read_bytes()
    assert s._counters["snapshots_sent"] == 1 and not s.sending and s.activity() == []


def test_without_a_dump_nothing_is_sent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = make(tmp_path, StateMachine(CLUSTER))
    assert s.getTransmissionData(TCPNode("127.0.0.1:7002")) is None
    assert logged(caplog, logging.ERROR) == ["cannot open the dump to send it"]
    assert not s.sending and s._counters["snapshots_sent_started"] == 0


def test_stop_ends_every_transmission_and_the_incoming_dump(tmp_path: Path) -> None:
    s = written_dump(tmp_path)
    assert s.getTransmissionData(TCPNode("127.0.0.1:7002"))
    assert not s.setTransmissionData((b"piece", True, False))
    assert s.activity() == ["receiving", "sending:127.0.0.1:7002"] and s.writes_to_disk
    s.stop()
    assert s.activity() == [] and not s.sending and not s.writes_to_disk
    assert not s.setTransmissionData((b"more", False, False)), "no dump is being received"


def test_a_received_dump_replaces_the_one_in_place_only_when_whole(tmp_path: Path) -> None:
    r = make(tmp_path, StateMachine(CLUSTER))
    assert not r.setTransmissionData(None) and not r.setTransmissionData((b"x", False, True))
    assert not r.setTransmissionData((b"abandoned", True, False))
    assert not r.setTransmissionData((b"new ", True, False)), "a first piece starts afresh"
    assert not (tmp_path / "raft.dump").exists() and not r.fsync_dir_pending
    assert r.setTransmissionData((b"dump", False, True))
    assert (tmp_path / "raft.dump").read_bytes() == b"new dump"
    assert not (tmp_path / "raft.dump.1.tmp").exists()
    assert r.fsync_dir_pending and r._counters["snapshots_received"] == 1
    assert r.activity() == []
    assert not r.setTransmissionData((b"late", False, True)), "nothing in progress"


def test_an_incoming_dump_that_cannot_be_stored_is_dropped(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    r = make(tmp_path / "missing", StateMachine(CLUSTER))  # its directory does not exist
    assert not r.setTransmissionData((b"piece", True, True))
    assert logged(caplog) == ["receiving a dump from the leader",
                              "cannot open a file for the incoming dump"]
    assert r.activity() == [] and r._counters["snapshots_received"] == 0


def test_a_background_job_lowers_the_switch_interval_and_puts_it_back() -> None:
    """Lowered while at least one job runs (jobs overlap), put back after the last, each time:
    from a known interval, not the one found (which an earlier test's job could have left)."""
    original = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        lowered = min(0.004, snapshotter.SWITCH_INTERVAL)
        switching = snapshotter._SwitchInterval()
        for _ in range(2):  # a second round starts from no job, as the first
            seen: list[float] = []
            with switching:
                seen.append(sys.getswitchinterval())
                with switching:  # a second job at the same time
                    seen.append(sys.getswitchinterval())
                seen.append(sys.getswitchinterval())
            assert seen == [lowered] * 3
            assert sys.getswitchinterval() == 0.004
    finally:
        sys.setswitchinterval(original)


def test_digest_of_a_frozen_state_is_the_state_digest_and_lets_go_of_it() -> None:
    sm = loaded(50)
    frozen = sm.freeze()
    assert snapshotter.digest_of(frozen, snapshotter.TickGate()) == sm.digest()
    assert frozen.data.shards == []  # in steps, on the caller's thread


def test_sent_and_received_dumps_are_counted_each(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    s = written_dump(tmp_path / "a")
    r = make(tmp_path / "b", StateMachine(CLUSTER))
    node = TCPNode("127.0.0.1:7002")
    for _ in range(2):
        while not r.setTransmissionData(s.getTransmissionData(node)):
            pass
    assert s._counters["snapshots_sent"] == 2 and r._counters["snapshots_received"] == 2


def test_an_incoming_dump_that_cannot_be_put_in_place_is_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "raft.dump").mkdir()  # os.replace cannot put a file over a directory
    (tmp_path / "raft.dump" / "x").write_bytes(b"")
    r = make(tmp_path, StateMachine(CLUSTER))
    assert r.setTransmissionData((b"whole", True, True)) is False
    assert logged(caplog, logging.ERROR) == ["cannot store the incoming dump"]
    assert r.activity() == [] and r._counters["snapshots_received"] == 0
    assert not r.fsync_dir_pending


def test_a_dump_that_cannot_be_read_is_not_sent(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    s = written_dump(tmp_path)
    node = TCPNode("127.0.0.1:7002")
    assert s.getTransmissionData(node)
    s._transmissions[node]["file"].close()
    s._transmissions[node]["file"] = open(os.devnull, "wb")  # read: UnsupportedOperation, an OSError
    assert s.getTransmissionData(node) is False
    assert logged(caplog, logging.ERROR) == ["cannot read the dump to send it"]
    assert not s.sending


def test_the_jobs_run_on_named_daemon_threads(tmp_path: Path,
                                              slow_pieces: threading.Event) -> None:
    """Daemon threads: a node that exits does not wait for a snapshot job."""
    s = make(tmp_path, loaded(1000))
    s.serialize(raft_data(10), 9)
    jobs = [t for t in threading.enumerate() if t.name == "snapshot-writer"]
    assert len(jobs) == 1 and jobs[0].daemon
    slow_pieces.set()
    assert finish_write(s) == SERIALIZER_STATE.SUCCESS
    f = make(tmp_path, StateMachine(CLUSTER))
    gate = threading.Event()
    decode = snapshot.decode_steps
    snapshotter.snapshot.decode_steps = lambda data: (gate.wait(30), decode(data))[1]
    try:
        f.deserialize()
        jobs = [t for t in threading.enumerate() if t.name == "snapshot-restorer"]
        assert len(jobs) == 1 and jobs[0].daemon
    finally:
        snapshotter.snapshot.decode_steps = decode
        gate.set()
    wait_for(lambda: (f.on_tick(), not f.restoring)[1], 30, "the restore")


def test_the_replaced_state_is_let_go_of_on_a_named_daemon_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written_dump(tmp_path, loaded(20))
    hold = threading.Event()

    def held(data: Any) -> Iterator[None]:
        hold.wait(30)
        yield
    monkeypatch.setattr(snapshotter, "release_of", held)
    try:
        install(make(tmp_path, loaded(5)))
        jobs = [t for t in threading.enumerate() if t.name == "snapshot-release"]
        assert len(jobs) == 1 and jobs[0].daemon
    finally:
        hold.set()
    jobs[0].join(10)


def test_a_closed_tick_gate_holds_a_job_for_max_wait_for_idle_only() -> None:
    gate = snapshotter.TickGate()
    gate.pass_starts()  # and never ends: a node busy in every pass
    waiter = threading.Thread(target=gate.wait, daemon=True)
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive(), "the job goes on after MAX_WAIT_FOR_IDLE"


# -- what is reported, and the small rules of failure (fake clocks, a few dozen keys) ----------

def test_before_any_snapshot_the_reported_durations_are_zero(tmp_path: Path) -> None:
    """The node's status and metrics show these figures from the start."""
    s = make(tmp_path, StateMachine(CLUSTER))
    reported = (s.last_write_seconds, s.last_freeze_seconds, s.last_restore_seconds)
    assert reported == (0.0, 0.0, 0.0)


def test_a_written_dump_is_logged_with_its_index_durations_and_digest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    stepping_clock(monkeypatch, 1.5)  # the freeze and the write each take one step
    sm = loaded(20)
    s = written_dump(tmp_path, sm)
    assert (s.last_freeze_seconds, s.last_write_seconds) == (1.5, 1.5)
    assert logged(caplog) == [f"snapshot at index 9 written in 1.50 s (frozen in 1500 ms), "
                              f"digest {sm.digest()}"]


def test_a_cancelled_write_is_not_put_in_place_and_is_no_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = make(tmp_path, loaded(20))
    s.serialize(raft_data(10), 9)
    s.stop(timeout=5)  # cancelled mid-write or once written: either way, not put in place
    assert s.checkSerializing() == (SERIALIZER_STATE.FAILED, 9)
    assert not (tmp_path / "raft.dump").exists() and not (tmp_path / "raft.dump.tmp").exists()
    assert logged(caplog, logging.ERROR) == [], "a cancelled write is not a failure"
    assert s._counters["snapshots_written"] == 0


def test_each_install_is_logged_timed_and_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    written_dump(tmp_path, loaded(20))
    caplog.set_level(logging.INFO, logger=LOGGER)
    stepping_clock(monkeypatch, 1.5)  # from the restore's start to its swap: one step
    f = make(tmp_path, StateMachine(CLUSTER))
    install(f)
    install(f)
    assert f.last_restore_seconds == 1.5 and f._counters["snapshots_loaded"] == 2
    assert logged(caplog) == 2 * ["restoring the snapshot at index 10 in the background",
                                  "snapshot loaded: index 10, restored in the background in 1.50 s"]


def test_a_dump_sent_is_logged_with_its_size_and_duration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    s = written_dump(tmp_path)
    size = (tmp_path / "raft.dump").stat().st_size
    assert size < 4096, "one batch, then the empty one that ends it"
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = [100.0]
    monkeypatch.setattr(snapshotter, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    node = TCPNode("127.0.0.1:7002")
    first = s.getTransmissionData(node)
    assert first and first[1] and not first[2] and len(first[0]) == size
    clock[0] = 102.5
    assert s.getTransmissionData(node) == (b"", False, True)
    assert logged(caplog) == ["sending the dump to 127.0.0.1:7002",
                              f"sent the dump to 127.0.0.1:7002 ({size} bytes) in 2.5 s"]


def test_an_incoming_dump_is_written_to_a_temporary_that_recovery_removes(tmp_path: Path) -> None:
    """Until it is whole, a dump received is not the dump (a crash leaves the previous one),
    nor the writer's temporary; a node restarting removes it (``recovery.TEMPORARY``)."""
    r = make(tmp_path, StateMachine(CLUSTER))
    assert not r.setTransmissionData((b"part", True, False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raft.dump.1.tmp"]
    assert "raft.dump.1.tmp" in recovery.TEMPORARY
    r.stop()


def test_stop_waits_for_a_stuck_job_only_as_long_as_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job inside one long piece cannot see that it is cancelled: a node stopping waits for
    it ``timeout`` seconds, then goes (the thread is a daemon)."""
    stuck, release = threading.Event(), threading.Event()

    def one_long_piece(frozen: snapshot.Frozen) -> Iterator[bytes]:
        stuck.set()
        release.wait(30)
        yield from snapshot.encode_pieces(frozen)
    monkeypatch.setattr(snapshotter, "snapshot",
                        types.SimpleNamespace(**{**vars(snapshot),
                                                 "encode_pieces": one_long_piece}))
    s = make(tmp_path, loaded(20))
    s.serialize(raft_data(10), 9)
    assert stuck.wait(10)
    unstick = threading.Timer(1.0, release.set)  # a stop that waited for the job returns late
    unstick.start()
    try:
        started = time.monotonic()
        s.stop(timeout=0.05)
        assert time.monotonic() - started < 0.5
        assert s.checkSerializing()[0] == SERIALIZER_STATE.SERIALIZING, "the job is still in it"
    finally:
        release.set()
        unstick.cancel()
    assert finish_write(s) == SERIALIZER_STATE.FAILED, "then it sees it was cancelled"
