"""The gRPC API against real nodes: bad input is refused with the right status and changes
nothing; followers point at the leader; typed exceptions in the client library."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from kvstore import api_errors, errors, ops
from kvstore.client import Client
from kvstore.limits import MAX_VALUE_BYTES
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.proto.log_pb2 import Code
from session import Session, new_session
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[Client]:
    with cluster.client(timeout=10) as c:
        yield c


def stub(cluster: Cluster, endpoint: str) -> api_pb2_grpc.KVStub:
    return api_pb2_grpc.KVStub(cluster.channel(endpoint))


def leader_endpoint(cluster: Cluster, client: Client) -> str:
    def find() -> str | None:
        leaders = [e for e in cluster.endpoints if client.status(e).role == "leader"]
        return leaders[0] if leaders else None
    return cluster.wait_for(find, 20, "a leader")


def call_error(call, request) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    return caught.value


def test_a_follower_refuses_a_write_and_names_the_leader(cluster: Cluster, client: Client) -> None:
    leader = leader_endpoint(cluster, client)
    follower = next(e for e in cluster.endpoints if e != leader)
    cluster.wait_for(lambda: client.status(follower).leader_api_address == leader, 10,
                     "the follower to know the leader")
    noop = client.get_noop_session()
    error = call_error(stub(cluster, follower).Propose,
                       api_pb2.ProposeRequest(session=noop.to_pb(), command=ops.put(b"api/f", b"v")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(error.trailing_metadata())[api_errors.LEADER_METADATA_KEY] == leader
    assert not client.get(b"api/f").found, "a refused write was applied"


def test_the_client_follows_the_hint_from_a_follower(cluster: Cluster, client: Client) -> None:
    leader = leader_endpoint(cluster, client)
    follower = next(e for e in cluster.endpoints if e != leader)
    with cluster.client([follower]) as via_follower:
        assert via_follower.put(b"api/hint", b"v").code == Code.OK
    assert client.get(b"api/hint").value == b"v"


def test_wrong_cluster_id_is_failed_precondition(cluster: Cluster, client: Client) -> None:
    leader = leader_endpoint(cluster, client)
    foreign = Session(cluster_id=client.cluster_id + 1, client_id=7, series_id=0)
    error = call_error(stub(cluster, leader).Propose,
                       api_pb2.ProposeRequest(session=foreign.to_pb(), command=ops.put(b"k", b"v")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(errors.ClusterMismatch):
        client.sync_propose(foreign, ops.put(b"k", b"v"))


def test_an_unknown_session_is_session_expired(cluster: Cluster, client: Client) -> None:
    stranger = new_session(client.cluster_id)
    with pytest.raises(errors.SessionExpired) as caught:
        client.sync_propose(stranger, ops.incr(b"api/expired"))
    assert caught.value.result.code == Code.SESSION_EXPIRED
    assert not client.get(b"api/expired").found


def test_an_acknowledged_series_is_already_responded(client: Client) -> None:
    session = client.sync_get_session()
    old = Session(session.cluster_id, session.client_id, session.series_id, session.responded_to)
    client.sync_propose(session, ops.incr(b"api/acked"))
    session.proposal_completed()
    client.sync_propose(session, ops.incr(b"api/acked"))  # tells the cluster series 1 was seen
    with pytest.raises(errors.AlreadyResponded):
        client.sync_propose(old, ops.incr(b"api/acked"))
    assert int(client.get(b"api/acked").value) == 2


def test_a_series_reused_for_another_command_is_series_reused(cluster: Cluster,
                                                               client: Client) -> None:
    """Rule 8b: a copy of a session proposing another command under a series id the session
    used gets ALREADY_EXISTS with the SERIES_REUSED result, raised as ``SeriesReused`` at once
    (not retried), and nothing is applied."""
    session = client.sync_get_session()
    copy = Session(session.cluster_id, session.client_id, session.series_id, session.responded_to)
    assert client.sync_propose(session, ops.incr(b"api/reused")).number == 1
    other = api_pb2.ProposeRequest(session=copy.to_pb(), command=ops.put(b"api/reused", b"9"))
    error = call_error(stub(cluster, leader_endpoint(cluster, client)).Propose, other)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details().startswith("SERIES_REUSED: series 1 of session")
    with pytest.raises(errors.SeriesReused) as caught:
        client.sync_propose(copy, ops.put(b"api/reused", b"9"))
    assert caught.value.result.code == Code.SERIES_REUSED
    assert client.sync_propose(copy, ops.incr(b"api/reused")).number == 1, "a retry: cached"
    assert client.get(b"api/reused").value == b"1"


@pytest.mark.parametrize(
    "command",
    [ops.put(b"", b"v"), ops.put(b"k" * 5000, b"v"), ops.put(b"k", b"v" * (MAX_VALUE_BYTES + 1)),
     ops.Command()],
    ids=["empty key", "key over 4 KiB", "value over 1 MiB", "no command"],
)
def test_invalid_commands_are_refused_before_the_log(cluster: Cluster, client: Client, command: ops.Command) -> None:
    leader = leader_endpoint(cluster, client)
    before = client.status(leader).commit_index
    noop = client.get_noop_session()
    error = call_error(stub(cluster, leader).Propose, api_pb2.ProposeRequest(session=noop.to_pb(), command=command))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused before the log" in error.details()
    assert api_errors.RESULT_METADATA_KEY not in dict(error.trailing_metadata() or ())
    assert client.status(leader).commit_index == before, "a refused request reached the log"
    with pytest.raises(errors.InvalidArgument):
        client.sync_propose(noop, command)


def test_an_invalid_command_that_reaches_the_log_is_an_answer(client: Client) -> None:
    """An append that would grow a value past 1 MiB passes the static checks; the state machine
    refuses it, caches that answer, and the session moves on."""
    session = client.sync_get_session()
    client.put(b"api/big", b"x" * MAX_VALUE_BYTES)
    with pytest.raises(errors.InvalidCommand) as caught:
        client.sync_propose(session, ops.append(b"api/big", b"y"))
    assert caught.value.result.code == Code.VALUE_TOO_LARGE
    session.proposal_completed()
    assert client.sync_propose(session, ops.put(b"api/after-big", b"ok")).code == Code.OK
    assert client.get(b"api/after-big").value == b"ok"


def test_a_request_over_the_message_limit_is_refused(cluster: Cluster, client: Client) -> None:
    leader = leader_endpoint(cluster, client)
    noop = client.get_noop_session()
    huge = ops.put(b"k", b"v" * (3 * 1024 * 1024))
    error = call_error(stub(cluster, leader).Propose, api_pb2.ProposeRequest(session=noop.to_pb(), command=huge))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("junk", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x03\x0a\x01"])
def test_bytes_that_do_not_decode_are_invalid_argument(cluster: Cluster, junk: bytes) -> None:
    channel = cluster.channel(cluster.endpoints[0])
    for method in ("Propose", "RegisterSession", "Read"):
        raw = channel.unary_unary(f"/kvstore.KV/{method}", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        error = call_error(raw, junk)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method


def test_session_calls_need_the_matching_series(cluster: Cluster, client: Client) -> None:
    leader = leader_endpoint(cluster, client)
    session = new_session(client.cluster_id)  # series 1, not the register value
    error = call_error(stub(cluster, leader).RegisterSession, api_pb2.SessionRequest(session=session.to_pb()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    session.prepare_for_register()
    error = call_error(stub(cluster, leader).Propose,
                       api_pb2.ProposeRequest(session=session.to_pb(), command=ops.put(b"k", b"v")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_reads_linearizable_and_serializable(cluster: Cluster, client: Client) -> None:
    client.put(b"api/read", b"v1")
    assert client.get(b"api/read").value == b"v1"
    for endpoint in cluster.endpoints:  # every replica catches up; a serializable read sees it
        with cluster.client([endpoint]) as local:
            cluster.wait_for(
                lambda: local.get(b"api/read", consistency="serializable").value == b"v1",  # noqa: B023
                10, f"{endpoint} to apply the write")
    with pytest.raises(errors.InvalidArgument):
        client.read(ops.put(b"k", b"v"))


def test_command_failures_are_typed(client: Client) -> None:
    client.put(b"api/text", b"not a number")
    with pytest.raises(errors.CommandFailed) as caught:
        client.incr(b"api/text")
    assert caught.value.result.code == Code.WRONG_TYPE
    assert client.get(b"api/text").value == b"not a number"
