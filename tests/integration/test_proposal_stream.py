"""Proposals on one long-lived call (``ProposeStream``, ``kvstore.streams``), on real nodes.

The claims: a node answers each request of the stream by its tag, with one outcome per
proposal, and goes on after refusing a whole batch; a malformed request ends the stream as a
caller's mistake; and a no-op session gets past a dead endpoint on the stream. What a request
without a reply means on the client side is ``tests/unit/test_streams.py``'s; losing nothing
across a leader's SIGKILL with streams in flight is ``test_batching``'s kill test (both clients
stream by default).
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator

import grpc
import pytest

from kvstore import aio, ops
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.proto.log_pb2 import Code
from tests import support
from tests.integration.conftest import Cluster
from tests.integration.test_faults import find_leader

pytestmark = pytest.mark.integration

REPLY_TIMEOUT = 10.0


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
