"""Proposals over one long-lived call per node (``ProposeStream``), for both clients.

Why a stream: a gRPC call costs Python a few hundred microseconds on each side whatever it
carries; a message on an open call costs about half as much on the server (the call's set-up,
metadata and status are paid once). ``benchmarks/grpc_ceiling.py --rpc stream`` measures it.

The rule that keeps the retry rules exact is the one of a dropped call, per request:

* A request that got its reply has its outcomes, one per proposal, as ``ProposeBatch`` has.
* A request that got no reply when the stream ended with an error has the fate that error
  tells (``retry.fate_of_status``): "failed to connect" means nothing left this process, so
  not applied; a stream that broke after it was open means the request may have been applied.
* A request whose caller stopped waiting is "outcome unknown": it was written. The blocking
  client then cancels the stream (a late reply could be taken for the next request's).
* A stream that ended (the node stopped, the connection broke) carries nothing more; the
  client opens a new one for the next request.

Replies are matched to requests by a tag, so they may come in any order. Every proposal still
carries its own session and series id: the stream changes how proposals travel, not what a
retry may do. ``ProposalStream`` (with its ``Watchdog``) is the blocking client's,
``AioProposalStream`` the asyncio client's; each returns, for a request, its reply or the
exception that says why there is none, and ``kvstore.client.outcomes_of`` turns either into
outcomes.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Sequence

import grpc

from kvstore.proto import api_pb2, api_pb2_grpc

_END = object()
"""Ends the request iterator gRPC reads from: the stream's half-close."""


class StreamEnded(Exception):
    """The node closed the stream without an error, with requests still unanswered."""


class NoReplyInTime(Exception):
    """The caller's deadline passed before the request's reply came (it was written)."""


NODE_ENDED = "the node ended the proposal stream before it answered"
CLOSED = "the proposal stream was closed"


def _request(tag: int, proposals: Sequence[api_pb2.ProposeRequest],
             timeout: float) -> api_pb2.ProposeStreamRequest:
    """One request: the batch, its tag, and how long its caller waits (at least 1 ms: 0 would
    mean the node's default)."""
    return api_pb2.ProposeStreamRequest(tag=tag, proposals=proposals,
                                        timeout_ms=max(int(timeout * 1000), 1))


def _no_reply(timeout: float) -> NoReplyInTime:
    return NoReplyInTime(f"no reply within {timeout:.3f}s on the proposal stream")


class Watchdog:
    """Cancels the streams whose request is past its deadline: one thread for a client's
    streams, asleep until the earliest deadline armed.

    Why: a blocking read of a gRPC stream has no timeout of its own, and the alternative, a
    reader thread that hands each reply to its caller, costs two thread wake-ups per request
    (about 190 us of client CPU per request, measured with ``kv bench --clients 1 --compare
    calls``). Arming costs no wake-up unless the new deadline comes before the one the thread
    sleeps until: with equal timeouts, only the first request of a quiet spell wakes it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[ProposalStream, float] = {}
        self._sleeping_until = float("inf")
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kv-stream-watchdog", daemon=True)
        self._thread.start()

    def arm(self, stream: ProposalStream, deadline: float) -> None:
        with self._cond:
            self._armed[stream] = deadline
            if deadline < self._sleeping_until:
                self._cond.notify()

    def disarm(self, stream: ProposalStream) -> None:
        with self._cond:
            self._armed.pop(stream, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                for stream in [s for s, deadline in self._armed.items() if deadline <= now]:
                    del self._armed[stream]
                    stream.expire()
                self._sleeping_until = min(self._armed.values(), default=float("inf"))
                self._cond.wait(None if self._sleeping_until == float("inf")
                                else self._sleeping_until - now)
                self._sleeping_until = float("inf")


class ProposalStream:
    """One ``ProposeStream`` call to one node, carrying one request at a time.

    The caller writes its request and reads the reply itself (gRPC reads the requests from a
    queue on a thread of its own); ``Watchdog`` cancels the call if the deadline passes first.
    One at a time is what ``kvstore.batching`` sends to a node anyway (one batch in flight);
    a second caller waits its turn. A request whose caller gave up ends the stream: its reply
    could otherwise be taken for the next one's.
    """

    def __init__(self, stub: api_pb2_grpc.KVStub, watchdog: Watchdog) -> None:
        self._watchdog = watchdog
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._turn = threading.Lock()
        self._tags = itertools.count(1)
        self._ended: BaseException | None = None
        self._expired = False
        self._call = stub.ProposeStream(iter(self._requests.get, _END))

    @property
    def ended(self) -> bool:
        return self._ended is not None

    def send(self, proposals: Sequence[api_pb2.ProposeRequest],
             timeout: float) -> api_pb2.ProposeStreamReply | BaseException:
        """Sends one batch and waits up to ``timeout`` s for its reply; returns the reply or
        the exception that says why there is none (``retry`` classifies it)."""
        if not self._turn.acquire(timeout=timeout):
            return NoReplyInTime(f"no turn on the proposal stream within {timeout:.3f}s")
        try:
            if self._ended is not None:
                return self._ended
            tag = next(self._tags)
            self._watchdog.arm(self, time.monotonic() + timeout)
            self._requests.put(_request(tag, proposals, timeout))
            end: BaseException
            try:
                for reply in self._call:
                    if reply.tag == tag:
                        return reply  # type: ignore[no-any-return]
                end = StreamEnded(NODE_ENDED)
            except grpc.RpcError as exc:
                end = _no_reply(timeout) if self._expired else exc
            except Exception as exc:  # noqa: BLE001 - whatever ended it, the caller must hear
                end = exc
            finally:
                self._watchdog.disarm(self)
            self._end(end)
            return end
        finally:
            self._turn.release()

    def expire(self) -> None:
        """The watchdog's call: the request in flight is past its deadline."""
        self._expired = True
        self._end(NoReplyInTime("a request on this proposal stream had no reply in time"))
        self._call.cancel()

    def close(self) -> None:
        """Cancels the call: a request in flight ends as the cancellation says."""
        self._call.cancel()
        self._end(StreamEnded(CLOSED))

    def _end(self, end: BaseException) -> None:
        if self._ended is None:
            self._ended = end
            self._requests.put(_END)  # gRPC's thread that reads the requests ends too


class AioProposalStream:
    """One ``ProposeStream`` call to one node for ``grpc.aio``: a reader task of its own, and
    writes one at a time (the call allows no other). Belongs to the loop it was made on."""

    def __init__(self, stub: api_pb2_grpc.KVStub) -> None:
        self._call = stub.ProposeStream()
        self._writing = asyncio.Lock()
        self._waiting: dict[int, asyncio.Future[api_pb2.ProposeStreamReply | BaseException]] = {}
        self._tags = itertools.count(1)
        self._ended: BaseException | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def ended(self) -> bool:
        return self._ended is not None

    async def send(self, proposals: Sequence[api_pb2.ProposeRequest],
                   timeout: float) -> api_pb2.ProposeStreamReply | BaseException:
        """``ProposalStream.send`` as a coroutine."""
        if self._ended is not None:
            return self._ended
        tag = next(self._tags)
        reply = asyncio.get_running_loop().create_future()
        self._waiting[tag] = reply
        try:
            async with self._writing:
                await self._call.write(_request(tag, proposals, timeout))
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call has ended: the reader settles the reply with the reason
        done, _ = await asyncio.wait((reply,), timeout=timeout)
        self._waiting.pop(tag, None)
        if not done:
            return _no_reply(timeout)
        return reply.result()

    async def close(self) -> None:
        """Cancels the call: requests still unanswered end as the cancellation says."""
        self._call.cancel()
        await asyncio.wait((self._reader,), timeout=1.0)

    async def _read(self) -> None:
        end: BaseException
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    end = StreamEnded(NODE_ENDED)
                    break
                reply = self._waiting.pop(message.tag, None)
                if reply is not None and not reply.done():
                    reply.set_result(message)
        except grpc.RpcError as exc:
            end = exc
        except asyncio.CancelledError:
            end = StreamEnded(CLOSED)
        except Exception as exc:  # noqa: BLE001 - whatever ended it, the waiters must hear
            end = exc
        self._ended = end
        waiting, self._waiting = self._waiting, {}
        for reply in waiting.values():
            if not reply.done():
                reply.set_result(end)
