"""Each client's side of ``ProposeStream`` (``kvstore.streams``) against real gRPC servers in
this process: what a request left without a reply means.

The claims, for the blocking and the asyncio client alike: no reply in time on a written
request is "outcome unknown"; a stream that ends with requests unanswered leaves them "outcome
unknown" and takes no more; no connection at all is "not applied" (nothing left the client);
and ended streams leave no thread behind. The servers are plain gRPC servers that take the
stream and never answer, or end it after the first request: the two ways a node can leave a
written request without a reply. (``kvstore/streams.py`` is not in ``make mutate``'s set yet:
a group run left 54 of 186 mutants alive, most of them messages, thread names and equivalent
comparisons, a few real; see the README's mutation testing section.)
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
from kvstore.proto.log_pb2 import Result
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


class _Answering(api_pb2_grpc.KVServicer):
    """A node that answers: each reply carries its request's tag and one outcome per proposal,
    whose result number is the request's ``timeout_ms``. With ``swap`` it holds a request until
    the next one comes and answers that one first (replies in another order than requests)."""

    def __init__(self, *, swap: bool = False) -> None:
        self.swap = swap
        self.tags: list[int] = []

    def ProposeStream(self, requests: Iterator[api_pb2.ProposeStreamRequest],
                      context: grpc.ServicerContext) -> Iterator[api_pb2.ProposeStreamReply]:
        held: list[api_pb2.ProposeStreamRequest] = []
        for request in requests:
            self.tags.append(request.tag)
            held.append(request)
            if self.swap and len(held) < 2:
                continue
            for one in reversed(held):
                yield api_pb2.ProposeStreamReply(tag=one.tag, outcomes=[
                    api_pb2.ProposeOutcome(result=Result(number=one.timeout_ms))
                    for _ in one.proposals])
            held = []


def _serve(node: api_pb2_grpc.KVServicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    api_pb2_grpc.add_KVServicer_to_server(node, server)
    address = f"127.0.0.1:{support.free_port()}"
    server.add_insecure_port(address)
    server.start()
    return server, address


def _proposal() -> api_pb2.ProposeRequest:
    return api_pb2.ProposeRequest(command=ops.incr(b"k"))


def _numbers(reply: object) -> list[int]:
    assert isinstance(reply, api_pb2.ProposeStreamReply), reply
    return [outcome.result.number for outcome in reply.outcomes]


def test_the_blocking_client_gets_each_reply_and_the_stream_goes_on() -> None:
    """Two requests one after the other on one stream: each is sent with its own tag and the
    caller's timeout in milliseconds, each caller gets its own reply, and a stream that
    answered is not ended."""
    node = _Answering()
    server, address = _serve(node)
    watchdog = Watchdog()
    try:
        with grpc.insecure_channel(address) as channel:
            stream = ProposalStream(api_pb2_grpc.KVStub(channel), watchdog)
            first = stream.send([_proposal(), _proposal()], timeout=2.0)
            second = stream.send([_proposal()], timeout=3.0)
            assert not stream.ended
            stream.close()
            assert stream.ended
    finally:
        watchdog.stop()
        server.stop(None)
    assert node.tags == [1, 2]
    assert (_numbers(first), _numbers(second)) == ([2000, 2000], [3000])


def test_the_asyncio_client_matches_replies_to_requests_by_tag() -> None:
    """Two requests in flight at once, answered in the other order: each gets its own."""
    node = _Answering(swap=True)
    server, address = _serve(node)

    async def run() -> tuple[object, object, bool]:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = AioProposalStream(api_pb2_grpc.KVStub(channel))
            try:
                first, second = await asyncio.gather(
                    stream.send([_proposal()], timeout=2.0),
                    stream.send([_proposal(), _proposal()], timeout=3.0))
                ended_before = stream.ended
            finally:
                await stream.close()
            return first, second, ended_before or not stream.ended
    try:
        first, second, wrongly_ended = asyncio.run(run())
    finally:
        server.stop(None)
    assert sorted(node.tags) == [1, 2]
    assert (_numbers(first), _numbers(second)) == ([2000], [3000, 3000])
    assert not wrongly_ended, "ended while it answered, or still open once closed"


def _send_twice(kind: str, address: str, count: int, timeout: float) -> tuple[object, object]:
    """Sends ``count`` proposals, waits for the stream to end if it does, then one more
    request, through the ``kind`` client's stream; returns both answers."""
    if kind == "sync":
        watchdog = Watchdog()
        with grpc.insecure_channel(address) as channel:
            stream = ProposalStream(api_pb2_grpc.KVStub(channel), watchdog)
            try:
                first = stream.send([_proposal()] * count, timeout=timeout)
                support.wait_for(lambda: stream.ended, REPLY_TIMEOUT, "the stream to end")
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
                    while not (stream.ended or isinstance(first, NoReplyInTime)):
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
