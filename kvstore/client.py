"""The client library: sessions, proposals and reads against a cluster, retried safely.

The API mirrors dragonboat's NodeHost session calls (``sync_get_session``, ``sync_propose``,
``sync_close_session``, ``get_noop_session``); ``put``/``get``/``incr``... are conveniences on top.

The retry rule, which is the point of this project: when a proposal's outcome is unknown (a
timeout, a leader that lost its leadership, a connection dropped after the request left), the
client sends the *same* session again, same series id, until it gets an answer or the deadline
passes. The cluster applies it at most once and answers every copy with the same result. The
client never calls ``proposal_completed()`` for the caller: only the caller knows whether it
accepted the answer. A no-op session has no such protection, so its proposals are retried only
when they were certainly not applied.

The rules themselves (what each failure means, which endpoint next, when the deadline means
``OutcomeUnknown``) are ``kvstore.retry``'s, shared with the asyncio client (``kvstore.aio``);
this module adds the blocking I/O, and the requests both clients send.

A ``Client`` is safe to share between threads, and meant to be: gRPC channels are thread-safe,
the little state the client keeps (the leader it last saw, the pool of sessions of the
convenience methods) is behind a lock, and the proposals of threads sharing a client travel
together (``kvstore.batching``: a lone proposal goes out at once; those arriving while one is
in flight share the next batch), each batch a message on one ``ProposeStream`` call per node
(``kvstore.streams``; with ``streaming=False`` a ``Propose`` or ``ProposeBatch`` call). A
``Session`` is not: give each thread its own.

With ``tls`` (``kvstore.tls.ClientTLS``) every channel is mutual TLS. A node that refuses the
client's certificate closes the connection at the handshake, which looks like a node going
away; the client then asks ``kvstore.tls.explain_refusal`` and, if the credentials were the
reason, raises ``Unauthenticated`` at once rather than retrying until its deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, Literal, TypeVar

import grpc

from kvstore import commands, errors, ops, retry
from kvstore.batching import GroupCommit
from kvstore.config import ConfigError, split_address
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.proto.log_pb2 import Command, Result
from kvstore.streams import ProposalStream, Watchdog
from kvstore.tls import ClientTLS, explain_refusal, open_channel
from session.errors import ClusterMismatchError, SessionInvariantError
from session.session import Session, new_noop_session, new_session

Consistency = Literal["linearizable", "serializable"]

DEFAULT_TIMEOUT = 5.0

_CONSISTENCY = {"linearizable": api_pb2.LINEARIZABLE, "serializable": api_pb2.SERIALIZABLE}
_T = TypeVar("_T")


class Client:
    """A connection to a cluster through any of its nodes' API endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        dial_timeout: float = 2.0,
        cluster_id: int | None = None,
        tls: ClientTLS | None = None,
        batching: bool = True,
        streaming: bool = True,
    ) -> None:
        self.endpoints = checked_endpoints(endpoints)
        self.timeout = timeout
        self.dial_timeout = dial_timeout
        self._cluster_id = cluster_id
        self._tls = tls
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, api_pb2_grpc.KVStub]] = {}
        self._preferred = self.endpoints[0]
        self._pool: list[Session] = []
        self._batches = _Batches(self._stub, streaming=streaming) if batching else None

    # -- the cluster ------------------------------------------------------------------------

    @property
    def cluster_id(self) -> int:
        """The cluster's id, asked of the first node that answers (once)."""
        if self._cluster_id is None:
            self._cluster_id = self._discover_cluster_id()
        return self._cluster_id

    def status(self, endpoint: str, *, with_digest: bool = False,
               timeout: float | None = None) -> api_pb2.NodeStatus:
        """One node's status; raises ``Unavailable`` if it does not answer."""
        request = api_pb2.StatusRequest(with_digest=with_digest)
        timeout = timeout or self.dial_timeout
        try:
            return self._stub(endpoint).Status(request, timeout=timeout)
        except grpc.RpcError as exc:
            failure = failure_of(exc)
            if isinstance(failure.error, errors.AccessDenied):
                raise failure.error from exc
            reason = failure.tls_suspect and explain_refusal(
                endpoint, self._tls, max(min(timeout, self.dial_timeout), 0.1))
            if reason:
                raise errors.Unauthenticated(reason) from exc
            raise errors.Unavailable(f"{endpoint}: {_details(exc)}") from exc

    def snapshot(self, out: BinaryIO, *, timeout: float | None = None) -> int:
        """Writes a consistent snapshot of the whole state, taken by the leader, to ``out``
        (``kvstore.backup`` reads it); returns its size.

        The leader streams its snapshot file once one covers everything committed when it got
        the request. A follower answers with a leader hint, followed here; every new attempt
        starts ``out`` over.
        """
        request = api_pb2.SnapshotRequest(cluster_id=self.cluster_id)

        def stream(stub: api_pb2_grpc.KVStub, timeout: float) -> int:
            out.seek(0)
            out.truncate()
            size = 0
            for chunk in stub.Snapshot(request, timeout=timeout):
                out.write(chunk.data)
                size += len(chunk.data)
            return size

        # A backup changes nothing: every failure is safe to retry, and one attempt may take
        # all the time there is (a large state streams for a while).
        try:
            return self._call(stream, timeout, retry_unknown=True, cap_attempts=False)
        except (errors.OutcomeUnknown, errors.Unavailable) as exc:
            raise errors.Unavailable(f"no snapshot in time: {exc}") from exc

    # -- membership (etcd's MemberList/MemberAdd/MemberPromote/MemberRemove) -------------------

    def member_list(self, *, endpoint: str | None = None,
                    timeout: float | None = None) -> api_pb2.MemberListResponse:
        """The members as the leader sees them (with match indexes and connections), or as
        ``endpoint`` sees them (its local view, even when there is no leader)."""
        if endpoint is not None:
            request = api_pb2.MemberListRequest(local=True)
            try:
                return self._stub(endpoint).MemberList(request, timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                raise errors.Unavailable(f"{endpoint}: {_details(exc)}") from exc
        request = api_pb2.MemberListRequest()
        return self._call(lambda stub, t: stub.MemberList(request, timeout=t), timeout,
                          retry_unknown=True)

    def member_add(self, name: str, raft_address: str, api_address: str, *,
                   timeout: float | None = None) -> api_pb2.MemberListResponse:
        """Adds a learner (start its node with ``--join`` first: upstream issue #89). Returns
        once the change is committed. Raises ``MembershipRefused``, ``Unavailable`` (nothing
        changed) or ``OutcomeUnknown`` (see ``member_list``)."""
        request = api_pb2.MemberAddRequest(name=name, raft_address=raft_address,
                                           api_address=api_address)
        return self._call(lambda stub, t: stub.MemberAdd(request, timeout=t), timeout,
                          retry_unknown=False)

    def member_promote(self, raft_address: str, *,
                       timeout: float | None = None) -> api_pb2.MemberListResponse:
        """Makes a learner a voter; refused unless it is connected and caught up."""
        request = api_pb2.MemberRequest(raft_address=raft_address)
        return self._call(lambda stub, t: stub.MemberPromote(request, timeout=t), timeout,
                          retry_unknown=False)

    def member_remove(self, raft_address: str, *,
                      timeout: float | None = None) -> api_pb2.MemberListResponse:
        """Removes a member, the leader included (it hands over first; the retry at the new
        leader is automatic)."""
        request = api_pb2.MemberRequest(raft_address=raft_address)
        return self._call(lambda stub, t: stub.MemberRemove(request, timeout=t), timeout,
                          retry_unknown=False)

    # -- dragonboat's session API -----------------------------------------------------------

    def sync_get_session(self, timeout: float | None = None) -> Session:
        """Opens a new session on the cluster, ready for its first proposal."""
        session, request = register_request(self.cluster_id)
        self._call(lambda stub, t: stub.RegisterSession(request, timeout=t), timeout, retry_unknown=True)
        session.prepare_for_propose()
        return session

    def sync_close_session(self, session: Session, timeout: float | None = None) -> None:
        """Closes ``session`` on the cluster (retrying is safe: closing twice succeeds)."""
        request = closing_request(session, self.cluster_id)
        self._call(lambda stub, t: stub.UnregisterSession(request, timeout=t), timeout, retry_unknown=True)

    def get_noop_session(self) -> Session:
        """A session without deduplication: needs no registration, and a retry may apply twice."""
        return new_noop_session(self.cluster_id)

    def sync_propose(self, session: Session, command: Command, timeout: float | None = None) -> Result:
        """Proposes ``command`` with ``session`` and returns the state machine's result.

        On an ambiguous failure the same series id is retried until ``timeout``; then
        ``OutcomeUnknown`` is raised and the caller may retry with the same session later.
        The caller calls ``session.proposal_completed()`` once it has the answer.
        """
        request = proposal_request(session, command, self.cluster_id)
        if self._batches is None:
            return self._call(lambda stub, t: stub.Propose(request, timeout=t), timeout,
                              retry_unknown=not session.is_noop_session())
        batches = self._batches
        return self._retry(lambda endpoint, t: batches.propose(endpoint, request, t), timeout,
                           retry_unknown=not session.is_noop_session())

    # The same calls under the names of ``kvstore.aio.Client``, so code moves between the two.
    get_session = sync_get_session
    propose = sync_propose
    close_session = sync_close_session

    # -- reads ------------------------------------------------------------------------------

    def read(self, command: Command, *, consistency: Consistency = "linearizable",
             timeout: float | None = None) -> Result:
        """A get or range. Linearizable (default) goes through the leader's log; serializable
        asks one node's local replica and may be stale."""
        request = read_request(command, consistency, self.cluster_id)
        # A read changes nothing, so every failure is safe to retry.
        return self._call(lambda stub, t: stub.Read(request, timeout=t), timeout,
                          retry_unknown=True, any_node=consistency == "serializable")

    def get(self, key: bytes, *, consistency: Consistency = "linearizable",
            timeout: float | None = None) -> Result:
        return self.read(ops.get(key), consistency=consistency, timeout=timeout)

    def range(self, prefix: bytes, *, limit: int = 0, keys_only: bool = False,
              consistency: Consistency = "linearizable", timeout: float | None = None) -> Result:
        return self.read(ops.range_(prefix, limit=limit, keys_only=keys_only),
                         consistency=consistency, timeout=timeout)

    # -- writes -----------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, *, session: Session | None = None,
            timeout: float | None = None) -> Result:
        return self.write(ops.put(key, value), session=session, timeout=timeout)

    def delete(self, key: bytes, *, prefix: bool = False, session: Session | None = None,
               timeout: float | None = None) -> Result:
        return self.write(ops.delete(key, prefix=prefix), session=session, timeout=timeout)

    def incr(self, key: bytes, delta: int = 1, *, session: Session | None = None,
             timeout: float | None = None) -> Result:
        return self.write(ops.incr(key, delta), session=session, timeout=timeout)

    def append(self, key: bytes, value: bytes, *, session: Session | None = None,
               timeout: float | None = None) -> Result:
        return self.write(ops.append(key, value), session=session, timeout=timeout)

    def cas(self, key: bytes, value: bytes, *, expected: bytes | None,
            session: Session | None = None, timeout: float | None = None) -> Result:
        return self.write(ops.cas(key, value, expected=expected), session=session, timeout=timeout)

    def write(self, command: Command, *, session: Session | None = None,
              timeout: float | None = None) -> Result:
        """Proposes ``command`` with ``session``, or with a pooled session of the client's own.

        With a pooled session the client completes the proposal itself. A pooled session whose
        proposal ended in ``OutcomeUnknown`` is dropped rather than reused, so that a late copy
        of the old proposal can never be confused with a new one.
        """
        if session is not None:
            return self.sync_propose(session, command, timeout)
        check_command(command)
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            return self._propose_pooled(self._take_session(_remaining(deadline)), command, deadline)
        except errors.SessionExpired:
            # Evicted from the cluster's LRU store: nothing was applied, so a fresh session
            # may carry the command.
            fresh = self.sync_get_session(_remaining(deadline))
            return self._propose_pooled(fresh, command, deadline)

    def close(self) -> None:
        """Closes the pooled sessions on the cluster (best effort) and the channels."""
        with self._lock:
            pool, self._pool = self._pool, []
        for session in pool:
            try:
                self.sync_close_session(session, timeout=self.dial_timeout)
            except errors.KVError:
                pass  # the LRU store evicts it eventually
        if self._batches is not None:
            self._batches.close()
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def proposal_calls(self) -> tuple[int, int]:
        """(calls, proposals) sent so far by the batching path: proposals / calls is the mean
        batch size (``(0, 0)`` with ``batching=False``)."""
        return self._batches.stats() if self._batches is not None else (0, 0)

    # -- machinery --------------------------------------------------------------------------

    def _propose_pooled(self, session: Session, command: Command, deadline: float) -> Result:
        """Proposes with a pooled session and decides whether the session can serve again."""
        try:
            result = self.sync_propose(session, command, _remaining(deadline))
        except BaseException as exc:
            self._after_pooled(session, exc)
            raise
        self._after_pooled(session, None)
        return result

    def _after_pooled(self, session: Session, error: BaseException | None) -> None:
        fate = retry.pooled_session_fate(error)
        if fate == "drop":
            return  # a late copy may still apply, or the cluster knows it otherwise
        if fate == "complete":
            session.proposal_completed()
        self._return_session(session)

    def _take_session(self, timeout: float) -> Session:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self.sync_get_session(timeout)

    def _return_session(self, session: Session) -> None:
        with self._lock:
            self._pool.append(session)

    def _stub(self, endpoint: str) -> api_pb2_grpc.KVStub:
        with self._lock:
            if endpoint not in self._channels:
                channel = open_channel(endpoint, self._tls)
                self._channels[endpoint] = (channel, api_pb2_grpc.KVStub(channel))
            return self._channels[endpoint][1]

    def _discover_cluster_id(self) -> int:
        failures = []
        for endpoint in self._rotation():
            try:
                return self.status(endpoint).cluster_id
            except errors.Unavailable as exc:
                failures.append(str(exc))
        raise errors.Unavailable("no endpoint answered: " + "; ".join(failures))

    def _rotation(self) -> list[str]:
        """Endpoints to try, the preferred one (the last known leader) first."""
        with self._lock:
            preferred = self._preferred
        return [preferred] + [e for e in self.endpoints if e != preferred]

    def _call(self, rpc: Callable[[api_pb2_grpc.KVStub, float], _T], timeout: float | None, *,
              retry_unknown: bool, any_node: bool = False, cap_attempts: bool = True) -> _T:
        """Sends one request by ``rpc(stub, timeout)`` under the retry rules (``_retry``)."""
        def attempt(endpoint: str, attempt_timeout: float) -> _T | retry.Failure:
            try:
                return rpc(self._stub(endpoint), attempt_timeout)
            except grpc.RpcError as exc:
                return failure_of(exc)
        return self._retry(attempt, timeout, retry_unknown=retry_unknown, any_node=any_node,
                           cap_attempts=cap_attempts)

    def _retry(self, attempt: Callable[[str, float], _T | retry.Failure], timeout: float | None,
               *, retry_unknown: bool, any_node: bool = False, cap_attempts: bool = True) -> _T:
        """Runs ``attempt(endpoint, timeout)`` as ``kvstore.retry.Attempts`` says: following
        leader hints, retrying until ``timeout``, raising what the caller must see.

        ``retry_unknown``: whether a failure with an unknown outcome may be retried (true with
        a session, or for a read).
        """
        plan = retry.Attempts(timeout or self.timeout, time.monotonic(),
                              retry_unknown=retry_unknown, any_node=any_node,
                              cap_attempts=cap_attempts)
        while True:
            step = plan.next(time.monotonic(), self._rotation)
            if isinstance(step, retry.Pause):
                time.sleep(step.seconds)
                continue
            answer = attempt(step.endpoint, step.timeout)
            if not isinstance(answer, retry.Failure):
                self._prefer(step.endpoint)
                return answer
            if plan.should_explain(answer):
                wait = max(min(plan.remaining(time.monotonic()), self.dial_timeout), 0.1)
                reason = explain_refusal(step.endpoint, self._tls, wait)
                if reason:
                    raise errors.Unauthenticated(reason)
            hint = plan.failed(step.endpoint, answer)
            if hint:
                self._prefer(hint)

    def _prefer(self, endpoint: str) -> None:
        with self._lock:
            self._preferred = endpoint


class _Slot:
    """One proposal waiting for its share of a call, or for its turn to carry one (``batch``)."""

    __slots__ = ("batch", "deadline", "done", "outcome", "request", "size")

    def __init__(self, request: api_pb2.ProposeRequest, deadline: float) -> None:
        self.request = request
        self.size = request.ByteSize()
        self.deadline = deadline
        self.done = threading.Event()
        self.outcome: Result | retry.Failure | None = None
        self.batch: list[_Slot] | None = None

    def settle(self, outcome: Result | retry.Failure) -> None:
        self.outcome = outcome
        self.done.set()

    def carry(self, batch: list[_Slot]) -> None:
        """Wakes this proposal's thread to send ``batch`` (itself among them)."""
        self.batch = batch
        self.done.set()


class _Batches:
    """The proposals of many threads, sent to each endpoint in shared calls (``kvstore.batching``).

    Every call is a blocking call in the thread of one of the proposals it carries: a proposal
    that goes out alone is sent by its own thread; a batch formed when a call ends is handed to
    its first proposal's thread, which sends it and wakes the others with their answers. No
    gRPC future (whose completion thread gRPC starts anew whenever a channel goes from no such
    call in flight to one: a thread per batch at moderate load).

    With ``streaming`` (the default) every batch, a lone proposal too, is a message on one
    ``ProposeStream`` call per endpoint (``kvstore.streams``: the sending thread reads its
    reply, and one watchdog thread of ours enforces the deadlines), opened again after it
    ends; without, a lone proposal is a ``Propose`` call and a batch a ``ProposeBatch`` call.
    """

    def __init__(self, stub: Callable[[str], api_pb2_grpc.KVStub], *, streaming: bool) -> None:
        self._stub = stub
        self._streaming = streaming
        self._lock = threading.Lock()
        self._groups: dict[str, GroupCommit[_Slot]] = {}
        self._streams: dict[str, ProposalStream] = {}
        self._watchdog: Watchdog | None = None

    def propose(self, endpoint: str, request: api_pb2.ProposeRequest,
                timeout: float) -> Result | retry.Failure:
        slot = _Slot(request, time.monotonic() + timeout)
        with self._lock:
            group = self._groups.get(endpoint)
            if group is None:
                group = self._groups[endpoint] = GroupCommit(_slot_size)
            alone = group.add(slot)
        if alone is None:
            slot.done.wait(timeout)
            with self._lock:
                if slot.batch is None and not slot.done.is_set():
                    if group.withdraw(slot):
                        return retry.Failure(retry.Fate.NOT_APPLIED, WAITED_TOO_LONG)
                    # In a batch another thread is carrying: it may still be applied.
                    return retry.Failure(retry.Fate.OUTCOME_UNKNOWN,
                                         "no answer in time (client deadline)")
            if slot.batch is None:
                return slot.outcome  # type: ignore[return-value]
            alone = slot.batch
        self._send(endpoint, alone)
        return slot.outcome  # type: ignore[return-value]

    def _send(self, endpoint: str, batch: list[_Slot]) -> None:
        """Sends ``batch`` and settles every proposal in it; then hands on what queued."""
        try:
            now = time.monotonic()
            for slot in batch:
                if slot.deadline <= now:
                    slot.settle(retry.Failure(retry.Fate.NOT_APPLIED, WAITED_TOO_LONG))
            batch = [slot for slot in batch if slot.outcome is None]
            if not batch:
                return
            timeout = max(slot.deadline for slot in batch) - now
            answer: object
            try:
                stub = self._stub(endpoint)
                if self._streaming:
                    answer = self._stream(endpoint, stub).send(
                        [slot.request for slot in batch], timeout)
                elif len(batch) == 1:
                    answer = stub.Propose(batch[0].request, timeout=timeout)
                else:
                    answer = stub.ProposeBatch(api_pb2.ProposeBatchRequest(
                        proposals=[slot.request for slot in batch]), timeout=timeout)
            except Exception as exc:
                answer = exc
            for slot, outcome in zip(batch, outcomes_of(len(batch), answer), strict=True):
                slot.settle(outcome)
        finally:
            # Under the lock: a proposal that times out meanwhile then sees it must carry.
            with self._lock:
                for next_batch in self._groups[endpoint].finished():
                    next_batch[0].carry(next_batch)

    def _stream(self, endpoint: str, stub: api_pb2_grpc.KVStub) -> ProposalStream:
        """The open stream to ``endpoint``: a new one if there is none or it ended."""
        with self._lock:
            stream = self._streams.get(endpoint)
            if stream is None or stream.ended:
                if self._watchdog is None:
                    self._watchdog = Watchdog()
                stream = self._streams[endpoint] = ProposalStream(stub, self._watchdog)
            return stream

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return (sum(g.calls for g in self._groups.values()),
                    sum(g.sent for g in self._groups.values()))

    def close(self) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            watchdog, self._watchdog = self._watchdog, None
        for stream in streams:
            stream.close()
        if watchdog is not None:
            watchdog.stop()


WAITED_TOO_LONG = "waited in the client's queue past the attempt's deadline (never sent)"


def _slot_size(slot: _Slot) -> int:
    return slot.size


def outcomes_of(count: int, answer: object) -> list[Result | retry.Failure]:
    """Each proposal's outcome from the call that carried ``count`` of them: ``answer`` is the
    lone ``Propose``'s result, the ``ProposeBatch`` response or ``ProposeStream`` reply, or the
    exception that says why there is none."""
    if isinstance(answer, grpc.RpcError):
        return [failure_of(answer)] * count
    if isinstance(answer, BaseException):  # cancelled by close(), or a bug: they may have left
        return [retry.Failure(retry.Fate.OUTCOME_UNKNOWN, f"call failed: {answer!r}")] * count
    if isinstance(answer, Result):
        return [answer]
    outcomes = list(answer.outcomes)  # type: ignore[attr-defined]
    if len(outcomes) != count:
        return [retry.Failure(retry.Fate.OUTCOME_UNKNOWN,
                              f"the node answered {len(outcomes)} of {count} proposals")] * count
    return [retry.classify_outcome(outcome) for outcome in outcomes]


# -- what both clients send (kvstore.aio uses these too) ---------------------------------------


def proposal_request(session: Session, command: Command, cluster_id: int) -> api_pb2.ProposeRequest:
    """A proposal, or ``InvalidArgument``/``ClusterMismatch`` if it must not leave."""
    check_session_cluster(session, cluster_id)
    try:
        valid = session.valid_for_proposal(cluster_id)
    except SessionInvariantError as exc:
        raise errors.InvalidArgument(str(exc)) from exc
    if not valid:
        raise errors.InvalidArgument(
            "the session is not valid for a proposal: register it first (get_session)")
    check_command(command)
    return api_pb2.ProposeRequest(session=session.to_pb(), command=command)


def register_request(cluster_id: int) -> tuple[Session, api_pb2.SessionRequest]:
    """A new session and the request that registers it (``prepare_for_propose`` once done)."""
    session = new_session(cluster_id)
    session.prepare_for_register()
    return session, api_pb2.SessionRequest(session=session.to_pb())


def closing_request(session: Session, cluster_id: int) -> api_pb2.SessionRequest:
    check_session_cluster(session, cluster_id)
    closing = Session(session.cluster_id, session.client_id)
    closing.prepare_for_unregister()
    return api_pb2.SessionRequest(session=closing.to_pb())


def read_request(command: Command, consistency: Consistency, cluster_id: int) -> api_pb2.ReadRequest:
    check_command(command)
    return api_pb2.ReadRequest(cluster_id=cluster_id, command=command,
                               consistency=_CONSISTENCY[consistency])


def check_session_cluster(session: Session, cluster_id: int) -> None:
    try:
        session.cluster_id_must_match(cluster_id)
    except ClusterMismatchError as exc:
        raise errors.ClusterMismatch(str(exc)) from exc


def checked_endpoints(endpoints: Sequence[str]) -> list[str]:
    if not endpoints:
        raise errors.InvalidArgument("no endpoints given")
    for endpoint in endpoints:
        try:
            split_address(endpoint)
        except ConfigError as exc:
            raise errors.InvalidArgument(str(exc)) from exc
    return list(endpoints)


def failure_of(exc: grpc.RpcError) -> retry.Failure:
    """What a failed call means, by the rules of ``kvstore.retry``."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    return retry.classify(code, _details(exc), _metadata(exc))


def check_command(command: Command) -> None:
    refused = commands.static_error(command)
    if refused is not None:
        raise errors.InvalidArgument(refused.message)


def _metadata(exc: grpc.RpcError) -> dict[str, str | bytes]:
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return {key: value for key, value in (trailing or ())}


def _details(exc: grpc.RpcError) -> str:
    return (exc.details() if hasattr(exc, "details") else None) or str(exc)


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()
