"""Each client's side of ``ProposeStream`` (``kvstore.streams``) against real gRPC servers in
this process: what a request left without a reply means.

The claims, for the blocking and the asyncio client alike: no reply in time on a written
request is "outcome unknown"; a stream that ends with requests unanswered leaves them "outcome
unknown" and takes no more; no connection at all is "not applied" (nothing left the client);
and ended streams leave no thread behind. The servers are plain gRPC servers that take the
stream and never answer, or end it after the first request: the two ways a node can leave a
written request without a reply.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from kvstore import ops, retry
from kvstore.client import outcomes_of
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.streams import AioProposalStream, NoReplyInTime, ProposalStream, StreamEnded, Watchdog
from tests import support

REPLY_TIMEOUT = 10.0
STREAMS_ENDED = 20


class _Node(api_pb2_grpc.KVServicer):
    """A node that takes the stream and never answers, or ends it after the first request:
    the two ways a written request stays without a reply."""

    def __init__(self, *, end_after_first: bool) -> None:
        self.end_after_first = end_after_first
        self.received = threading.Event()
        self.stop = threading.Event()

    def ProposeStream(self, requests: Iterator[api_pb2.ProposeStreamRequest],
                      context: grpc.ServicerContext) -> Iterator[api_pb2.ProposeStreamReply]:
        context.send_initial_metadata(())
        for _ in requests:
            self.received.set()
            if self.end_after_first:
                return
            self.stop.wait(REPLY_TIMEOUT)
        yield from ()


def _serve(node: _Node) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    api_pb2_grpc.add_KVServicer_to_server(node, server)
    address = f"127.0.0.1:{support.free_port()}"
    server.add_insecure_port(address)
    server.start()
    return server, address


def _proposal() -> api_pb2.ProposeRequest:
    return api_pb2.ProposeRequest(command=ops.incr(b"k"))


def _send_twice(kind: str, address: str, count: int, timeout: float) -> tuple[object, object]:
    """Sends ``count`` proposals, waits for the stream to end if it does, then one more
    request, through the ``kind`` client's stream; returns both answers."""
    def ended(stream: ProposalStream | AioProposalStream) -> bool:
        return stream.ended

    if kind == "sync":
        watchdog = Watchdog()
        with grpc.insecure_channel(address) as channel:
            stream = ProposalStream(api_pb2_grpc.KVStub(channel), watchdog)
            try:
                first = stream.send([_proposal()] * count, timeout=timeout)
                support.wait_for(lambda: ended(stream), REPLY_TIMEOUT, "the stream to end")
                return first, stream.send([_proposal()], timeout=timeout)
            finally:
                stream.close()
                watchdog.stop()

    async def run() -> tuple[object, object]:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = AioProposalStream(api_pb2_grpc.KVStub(channel))
            try:
                first = await stream.send([_proposal()] * count, timeout=timeout)
                async with asyncio.timeout(REPLY_TIMEOUT):  # the aio stream outlives a timeout
                    while not (ended(stream) or isinstance(first, NoReplyInTime)):
                        await asyncio.sleep(0.01)
                return first, await stream.send([_proposal()], timeout=timeout)
            finally:
                await stream.close()
    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_no_reply_in_time_on_a_written_request_is_outcome_unknown(kind: str) -> None:
    node = _Node(end_after_first=False)
    server, address = _serve(node)
    try:
        answer, _ = _send_twice(kind, address, 1, timeout=0.5)
        assert node.received.is_set()
    finally:
        node.stop.set()
        server.stop(None)
    assert isinstance(answer, NoReplyInTime), answer
    [outcome] = outcomes_of(1, answer)
    assert isinstance(outcome, retry.Failure) and outcome.fate is retry.Fate.OUTCOME_UNKNOWN


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_stream_that_ends_with_requests_unanswered_leaves_them_outcome_unknown(
        kind: str) -> None:
    """And an ended stream takes no more requests: the next one gets the same end at once."""
    server, address = _serve(_Node(end_after_first=True))
    try:
        answer, later = _send_twice(kind, address, 2, timeout=REPLY_TIMEOUT)
    finally:
        server.stop(None)
    assert isinstance(answer, StreamEnded), answer
    outcomes = outcomes_of(2, answer)
    assert [o.fate for o in outcomes] == [retry.Fate.OUTCOME_UNKNOWN] * 2  # type: ignore[union-attr]
    assert later is answer, "an ended stream must not take more requests"


def test_no_connection_means_not_applied_for_both_clients() -> None:
    """Nothing listens: nothing could have left, so a retry elsewhere is safe even without a
    session."""
    address = f"127.0.0.1:{support.free_port()}"
    watchdog = Watchdog()
    with grpc.insecure_channel(address) as channel:
        stream = ProposalStream(api_pb2_grpc.KVStub(channel), watchdog)
        answer = stream.send([_proposal()], timeout=REPLY_TIMEOUT)
        stream.close()
    watchdog.stop()

    async def aio_answer() -> object:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = AioProposalStream(api_pb2_grpc.KVStub(channel))
            try:
                return await stream.send([_proposal()], timeout=REPLY_TIMEOUT)
            finally:
                await stream.close()

    for got in (answer, asyncio.run(aio_answer())):
        assert isinstance(got, grpc.RpcError), got
        [outcome] = outcomes_of(1, got)
        assert isinstance(outcome, retry.Failure) and outcome.fate is retry.Fate.NOT_APPLIED, got


def test_ended_streams_leave_no_thread_behind() -> None:
    """Each ended stream's reader and gRPC's thread that reads its requests both end: a client
    that outlives many broken streams (a node restarting again and again) does not grow."""
    address = f"127.0.0.1:{support.free_port()}"
    watchdog = Watchdog()
    before = threading.active_count()
    with grpc.insecure_channel(address) as channel:
        for _ in range(STREAMS_ENDED):
            stream = ProposalStream(api_pb2_grpc.KVStub(channel), watchdog)
            stream.send([_proposal()], timeout=REPLY_TIMEOUT)
            assert stream.ended
        support.wait_for(lambda: threading.active_count() <= before, REPLY_TIMEOUT,
                         "the ended streams' threads to end")
    watchdog.stop()
