"""Proposals on one long-lived call (``ProposeStream``, ``kvstore.streams``), on real nodes.

The claims: a node answers each request of the stream by its tag, with one outcome per
proposal, and goes on after refusing a whole batch; a malformed request ends the stream as a
caller's mistake; and on the client side a request that got no reply has the fate the retry
rules need: "not applied" only when nothing could have left (no connection), "outcome unknown"
when it was written (no reply in time, a stream that ended). Losing nothing across a leader's
SIGKILL with streams in flight is ``test_batching``'s kill test: both clients stream by default.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from kvstore import aio, ops, retry
from kvstore.client import outcomes_of
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.proto.log_pb2 import Code
from kvstore.streams import AioProposalStream, NoReplyInTime, ProposalStream, StreamEnded, Watchdog
from tests import support
from tests.integration.conftest import Cluster
from tests.integration.test_faults import find_leader

pytestmark = pytest.mark.integration

REPLY_TIMEOUT = 10.0
STREAMS_ENDED = 20


def _requests(items: queue.SimpleQueue[object]) -> Iterator[object]:
    while (item := items.get()) is not None:
        yield item


def test_each_request_is_answered_by_its_tag_and_a_refused_batch_does_not_end_the_stream(
        cluster: Cluster) -> None:
    """Two requests on the leader's stream get replies with their own tags, one outcome per
    proposal, applied once each; on a follower's stream a batch is refused as a whole, each
    outcome NOT_APPLIED with the leader's address, and the next request on the same stream is
    answered too."""
    with cluster.client() as client:
        sessions = [client.sync_get_session() for _ in range(3)]
        leader, _ = find_leader(client, cluster.endpoints)
    follower = next(e for e in cluster.endpoints if e != leader)
    key = b"stream/tags/n"

    def proposal(i: int, delta: int) -> api_pb2.ProposeRequest:
        return api_pb2.ProposeRequest(session=sessions[i].to_pb(), command=ops.incr(key, delta))

    with cluster.channel(leader) as channel:
        items: queue.SimpleQueue[object] = queue.SimpleQueue()
        stub = api_pb2_grpc.KVStub(channel)
        replies = stub.ProposeStream(_requests(items), timeout=REPLY_TIMEOUT)
        items.put(api_pb2.ProposeStreamRequest(tag=7, proposals=[proposal(0, 1), proposal(1, 10)]))
        first = next(replies)
        items.put(api_pb2.ProposeStreamRequest(tag=9, proposals=[proposal(2, 100)]))
        second = next(replies)
        items.put(None)
        assert list(replies) == []  # the node ends the stream once the client half-closes
    assert (first.tag, second.tag) == (7, 9)
    assert [(o.fate, o.result.code, o.result.number) for o in first.outcomes] == [
        (api_pb2.FATE_ANSWERED, Code.OK, 1), (api_pb2.FATE_ANSWERED, Code.OK, 11)]
    assert [(o.fate, o.result.number) for o in second.outcomes] == [(api_pb2.FATE_ANSWERED, 111)]

    with cluster.channel(follower) as channel:
        items = queue.SimpleQueue()
        stub = api_pb2_grpc.KVStub(channel)
        replies = stub.ProposeStream(_requests(items), timeout=REPLY_TIMEOUT)
        refused = []
        for tag in (1, 2):
            items.put(api_pb2.ProposeStreamRequest(tag=tag, proposals=[proposal(0, 1000)] * 2))
            refused.append(next(replies))
        items.put(None)
    assert [r.tag for r in refused] == [1, 2]
    for reply in refused:
        assert [(o.fate, o.reason, o.leader) for o in reply.outcomes] == [
            (api_pb2.FATE_NOT_APPLIED, "NOT_LEADER", leader)] * 2, reply
    with cluster.client() as client:
        assert int(client.get(key).value) == 111


def test_a_malformed_request_ends_the_stream_as_invalid_argument(cluster: Cluster) -> None:
    """Bytes that are no ProposeStreamRequest: the stream ends INVALID_ARGUMENT (a caller's
    mistake, not the node's INTERNAL)."""
    with cluster.channel(cluster.endpoints[0]) as channel:
        call = channel.stream_stream("/kvstore.KV/ProposeStream")
        with pytest.raises(grpc.RpcError) as caught:
            list(call(iter([b"\xff\xff\xff"]), timeout=REPLY_TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "malformed" in caught.value.details()


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


def test_a_no_op_session_reaches_the_leader_past_a_dead_endpoint(cluster: Cluster) -> None:
    """A no-op session is retried only when certainly not applied: with a dead endpoint first
    in the list, both clients still get their write through on the stream."""
    dead = f"127.0.0.1:{support.free_port()}"
    endpoints = [dead, *cluster.endpoints]
    with cluster.client(endpoints=endpoints, timeout=REPLY_TIMEOUT) as client:
        session = client.get_noop_session()
        assert client.sync_propose(session, ops.incr(b"stream/noop")).number == 1

    async def run() -> int:
        async with aio.Client(endpoints, tls=cluster.tls(), timeout=REPLY_TIMEOUT) as kv:
            await kv.get_cluster_id()
            return (await kv.propose(kv.get_noop_session(), ops.incr(b"stream/noop"))).number

    assert asyncio.run(run()) == 2


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
