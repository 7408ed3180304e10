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

A ``Client`` is safe to share between threads: gRPC channels are thread-safe, and the little
state the client keeps (the leader it last saw, the pool of sessions of the convenience
methods) is behind a lock. A ``Session`` is not: give each thread its own.

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

from kvstore import api_errors, commands, errors, ops, results
from kvstore.config import ConfigError, split_address
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.proto.log_pb2 import Command, Result
from kvstore.tls import ClientTLS, explain_refusal, open_channel
from session.errors import ClusterMismatchError, SessionInvariantError
from session.session import Session, new_noop_session, new_session

Consistency = Literal["linearizable", "serializable"]

DEFAULT_TIMEOUT = 5.0
RETRY_BACKOFF = (0.01, 0.2)
"""First and longest pause between attempts when no leader is known (an election is on)."""
ATTEMPT_SHARE = 0.25
MIN_ATTEMPT = 0.5
"""When a retry is safe, one attempt gets at most a quarter of the deadline (and at least
0.5 s), so a node that hangs (paused, partitioned) cannot use up the whole deadline: the next
attempt goes to another node."""

_CONSISTENCY = {"linearizable": api_pb2.LINEARIZABLE, "serializable": api_pb2.SERIALIZABLE}
_NEVER_SENT = ("failed to connect", "connection refused", "dns resolution failed", "name resolution")
_TLS_TROUBLE = ("socket closed", "handshake failed")
"""What gRPC says when a node closed the connection at the TLS handshake (see ``kvstore.tls``)."""
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
    ) -> None:
        if not endpoints:
            raise errors.InvalidArgument("no endpoints given")
        for endpoint in endpoints:
            try:
                split_address(endpoint)
            except ConfigError as exc:
                raise errors.InvalidArgument(str(exc)) from exc
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.dial_timeout = dial_timeout
        self._cluster_id = cluster_id
        self._tls = tls
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, api_pb2_grpc.KVStub]] = {}
        self._preferred = self.endpoints[0]
        self._pool: list[Session] = []

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
            failure = _classify(exc)
            if isinstance(failure, errors.AccessDenied):
                raise failure from exc
            raise self._refusal(endpoint, exc, timeout) or errors.Unavailable(
                f"{endpoint}: {_details(exc)}") from exc

    def snapshot(self, out: BinaryIO, *, timeout: float | None = None) -> int:
        """Writes a consistent snapshot of the whole state, taken by the leader, to ``out``
        (``kvstore.backup`` reads it); returns its size.

        The leader streams its snapshot file once one covers everything committed when it got
        the request. A follower answers with a leader hint, followed here; every new attempt
        starts ``out`` over.
        """
        request = api_pb2.SnapshotRequest(cluster_id=self.cluster_id)
        deadline = time.monotonic() + (timeout or self.timeout)
        last_error = "no attempt made"
        backoff = RETRY_BACKOFF[0]
        while True:
            for endpoint in self._rotation():
                remaining = _remaining(deadline)
                if remaining <= 0:
                    break
                out.seek(0)
                out.truncate()
                try:
                    size = 0
                    for chunk in self._stub(endpoint).Snapshot(request, timeout=remaining):
                        out.write(chunk.data)
                        size += len(chunk.data)
                except grpc.RpcError as exc:
                    failure = _classify(exc)
                    if isinstance(failure, errors.KVError):
                        raise failure from exc
                    last_error = f"{endpoint}: {_details(exc)}"
                    hint = _metadata(exc).get(api_errors.LEADER_METADATA_KEY, "")
                    if isinstance(hint, str) and hint:
                        with self._lock:
                            self._preferred = hint
                        break  # start over at the leader
                    continue
                with self._lock:
                    self._preferred = endpoint
                return size
            remaining = _remaining(deadline)
            if remaining <= 0:
                raise errors.Unavailable(f"no snapshot in time: {last_error}")
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, RETRY_BACKOFF[1])
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
        session = new_session(self.cluster_id)
        session.prepare_for_register()
        request = api_pb2.SessionRequest(session=session.to_pb())
        self._call(lambda stub, t: stub.RegisterSession(request, timeout=t), timeout, retry_unknown=True)
        session.prepare_for_propose()
        return session

    def sync_close_session(self, session: Session, timeout: float | None = None) -> None:
        """Closes ``session`` on the cluster (retrying is safe: closing twice succeeds)."""
        self._check_session_cluster(session)
        closing = Session(session.cluster_id, session.client_id)
        closing.prepare_for_unregister()
        request = api_pb2.SessionRequest(session=closing.to_pb())
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
        self._check_session_cluster(session)
        try:
            valid = session.valid_for_proposal(self.cluster_id)
        except SessionInvariantError as exc:
            raise errors.InvalidArgument(str(exc)) from exc
        if not valid:
            raise errors.InvalidArgument(
                "the session is not valid for a proposal: register it first (sync_get_session)")
        _check_command(command)
        request = api_pb2.ProposeRequest(session=session.to_pb(), command=command)
        return self._call(lambda stub, t: stub.Propose(request, timeout=t), timeout,
                          retry_unknown=not session.is_noop_session())

    # -- reads ------------------------------------------------------------------------------

    def read(self, command: Command, *, consistency: Consistency = "linearizable",
             timeout: float | None = None) -> Result:
        """A get or range. Linearizable (default) goes through the leader's log; serializable
        asks one node's local replica and may be stale."""
        _check_command(command)
        request = api_pb2.ReadRequest(cluster_id=self.cluster_id, command=command,
                                      consistency=_CONSISTENCY[consistency])
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
        _check_command(command)
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
        with self._lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- machinery --------------------------------------------------------------------------

    def _propose_pooled(self, session: Session, command: Command, deadline: float) -> Result:
        """Proposes with a pooled session and decides whether the session can serve again."""
        try:
            result = self.sync_propose(session, command, _remaining(deadline))
        except (errors.OutcomeUnknown, errors.SessionExpired, errors.AlreadyResponded,
                errors.SeriesReused):
            raise  # dropped: a late copy may still apply, or the cluster knows it otherwise
        except errors.ResultError:
            session.proposal_completed()  # the state machine answered, with an error
            self._return_session(session)
            raise
        except errors.KVError:
            self._return_session(session)  # refused before the log: the session is unchanged
            raise
        session.proposal_completed()
        self._return_session(session)
        return result

    def _take_session(self, timeout: float) -> Session:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self.sync_get_session(timeout)

    def _return_session(self, session: Session) -> None:
        with self._lock:
            self._pool.append(session)

    def _check_session_cluster(self, session: Session) -> None:
        try:
            session.cluster_id_must_match(self.cluster_id)
        except ClusterMismatchError as exc:
            raise errors.ClusterMismatch(str(exc)) from exc

    def _stub(self, endpoint: str) -> api_pb2_grpc.KVStub:
        with self._lock:
            if endpoint not in self._channels:
                channel = open_channel(endpoint, self._tls)
                self._channels[endpoint] = (channel, api_pb2_grpc.KVStub(channel))
            return self._channels[endpoint][1]

    def _refusal(self, endpoint: str, exc: grpc.RpcError,
                 timeout: float) -> errors.Unauthenticated | None:
        """``Unauthenticated`` if ``endpoint`` closed the connection because of our TLS settings
        (not on every failure: only when gRPC saw the connection close at the handshake)."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or not any(
                s in _details(exc).lower() for s in _TLS_TROUBLE):
            return None
        reason = explain_refusal(endpoint, self._tls, max(min(timeout, self.dial_timeout), 0.1))
        return errors.Unauthenticated(reason) if reason else None

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
              retry_unknown: bool, any_node: bool = False) -> _T:
        """Sends one request, following leader hints and retrying until ``timeout``.

        ``retry_unknown``: whether a failure with an unknown outcome may be retried (true with
        a session, or for a read). Errors that the state machine or the request itself caused
        are raised at once.
        """
        total = timeout or self.timeout
        deadline = time.monotonic() + total
        attempt_cap = max(MIN_ATTEMPT, total * ATTEMPT_SHARE) if retry_unknown else total
        maybe_applied = False
        last_error = "no attempt made"
        backoff = RETRY_BACKOFF[0]
        while True:
            for endpoint in self._rotation():
                remaining = _remaining(deadline)
                if remaining <= 0:
                    break
                try:
                    answer = rpc(self._stub(endpoint), min(remaining, attempt_cap))
                except grpc.RpcError as exc:
                    failure = _classify(exc)
                    last_error = f"{endpoint}: {_details(exc)}"
                    if isinstance(failure, errors.KVError):
                        raise failure from exc
                    refusal = None if maybe_applied else self._refusal(endpoint, exc, remaining)
                    if refusal is not None:
                        raise refusal from exc
                    if failure == "unknown":
                        maybe_applied = True
                        if not retry_unknown:
                            raise errors.OutcomeUnknown(
                                f"{last_error}; the request may have been applied") from exc
                    hint = _metadata(exc).get(api_errors.LEADER_METADATA_KEY, "")
                    if isinstance(hint, str) and hint and not any_node:
                        with self._lock:
                            self._preferred = hint
                        break  # start over at the leader
                    continue
                with self._lock:
                    self._preferred = endpoint
                return answer
            remaining = _remaining(deadline)
            if remaining <= 0:
                if maybe_applied:
                    raise errors.OutcomeUnknown(
                        f"timed out; the request may have been applied ({last_error}); "
                        "retry with the same session")
                raise errors.Unavailable(f"no leader reachable: {last_error}")
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, RETRY_BACKOFF[1])


def _classify(exc: grpc.RpcError) -> errors.KVError | Literal["not_applied", "unknown"]:
    """What a failed call means: an error to raise, or whether a retry risks a duplicate."""
    code = exc.code()
    metadata = _metadata(exc)
    encoded = metadata.get(api_errors.RESULT_METADATA_KEY)
    if isinstance(encoded, bytes):
        result = results.decode(encoded)
        _, error_type = api_errors.RESULT_ERRORS[result.code]
        message = f"{results.code_name(result)}: {result.message}"
        if issubclass(error_type, errors.ResultError):
            return error_type(message, result)
        return error_type(message)
    node_answered = api_errors.REASON_METADATA_KEY in metadata
    if metadata.get(api_errors.REASON_METADATA_KEY) == api_errors.MEMBERSHIP_REFUSED:
        return errors.MembershipRefused(_details(exc))
    if code in (api_errors.NOT_APPLIED_STATUS, api_errors.QUEUE_FULL_STATUS) and node_answered:
        return "not_applied"
    if code == grpc.StatusCode.UNAVAILABLE and any(s in _details(exc).lower() for s in _NEVER_SENT):
        return "not_applied"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        return "unknown"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.Unauthenticated(_details(exc))
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return errors.PermissionDenied(_details(exc))
    if code == grpc.StatusCode.FAILED_PRECONDITION and "cluster mismatch" in _details(exc):
        return errors.ClusterMismatch(_details(exc))
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return errors.InvalidArgument(_details(exc))
    return errors.KVError(f"{code.name}: {_details(exc)}")


def _check_command(command: Command) -> None:
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
