"""The client API of one node, over gRPC, and ``run_node``: a node process from start to stop.

Any node accepts any request. A follower does not forward writes: it refuses them with
UNAVAILABLE and the leader's API address in metadata, and the client library goes there. Why
not forward? PySyncObj can forward a call from a follower, but that costs a second network hop
(twice the latency, measured in shared/reference/pysyncobj-0.3.17.md), and a forwarded call that
loses its leader comes back as "outcome unknown" where a direct refusal is "not applied". A hint
keeps the follower out of the data path and the error precise; the client keeps talking to the
leader afterwards.

The server is ``grpc.aio`` on one event loop in its own thread, not a pool of threads that each
block until their proposal commits: a batch's answers reach the loop together, and the leader's
GIL is shared by two busy threads (the loop and the Raft tick) instead of dozens
(``benchmarks/grpc_ceiling.py --handoff`` measures the difference).

With ``config.tls`` the API is mutual TLS (``kvstore.tls``) and every RPC is authorized by the
role in the caller's certificate before anything else (``kvstore.auth``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message

from kvstore import api_errors, auth, commands, results, retry
from kvstore.config import NodeConfig
from kvstore.entry import encode_entry
from kvstore.node import KVNode, NodeStatusView, NotApplied, OutcomeUnknown, gc_pauses
from kvstore.node.member_table import ChangeRefused
from kvstore.node.outcomes import ProposeError
from kvstore.proto import api_pb2
from kvstore.proto.log_pb2 import Code, Result
from kvstore.state_machine import StateMachine
from session.constants import SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER
from session.session import Session
from session.wire import WireDecodeError, parse

log = logging.getLogger("kvstore.server")

DEFAULT_PROPOSE_TIMEOUT = 5.0
"""Longest a proposal waits on the node when the client set no deadline."""

DEADLINE_MARGIN = 0.05
"""Seconds kept for the answer to travel back before the client's own deadline expires (at
most half of what is left, so a short deadline still gets a chance to commit)."""

MAX_BATCH_PROPOSALS = 1024
"""Most proposals one ``ProposeBatch`` may carry (the node's own replicated batch holds as many)."""

MAX_MESSAGE_BYTES = 2 * 1024 * 1024
"""Bigger than any valid request (a 4 KiB key and a 1 MiB value); larger ones are refused by gRPC."""

STOP_GRACE = 1.0
"""Seconds in-flight RPCs get to finish when the server stops."""

SNAPSHOT_TIMEOUT = 60.0
"""Longest a Snapshot RPC without a deadline waits for the node's snapshot file."""
SNAPSHOT_POLL = 0.05
SNAPSHOT_CHUNK_BYTES = 1024 * 1024
"""A backup streams in chunks of this size, so a large state is never one message."""


class Refused(Exception):
    """A request answered with an error status (raised by the checks, sent by ``_guarded``)."""

    def __init__(self, code: grpc.StatusCode, message: str, *metadata: tuple[str, str | bytes]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.metadata = metadata

    @property
    def reason(self) -> str:
        """Why nothing was applied (the reason metadata), else the status code's name."""
        for key, value in self.metadata:
            if key == api_errors.REASON_METADATA_KEY:
                return str(value)
        return self.code.name


class KVService:
    """Validates requests, turns them into log entries, and maps outcomes to gRPC statuses."""

    def __init__(self, node: KVNode, config: NodeConfig) -> None:
        self._node = node
        self._config = config
        self._proposals = node.metrics.proposals if node.metrics is not None else None

    # -- RPCs -------------------------------------------------------------------------------

    async def RegisterSession(self, request: api_pb2.SessionRequest,
                              context: grpc.aio.ServicerContext) -> Result:
        return await self._session_op(request, context, SERIES_ID_FOR_REGISTER, "register")

    async def UnregisterSession(self, request: api_pb2.SessionRequest,
                                context: grpc.aio.ServicerContext) -> Result:
        return await self._session_op(request, context, SERIES_ID_FOR_UNREGISTER, "unregister")

    async def Propose(self, request: api_pb2.ProposeRequest, context: grpc.aio.ServicerContext) -> Result:
        return await self._propose(self._proposal_entry(request), context)

    async def ProposeBatch(self, request: api_pb2.ProposeBatchRequest,
                           context: grpc.aio.ServicerContext) -> api_pb2.ProposeBatchResponse:
        """Every proposal of the batch checked on its own, the valid ones handed to the node in
        one submission, and each answered with its own ``ProposeOutcome``: the status a lone
        ``Propose`` would have got, and the fate that status means (``retry.fate_of_status``,
        the client's own rule), so that a batch failing part way stays exact per proposal.
        A refusal of the whole batch (not the leader) is the call's status."""
        return api_pb2.ProposeBatchResponse(
            outcomes=await self._batch_outcomes(request.proposals, self._node_timeout(context)))

    async def ProposeStream(self, requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> None:
        """``ProposeBatch`` over one long-lived call: each request is a batch, answered by a
        reply with its tag once its outcomes are known, while later requests are read and
        proposed. A refusal of a whole batch is in each of its outcomes, so the stream goes
        on; only a malformed request ends it (what a client makes of a request left without a
        reply is ``kvstore.streams``'s rule)."""
        self._refuse_if_removed()
        writing = asyncio.Lock()
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: api_pb2.ProposeStreamRequest) -> None:
            timeout = (self._timeout_within(request.timeout_ms / 1000) if request.timeout_ms
                       else DEFAULT_PROPOSE_TIMEOUT)
            try:
                outcomes = await self._batch_outcomes(request.proposals, timeout)
            except Refused as refusal:
                outcomes = [_refused_outcome(refusal)] * len(request.proposals)
            async with writing:
                await context.write(api_pb2.ProposeStreamReply(tag=request.tag, outcomes=outcomes))

        try:
            async for request in requests:
                if isinstance(request, _Malformed):
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"malformed request: {request.reason}")
                task = asyncio.ensure_future(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        finally:
            for task in pending:
                task.cancel()  # the caller is gone: its proposals may still apply, unanswered

    async def _batch_outcomes(self, proposals: Sequence[api_pb2.ProposeRequest],
                              timeout: float) -> list[api_pb2.ProposeOutcome]:
        """Each proposal's ``ProposeOutcome``; ``Refused`` if the node takes none of them."""
        self._refuse_if_removed()
        # Before leadership, as a lone Propose checks its request: a batch that no node would
        # take is refused as such by every node, not sent on to the leader to be refused there.
        _require(len(proposals) <= MAX_BATCH_PROPOSALS,
                 f"a batch holds at most {MAX_BATCH_PROPOSALS} proposals")
        if not self._node.is_leader():
            raise self._not_leader("NOT_LEADER")
        outcomes: list[api_pb2.ProposeOutcome | None] = [None] * len(proposals)
        entries: list[bytes] = []
        slots: list[int] = []
        for i, proposal in enumerate(proposals):
            try:
                entries.append(self._proposal_entry(proposal))
                slots.append(i)
            except Refused as refusal:
                outcomes[i] = _refused_outcome(refusal)
        try:
            answers = await self._node.propose_many_async(entries, timeout)
        except NotApplied as exc:
            refusal = self._propose_refusal(exc)
            if self._proposals is not None:
                for _ in entries:
                    self._proposals.count("propose", refusal.reason)
            raise refusal from exc
        for i, answer in zip(slots, answers, strict=True):
            if isinstance(answer, bytes):
                result = results.decode(answer)
                outcomes[i] = api_pb2.ProposeOutcome(fate=api_pb2.FATE_ANSWERED, result=result)
                if self._proposals is not None:
                    self._proposals.count("propose", result.code)
            else:
                refusal = self._propose_refusal(answer)
                outcomes[i] = _refused_outcome(refusal)
                if self._proposals is not None:
                    self._proposals.count("propose", refusal.reason)
        return outcomes  # type: ignore[return-value]

    async def Read(self, request: api_pb2.ReadRequest, context: grpc.aio.ServicerContext) -> Result:
        self._check_cluster(request.cluster_id)
        _check_command(request)
        _require(commands.is_read_only(request.command),
                 "Read takes a get or range command; writes go through Propose")
        _require(request.consistency in (api_pb2.LINEARIZABLE, api_pb2.SERIALIZABLE),
                 f"unknown consistency {request.consistency}")
        if request.consistency == api_pb2.SERIALIZABLE:
            self._refuse_if_removed()
            # Waits for the tick thread: in a worker thread, so the event loop goes on.
            try:
                return _answer(await asyncio.to_thread(self._node.read_local, request.command))
            except NotApplied as exc:  # restoring a snapshot: the state is behind
                raise Refused(grpc.StatusCode.UNAVAILABLE, f"{exc}; read another node",
                              (api_errors.REASON_METADATA_KEY, exc.reason)) from exc
        # A linearizable read goes through the log as a system entry (client id 0): it changes
        # nothing, so it needs no deduplication, and it sees every write committed before it.
        system = Session(cluster_id=self._config.cluster_id)
        return await self._propose(encode_entry(system, request.command), context, "read")

    async def Status(self, request: api_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> api_pb2.NodeStatus:
        view = await asyncio.to_thread(self._node.status, with_digest=request.with_digest)
        return status_message(view, self._config)

    async def Snapshot(self, request: api_pb2.SnapshotRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.SnapshotChunk]:
        """Streams the leader's snapshot file once one covers the commit index of now."""
        self._check_cluster(request.cluster_id)
        try:
            index = await asyncio.to_thread(self._node.snapshot_index)
        except NotApplied as exc:
            raise self._not_leader(exc.reason) from exc
        except TimeoutError as exc:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          "the node's Raft loop did not answer in time") from exc
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + (SNAPSHOT_TIMEOUT if remaining is None else remaining)
        while (dump := await asyncio.to_thread(self._node.open_snapshot, index)) is None:
            if loop.time() >= deadline:
                raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no snapshot covering index {index} in time")
            await asyncio.sleep(SNAPSHOT_POLL)
        with dump:
            while chunk := await asyncio.to_thread(dump.read, SNAPSHOT_CHUNK_BYTES):
                yield api_pb2.SnapshotChunk(data=chunk)
    # -- membership (kvstore/node/membership.py) ---------------------------------------------

    async def MemberList(self, request: api_pb2.MemberListRequest,
                         context: grpc.aio.ServicerContext) -> api_pb2.MemberListResponse:
        if not request.local and not self._node.is_leader():
            raise self._not_leader("NOT_LEADER")
        return await asyncio.to_thread(self._member_list)

    async def MemberAdd(self, request: api_pb2.MemberAddRequest,
                        context: grpc.aio.ServicerContext) -> api_pb2.MemberListResponse:
        _require(bool(request.name and request.raft_address and request.api_address),
                 "MemberAdd needs a name, a raft address and an API address")
        return await self._member_change(context, "add", request.raft_address, request.name,
                                         request.api_address)

    async def MemberPromote(self, request: api_pb2.MemberRequest,
                            context: grpc.aio.ServicerContext) -> api_pb2.MemberListResponse:
        _require(bool(request.raft_address), "MemberPromote needs the member's raft address")
        return await self._member_change(context, "promote", request.raft_address)

    async def MemberRemove(self, request: api_pb2.MemberRequest,
                           context: grpc.aio.ServicerContext) -> api_pb2.MemberListResponse:
        _require(bool(request.raft_address), "MemberRemove needs the member's raft address")
        return await self._member_change(context, "remove", request.raft_address)

    async def _member_change(self, context: grpc.aio.ServicerContext, kind: str,
                             raft_address: str, name: str = "",
                             api_address: str = "") -> api_pb2.MemberListResponse:
        """Appends the change on the leader and answers once it is committed."""
        self._refuse_if_removed()
        if not self._node.is_leader():
            raise self._not_leader("NOT_LEADER")
        try:
            committed = await asyncio.to_thread(self._node.change_membership, kind,
                                                raft_address, name, api_address)
            remaining = context.time_remaining()
            await asyncio.wait_for(asyncio.wrap_future(committed),
                                   DEFAULT_PROPOSE_TIMEOUT if remaining is None
                                   else max(remaining - DEADLINE_MARGIN, remaining / 2, 0.0))
        except NotApplied as exc:
            raise self._not_leader(exc.reason, str(exc)) from exc
        except ChangeRefused as exc:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(exc),
                          (api_errors.REASON_METADATA_KEY, api_errors.MEMBERSHIP_REFUSED)) from exc
        except TimeoutError as exc:  # asyncio.TimeoutError is TimeoutError since 3.11
            raise Refused(api_errors.TIMEOUT_STATUS, "the membership change was not committed in "
                          "time: its outcome is unknown (see kv member list)",
                          (api_errors.REASON_METADATA_KEY, "TIMEOUT")) from exc
        return await asyncio.to_thread(self._member_list)

    def _member_list(self) -> api_pb2.MemberListResponse:
        table, views, commit, pending = self._node.members()
        return api_pb2.MemberListResponse(
            cluster_id=self._config.cluster_id, answered_by=self._config.node_id,
            from_leader=any(v.is_self and v.is_leader for v in views),
            membership_index=self._node.membership.index, change_pending=pending,
            last_change=table.change, commit_index=commit,
            members=[api_pb2.MemberStatus(
                name=v.info.name, raft_address=v.info.raft_address,
                api_address=v.info.api_address, role=v.info.role.value, is_leader=v.is_leader,
                match_index=v.match_index, connected=v.connected, in_sync=v.in_sync)
                for v in views])

    def _refuse_if_removed(self) -> None:
        """A removed node serves nobody: what it holds stops being the cluster's."""
        if self._node.removed:
            raise Refused(api_errors.NOT_APPLIED_STATUS, "this node was removed from the cluster "
                          "and serves no client (nothing was applied); use another endpoint",
                          (api_errors.REASON_METADATA_KEY, "REMOVED"))

    # -- helpers ----------------------------------------------------------------------------

    async def _session_op(self, request: api_pb2.SessionRequest, context: grpc.aio.ServicerContext,
                          series_id: int, op: str) -> Result:
        session = self._session(request.session)
        _require(session.series_id == series_id and session.valid_for_session_op(
            self._config.cluster_id), f"{op.capitalize()}Session needs a session prepared for {op}")
        return await self._propose(encode_entry(session), context, op)

    def _session(self, pb: object) -> Session:
        session = Session.from_pb(pb)  # type: ignore[arg-type]
        self._check_cluster(session.cluster_id)
        return session

    def _check_cluster(self, cluster_id: int) -> None:
        if cluster_id != self._config.cluster_id:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"cluster mismatch: request for cluster {cluster_id}, this is "
                          f"{self._config.cluster_id}")

    def _proposal_entry(self, request: api_pb2.ProposeRequest) -> bytes:
        """The log entry of one proposal, or ``Refused`` if it must not reach the log."""
        session = self._session(request.session)
        try:
            valid = session.valid_for_proposal(self._config.cluster_id)
        except Exception as exc:  # a broken invariant in the client's session
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        _require(valid, "the session is not valid for a proposal (client id 0, or a "
                 "register/unregister series id)")
        _check_command(request)
        return encode_entry(session, request.command)

    async def _propose(self, entry: bytes, context: grpc.aio.ServicerContext,
                       kind: str = "propose") -> Result:
        """Replicates ``entry`` and answers with its result; with metrics, counts the outcome
        under ``kind`` (``kvstore.metrics.KINDS``)."""
        if self._proposals is None:
            return _answer(await self._replicate(entry, context))
        try:
            result = await self._replicate(entry, context)
        except Refused as refusal:
            self._proposals.count(kind, refusal.reason)
            raise
        except asyncio.CancelledError:  # the caller went away; the entry may still apply
            self._proposals.count(kind, "CANCELLED")
            raise
        self._proposals.count(kind, result.code)
        return _answer(result)

    async def _replicate(self, entry: bytes, context: grpc.aio.ServicerContext) -> Result:
        """The state machine's result for ``entry``, or ``Refused`` if there is none."""
        self._refuse_if_removed()
        if not self._node.is_leader():
            raise self._not_leader("NOT_LEADER")
        started = time.perf_counter()
        try:
            answer = await self._node.propose_async(entry, self._node_timeout(context))
        except (NotApplied, OutcomeUnknown) as exc:
            raise self._propose_refusal(exc) from exc
        finally:
            if self._proposals is not None:
                self._proposals.commit_seconds.observe(time.perf_counter() - started)
        return results.decode(answer)

    @staticmethod
    def _node_timeout(context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return DEFAULT_PROPOSE_TIMEOUT
        return KVService._timeout_within(remaining)

    @staticmethod
    def _timeout_within(remaining: float) -> float:
        """How long the node may wait for a proposal whose client waits ``remaining`` s."""
        return max(remaining - DEADLINE_MARGIN, remaining / 2, 0.0)

    def _propose_refusal(self, exc: ProposeError) -> Refused:
        """The status of a proposal the node did not apply (``NotApplied``) or gave up on."""
        if isinstance(exc, NotApplied):
            if exc.reason == "QUEUE_FULL":
                return Refused(api_errors.QUEUE_FULL_STATUS, "the proposal queue is full; retry",
                               (api_errors.REASON_METADATA_KEY, exc.reason))
            return self._not_leader(exc.reason)
        status = (api_errors.TIMEOUT_STATUS if exc.reason == "TIMEOUT"
                  else api_errors.UNKNOWN_OUTCOME_STATUS)
        return Refused(status, f"outcome unknown ({exc.reason}): retry with the same session "
                       "and series id", (api_errors.REASON_METADATA_KEY, exc.reason))

    def _not_leader(self, reason: str, detail: str = "") -> Refused:
        leader = self._node.api_address_of(self._node.leader_address() or "")
        message = detail or (f"not the leader; the leader is {leader}" if leader
                             else "no leader at the moment")
        return Refused(api_errors.NOT_APPLIED_STATUS, f"{message} (nothing was applied)",
                       (api_errors.REASON_METADATA_KEY, reason), (api_errors.LEADER_METADATA_KEY, leader))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_command(request: api_pb2.ProposeRequest | api_pb2.ReadRequest) -> None:
    refused = commands.static_error(request.command)
    if refused is not None:
        # No result metadata: this refusal is not an answer of the state machine, and the
        # session does not move on.
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{Code.Name(refused.code)}: {refused.message} (refused before the log)")


def _refused_outcome(refusal: Refused) -> api_pb2.ProposeOutcome:
    """One proposal's share of a batch answer, for a proposal that got no answer."""
    metadata = dict(refusal.metadata)
    reason, leader = metadata.get(api_errors.REASON_METADATA_KEY, ""), \
        metadata.get(api_errors.LEADER_METADATA_KEY, "")
    return api_pb2.ProposeOutcome(
        fate=int(retry.fate_of_status(refusal.code, refusal.message, metadata)),
        code=refusal.code.value[0], message=refusal.message,
        reason=reason if isinstance(reason, str) else "",
        leader=leader if isinstance(leader, str) else "")


def _answer(result: Result) -> Result:
    if result.code == Code.OK:
        return result
    status, _ = api_errors.RESULT_ERRORS[result.code]
    raise Refused(status, f"{Code.Name(result.code)}: {result.message}",
                  (api_errors.RESULT_METADATA_KEY, results.encode(result)))


class _Malformed:
    """Stands for a request whose bytes did not decode (gRPC would answer INTERNAL)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _handlers(service: KVService, authorize: bool) -> grpc.GenericRpcHandler:
    """The service's handlers, built from the ``.proto`` descriptor, with two differences from
    the generated ``add_KVServicer_to_server``: a request that does not decode is answered
    INVALID_ARGUMENT, a caller's mistake, rather than gRPC's INTERNAL; and with ``authorize``
    each call is first checked against the caller's role (``kvstore.auth``). Every RPC must
    have a permission, with TLS or without: an unclassified one stops the node here."""
    handlers = {}
    for method in api_pb2.DESCRIPTOR.services_by_name["KV"].methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        permission = auth.required_permission(method.name)
        make, guard = _KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            guard(getattr(service, method.name), method.name, permission if authorize else None),
            request_deserializer=_lenient_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(api_pb2.DESCRIPTOR.services_by_name["KV"].full_name,
                                                handlers)


def _lenient_parser(request_type: type[Message]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return parse(request_type, data)
        except WireDecodeError as exc:
            return _Malformed(str(exc))
    return deserialize


def _guarded(behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], method: str,
             permission: auth.Permission | None,
             ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Refuses callers without ``permission`` (if given), then malformed requests, and sends
    every ``Refused`` as its status."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _authorize(context, method, permission)
            if isinstance(request, _Malformed):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")
            return await behavior(request, context)
        except Refused as refusal:
            await context.abort(refusal.code, refusal.message, trailing_metadata=refusal.metadata)
    return handle


def _guarded_stream(behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
                    method: str, permission: auth.Permission | None,
                    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """``_guarded`` for a server-streaming RPC."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            _authorize(context, method, permission)
            if isinstance(request, _Malformed):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")
            async for item in behavior(request, context):
                yield item
        except Refused as refusal:
            await context.abort(refusal.code, refusal.message, trailing_metadata=refusal.metadata)
    return handle


def _guarded_bidi(behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]],
                  method: str, permission: auth.Permission | None,
                  ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    """``_guarded`` for a stream of requests answered by a stream (the behaviour writes its
    replies and checks each request for ``_Malformed`` itself)."""
    async def handle(requests: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            _authorize(context, method, permission)
            await behavior(requests, context)
        except Refused as refusal:
            await context.abort(refusal.code, refusal.message, trailing_metadata=refusal.metadata)
    return handle


_KINDS: dict[tuple[bool, bool], tuple[Callable[..., grpc.RpcMethodHandler], Callable[..., Any]]] = {
    (False, False): (grpc.unary_unary_rpc_method_handler, _guarded),
    (False, True): (grpc.unary_stream_rpc_method_handler, _guarded_stream),
    (True, True): (grpc.stream_stream_rpc_method_handler, _guarded_bidi),
}
"""Each kind of RPC the service has (client streaming, server streaming): its handler and its
guard."""


def _authorize(context: grpc.aio.ServicerContext, method: str,
               permission: auth.Permission | None) -> None:
    """Raises ``Refused`` unless the caller's certificate grants ``permission``; ``None`` means
    no check (a plaintext node, on loopback only)."""
    if permission is not None:
        denied = auth.check(method, permission, context.auth_context())
        if denied is not None:
            raise Refused(grpc.StatusCode[denied.code], denied.message)


def status_message(view: NodeStatusView, config: NodeConfig) -> api_pb2.NodeStatus:
    """The Status RPC's answer from the node's own view."""
    api_of = {m.info.raft_address: m.info.api_address for m in view.members}
    return api_pb2.NodeStatus(
        cluster_id=config.cluster_id,
        node_id=config.node_id,
        raft_address=config.me.raft_address,
        api_address=config.me.api_address,
        role=view.role,
        leader_raft_address=view.leader or "",
        leader_api_address=api_of.get(view.leader or "") or config.api_address_of(view.leader or ""),
        term=view.term,
        commit_index=view.commit_index,
        applied_index=view.applied_index,
        sessions=view.sessions,
        keys=view.keys,
        digest=view.digest,
        lag=max(view.commit_index - view.applied_index, 0),
        has_quorum=view.has_quorum,
        pid=os.getpid(),
        fsync=config.fsync,
        peers=[
            api_pb2.PeerStatus(
                raft_address=m.info.raft_address,
                api_address=m.info.api_address,
                connected=view.peers_connected.get(m.info.raft_address, False),
                match_index=view.peers_match_index.get(m.info.raft_address, 0),
                role=m.info.role.value,
                name=m.info.name,
            )
            for m in view.members if not m.is_self
        ],
        alarms=view.alarms,
        log_length=view.log_length,
        membership_change_pending=view.membership_change_pending,
        snapshot=view.snapshot,
        tick_gap_max_ms=view.tick_gap_max * 1e3,
        tick_gap_recent_ms=view.tick_gap_recent * 1e3,
        snapshots_written=view.snapshots_written,
        snapshots_loaded=view.snapshots_loaded,
        snapshot_write_seconds=view.snapshot_write_seconds,
        snapshot_restore_seconds=view.snapshot_restore_seconds,
        gc_pause_max_ms=view.gc_pause_max * 1e3,
    )


class ApiServer:
    """The gRPC API of one node: a ``grpc.aio`` server on an event loop in its own thread."""

    def __init__(self, node: KVNode, config: NodeConfig) -> None:
        self._node = node
        self._config = config
        self._started: Future[None] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"kv-api-{config.node_id}")

    def start(self, timeout: float = 10.0) -> None:
        """Returns once the server listens; raises ``OSError`` if it cannot."""
        self._thread.start()
        self._started.result(timeout)

    def stop(self) -> None:
        """Lets in-flight RPCs finish for up to STOP_GRACE seconds, then returns."""
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # the loop is already gone
        self._thread.join(STOP_GRACE + 5.0)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            log.exception("the API server failed")
            if not self._started.done():
                self._started.set_exception(exc)

    async def _serve(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        tls = self._config.tls
        server.add_generic_rpc_handlers(
            (_handlers(KVService(self._node, self._config), authorize=tls is not None),))
        try:
            if tls is None:
                server.add_insecure_port(self._config.me.api_address)
            else:
                server.add_secure_port(self._config.me.api_address, tls.server_credentials())
        except RuntimeError as exc:
            self._started.set_exception(
                OSError(f"cannot listen on {self._config.me.api_address}: {exc}"))
            return
        await server.start()
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set_result(None)
        await self._stop.wait()
        await server.stop(STOP_GRACE)


@contextmanager
def serving(config: NodeConfig,
            state_machine_type: type[StateMachine] = StateMachine) -> Iterator[KVNode]:
    """A running node with its API server; both stop when the block ends."""
    warning = config.tls.host_warning(config.me.api_address) if config.tls else None
    if warning:
        log.warning("%s", warning)
    node = KVNode(config, state_machine_type)
    api = ApiServer(node, config)
    try:
        api.start()
    except BaseException:
        node.stop()
        raise
    log.info("node %s serving clients on %s (%s), raft on %s", config.node_id,
             config.me.api_address, "mutual TLS" if config.tls else "plaintext, loopback only",
             config.me.raft_address)
    metrics = None
    if node.metrics is not None and config.metrics_address is not None:
        from kvstore.metrics import MetricsServer, NodeCollector

        metrics = MetricsServer(config.metrics_address, NodeCollector(node, node.metrics),
                                config.tls)
        try:
            metrics.start()
        except BaseException:
            api.stop()
            node.stop()
            raise
        log.info("node %s serving metrics on %s (%s)", config.node_id, config.metrics_address,
                 "HTTPS, client certificate required" if config.tls else "HTTP, loopback only")
    try:
        yield node
    finally:
        if metrics is not None:
            metrics.stop()
        api.stop()
        node.stop()


def run_node(config: NodeConfig, state_machine_type: type[StateMachine] = StateMachine) -> None:
    """Runs a node until SIGTERM or SIGINT, then stops it cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with serving(config, state_machine_type):
        log.info("%d start-up objects frozen out of the garbage collector's reach",
                 gc_pauses.freeze_start_up())
        stop.wait()
    log.info("node %s stopped", config.node_id)
