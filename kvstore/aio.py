"""The asyncio client: ``kvstore.Client``'s API as coroutines, over ``grpc.aio``.

Same calls (``get_session``, ``propose``, ``close_session``, also under their dragonboat
names ``sync_get_session``..., ``get_noop_session``, ``read``, ``get``, ``range``, ``put``,
``delete``, ``incr``, ``append``, ``cas``, ``write``), same typed errors (``kvstore.errors``), same retry rules: those are ``kvstore.retry``'s, which both clients
run; what differs is only how they wait. Same TLS files (``kvstore.tls.ClientTLS``).

It is made for many proposals at once on one event loop: thousands of tasks may propose
concurrently. Concurrent proposals to one node travel together, as batches formed by
``kvstore.batching`` (a lone proposal goes out at once, those arriving while one is in flight
go together in the next), each batch a message on one ``ProposeStream`` call per node
(``kvstore.streams``; ``streaming=False``: ``Propose`` and ``ProposeBatch`` calls), and each
proposal keeps its own session, series id and answer. A ``Session`` belongs to one task at a
time, as in the blocking client it belongs to one thread.

    async with kvstore.aio.Client(["127.0.0.1:7001"]) as kv:
        session = await kv.get_session()
        result = await kv.propose(session, kvstore.ops.incr(b"hits"))
        session.proposal_completed()

A client belongs to the event loop it is first used on (gRPC's aio channels do).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvstore import errors, ops, retry
from kvstore.batching import GroupCommit
from kvstore.client import (
    DEFAULT_TIMEOUT,
    WAITED_TOO_LONG,
    Consistency,
    check_command,
    checked_endpoints,
    closing_request,
    failure_of,
    outcomes_of,
    proposal_request,
    read_request,
    register_request,
)
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.proto.log_pb2 import Command, Result
from kvstore.streams import AioProposalStream
from kvstore.tls import ClientTLS, explain_refusal
from session.session import Session, new_noop_session

_T = TypeVar("_T")


class Client:
    """A connection to a cluster through any of its nodes' API endpoints, for asyncio."""

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
        self._channels: dict[str, tuple[grpc.aio.Channel, api_pb2_grpc.KVStub]] = {}
        self._preferred = self.endpoints[0]
        self._pool: list[Session] = []
        self._batches = _Batches(self._stub, streaming=streaming) if batching else None

    # -- the cluster ------------------------------------------------------------------------

    async def get_cluster_id(self) -> int:
        """The cluster's id, asked of the first node that answers (once)."""
        if self._cluster_id is None:
            failures = []
            for endpoint in self._rotation():
                try:
                    self._cluster_id = (await self.status(endpoint)).cluster_id
                    break
                except errors.Unavailable as exc:
                    failures.append(str(exc))
            else:
                raise errors.Unavailable("no endpoint answered: " + "; ".join(failures))
        return self._cluster_id

    async def status(self, endpoint: str, *, with_digest: bool = False,
                     timeout: float | None = None) -> api_pb2.NodeStatus:
        """One node's status; raises ``Unavailable`` if it does not answer."""
        request = api_pb2.StatusRequest(with_digest=with_digest)
        timeout = timeout or self.dial_timeout
        try:
            return await self._stub(endpoint).Status(request, timeout=timeout)
        except grpc.RpcError as exc:
            failure = failure_of(exc)
            if isinstance(failure.error, errors.AccessDenied):
                raise failure.error from exc
            reason = failure.tls_suspect and await asyncio.to_thread(
                explain_refusal, endpoint, self._tls, max(min(timeout, self.dial_timeout), 0.1))
            if reason:
                raise errors.Unauthenticated(reason) from exc
            raise errors.Unavailable(f"{endpoint}: {failure.detail}") from exc

    # -- dragonboat's session API -----------------------------------------------------------

    async def get_session(self, timeout: float | None = None) -> Session:
        """Opens a new session on the cluster, ready for its first proposal."""
        session, request = register_request(await self.get_cluster_id())
        await self._call(lambda stub, t: stub.RegisterSession(request, timeout=t), timeout,
                         retry_unknown=True)
        session.prepare_for_propose()
        return session

    async def close_session(self, session: Session, timeout: float | None = None) -> None:
        """Closes ``session`` on the cluster (retrying is safe: closing twice succeeds)."""
        request = closing_request(session, await self.get_cluster_id())
        await self._call(lambda stub, t: stub.UnregisterSession(request, timeout=t), timeout,
                         retry_unknown=True)

    def get_noop_session(self) -> Session:
        """A session without deduplication: needs no registration, and a retry may apply twice.

        Not a coroutine, as in the blocking client; it needs the cluster id, so it comes after
        the first call that learnt it (or pass ``cluster_id=``).
        """
        if self._cluster_id is None:
            raise errors.InvalidArgument("the cluster id is not known yet: pass cluster_id= or "
                                         "await get_cluster_id() first")
        return new_noop_session(self._cluster_id)

    async def propose(self, session: Session, command: Command,
                      timeout: float | None = None) -> Result:
        """Proposes ``command`` with ``session`` and returns the state machine's result.

        On an ambiguous failure the same series id is retried until ``timeout``; then
        ``OutcomeUnknown`` is raised and the caller may retry with the same session later.
        The caller calls ``session.proposal_completed()`` once it has the answer.
        """
        request = proposal_request(session, command, await self.get_cluster_id())
        retry_unknown = not session.is_noop_session()
        if self._batches is None:
            return await self._call(lambda stub, t: stub.Propose(request, timeout=t), timeout,
                                    retry_unknown=retry_unknown)
        batches = self._batches
        return await self._retry(lambda endpoint, t: batches.propose(endpoint, request, t),
                                 timeout, retry_unknown=retry_unknown)

    # The blocking client's dragonboat names, so code moves between the two by adding await.
    sync_get_session = get_session
    sync_propose = propose
    sync_close_session = close_session

    # -- reads ------------------------------------------------------------------------------

    async def read(self, command: Command, *, consistency: Consistency = "linearizable",
                   timeout: float | None = None) -> Result:
        """A get or range: linearizable (through the leader's log) or serializable (one
        node's replica, possibly stale)."""
        request = read_request(command, consistency, await self.get_cluster_id())
        return await self._call(lambda stub, t: stub.Read(request, timeout=t), timeout,
                                retry_unknown=True, any_node=consistency == "serializable")

    async def get(self, key: bytes, *, consistency: Consistency = "linearizable",
                  timeout: float | None = None) -> Result:
        return await self.read(ops.get(key), consistency=consistency, timeout=timeout)

    async def range(self, prefix: bytes, *, limit: int = 0, keys_only: bool = False,
                    consistency: Consistency = "linearizable",
                    timeout: float | None = None) -> Result:
        return await self.read(ops.range_(prefix, limit=limit, keys_only=keys_only),
                               consistency=consistency, timeout=timeout)

    # -- writes -----------------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes, *, session: Session | None = None,
                  timeout: float | None = None) -> Result:
        return await self.write(ops.put(key, value), session=session, timeout=timeout)

    async def delete(self, key: bytes, *, prefix: bool = False, session: Session | None = None,
                     timeout: float | None = None) -> Result:
        return await self.write(ops.delete(key, prefix=prefix), session=session, timeout=timeout)

    async def incr(self, key: bytes, delta: int = 1, *, session: Session | None = None,
                   timeout: float | None = None) -> Result:
        return await self.write(ops.incr(key, delta), session=session, timeout=timeout)

    async def append(self, key: bytes, value: bytes, *, session: Session | None = None,
                     timeout: float | None = None) -> Result:
        return await self.write(ops.append(key, value), session=session, timeout=timeout)

    async def cas(self, key: bytes, value: bytes, *, expected: bytes | None,
                  session: Session | None = None, timeout: float | None = None) -> Result:
        return await self.write(ops.cas(key, value, expected=expected), session=session,
                                timeout=timeout)

    async def write(self, command: Command, *, session: Session | None = None,
                    timeout: float | None = None) -> Result:
        """Proposes ``command`` with ``session``, or with a pooled session of the client's own
        (the rules of ``kvstore.Client.write``: ``retry.pooled_session_fate``)."""
        if session is not None:
            return await self.propose(session, command, timeout)
        check_command(command)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        pooled = self._pool.pop() if self._pool else await self.get_session(timeout)
        try:
            return await self._propose_pooled(pooled, command, deadline - loop.time())
        except errors.SessionExpired:
            # Evicted from the cluster's LRU store: nothing was applied, so a fresh session
            # may carry the command.
            fresh = await self.get_session(deadline - loop.time())
            return await self._propose_pooled(fresh, command, deadline - loop.time())

    async def close(self) -> None:
        """Closes the pooled sessions on the cluster (best effort) and the channels."""
        pool, self._pool = self._pool, []
        for session in pool:
            try:
                await self.close_session(session, timeout=self.dial_timeout)
            except errors.KVError:
                pass  # the LRU store evicts it eventually
        if self._batches is not None:
            await self._batches.close()
        channels, self._channels = list(self._channels.values()), {}
        for channel, _ in channels:
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def proposal_calls(self) -> tuple[int, int]:
        """(calls, proposals) sent so far by the batching path: proposals / calls is the mean
        batch size (``(0, 0)`` with ``batching=False``)."""
        return self._batches.stats() if self._batches is not None else (0, 0)

    # -- machinery --------------------------------------------------------------------------

    async def _propose_pooled(self, session: Session, command: Command, timeout: float) -> Result:
        try:
            result = await self.propose(session, command, timeout)
        except BaseException as exc:
            self._after_pooled(session, exc)
            raise
        self._after_pooled(session, None)
        return result

    def _after_pooled(self, session: Session, error: BaseException | None) -> None:
        fate = retry.pooled_session_fate(error)
        if fate == "drop":
            return
        if fate == "complete":
            session.proposal_completed()
        self._pool.append(session)

    def _stub(self, endpoint: str) -> api_pb2_grpc.KVStub:
        if endpoint not in self._channels:
            channel = (grpc.aio.insecure_channel(endpoint) if self._tls is None else
                       grpc.aio.secure_channel(endpoint, self._tls.channel_credentials()))
            self._channels[endpoint] = (channel, api_pb2_grpc.KVStub(channel))
        return self._channels[endpoint][1]

    def _rotation(self) -> list[str]:
        """Endpoints to try, the preferred one (the last known leader) first."""
        preferred = self._preferred
        return [preferred] + [e for e in self.endpoints if e != preferred]

    async def _call(self, rpc: Callable[[api_pb2_grpc.KVStub, float], Awaitable[_T]],
                    timeout: float | None, *, retry_unknown: bool, any_node: bool = False) -> _T:
        async def attempt(endpoint: str, attempt_timeout: float) -> _T | retry.Failure:
            try:
                return await rpc(self._stub(endpoint), attempt_timeout)
            except grpc.RpcError as exc:
                return failure_of(exc)
        return await self._retry(attempt, timeout, retry_unknown=retry_unknown,
                                 any_node=any_node)

    async def _retry(self, attempt: Callable[[str, float], Awaitable[_T | retry.Failure]],
                     timeout: float | None, *, retry_unknown: bool,
                     any_node: bool = False) -> _T:
        """``kvstore.Client._retry`` with ``await``: the plan is ``kvstore.retry.Attempts``."""
        loop = asyncio.get_running_loop()
        plan = retry.Attempts(timeout or self.timeout, loop.time(), retry_unknown=retry_unknown,
                              any_node=any_node)
        while True:
            step = plan.next(loop.time(), self._rotation)
            if isinstance(step, retry.Pause):
                await asyncio.sleep(step.seconds)
                continue
            answer = await attempt(step.endpoint, step.timeout)
            if not isinstance(answer, retry.Failure):
                self._preferred = step.endpoint
                return answer
            if plan.should_explain(answer):
                wait = max(min(plan.remaining(loop.time()), self.dial_timeout), 0.1)
                reason = await asyncio.to_thread(explain_refusal, step.endpoint, self._tls, wait)
                if reason:
                    raise errors.Unauthenticated(reason)
            hint = plan.failed(step.endpoint, answer)
            if hint:
                self._preferred = hint


_EXPIRED: Any = object()
"""What a waiting proposal's future holds when its attempt's deadline passed first."""


class _Slot:
    """One proposal waiting for its share of a call."""

    __slots__ = ("deadline", "future", "request", "size")

    def __init__(self, request: api_pb2.ProposeRequest, deadline: float,
                 future: asyncio.Future[Any]) -> None:
        self.request = request
        self.size = request.ByteSize()
        self.deadline = deadline
        self.future = future

    def settle(self, outcome: object) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


class _Batches:
    """The proposals of many tasks, sent to each endpoint in shared calls (``kvstore.batching``).

    A proposal that goes out alone is sent by its own task; a batch formed while calls were in
    flight is sent by a task of its own, which hands out the answers and, when it ends, sends
    what queued meanwhile. All on the event loop: no lock.

    With ``streaming`` (the default) every batch, a lone proposal too, is a message on one
    ``ProposeStream`` call per endpoint (``kvstore.streams``), opened again after it ends;
    without, a lone proposal is a ``Propose`` call and a batch a ``ProposeBatch`` call.
    """

    def __init__(self, stub: Callable[[str], api_pb2_grpc.KVStub], *, streaming: bool) -> None:
        self._stub = stub
        self._streaming = streaming
        self._groups: dict[str, GroupCommit[_Slot]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._streams: dict[str, AioProposalStream] = {}

    async def propose(self, endpoint: str, request: api_pb2.ProposeRequest,
                      timeout: float) -> Result | retry.Failure:
        loop = asyncio.get_running_loop()
        group = self._groups.get(endpoint)
        if group is None:
            group = self._groups[endpoint] = GroupCommit(_slot_size)
        slot = _Slot(request, loop.time() + timeout, loop.create_future())
        if group.add(slot) is not None:
            try:
                return outcomes_of(1, await self._carry(endpoint, [request], timeout))[0]
            except grpc.RpcError as exc:
                return failure_of(exc)
            finally:
                self._finished(endpoint)
        expiry = loop.call_later(timeout, slot.settle, _EXPIRED)
        try:
            outcome = await slot.future
        except asyncio.CancelledError:
            group.withdraw(slot)  # if still queued it is never sent
            raise
        finally:
            expiry.cancel()
        if outcome is not _EXPIRED:
            return outcome  # type: ignore[no-any-return]
        if group.withdraw(slot):
            return retry.Failure(retry.Fate.NOT_APPLIED, WAITED_TOO_LONG)
        return retry.Failure(retry.Fate.OUTCOME_UNKNOWN, "no answer in time (client deadline)")

    def stats(self) -> tuple[int, int]:
        return (sum(g.calls for g in self._groups.values()),
                sum(g.sent for g in self._groups.values()))

    async def _carry(self, endpoint: str, requests: list[api_pb2.ProposeRequest],
                     timeout: float) -> object:
        """Sends one batch (a lone proposal is a batch of one) the way this client sends them;
        returns what answered it, for ``outcomes_of``; a failed call raises its error."""
        if self._streaming:
            return await self._stream(endpoint).send(requests, timeout)
        stub = self._stub(endpoint)
        if len(requests) == 1:
            return await stub.Propose(requests[0], timeout=timeout)
        return await stub.ProposeBatch(api_pb2.ProposeBatchRequest(proposals=requests),
                                       timeout=timeout)

    def _stream(self, endpoint: str) -> AioProposalStream:
        """The open stream to ``endpoint``: a new one if there is none or it ended."""
        stream = self._streams.get(endpoint)
        if stream is None or stream.ended:
            stream = self._streams[endpoint] = AioProposalStream(self._stub(endpoint))
        return stream

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            await stream.close()

    def _finished(self, endpoint: str) -> None:
        for batch in self._groups[endpoint].finished():
            task = asyncio.get_running_loop().create_task(self._send(endpoint, batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, endpoint: str, batch: list[_Slot]) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = loop.time()
            for slot in batch:
                if slot.deadline <= now:
                    slot.settle(retry.Failure(retry.Fate.NOT_APPLIED, WAITED_TOO_LONG))
            batch = [slot for slot in batch if not slot.future.done()]
            if not batch:
                return
            timeout = max(slot.deadline for slot in batch) - now
            answer: object
            try:
                answer = await self._carry(endpoint, [slot.request for slot in batch], timeout)
            except asyncio.CancelledError as exc:
                answer = exc
                raise
            except Exception as exc:
                answer = exc
            finally:
                for slot, outcome in zip(batch, outcomes_of(len(batch), answer), strict=True):
                    slot.settle(outcome)
        finally:
            self._finished(endpoint)


def _slot_size(slot: _Slot) -> int:
    return slot.size
