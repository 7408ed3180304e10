"""Each client's side of ``ProposeStream`` (``kvstore.streams``) against real gRPC servers in
this process: what a request left without a reply means.

The claims, for the blocking and the asyncio client alike: no reply in time on a written
request is "outcome unknown"; a stream that ends with requests unanswered leaves them "outcome
unknown" and takes no more; no connection at all is "not applied" (nothing left the client);
and ended streams leave no thread behind. The servers are plain gRPC servers that take the
stream and never answer, or end it after the first request: the two ways a node can leave a
written request without a reply; others answer, late, or with bytes that are no reply. These
tests are what ``make mutate GROUP=streams`` runs against ``kvstore/streams.py``'s mutants.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

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
        self.timeouts_ms: list[int] = []

    def ProposeStream(self, requests: Iterator[api_pb2.ProposeStreamRequest],
                      context: grpc.ServicerContext) -> Iterator[api_pb2.ProposeStreamReply]:
        held: list[api_pb2.ProposeStreamRequest] = []
        for request in requests:
            self.tags.append(request.tag)
            self.timeouts_ms.append(request.timeout_ms)
            held.append(request)
            if self.swap and len(held) < 2:
                continue
            for one in reversed(held):
                yield _reply_to(one)
            held = []


def _reply_to(request: api_pb2.ProposeStreamRequest) -> api_pb2.ProposeStreamReply:
    """The reply ``_Answering`` gives: the request's tag, one outcome per proposal, each with
    the request's ``timeout_ms`` for its result number."""
    return api_pb2.ProposeStreamReply(tag=request.tag, outcomes=[
        api_pb2.ProposeOutcome(result=Result(number=request.timeout_ms))
        for _ in request.proposals])


class _Late(api_pb2_grpc.KVServicer):
    """A node that answers the first request only once ``release`` is set (the test sets it
    when that request's caller has stopped waiting), and each later request at once."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def ProposeStream(self, requests: Iterator[api_pb2.ProposeStreamRequest],
                      context: grpc.ServicerContext) -> Iterator[api_pb2.ProposeStreamReply]:
        for request in requests:
            if request.tag == 1:
                self.release.wait(REPLY_TIMEOUT)
            yield _reply_to(request)


def _serve_unreadable() -> tuple[grpc.Server, str]:
    """A node whose reply to each request is bytes that are no ``ProposeStreamReply``."""
    def propose_stream(requests: Iterator[api_pb2.ProposeStreamRequest],
                       context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield b"\xff"  # a truncated varint: the client's parser refuses it

    handler = grpc.method_handlers_generic_handler("kvstore.KV", {
        "ProposeStream": grpc.stream_stream_rpc_method_handler(
            propose_stream, request_deserializer=api_pb2.ProposeStreamRequest.FromString,
            response_serializer=lambda raw: raw)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    address = f"127.0.0.1:{support.free_port()}"
    server.add_insecure_port(address)
    server.start()
    return server, address


NODE_THREADS = "test-node"
"""The name of each thread of the test nodes (gRPC servers) of this file begins with this."""


def _serve(node: api_pb2_grpc.KVServicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4,
                                                    thread_name_prefix=NODE_THREADS))
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


@contextmanager
def _blocking_stream(node: Any) -> Iterator[ProposalStream]:
    """A blocking client's stream to ``node`` served on 127.0.0.1; all stopped at the end."""
    server, address = _serve(node)
    watchdog = Watchdog()
    try:
        with grpc.insecure_channel(address) as channel:
            yield ProposalStream(api_pb2_grpc.KVStub(channel), watchdog)
    finally:
        watchdog.stop()
        server.stop(None)


def test_the_blocking_client_gets_each_reply_and_the_stream_goes_on() -> None:
    """Two requests one after the other on one stream: each is sent with its own tag and the
    caller's timeout in milliseconds, each caller gets its own reply, and a stream that
    answered is not ended."""
    node = _Answering()
    with _blocking_stream(node) as stream:
        first = stream.send([_proposal(), _proposal()], timeout=2.0)
        second = stream.send([_proposal()], timeout=3.0)
        assert not stream.ended
        stream.close()
        assert stream.ended
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


def test_the_watchdog_forgets_a_request_once_it_is_answered() -> None:
    """A request answered in time leaves no deadline behind: once the watchdog has expired a
    later deadline (another stream's, to a node that never answers), the answered request's
    deadline is past too, and its stream is still open and answers its next request."""
    node = _Answering()
    server, address = _serve(node)
    silent = _Node(end_after_first=False)
    silent_server, silent_address = _serve(silent)
    watchdog = Watchdog()
    try:
        with grpc.insecure_channel(address) as channel, \
                grpc.insecure_channel(silent_address) as silent_channel:
            stream = ProposalStream(api_pb2_grpc.KVStub(channel), watchdog)
            first = stream.send([_proposal()], timeout=0.5)
            other = ProposalStream(api_pb2_grpc.KVStub(silent_channel), watchdog)
            unanswered = other.send([_proposal()], timeout=1.0)  # its deadline is the later
            ended_by_the_old_deadline = stream.ended
            second = stream.send([_proposal()], timeout=2.0)
            other.close()
            stream.close()
    finally:
        silent.stop.set()
        watchdog.stop()
        server.stop(None)
        silent_server.stop(None)
    assert isinstance(unanswered, NoReplyInTime), unanswered
    assert not ended_by_the_old_deadline, "an answered request's deadline ended its stream"
    assert (_numbers(first), _numbers(second)) == ([500], [2000])


def test_the_asyncio_client_drops_a_late_reply_and_goes_on() -> None:
    """A reply that comes after its caller stopped waiting is for nobody: the stream drops it,
    stays open, and answers the next request with that request's own reply. The request that
    timed out is left pending nowhere."""
    node = _Late()
    server, address = _serve(node)

    async def run() -> tuple[object, int, object, bool]:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = AioProposalStream(api_pb2_grpc.KVStub(channel))
            try:
                first = await stream.send([_proposal()], timeout=0.3)
                pending = len(stream._waiting)  # no public view of the pending replies
                node.release.set()  # now tag 1's reply goes out, before any later one
                second = await stream.send([_proposal(), _proposal()], timeout=REPLY_TIMEOUT)
                return first, pending, second, stream.ended
            finally:
                await stream.close()
    try:
        first, pending, second, ended = asyncio.run(run())
    finally:
        node.release.set()
        server.stop(None)
    assert isinstance(first, NoReplyInTime), first
    assert pending == 0, "a request that timed out is still waiting for its reply"
    assert _numbers(second) == [10000, 10000]
    assert not ended, "a late reply ended the stream"


def test_the_asyncio_client_hands_an_unreadable_reply_to_its_waiter() -> None:
    """A reply the client cannot parse ends the asyncio stream: the waiting request gets the
    error that ended it (outcome unknown: the request was written), and so does the next."""
    server, address = _serve_unreadable()

    async def run() -> tuple[object, object, bool]:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = AioProposalStream(api_pb2_grpc.KVStub(channel))
            try:
                answer = await stream.send([_proposal()], timeout=REPLY_TIMEOUT)
                return answer, await stream.send([_proposal()], timeout=REPLY_TIMEOUT), \
                    stream.ended
            finally:
                await stream.close()
    try:
        answer, later, ended = asyncio.run(run())
    finally:
        server.stop(None)
    assert isinstance(answer, Exception) and not isinstance(answer, grpc.RpcError), answer
    assert ended and later is answer
    [outcome] = outcomes_of(1, answer)
    assert isinstance(outcome, retry.Failure) and outcome.fate is retry.Fate.OUTCOME_UNKNOWN


def test_a_stream_the_watchdog_expired_after_its_reply_takes_no_more_requests() -> None:
    """The watchdog can expire a stream just as its reply came (the deadline passed while the
    caller was taking it). The stream is then ended at once, so the client opens a new one for
    its next batch; a request sent on it anyway gets "no reply in time" and is never sent."""
    node = _Answering()
    with _blocking_stream(node) as stream:
        first = stream.send([_proposal()], timeout=REPLY_TIMEOUT)
        stream.expire()  # what the watchdog does at the deadline
        ended = stream.ended
        later = stream.send([_proposal()], timeout=REPLY_TIMEOUT)
        stream.close()
    assert _numbers(first) == [10000]
    assert ended, "an expired stream must be replaced before the next batch"
    assert isinstance(later, NoReplyInTime), later
    assert node.tags == [1]


def test_the_blocking_client_hands_a_reply_it_cannot_read_to_its_caller() -> None:
    """Whatever goes wrong while the blocking client reads the replies, its caller gets that
    error (outcome unknown: the request was written), and the stream ends. Here the replies
    come as raw bytes, which have no tag."""
    server, address = _serve(_Answering())
    watchdog = Watchdog()

    class RawStub:
        def __init__(self, channel: grpc.Channel) -> None:
            self.ProposeStream = channel.stream_stream(
                "/kvstore.KV/ProposeStream",
                request_serializer=api_pb2.ProposeStreamRequest.SerializeToString)

    try:
        with grpc.insecure_channel(address) as channel:
            stream = ProposalStream(RawStub(channel), watchdog)  # type: ignore[arg-type]
            answer = stream.send([_proposal()], timeout=REPLY_TIMEOUT)
            ended = stream.ended
            stream.close()
    finally:
        watchdog.stop()
        server.stop(None)
    assert isinstance(answer, AttributeError), answer
    assert ended
    [outcome] = outcomes_of(1, answer)
    assert isinstance(outcome, retry.Failure) and outcome.fate is retry.Fate.OUTCOME_UNKNOWN


def test_a_timeout_under_a_millisecond_is_sent_as_one() -> None:
    """The node reads ``timeout_ms`` 0 as its own default: a caller's timeout below a
    millisecond is sent as 1 ms, not 0 and not more."""
    node = _Answering()
    server, address = _serve(node)

    async def run() -> object:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = AioProposalStream(api_pb2_grpc.KVStub(channel))
            try:
                await stream.send([_proposal()], timeout=0.0004)
                # Its reply comes after the first request's: the node has read that one.
                return await stream.send([_proposal()], timeout=REPLY_TIMEOUT)
            finally:
                await stream.close()
    try:
        second = asyncio.run(run())
    finally:
        server.stop(None)
    assert _numbers(second) == [10000]
    assert node.timeouts_ms == [1, 10000]


def test_the_watchdog_thread_is_a_daemon_and_ends_when_stopped() -> None:
    """A client that is never closed must not keep its program from exiting, and a closed one
    leaves no thread behind."""
    before = set(threading.enumerate())
    watchdog = Watchdog()
    started = [thread for thread in threading.enumerate() if thread not in before]
    watchdog.stop()
    assert started and all(thread.daemon for thread in started), started
    assert not any(thread.is_alive() for thread in started), started


@pytest.mark.parametrize("ending", ["closed", "node ended it"])
def test_a_stream_ends_without_an_error_logged(ending: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """gRPC's thread that reads a stream's requests reads their end once the stream ended, not
    one more request that it cannot send (gRPC would log that as an error, with a traceback,
    for every stream a client ever ends)."""
    node = _Answering() if ending == "closed" else _Node(end_after_first=True)
    server, address = _serve(node)
    watchdog = Watchdog()
    before = set(threading.enumerate())
    try:
        with caplog.at_level(logging.WARNING):
            with grpc.insecure_channel(address) as channel:
                stream = ProposalStream(api_pb2_grpc.KVStub(channel), watchdog)
                answer = stream.send([_proposal()], timeout=REPLY_TIMEOUT)
                if ending == "closed":
                    stream.close()
                assert stream.ended
            support.wait_for(lambda: not [t for t in threading.enumerate() if t not in before
                                          and not t.name.startswith(NODE_THREADS)],
                             REPLY_TIMEOUT, "the client's threads for the stream to end")
    finally:
        watchdog.stop()
        server.stop(None)
    assert isinstance(answer, api_pb2.ProposeStreamReply if ending == "closed" else StreamEnded)
    assert not caplog.records, [record.getMessage() for record in caplog.records]
