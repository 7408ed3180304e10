"""One Raft replica: PySyncObj 0.3.17 driving a pure state machine, with its defects fenced.

This is the only module (with its siblings in ``kvstore.node``) that knows PySyncObj. What it
does about each defect of ``shared/reference/pysyncobj-0.3.17.md``:

* D1 (the raft port unpickles before authenticating): a ``password`` is mandatory, and every
  peer message is sealed with AES-GCM under a key derived from it (``kvstore.node.wire_crypto``,
  cheaper than PySyncObj's Fernet); a message that does not open is never unpickled.
* D2 (binds 0.0.0.0): ``bindAddress`` is always the node's own address.
* D3, D9, D10, D12 (persistence: a journal never fsynced, a meta file renamed without fsync, an
  empty journal that cannot be opened, a tail dropped after a snapshot): PySyncObj's journal is
  replaced by ours (``kvstore.node.journal``, ``meta_file``), checked and repaired before start
  (``kvstore.node.recovery``); in durable mode (the default) entries are synced before they are
  acknowledged (``kvstore.node.durable``). Our dump file and its directory are fsynced.
* D4 (journal without dump loses everything): both, always.
* D5 (an apply that raises wedges the node): the state machine never raises; if it ever does,
  the node stops itself and reports it rather than run on with a state that may differ.
* D6 (needless truncation under pipelining): ``kvstore.node.d6_fence``.
* D7 (a late forked dump empties a journal): no fork; our own serializer.
* D11 (snapshots serialized on the tick thread stall it for seconds): ``kvstore.node.snapshotter``
  takes and installs snapshots on threads of its own; the tick thread only freezes a copy and
  swaps a restored state in.
* D15 (a leader sends a follower that is behind batches for up to 50 ms in one pass):
  ``kvstore.node.send_pacing`` holds the send step to a budget per pass.
* D8 (100 ms timers): ``kvstore.node.timers``; we drive the tick loop ourselves.
* zlib on every peer message, however small: ``kvstore.node.lean_wire`` sends small ones
  uncompressed to peers that read them.
* M1-M7 (PySyncObj's dynamic membership): ``kvstore.node.membership``; its own is off.

Exactly one method is replicated, and it takes the entry as bytes: the log carries our protobuf
entries, never pickled Python objects of ours.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjException, replicated
from pysyncobj.node import TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE

from kvstore import snapshot
from kvstore.entry import encode_batch
from kvstore.node import (
    d6_fence,
    dial,
    dump_file,
    durable,
    journal_hook,
    lean_wire,
    membership,
    recovery,
    snapshot_turns,
)
from kvstore.node.append_rounds import round_open
from kvstore.node.internals import Internals
from kvstore.node.journal import Journal, JournalFailed
from kvstore.node.member_table import MemberInfo, Role, Table, bootstrap
from kvstore.node.outcomes import (
    BatchCallback,
    LoopWaiter,
    NotApplied,
    OutcomeUnknown,
    Pending,
    Waiter,
    outcome,
)
from kvstore.node.send_pacing import SendPacer
from kvstore.node.snapshotter import RaftMeta, Snapshotter
from kvstore.node.sync_thread import SyncThread
from kvstore.node.timers import SHIPPED, TimerProfile
from kvstore.node.wire_crypto import WireCrypto

log = logging.getLogger("kvstore.node")

MAX_BATCH_ENTRIES = 1024
MAX_BATCH_BYTES = 4 * 1024 * 1024
"""Limits of one replicated batch; what does not fit goes out in the next one, same tick."""
MAX_APPLY_PER_PASS = 64
"""Committed entries (each a batch of proposals) applied per pass of the tick loop."""
TRANSMISSION_BATCH_BYTES = 256 * 1024
"""Bytes of a dump per message when a leader sends it to a follower (PySyncObj: 64 KiB)."""

T = TypeVar("T")


class Replicated(Protocol):
    """What the node needs of the state machine (``kvstore.StateMachine`` fits)."""

    cluster_id: int

    def apply_batch(self, batch: bytes) -> list[bytes]: ...
    def freeze(self) -> snapshot.Frozen: ...
    def restore(self, data: bytes) -> None: ...
    def install(self, state: snapshot.State) -> snapshot.State: ...


@dataclass(frozen=True)
class RaftOptions:
    self_address: str
    """host:port of the raft port; peers know this node by it."""
    peers: tuple[str, ...]
    data_dir: str
    password: str
    profile: TimerProfile = SHIPPED
    log_compaction_min_entries: int = 5000
    log_compaction_min_time: float = 300.0
    d6_fence: bool = True
    dial_via: Mapping[str, str] = field(default_factory=dict)
    """Peer raft address -> host:port to connect to instead (a fault proxy: ``kvstore.node.dial``)."""
    fsync: bool = True
    """Make the journal durable before acknowledging entries (``kvstore.node.durable``)."""
    members: Table | None = None
    """The bootstrap member table, used only while neither the log nor a snapshot holds one
    (default: ``self_address`` and ``peers``, all voters, without names or API addresses)."""
    membership_fence: bool = True
    """Our membership (``kvstore.node.membership``). False: PySyncObj's own dynamic
    membership instead, with its defects (for the regression tests only)."""
    lean_wire: bool = True
    """Small Raft messages go uncompressed to peers that read them (``kvstore.node.lean_wire``).
    False: PySyncObj's zlib on every message (a control for benchmarks and the tests)."""
    background_snapshots: bool = True
    """Take and install snapshots off the tick thread (``kvstore.node.snapshotter``). False
    does both on the tick thread, as PySyncObj calls them: a control for benchmarks and tests."""
    quick_syncs_inline: bool = True
    """While the disk is quick, a follower makes the sync its acknowledgement waits for on its
    tick thread (``kvstore.node.quick_disk``). False: always on the sync thread (the tests of
    that thread's holding, and a control for benchmarks)."""
    one_round_in_flight: bool = True
    """A leader's new proposals wait while its last entry is on no majority yet, then leave as
    one batch (``kvstore.node.append_rounds``). False: each pass appends what is waiting (a
    control for benchmarks, and the tests that append while a round is open)."""

    def bootstrap_table(self) -> Table:
        if self.members is not None:
            return self.members
        me = MemberInfo("", self.self_address, "", Role.VOTER)
        return bootstrap(me, [MemberInfo("", p, "", Role.VOTER) for p in self.peers
                              if p != self.self_address])


def dump_meta(raft_meta: RaftMeta) -> dict[str, Any]:
    """PySyncObj's (last entry, previous entry, members) as the JSON of a dump's meta (no
    pickles in our files)."""
    last, prev, cluster = raft_meta
    return {
        "last": [last[0].hex(), last[1], last[2]],
        "prev": [prev[0].hex(), prev[1], prev[2]],
        "cluster": sorted(n.address if hasattr(n, "address") else str(n) for n in cluster),
    }


def raft_meta_of(meta: dict[str, Any]) -> RaftMeta:
    """The other way round."""
    last = (bytes.fromhex(meta["last"][0]), meta["last"][1], meta["last"][2])
    prev = (bytes.fromhex(meta["prev"][0]), meta["prev"][1], meta["prev"][2])
    return last, prev, {TCPNode(address) for address in meta["cluster"]}


def _check_bindable(address: str) -> None:
    """Fails at once, in one line, when the Raft port is taken. PySyncObj would retry for
    seconds, log a traceback and raise a bare ``BindError``."""
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PySyncObj binds
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise OSError(f"cannot listen on {address} (the Raft port): "
                          f"{exc.strerror or exc}") from None


def may_wait(queued: bool, commit_index: int, last_applied: int, restoring: bool) -> bool:
    """Whether the coming pass of the tick loop may end waiting in ``poll()`` for a message.

    Not if a command is still queued inside PySyncObj: it is appended at the end of the pass
    and must be shipped by the next one at once. Not if the pass cannot apply everything that
    is committed (it applies at most ``MAX_APPLY_PER_PASS``): the rest would wait for the next
    message. Otherwise it may: the pass applies every committed entry before it polls. (A
    follower learns a new commit index from a message, so at the start of the next pass it is
    nearly always a little behind; not waiting then cost each follower a second, empty pass
    per write.) While a snapshot is restored nothing is applied, so it may wait.
    """
    if queued:
        return False
    return restoring or commit_index - last_applied <= MAX_APPLY_PER_PASS


class RaftNode(SyncObj):
    """One replica. Call ``propose`` from any thread but the tick thread; ``stop`` at the end.

    All our attributes exist before ``SyncObj.__init__``: PySyncObj's default serializer pickles
    every attribute created after it, and the tick thread may start inside it.
    """

    def __init__(self, sm: Replicated, options: RaftOptions) -> None:
        if not options.password:
            raise ValueError("a cluster secret is required (D1: the raft port unpickles its input)")
        _check_bindable(options.self_address)
        os.makedirs(options.data_dir, exist_ok=True)
        profile = options.profile
        self._n_sm = sm
        self._n_options = options
        self._n_fatal: str | None = None
        self._n_tick_thread_id: int | None = None
        self._n_stopping = threading.Event()
        self._n_thread: threading.Thread | None = None
        self._n_tick_tasks: list[tuple[Future[Any], Callable[[], Any]]] = []
        self._n_tick_tasks_lock = threading.Lock()
        self._n_wake_r, self._n_wake_w = os.pipe()
        os.set_blocking(self._n_wake_r, False)
        os.set_blocking(self._n_wake_w, False)
        self._n_wake_pending = False
        self._n_waiting: deque[tuple[bytes, Waiter]] = deque()
        self.counters: Counter[str] = Counter()
        self._n_on_tick_hooks: list[Callable[[], None]] = []
        self._n_sync_before_commit: Callable[[], None] | None = None
        self._n_sync_thread: SyncThread | None = None
        self._n_crypto = WireCrypto(options.password)
        self._n_hold_proposals = False
        self._n_round_open = False
        """Set by the tick thread at the start of each pass (``append_rounds``): proposals
        submitted meanwhile need no wake-up, the acknowledgement that closes the round is one."""
        self.membership: membership.Membership | None = None
        self._n_journal = recovery.prepare(options.data_dir)  # CannotRestart: one line
        self._n_journal.on_failure = self._n_fail_stop
        journal_path = os.path.join(options.data_dir, recovery.JOURNAL)
        dump_path = os.path.join(options.data_dir, dump_file.FILE_NAME)
        self._n_snapshotter = Snapshotter(dump_path, TRANSMISSION_BATCH_BYTES, sm, self.counters,
                                          self._n_dump_meta, self._n_raft_meta, self._n_set_fatal,
                                          self._n_keepalive, my_turn=self._n_my_turn)
        conf = SyncObjConf(
            password=options.password,
            bindAddress=options.self_address,
            journalFile=journal_path,
            fullDumpFile=dump_path,
            serializer=self._n_serialize,
            deserializer=self._n_deserialize,
            logCompactionBatchSize=TRANSMISSION_BATCH_BYTES,
            autoTick=not profile.driven,
            **profile.syncobj_settings(),
            logCompactionMinEntries=options.log_compaction_min_entries,
            logCompactionMinTime=options.log_compaction_min_time,
            # Without autoTick, binding happens in __init__, retrying forever when the port is
            # taken (0 means forever): bound it.
            maxBindRetries=5 if profile.driven else 0,
            dynamicMembershipChange=not options.membership_fence,
        )
        if options.membership_fence:
            table = options.bootstrap_table()
            others = sorted((table.voters | table.receivers) - {options.self_address})
            peers = [dial.node(a, options.dial_via) for a in sorted(table.voters - {
                options.self_address})]
        else:
            others = [p for p in options.peers if p != options.self_address]
            peers = dial.peer_nodes(others, options.dial_via)
        try:
            with journal_hook.providing(journal_path, self._n_journal):
                super().__init__(options.self_address, peers, conf)
        except SyncObjException as exc:  # taken between our check and PySyncObj's bind
            raise OSError(f"cannot listen on {options.self_address} (the Raft port): "
                          f"{exc.errorCode}") from None
        # After SyncObj.__init__: wiring only, no new attributes.
        self.internals = Internals(self)
        if self.internals.raft_log is not self._n_journal:
            raise RuntimeError("PySyncObj did not take our journal (kvstore.node.journal_hook)")
        pacer = SendPacer(self.internals.next_index, self.internals.raft_log)
        self.internals.wrap_send(pacer.step)
        if options.background_snapshots:
            self._n_snapshotter.attach(pacer)
            self.internals.use_serializer(self._n_snapshotter)
            self.internals.wrap_apply(self._n_apply_unless_restoring)
        self._poller.subscribe(self._n_wake_r, self._n_on_wake, POLL_EVENT_TYPE.READ)
        self.addOnTickCallback(self._n_on_tick)
        if options.lean_wire:
            lean_wire.install(self.internals, self.counters)
        if options.d6_fence:
            d6_fence.install(self, self.internals, self.counters)
        if options.membership_fence:
            self.membership = membership.install(
                self, self.internals, self.counters, self_address=options.self_address,
                bootstrap=options.bootstrap_table(), dial_via=options.dial_via,
                hold=self._n_hold, on_fatal=self._n_fail)
            self.add_tick_hook(self.membership.on_tick)
        if options.fsync:
            snapshotter = self._n_snapshotter
            sync, self._n_sync_thread = durable.install(
                self, self.internals, self.counters, alone=not others, wake=self._n_wake,
                disk_busy=(lambda: snapshotter.writes_to_disk)
                if options.quick_syncs_inline else None)
            self.add_tick_hook(sync)
            if not others:  # a lone leader commits as soon as it ticks: sync before that
                self._n_sync_before_commit = sync
        # Last: it paces what the durable mode's send (above) lets through.
        self.internals.transport.send = pacer.wrap(self.internals.transport.send)
        if profile.driven:
            self._n_thread = threading.Thread(target=self._n_drive, daemon=True,
                                              name=f"raft-tick-{options.self_address}")
            self._n_thread.start()

    @property
    def encryptor(self) -> WireCrypto:
        """What PySyncObj's transport seals and opens peer messages with (instead of Fernet)."""
        return self._n_crypto

    # -- the one replicated method --------------------------------------------------------

    @replicated
    def _n_apply_batch(self, batch: bytes) -> list[bytes]:
        """Runs on every replica, in log order, on the tick thread: one batch of entries."""
        try:
            return self._n_sm.apply_batch(batch)
        except BaseException as exc:
            # D5: raising wedges PySyncObj on this entry for good, and returning something
            # else could make this replica differ (the failure may be local, a MemoryError).
            # Fail-stop: record it, stop ticking, let status and propose report it.
            self._n_fatal = f"state machine apply raised {type(exc).__name__}: {exc}"
            log.critical(self._n_fatal)
            self._n_stopping.set()
            raise

    # -- proposing ------------------------------------------------------------------------

    def submit(self, entry: bytes, waiter: Waiter) -> None:
        """Queues ``entry`` for replication; ``waiter(result, fail_reason)`` is called once, on
        the tick thread, when its fate is known (``outcomes.outcome`` turns that into bytes or
        an exception). Never blocks.

        With the driven tick loop, the entry waits for the next pass of the loop, which sends
        everything that is waiting as one replicated batch (group commit): the per-entry costs
        of PySyncObj (a command, a callback, a log record) are paid once per batch.
        """
        if self._n_fatal:
            raise NotApplied("NODE_FAILED", self._n_fatal)
        if self._n_options.profile.driven:
            self._n_waiting.append((bytes(entry), waiter))
            if not self._n_round_open:  # read after the append: see _n_drive
                self._n_wake()
        else:
            self._n_apply_batch(encode_batch([bytes(entry)]), callback=BatchCallback([waiter]))

    def submit_many(self, entries: list[bytes], waiters: list[Waiter]) -> None:
        """``submit`` for several entries at once (a client's ``ProposeBatch``): queued together
        with one wake-up, so the tick loop's next pass replicates them in one batch."""
        if self._n_fatal:
            raise NotApplied("NODE_FAILED", self._n_fatal)
        if not self._n_options.profile.driven:
            for entry, waiter in zip(entries, waiters, strict=True):
                self.submit(entry, waiter)
            return
        queued = [(bytes(entry), waiter) for entry, waiter in zip(entries, waiters, strict=True)]
        self._n_waiting.extend(queued)  # one C call: the tick thread sees all or none
        if not self._n_round_open:  # read after the append: see _n_drive
            self._n_wake()

    def propose(self, entry: bytes, timeout: float) -> bytes:
        """Replicates ``entry`` and returns the state machine's result, blocking this thread.

        Raises ``NotApplied`` (safe to retry) or ``OutcomeUnknown`` (may be applied; includes
        our own deadline, since PySyncObj's asynchronous calls cannot be cancelled).
        """
        if threading.get_ident() == self._n_tick_thread_id:
            raise RuntimeError("propose() on the tick thread would deadlock")
        pending = Pending()
        self.submit(entry, pending)
        if not pending.event.wait(timeout):
            raise OutcomeUnknown("TIMEOUT", f"no outcome within {timeout:.3f}s")
        return pending.outcome()

    async def propose_async(self, entry: bytes, timeout: float) -> bytes:
        """``propose`` for an asyncio task: waits without holding a thread."""
        loop = asyncio.get_running_loop()
        waiter = LoopWaiter(loop)
        self.submit(entry, waiter)
        # Our deadline: a timer that cancels the future (lighter than asyncio.wait_for).
        expiry = loop.call_later(timeout, waiter.future.cancel)
        try:
            result, error = await waiter.future
        except asyncio.CancelledError:
            if expiry.when() <= loop.time():  # our deadline, not a cancelled RPC
                raise OutcomeUnknown("TIMEOUT", f"no outcome within {timeout:.3f}s") from None
            raise
        finally:
            expiry.cancel()
        return outcome(result, error)

    def _n_send_waiting(self) -> None:
        """On the tick thread: turns the waiting proposals into replicated batches."""
        if self._n_hold_proposals and self._isLeader():
            return  # a leader handing over (kvstore.node.membership): they wait, then fail
        while self._n_waiting:
            entries: list[bytes] = []
            waiters: list[Waiter] = []
            size = 0
            while self._n_waiting and len(entries) < MAX_BATCH_ENTRIES and size < MAX_BATCH_BYTES:
                entry, pending = self._n_waiting.popleft()
                entries.append(entry)
                waiters.append(pending)
                size += len(entry)
            if not self._isLeader():
                # Never appended anywhere: certainly not applied (one wake-up per event loop).
                BatchCallback(waiters)(None, FAIL_REASON.NOT_LEADER)
                continue
            self._n_apply_batch(encode_batch(entries), callback=BatchCallback(waiters))
            self.counters["batches"] += 1
            self.counters["batched_entries"] += len(entries)

    def on_tick_thread(self, task: Callable[[], T], timeout: float) -> T:
        """Runs ``task`` on the tick thread, between applies, and returns its result.

        This is how other threads read the state machine consistently without a lock on the
        apply path. Raises ``TimeoutError`` if the tick thread does not get to it in time.
        """
        future: Future[T] = Future()
        with self._n_tick_tasks_lock:
            self._n_tick_tasks.append((future, task))
        self._n_wake()
        return future.result(timeout)

    # -- state ----------------------------------------------------------------------------

    @property
    def fatal(self) -> str | None:
        return self._n_fatal

    @property
    def dump_path(self) -> str:
        """The snapshot file (``kvstore.node.dump_file``); PySyncObj replaces it atomically."""
        return os.path.join(self._n_options.data_dir, dump_file.FILE_NAME)
    def _n_hold(self, hold: bool) -> None:
        self._n_hold_proposals = hold
        self._n_wake()

    def _n_fail(self, reason: str) -> None:
        """Fail-stop (as for D5): record it, stop ticking; status and propose report it."""
        self._n_fatal = reason
        log.critical(reason)
        self._n_stopping.set()

    def add_tick_hook(self, hook: Callable[[], None]) -> None:
        """Runs ``hook`` on every tick (on the tick thread); keep it cheap."""
        self._n_on_tick_hooks.append(hook)

    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return leader.address if leader is not None else None

    def is_leader(self) -> bool:
        return bool(self._isLeader())

    @property
    def snapshot_activity(self) -> list[str]:
        """What is in progress: writing, sending:<peer>, receiving, restoring (empty: nothing)."""
        return self._n_snapshotter.activity()

    @property
    def journal(self) -> Journal:
        """The node's Raft log on disk (``kvstore.node.journal``)."""
        return self._n_journal

    @property
    def snapshotter(self) -> Snapshotter:
        return self._n_snapshotter

    @property
    def restoring(self) -> bool:
        """A snapshot is being restored: the state machine is not yet at ``raftLastApplied``."""
        return self._n_snapshotter.restoring

    def stop(self, timeout: float = 5.0) -> None:
        """Stops ticking and closes sockets; the journal is synced and closed on destroy."""
        if self._n_options.profile.driven:
            self._n_stopping.set()
            self._n_wake()
            if self._n_thread is not None:
                self._n_thread.join(timeout)
        else:
            self.destroy()
        self._n_snapshotter.stop()
        if self._n_sync_thread is not None:
            self._n_sync_thread.stop()
        for fd in (self._n_wake_r, self._n_wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the tick loop ----------------------------------------------------------------------

    def _n_drive(self) -> None:
        """Our tick loop: group commit without waiting for ``appendEntriesPeriod``.

        Each pass turns the waiting proposals into a batch, appends it to the log at once
        (PySyncObj would append it at the end of the tick, after the send step, and ship it
        one tick later), and makes this tick send it. A new commit index alone does not
        trigger a send: followers learn it from the next append or heartbeat, and nobody waits
        for that (a client's answer comes from the leader's apply). That halves the messages
        per write at low load.
        """
        idle = self._n_options.profile.tick_period
        internals = self.internals
        sent = -1
        gate = self._n_snapshotter.gate
        while not self._n_stopping.is_set():
            gate.pass_starts()  # background snapshot work waits (kvstore.node.snapshotter)
            try:
                # The flag first, then the queue; submit appends, then reads the flag. So a
                # proposal that skipped its wake-up is seen by this pass or waits for the round
                # in flight, whose acknowledgement wakes this thread.
                self._n_round_open = self._n_leader_round_open()
                if self._n_waiting and not self._n_round_open:
                    self._n_send_waiting()
                    self._checkCommandsToApply()
                if self._isLeader():
                    last = internals.raft_log[-1][1]
                    if last != sent or self._n_snapshotter.sending:
                        internals.force_append()  # a snapshot being sent goes out every pass
                        sent = last
                if self._n_sync_before_commit is not None:
                    self._n_sync_before_commit()
                waits = may_wait(bool(internals.queue), self.raftCommitIndex,
                                 self.raftLastApplied, self._n_snapshotter.restoring)
                self.doTick(idle if waits else 0.0)
                if self._n_sync_thread is not None:
                    # What the sync thread finished while the tick thread waited leaves now,
                    # not after the next pass's apply and hooks.
                    self._n_sync_thread.release()
            except JournalFailed:
                break  # fail-stop: the journal has said why (status: fatal)
            except Exception:
                self.counters["tick_exceptions"] += 1
                log.exception("tick failed")
                time.sleep(idle)
        try:
            self._doDestroy()
        except Exception:
            log.exception("destroy failed")

    def _n_leader_round_open(self) -> bool:
        """``append_rounds``' rule: this node leads and its last entry is on no majority."""
        if not self._n_options.one_round_in_flight or not self._isLeader():
            return False
        internals = self.internals
        return round_open(internals.raft_log[-1][1], internals.match_index, internals.voters())

    def _n_wake(self) -> None:
        """Makes the tick thread's poll() return now. Never blocks."""
        if self._n_wake_pending:
            return
        self._n_wake_pending = True
        try:
            os.write(self._n_wake_w, b"w")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending) or closed (stopping)

    def _n_on_wake(self, fd: int, _event: int) -> None:
        # Drain first, then clear the flag: the other order loses wake-ups for good.
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        self._n_wake_pending = False

    def _n_on_tick(self) -> None:
        """PySyncObj's per-tick callback, on the tick thread: bookkeeping only."""
        self._n_tick_thread_id = threading.get_ident()
        self.counters["ticks"] += 1
        if self._n_snapshotter.fsync_dir_pending:
            self._n_snapshotter.fsync_dir_pending = False
            if self._n_sync_thread is not None:
                self._n_sync_thread.fsync_directory_later(self._n_options.data_dir)
            else:
                try:
                    dump_file.fsync_directory(self._n_options.data_dir)
                except OSError:
                    log.exception("fsync of the data directory failed")
        with self._n_tick_tasks_lock:
            tasks, self._n_tick_tasks = self._n_tick_tasks, []
        for future, task in tasks:
            try:
                future.set_result(task())
            except Exception as exc:
                future.set_exception(exc)
        for hook in self._n_on_tick_hooks:
            hook()
        self._n_snapshotter.gate.pass_ends()  # the tick thread goes to wait in poll()

    def _n_fail_stop(self, reason: str) -> None:
        """The disk failed under the journal: stop ticking, report ``fatal``, refuse proposals."""
        self._n_fatal = f"disk failure: {reason}"
        self._n_stopping.set()

    # -- snapshots ------------------------------------------------------------------------

    def _n_apply_unless_restoring(self, apply: Callable[[], bool]) -> bool:
        """PySyncObj's apply step, held back while a restored state is not swapped in yet, and
        at most ``MAX_APPLY_PER_PASS`` entries per pass.

        PySyncObj applies every committed entry in one pass: a node that has just installed a
        snapshot (or restarted) and has thousands of entries to catch up on stalled its loop
        for seconds (1.7 s measured at 1M keys). The commit index PySyncObj's apply step reads
        is lowered for the call and put back at once; nothing else runs in between.
        """
        self._n_snapshotter.on_tick()
        if self._n_snapshotter.restoring:
            return False
        commit = self._SyncObj__raftCommitIndex
        capped = self.raftLastApplied + MAX_APPLY_PER_PASS
        if commit <= capped:
            return apply()
        self._SyncObj__raftCommitIndex = capped
        try:
            return apply()
        finally:
            self._SyncObj__raftCommitIndex = commit  # (the loop then polls without waiting)

    def _n_my_turn(self, index: int, cluster: Any) -> bool:
        """Whether this member may start a snapshot now (``kvstore.node.snapshot_turns``)."""
        return snapshot_turns.my_turn(index, self._n_options.log_compaction_min_entries,
                                      (getattr(n, "address", str(n)) for n in cluster),
                                      self._n_options.self_address, len(self._n_journal))

    def forceLogCompaction(self) -> None:  # noqa: N802 - PySyncObj's name
        """A snapshot now (a backup asks for one), whichever member's turn it is."""
        self._n_snapshotter.force()
        super().forceLogCompaction()

    def _n_keepalive(self) -> None:
        """Tells the leader this follower is there while it receives a dump: a ``next_node_idx``
        that neither succeeds nor resets changes nothing on the leader but the time of our last
        answer (and keeps PySyncObj from dropping the connection as silent)."""
        leader = self._getLeader()
        if leader is None or leader == self.selfNode:
            return
        self.internals.transport.send(leader, {
            "type": "next_node_idx", "next_node_idx": self.internals.raft_log[-1][1] + 1,
            "reset": False, "success": False,
        })

    def _n_set_fatal(self, reason: str) -> None:
        """A dump that does not load: status reports it and propose refuses."""
        self._n_fatal = reason
        log.critical(reason)

    def _n_dump_meta(self, raft_meta: RaftMeta) -> dict[str, Any]:
        """PySyncObj's bookkeeping for a dump at its index (on the tick thread), as JSON."""
        meta = dump_meta(raft_meta)
        if self.membership is not None:  # M3: the table as of this index, not the current one
            index = raft_meta[0][1]
            meta["cluster"] = self.membership.voters_at(index)
            meta["membership"] = self.membership.snapshot_meta(index)
        return meta

    def _n_raft_meta(self, meta: dict[str, Any]) -> RaftMeta:
        """A loaded dump's bookkeeping, for PySyncObj, which resets its log to it next."""
        if self.membership is not None:
            self.membership.on_snapshot_loaded(meta.get("membership"))
        return raft_meta_of(meta)

    # With background_snapshots=False, PySyncObj's own Serializer calls these two on the tick
    # thread (the control that shows what the snapshotter buys).

    def _n_serialize(self, path: str, raft_meta: RaftMeta) -> None:
        started = time.monotonic()
        writer = dump_file.Writer(path)
        for piece in snapshot.encode_pieces(self._n_sm.freeze()):
            writer.write(piece)
        digest = writer.finish(self._n_dump_meta(raft_meta))
        self._n_snapshotter.last_write_seconds = time.monotonic() - started
        self.counters["snapshots_written"] += 1
        self._n_snapshotter.fsync_dir_pending = True
        log.info("snapshot at index %d, digest %s", raft_meta[0][1], digest)

    def _n_deserialize(self, path: str) -> RaftMeta:
        """If this raises, PySyncObj only logs it and carries on from the compacted journal,
        with a wrong state; so we record a fatal error first."""
        started = time.monotonic()
        try:
            dump = dump_file.read(path)
            self._n_sm.restore(dump.snapshot)
        except Exception as exc:
            self._n_set_fatal(f"snapshot load failed: {type(exc).__name__}: {exc}")
            raise
        self._n_snapshotter.last_restore_seconds = time.monotonic() - started
        self.counters["snapshots_loaded"] += 1
        log.info("snapshot loaded: index %d, digest %s", dump.meta["last"][1], dump.meta["digest"])
        return self._n_raft_meta(dump.meta)
