"""Snapshots taken and installed off the Raft thread (PySyncObj defect D11).

The rule: the tick thread never does work proportional to the size of the state. PySyncObj
calls its serializer and deserializer on the tick thread, and at 1M keys those took 5.9 s and
3.6 s there: no heartbeats, no votes answered, an election. This module takes the place of
PySyncObj's ``Serializer`` object (same five methods) and does the heavy part on threads of its
own:

* **Taking a snapshot.** On the tick thread, between two applies, the state is *frozen*
  (``StateMachine.freeze``: a ``dict.copy`` of the data, ~30 ms at 1M keys, and a copy of the
  session store), so the snapshot is exactly the state at the index PySyncObj asked for, however
  many entries are applied meanwhile. A writer thread encodes the frozen copy piece by piece into
  ``raft.dump.tmp`` and fsyncs it. The tick thread renames it into place once it is complete
  (``checkSerializing``), and only then does PySyncObj drop the log entries it covers. A crash
  while writing leaves the previous dump and the whole log: nothing to repair.
* **Sending it.** A leader streams the dump file to a follower that needs it, a batch per send,
  as PySyncObj does, within the send step's budget per pass (``kvstore.node.send_pacing``); a
  dump being written does not stop that (the previous file is complete). A new dump is put in
  place, and the log compacted, only once no transmission is in flight: the follower receiving
  the old dump needs the entries after it, and if each new dump restarted the transmissions
  (PySyncObj's behaviour), a large dump would never reach a follower of a busy cluster. And a
  follower receiving a dump sends a keepalive to the leader every ``KEEPALIVE_EVERY``: PySyncObj
  acknowledges nothing while it streams a dump, and drops a connection that has carried nothing
  in for ``connectionTimeout`` (3.5 s), which cancels the transmission, so a dump that takes
  longer than that to send (113 MiB at 1M keys on a busy cluster) was restarted forever.
* **Installing one.** When the last piece has arrived (or at start-up), PySyncObj calls
  ``deserialize``: we read only the meta (index, term, members) and hand it back at once, so
  PySyncObj resets its log to the snapshot's index and the node goes on voting, acknowledging and
  storing entries; the state is decoded on a restorer thread, and until it is swapped in (on the
  tick thread, ``on_tick``) applying is held back (``hold_applies``). A newer snapshot arriving
  meanwhile cancels the older restore; a node stopped mid-restore restarts from the dump file,
  which is complete (it was renamed into place before the log was reset).

Python runs one thread at a time, so a background thread is only harmless if it gives way.
Each job works in pieces of a few milliseconds (``kvstore.snapshot``) and, between two pieces,
waits until the tick thread is between passes (``TickGate``: open from the end of a pass until
the next one starts, which is mostly the tick thread waiting in ``poll``), so a job runs in the
tick thread's idle time rather than against it. While a job runs the interpreter's switch
interval is lowered from 5 ms to ``SWITCH_INTERVAL``, so a tick thread that wakes up during a
piece gets the interpreter back within about a millisecond, provided the job's thread is on a
core to give it. That is why a job's thread keeps the node's priority and runs under Linux's
``SCHED_BATCH`` policy (``_run_as_batch``): it never preempts another thread when it wakes, but
a thread that holds the interpreter lock at nice +10 (as it did) was descheduled for tens of
milliseconds at a time on a busy machine, and the tick thread waited for the lock all that
while (a priority inversion: up to 831 ms measured, ``benchmarks/gil_holds.py``). What the
lower priority was for, leaving the cores to the Raft loops, a job now does by resting between
pieces: it takes at most ``BACKGROUND_SHARE`` of a core. Which member snapshots when is
``kvstore.node.snapshot_turns``: one at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol

from pysyncobj.config import SERIALIZER_STATE

from kvstore import snapshot
from kvstore.data import release_of
from kvstore.node import dump_file
from kvstore.node.send_pacing import SendPacer

log = logging.getLogger("kvstore.node.snapshot")

SWITCH_INTERVAL = 0.001
"""The interpreter's thread switch interval while a background job runs (Python's default is
5 ms: a tick thread waiting that long at every hand-over misses its 100 ms budget)."""

BACKGROUND_SHARE = 1 / 3
"""The most of a core a job takes over time: after each piece it sleeps twice the CPU time the
piece took. A snapshot is work that can wait and the Raft loops of the machine cannot: at a
full share, the snapshot threads of three nodes on two cores kept the tick threads waiting for
a core for 100-400 ms (``runq``, issue 9). (A lower priority did this before, and cost more:
see ``_run_as_batch``.)"""
MIN_REST = 0.001
"""Rests shorter than this are added up and taken together."""

MAX_WAIT_FOR_IDLE = 0.02
"""A job waits at most this long for the tick thread to be idle, then does a piece anyway: a
node busy in every pass still finishes its snapshot, more slowly."""

KEEPALIVE_EVERY = 1.0
"""Seconds between two keepalives a follower sends while it receives a dump (see ``Snapshotter``)."""

RaftMeta = tuple[Any, Any, Any]
"""PySyncObj's (last entry, previous entry, cluster members) that a dump carries."""


class Restorable(Protocol):
    """What the snapshotter needs of the state machine (``kvstore.StateMachine`` fits)."""

    cluster_id: int

    def freeze(self) -> snapshot.Frozen: ...
    def install(self, state: snapshot.State) -> snapshot.State: ...


class _SwitchInterval:
    """Lowers the interpreter's switch interval while at least one background job runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved = sys.getswitchinterval()

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, SWITCH_INTERVAL))
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                sys.setswitchinterval(self._saved)


SWITCHING = _SwitchInterval()


class TickGate:
    """Open while the tick thread is between two passes (set by the node's tick loop)."""

    def __init__(self) -> None:
        self._idle = threading.Event()
        self._idle.set()  # a node that does not drive its loop never closes it

    def pass_starts(self) -> None:
        self._idle.clear()

    def pass_ends(self) -> None:
        self._idle.set()

    def wait(self) -> None:
        """Waits (at most ``MAX_WAIT_FOR_IDLE``) for the tick thread to be between passes."""
        self._idle.wait(MAX_WAIT_FOR_IDLE)


class _Job:
    """A background thread doing one piece of work, which it can be asked to abandon."""

    def __init__(self, name: str, work: Callable[[_Job], Any], gate: TickGate) -> None:
        self._gate = gate
        self.cancelled = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._work = work
        self._cpu_mark = 0.0
        self._rest_owed = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _run_as_batch()
        self._cpu_mark = time.thread_time()
        with SWITCHING:
            try:
                self.result = self._work(self)
            except BaseException as exc:  # reported to the tick thread, which decides
                self.error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def pause(self) -> None:
        """Between two pieces: lets the tick thread in, and stops if cancelled."""
        if self.cancelled.is_set():
            raise _Cancelled
        self._rest()
        self._gate.wait()

    def let_go(self, steps: Iterator[None]) -> None:
        """Runs ``steps`` (a ``release``), letting the tick thread in between, cancelled or not."""
        for _ in steps:
            self._rest()
            self._gate.wait()

    def _rest(self) -> None:
        """Sleeps for the CPU time used since the last rest, so the job takes at most
        ``BACKGROUND_SHARE`` of a core."""
        used = time.thread_time() - self._cpu_mark
        self._rest_owed += used * (1 / BACKGROUND_SHARE - 1)
        if self._rest_owed >= MIN_REST:
            time.sleep(self._rest_owed)
            self._rest_owed = 0.0
        self._cpu_mark = time.thread_time()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _run_as_batch() -> None:
    """Puts the calling thread under ``SCHED_BATCH`` (Linux; no privilege needed): the same CPU
    share, but it never preempts a thread that wakes up. Not a lower nice value: the job holds
    the interpreter lock between its blocking calls, and a thread the OS runs less often holds
    it for longer, with the tick thread waiting."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere the call names the whole process, not this thread
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        pass  # not allowed here: the job runs under the node's policy


class _Cancelled(Exception):
    pass


class Snapshotter:
    """Stands in for ``pysyncobj.serializer.Serializer``; every method runs on the tick thread."""

    def __init__(self, path: str, batch_size: int, sm: Restorable, counters: Counter[str],
                 dump_meta: Callable[[RaftMeta], dict[str, Any]],
                 raft_meta: Callable[[dict[str, Any]], RaftMeta],
                 on_fatal: Callable[[str], None], keepalive: Callable[[], None],
                 my_turn: Callable[[int, Any], bool] = lambda index, cluster: True) -> None:
        self._path = path
        self._tmp = path + ".tmp"
        self._incoming_tmp = path + ".1.tmp"
        self._batch_size = batch_size
        self._sm = sm
        self._counters = counters
        self._dump_meta = dump_meta
        self._raft_meta = raft_meta
        self._on_fatal = on_fatal
        self._keepalive = keepalive
        self._my_turn = my_turn
        """(index, members) -> whether to start now (``kvstore.node.snapshot_turns``)."""
        self._forced = False
        self._kept_alive = 0.0
        self._writing: _Job | None = None
        self._writing_id: Any = None
        self._restoring: _Job | None = None
        self._restoring_index: Any = None
        self._transmissions: dict[Any, dict[str, Any]] = {}
        self._incoming: BinaryIO | None = None
        self._pacer: SendPacer | None = None
        self.gate = TickGate()
        self.fsync_dir_pending = False
        self.last_write_seconds = 0.0
        self.last_freeze_seconds = 0.0
        self.last_restore_seconds = 0.0

    def attach(self, pacer: SendPacer) -> None:
        """Holds the dump's sending to the leader's send budget (``kvstore.node.send_pacing``)."""
        self._pacer = pacer

    # -- what the node asks ---------------------------------------------------------------

    @property
    def sending(self) -> bool:
        return bool(self._transmissions)

    @property
    def restoring(self) -> bool:
        """A snapshot is being decoded: applying must wait until it is swapped in."""
        return self._restoring is not None

    @property
    def writes_to_disk(self) -> bool:
        """A snapshot is being written or received here (a sync now may wait behind it)."""
        return self._writing is not None or self._incoming is not None

    def activity(self) -> list[str]:
        """What is in progress, for the node's status."""
        doing = []
        if self._writing is not None:
            doing.append("writing")
        if self._incoming is not None:
            doing.append("receiving")
        if self._restoring is not None:
            doing.append("restoring")
        doing += [f"sending:{node}" for node in self._transmissions]  # a node's str is its address
        return doing

    def on_tick(self) -> None:
        """Swaps a finished restore in. Called on every tick, before applying."""
        job = self._restoring
        if job is None or not job.done:
            return
        self._restoring = None
        if job.error is not None:
            self._on_fatal(f"snapshot load failed: {type(job.error).__name__}: {job.error}")
            return
        replaced = self._sm.install(job.result).data
        self.last_restore_seconds = time.monotonic() - job.started
        self._counters["snapshots_loaded"] += 1
        log.info("snapshot loaded: index %s, restored in the background in %.2f s",
                 self._restoring_index, self.last_restore_seconds)
        # Not here: 1M keys take tens of milliseconds to free.
        _Job("snapshot-release", lambda job: job.let_go(release_of(replaced)), self.gate)

    def stop(self, timeout: float = 2.0) -> None:
        for job in (self._writing, self._restoring):
            if job is not None:
                job.cancelled.set()
                job.join(timeout)
        self._close_transmissions()
        if self._incoming is not None:
            self._incoming.close()
            self._incoming = None

    # -- PySyncObj's Serializer interface: taking a snapshot -----------------------------

    def force(self) -> None:
        """The next snapshot PySyncObj asks for starts whoever's turn it is (a backup waits)."""
        self._forced = True

    def serialize(self, data: tuple[Any, Any, Any, Any], snapshot_id: Any) -> None:
        """PySyncObj asks for a dump at the last applied entry (``data[1]``). Declined, it asks
        again at its next pass."""
        if self._writing is not None or self._restoring is not None:
            return  # one at a time; and a state being restored is not the state at that index
        _, last, prev, cluster = data
        if not self._forced and not self._my_turn(last[1], cluster):
            return  # another member's turn (kvstore.node.snapshot_turns)
        self._forced = False
        meta = self._dump_meta((last, prev, cluster))
        started = time.monotonic()
        frozen = self._sm.freeze()
        self.last_freeze_seconds = time.monotonic() - started
        self._writing_id = snapshot_id
        self._writing = _Job("snapshot-writer", lambda job: self._write(job, frozen, meta),
                             self.gate)

    def _write(self, job: _Job, frozen: snapshot.Frozen, meta: dict[str, Any]) -> str:
        writer = dump_file.Writer(self._tmp)
        try:
            for piece in snapshot.encode_pieces(frozen):
                if piece:
                    writer.write(piece)
                job.pause()
            return writer.finish(meta)
        except BaseException:
            writer.abort()
            raise
        finally:  # here, in steps, not on the tick thread when it drops the finished job
            job.let_go(frozen.data.release())

    def checkSerializing(self) -> tuple[int, Any]:  # noqa: N802 - PySyncObj's name
        job = self._writing
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if not job.done:
            return SERIALIZER_STATE.SERIALIZING, self._writing_id
        if job.error is None and not job.cancelled.is_set() and self._transmissions:
            # A follower is being sent the dump in place, and needs the log entries that follow
            # it: the new dump (and the compaction it allows) waits until it has it all.
            return SERIALIZER_STATE.SERIALIZING, self._writing_id
        self._writing = None
        if job.error is not None or job.cancelled.is_set():
            if not isinstance(job.error, _Cancelled | None):
                log.error("snapshot write failed: %s: %s", type(job.error).__name__, job.error)
            self._remove(self._tmp)
            return SERIALIZER_STATE.FAILED, self._writing_id
        os.replace(self._tmp, self._path)
        self.fsync_dir_pending = True
        self.last_write_seconds = time.monotonic() - job.started
        self._counters["snapshots_written"] += 1
        log.info("snapshot at index %s written in %.2f s (frozen in %.0f ms), digest %s",
                 self._writing_id, self.last_write_seconds, self.last_freeze_seconds * 1e3,
                 job.result)
        return SERIALIZER_STATE.SUCCESS, self._writing_id

    # -- installing one ---------------------------------------------------------------------

    def deserialize(self) -> tuple[None, Any, Any, Any]:
        """The dump's Raft meta at once; its state follows on the restorer thread. If this
        raises, PySyncObj only logs it and goes on from its journal with a wrong state, so
        the node is stopped first (``on_fatal``)."""
        try:
            # The restorer reads this very file (open), whatever is renamed over the path later.
            f = open(self._path, "rb")
            try:
                last, prev, cluster = self._raft_meta(dump_file.read_meta(f, self._path))
            except BaseException:
                f.close()
                raise
        except Exception as exc:
            self._on_fatal(f"snapshot load failed: {type(exc).__name__}: {exc}")
            raise
        for job in (self._writing, self._restoring):
            if job is not None:
                job.cancelled.set()  # a dump of an older state must not replace this one
        self._restoring_index = last[1]
        self._restoring = _Job("snapshot-restorer", lambda job: self._restore(job, f),
                               self.gate)
        log.info("restoring the snapshot at index %s in the background", last[1])
        return None, last, prev, cluster

    def _restore(self, job: _Job, f: BinaryIO) -> snapshot.State:
        with f:
            dump = dump_file.read_open(f, self._path)  # checksum and digest verified
        job.pause()
        steps = snapshot.decode_steps(dump.snapshot)
        del dump
        while True:
            try:
                next(steps)
            except StopIteration as decoded:
                state: snapshot.State = decoded.value
                break
            job.pause()
        if state.cluster_id != self._sm.cluster_id:
            raise snapshot.SnapshotError(
                f"snapshot of cluster {state.cluster_id}, this is {self._sm.cluster_id}")
        return state

    # -- streaming the dump to a follower, and receiving one --------------------------------

    def getTransmissionData(self, node: Any) -> tuple[bytes, bool, bool] | None | bool:  # noqa: N802
        """The next batch of the dump for ``node``; None once this pass's budget is spent."""
        if self._pacer is not None and self._pacer.spent_for(node):
            self._pacer.park(node)  # ends PySyncObj's loop for it (``sendingSerialized`` too)
            return None
        transmission = self._transmissions.get(node)
        if transmission is None:
            if self._writing is not None and self._writing.done:
                return None  # a newer dump is waiting to be put in place: send that one
            try:
                transmission = {"file": open(self._path, "rb"), "sent": 0}
            except OSError:
                log.exception("cannot open the dump to send it")
                return None
            transmission["started"] = time.monotonic()
            self._transmissions[node] = transmission
            self._counters["snapshots_sent_started"] += 1
            log.info("sending the dump to %s", node)
        try:
            data = transmission["file"].read(self._batch_size)
        except OSError:
            log.exception("cannot read the dump to send it")
            self.cancelTransmisstion(node)
            return False
        first = transmission["sent"] == 0
        transmission["sent"] += len(data)
        last = not data
        if last:
            log.info("sent the dump to %s (%d bytes) in %.1f s", node, transmission["sent"],
                     time.monotonic() - transmission["started"])
            self.cancelTransmisstion(node)
            self._counters["snapshots_sent"] += 1
        return data, first, last

    def cancelTransmisstion(self, node: Any) -> None:  # noqa: N802 - PySyncObj's spelling
        transmission = self._transmissions.pop(node, None)
        if transmission is not None:
            transmission["file"].close()

    def setTransmissionData(self, data: tuple[bytes, bool, bool] | None) -> bool:  # noqa: N802
        """Stores a piece of a dump sent by the leader; True once the whole file is in place."""
        if not data:
            return False
        piece, first, last = data
        if first:
            log.info("receiving a dump from the leader")
            if self._incoming is not None:
                self._incoming.close()
            try:
                self._incoming = open(self._incoming_tmp, "wb")
            except OSError:
                log.exception("cannot open a file for the incoming dump")
                self._incoming = None
                return False
        if self._incoming is None:
            return False
        now = time.monotonic()
        if now - self._kept_alive >= KEEPALIVE_EVERY:
            self._kept_alive = now
            self._keepalive()
        try:
            self._incoming.write(piece)
            if not last:
                return False
            self._incoming.close()
            self._incoming = None
            os.replace(self._incoming_tmp, self._path)
        except OSError:
            log.exception("cannot store the incoming dump")
            self._incoming = None
            return False
        self.fsync_dir_pending = True
        self._counters["snapshots_received"] += 1
        return True

    # -- helpers ----------------------------------------------------------------------------

    def _close_transmissions(self) -> None:
        for node in list(self._transmissions):
            self.cancelTransmisstion(node)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def digest_of(frozen: snapshot.Frozen, gate: TickGate) -> str:
    """The state digest of a frozen state, computed piece by piece in the tick thread's idle
    time (on any thread but the tick thread)."""
    sha = hashlib.sha256()
    with SWITCHING:
        for piece in snapshot.encode_pieces(frozen):
            sha.update(piece)
            gate.wait()
        for _ in frozen.data.release():  # in steps, as a written snapshot's
            gate.wait()
    return dump_file.state_digest(sha)
