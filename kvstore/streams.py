"""Proposals over one long-lived call per node (``ProposeStream``), for the blocking client.

Why a stream: a gRPC call costs Python a few hundred microseconds on each side whatever it
carries; a message on an open call costs about half as much on the server (the call's set-up,
metadata and status are paid once). ``benchmarks/grpc_ceiling.py --rpc stream`` measures it.

The rule that keeps the retry rules exact is the one of a dropped call, per request:

* A request that got its reply has its outcomes, one per proposal, as ``ProposeBatch`` has.
* A request that got no reply when the stream ended with an error has the fate that error
  tells (``retry.fate_of_status``): "failed to connect" means nothing left this process, so
  not applied; a stream that broke after it was open means the request may have been applied.
* A request whose caller stopped waiting is "outcome unknown": it was written.
* A stream that ended (the node stopped, the connection broke) carries nothing more; the
  client opens a new one for the next request.

Replies are matched to requests by a tag, so they may come in any order. Every proposal still
carries its own session and series id: the stream changes how proposals travel, not what a
retry may do. ``ProposalStream`` is the blocking client's, ``AioProposalStream`` the asyncio
client's; each returns, for a request, its reply or the exception that says why there is none,
and ``kvstore.client.outcomes_of`` turns either into outcomes.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Sequence

import grpc

from kvstore.proto import api_pb2, api_pb2_grpc

_END = object()
"""Ends the request iterator gRPC reads from: the stream's half-close."""


class StreamEnded(Exception):
    """The node closed the stream without an error, with requests still unanswered."""


class NoReplyInTime(Exception):
    """The caller's deadline passed before the request's reply came (it was written)."""


class _Reply:
    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: api_pb2.ProposeStreamReply | BaseException | None = None

    def set(self, answer: api_pb2.ProposeStreamReply | BaseException) -> None:
        self.answer = answer
        self.done.set()


class ProposalStream:
    """One ``ProposeStream`` call to one node, shared by the threads of a ``Client``.

    gRPC reads the requests from a queue on a thread of its own; a reader thread of ours takes
    each reply and wakes the thread that waits for it.
    """

    def __init__(self, stub: api_pb2_grpc.KVStub) -> None:
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: dict[int, _Reply] = {}
        self._tags = itertools.count(1)
        self._ended: BaseException | None = None
        self._call = stub.ProposeStream(iter(self._requests.get, _END))
        self._reader = threading.Thread(target=self._read, name="kv-proposal-stream", daemon=True)
        self._reader.start()

    @property
    def ended(self) -> bool:
        with self._lock:
            return self._ended is not None

    def send(self, proposals: Sequence[api_pb2.ProposeRequest],
             timeout: float) -> api_pb2.ProposeStreamReply | BaseException:
        """Sends one batch and waits up to ``timeout`` s for its reply; returns the reply or
        the exception that says why there is none (``retry`` classifies it)."""
        reply = _Reply()
        with self._lock:
            if self._ended is not None:
                return self._ended
            tag = next(self._tags)
            self._waiting[tag] = reply
        self._requests.put(api_pb2.ProposeStreamRequest(
            tag=tag, proposals=proposals, timeout_ms=max(int(timeout * 1000), 1)))
        if not reply.done.wait(timeout):
            with self._lock:
                self._waiting.pop(tag, None)
            if reply.answer is None:
                return NoReplyInTime(f"no reply within {timeout:.3f}s on the proposal stream")
        return reply.answer  # type: ignore[return-value]

    def close(self) -> None:
        """Cancels the call: requests still unanswered end as the cancellation says."""
        self._requests.put(_END)
        self._call.cancel()
        self._reader.join(timeout=1.0)

    def _read(self) -> None:
        end: BaseException
        try:
            for message in self._call:
                with self._lock:
                    reply = self._waiting.pop(message.tag, None)
                if reply is not None:
                    reply.set(message)
            end = StreamEnded("the node ended the proposal stream before it answered")
        except grpc.RpcError as exc:
            end = exc
        except Exception as exc:  # noqa: BLE001 - whatever ended it, the waiters must hear
            end = exc
        with self._lock:
            self._ended = end
            waiting, self._waiting = self._waiting, {}
        self._requests.put(_END)  # gRPC's thread that reads the requests ends too
        for reply in waiting.values():
            reply.set(end)


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
                await self._call.write(api_pb2.ProposeStreamRequest(
                    tag=tag, proposals=proposals, timeout_ms=max(int(timeout * 1000), 1)))
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call has ended: the reader settles the reply with the reason
        done, _ = await asyncio.wait((reply,), timeout=timeout)
        self._waiting.pop(tag, None)
        if not done:
            return NoReplyInTime(f"no reply within {timeout:.3f}s on the proposal stream")
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
                    end = StreamEnded("the node ended the proposal stream before it answered")
                    break
                reply = self._waiting.pop(message.tag, None)
                if reply is not None and not reply.done():
                    reply.set_result(message)
        except grpc.RpcError as exc:
            end = exc
        except asyncio.CancelledError:
            end = StreamEnded("the proposal stream was closed")
        except Exception as exc:  # noqa: BLE001 - whatever ended it, the waiters must hear
            end = exc
        self._ended = end
        waiting, self._waiting = self._waiting, {}
        for reply in waiting.values():
            if not reply.done():
                reply.set_result(end)
