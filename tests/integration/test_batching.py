"""Proposals that share a call (``ProposeBatch``) and the asyncio client, on a real cluster.

The claims: thousands of concurrent proposals through one ``kvstore.aio.Client`` are each
applied once; a leader SIGKILLed while batches are in flight loses nothing and applies no retry
twice; and a batch that fails part way says, per proposal, whether it was applied, certainly
not applied, possibly applied, or refused, so each proposal's retry stays exact.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import pytest

from kvstore import aio, errors, ops
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.proto.log_pb2 import Code
from kvstore.tls import ClientTLS
from session.session import Session
from tests import support
from tests.integration.conftest import Cluster
from tests.integration.test_faults import find_leader, wait_converged

pytestmark = pytest.mark.integration

CONCURRENT = 2000
STREAMS = 48
INCREMENTS = 40
"""Leader kill: each stream stops after this many acknowledged increments..."""
STREAM_DEADLINE = 60.0
"""... or after this many seconds."""
ATTEMPT_TIMEOUT = 0.2
"""Below the 0.4 s election timeout: a proposal caught by the crash gives up, and its stream
retries it with the same series id (as in test_faults)."""
KILL_AFTER = 10


def aio_client(cluster: Cluster, **options: object) -> aio.Client:
    return aio.Client(cluster.endpoints, tls=cluster.tls(), **options)  # type: ignore[arg-type]


def test_two_thousand_concurrent_proposals_on_one_event_loop_each_apply_once(
        cluster: Cluster) -> None:
    """2,000 tasks, each with its own session, add a distinct amount (1, 2, ... 2000) to one
    counter at once, through one client. The counter ends at the sum of the acknowledged
    amounts; ordered by answer, each answer is the previous one plus that task's own amount (so
    each proposal was applied once and got its own answer, not a neighbour's); and the
    proposals travelled in shared calls."""
    key = b"batching/two-thousand"

    async def run() -> tuple[list[tuple[int, int]], tuple[int, int], int]:
        async with aio_client(cluster, timeout=30) as kv:
            sessions = await asyncio.gather(*(kv.get_session() for _ in range(CONCURRENT)))

            async def one(session: Session, delta: int) -> tuple[int, int]:
                result = await kv.propose(session, ops.incr(key, delta))
                session.proposal_completed()
                return result.number, delta

            answers = await asyncio.gather(*(one(s, n + 1) for n, s in enumerate(sessions)))
            final = int((await kv.get(key)).value)
            # The sessions are left to the LRU store: closing 2,000 would only take time.
            return answers, kv.proposal_calls(), final

    answers, (calls, proposals), final = asyncio.run(run())
    assert len(answers) == CONCURRENT
    assert final == sum(delta for _, delta in answers)
    previous = 0
    for number, delta in sorted(answers):
        assert number == previous + delta, "an answer is not its own proposal's"
        previous = number
    assert proposals == CONCURRENT
    assert calls < CONCURRENT / 4, f"{proposals} proposals in {calls} calls: batching did not form"
    print(f"\n{proposals} proposals in {calls} calls")


def test_threads_sharing_a_blocking_client_share_calls_and_each_get_their_own_answer(
        cluster: Cluster) -> None:
    """The blocking client's batches: 32 threads, each with its own session, add distinct
    amounts to one counter 20 times each through one ``Client``. Ordered by answer, each answer
    is the previous one plus its own amount, and fewer calls than proposals were made."""
    key = b"batching/threads"
    threads, rounds = 32, 20
    answers: list[tuple[int, int]] = []
    failures: list[str] = []
    lock = threading.Lock()
    with cluster.client(timeout=30) as client:
        sessions = [client.get_session() for _ in range(threads)]
        start = threading.Barrier(threads)

        def run(n: int) -> None:
            start.wait()
            for r in range(rounds):
                delta = n * rounds + r + 1
                try:
                    number = client.propose(sessions[n], ops.incr(key, delta)).number
                except errors.KVError as exc:
                    failures.append(repr(exc))
                    return
                sessions[n].proposal_completed()
                with lock:
                    answers.append((number, delta))

        workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        final = int(client.get(key).value)
        calls, proposals = client.proposal_calls()
    assert not failures
    assert len(answers) == threads * rounds == proposals
    assert final == sum(delta for _, delta in answers)
    previous = 0
    for number, delta in sorted(answers):
        assert number == previous + delta, "an answer is not its own proposal's"
        previous = number
    assert calls < proposals / 2, f"{proposals} proposals in {calls} calls"
    print(f"\n{proposals} proposals in {calls} calls")


def test_sigkill_of_the_leader_while_batches_are_in_flight_applies_each_retry_once(
        cluster: Cluster) -> None:
    """48 tasks increment their own counters through one aio client (so their proposals share
    calls); the leader is SIGKILLed mid-stream. Proposals caught in flight are retried with
    their series ids; every answer is the next number, and every counter ends at its stream's
    acknowledged increments."""
    async def stream(kv: aio.Client, key: bytes, state: dict[str, object]) -> None:
        deadline = time.monotonic() + STREAM_DEADLINE
        session = await kv.get_session(timeout=10)
        acked = 0
        retried: set[int] = set()
        state.update(acked=0, retried=retried, in_flight=None, errors=[])
        while acked < INCREMENTS and time.monotonic() < deadline:
            state["in_flight"] = session.series_id
            try:
                result = await kv.propose(session, ops.incr(key), timeout=ATTEMPT_TIMEOUT)
            except (errors.OutcomeUnknown, errors.Unavailable):
                retried.add(session.series_id)  # same session, same series id: safe
                continue
            except errors.KVError as exc:
                state["errors"].append(repr(exc))  # type: ignore[attr-defined]
                return
            finally:
                state["in_flight"] = None
            session.proposal_completed()
            acked += 1
            state["acked"] = acked
            if result.number != acked:
                state["errors"].append(  # type: ignore[attr-defined]
                    f"increment {acked} answered {result.number}: applied twice or lost")
                return

    async def run() -> tuple[list[dict[str, object]], list[tuple[int, object]], tuple[int, int],
                             list[int], str]:
        async with aio_client(cluster, timeout=10) as kv:
            keys = [f"batching/kill/{n}".encode() for n in range(STREAMS)]
            states: list[dict[str, object]] = [{} for _ in keys]
            tasks = [asyncio.create_task(stream(kv, k, s)) for k, s in zip(keys, states)]
            loop_deadline = time.monotonic() + 30
            while not all(s.get("acked", 0) >= KILL_AFTER for s in states):  # type: ignore[operator]
                assert time.monotonic() < loop_deadline, "the streams did not get going"
                assert not any(t.done() for t in tasks), [s.get("errors") for s in states]
                await asyncio.sleep(0.01)
            calls_before = kv.proposal_calls()
            endpoint, pid = await asyncio.to_thread(_find_leader, cluster)
            at_kill = [(s["acked"], s["in_flight"]) for s in states]
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), STREAM_DEADLINE + 10)
            finals = [int((await kv.get(k)).value) for k in keys]
            return states, at_kill, calls_before, finals, endpoint

    states, at_kill, (calls, proposals), finals, endpoint = asyncio.run(run())
    assert not [s["errors"] for s in states if s["errors"]]
    assert all(acked < INCREMENTS for acked, _ in at_kill), at_kill
    assert [s["acked"] for s in states] == [INCREMENTS] * STREAMS
    assert finals == [INCREMENTS] * STREAMS, "a counter differs from its acknowledged increments"
    assert proposals > 1.5 * calls, f"{proposals} proposals in {calls} calls: no batches in flight"
    caught = [series for (_, series), s in zip(at_kill, states, strict=True)
              if series is not None and series in s["retried"]]  # type: ignore[operator]
    assert caught, "no proposal in flight at the kill was retried across it"
    print(f"\nbefore the kill {proposals} proposals in {calls} calls; "
          f"{len(caught)} in-flight proposals retried across the kill")

    with cluster.client(timeout=10) as client:
        victim = next(n for n in cluster.node_ids if cluster.endpoint(n) == endpoint)
        cluster.wait_for(lambda: cluster.pid(victim) is None, 15, f"{victim} to be gone")
        cluster.up()  # brings back only the killed node
        wait_converged(cluster, client)


def test_the_asyncio_client_raises_the_blocking_clients_typed_errors(cluster: Cluster) -> None:
    """The same rules, so the same errors: refused before the log, another cluster's session,
    an unregistered session, a read-only certificate writing, no certificate at all (told at
    once, not retried until the deadline); a no-op session's write goes through."""
    async def run() -> None:
        async with aio_client(cluster, timeout=5) as kv:
            with pytest.raises(errors.InvalidArgument):
                await kv.put(b"", b"x")
            cluster_id = await kv.get_cluster_id()
            with pytest.raises(errors.ClusterMismatch):
                await kv.propose(Session(cluster_id + 1, 7, 1, 0), ops.incr(b"batching/e"))
            with pytest.raises(errors.SessionExpired):
                await kv.propose(Session(cluster_id, 424242, 3, 2), ops.incr(b"batching/e"))
            assert (await kv.propose(kv.get_noop_session(), ops.incr(b"batching/e"))).number == 1
        async with aio.Client(cluster.endpoints, tls=cluster.tls("readonly")) as reader:
            assert (await reader.get(b"batching/e")).value == b"1"
            with pytest.raises(errors.PermissionDenied):
                await reader.put(b"batching/e", b"2")
        tls = cluster.tls()
        assert tls is not None
        anonymous = ClientTLS.load(tls.ca_file, None, None)
        started = time.monotonic()
        async with aio.Client(cluster.endpoints, tls=anonymous, timeout=20) as nobody:
            with pytest.raises(errors.Unauthenticated):
                await nobody.get(b"batching/e")
        assert time.monotonic() - started < 10

    asyncio.run(run())


def _find_leader(cluster: Cluster) -> tuple[str, int]:
    with cluster.client() as client:
        return find_leader(client, cluster.endpoints)


def _leader_stub(cluster: Cluster) -> tuple[api_pb2_grpc.KVStub, grpc.Channel, int]:
    endpoint, _ = _find_leader(cluster)
    with cluster.client() as client:
        cluster_id = client.cluster_id
    channel = cluster.channel(endpoint)
    return api_pb2_grpc.KVStub(channel), channel, cluster_id


def test_a_batch_answers_each_proposal_on_its_own(cluster: Cluster) -> None:
    """One call, six proposals, six fates: applied, applied, answered with the cached error of
    an unknown session, answered SERIES_REUSED, refused before the log (an empty key), refused
    for another cluster. The applied ones took effect once; the refused ones did not."""
    with cluster.client() as client:
        good = [client.sync_get_session() for _ in range(2)]
        reused = client.sync_get_session()
        client.sync_propose(reused, ops.put(b"batching/partial/reused", b"first"))
    stub, channel, cluster_id = _leader_stub(cluster)
    unknown_session = Session(cluster_id, client_id=987654321, series_id=5, responded_to=4)
    other_cluster = Session(cluster_id + 1, client_id=good[0].client_id,
                            series_id=good[0].series_id, responded_to=0)
    key = b"batching/partial/n"
    proposals = [
        api_pb2.ProposeRequest(session=good[0].to_pb(), command=ops.incr(key)),
        api_pb2.ProposeRequest(session=good[1].to_pb(), command=ops.incr(key, 10)),
        api_pb2.ProposeRequest(session=unknown_session.to_pb(), command=ops.incr(key, 100)),
        api_pb2.ProposeRequest(session=reused.to_pb(),  # same series, another command
                               command=ops.put(b"batching/partial/reused", b"second")),
        api_pb2.ProposeRequest(session=good[0].to_pb(), command=ops.put(b"", b"x")),
        api_pb2.ProposeRequest(session=other_cluster.to_pb(), command=ops.incr(key, 1000)),
    ]
    with channel:
        answer = stub.ProposeBatch(api_pb2.ProposeBatchRequest(proposals=proposals), timeout=10)
    fates = [(o.fate, o.result.code if o.fate == api_pb2.FATE_ANSWERED else o.code)
             for o in answer.outcomes]
    assert fates == [
        (api_pb2.FATE_ANSWERED, Code.OK),
        (api_pb2.FATE_ANSWERED, Code.OK),
        (api_pb2.FATE_ANSWERED, Code.SESSION_EXPIRED),
        (api_pb2.FATE_ANSWERED, Code.SERIES_REUSED),
        (api_pb2.FATE_REFUSED, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        (api_pb2.FATE_REFUSED, grpc.StatusCode.FAILED_PRECONDITION.value[0]),
    ], answer
    # Applied in the batch's order, each once.
    assert [o.result.number for o in answer.outcomes[:2]] == [1, 11]
    with cluster.client() as client:
        assert int(client.get(key).value) == 11
        assert client.get(b"batching/partial/reused").value == b"first"


def test_a_batch_cut_off_from_its_quorum_says_which_proposals_may_have_applied(
        cluster: Cluster) -> None:
    """The followers are SIGSTOPped and a batch goes to the leader with a short deadline: its
    valid proposals reach the leader's log but cannot commit, so each says OUTCOME_UNKNOWN;
    the invalid one in the same batch says REFUSED (it never reached the log). Once the
    followers resume, the unknown ones are retried through the client with their own series
    ids, and each is applied exactly once."""
    stub, channel, _ = _leader_stub(cluster)
    with cluster.client(timeout=15) as client:
        sessions = [client.sync_get_session() for _ in range(3)]
        leader = cluster.wait_for(cluster.leader_id, 10, "a leader")
        key = b"batching/cut-off/n"
        proposals = [api_pb2.ProposeRequest(session=s.to_pb(), command=ops.incr(key))
                     for s in sessions]
        proposals.insert(1, api_pb2.ProposeRequest(session=sessions[0].to_pb(),
                                                   command=ops.incr(b"", 1)))
        followers = [cluster.pid(n) for n in cluster.node_ids if n != leader]
        assert all(followers)
        for pid in followers:
            os.kill(pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            with channel:
                answer = stub.ProposeBatch(api_pb2.ProposeBatchRequest(proposals=proposals),
                                           timeout=0.8)
        finally:
            for pid in followers:
                os.kill(pid, signal.SIGCONT)  # type: ignore[arg-type]
        assert [o.fate for o in answer.outcomes] == [
            api_pb2.FATE_OUTCOME_UNKNOWN, api_pb2.FATE_REFUSED,
            api_pb2.FATE_OUTCOME_UNKNOWN, api_pb2.FATE_OUTCOME_UNKNOWN], answer
        assert all(o.reason == "TIMEOUT" for i, o in enumerate(answer.outcomes) if i != 1)
        # The retries: same sessions, same series ids, through the library's own rules.
        numbers = []
        for session in sessions:
            numbers.append(client.sync_propose(session, ops.incr(key)).number)
            session.proposal_completed()
        assert sorted(numbers) == [1, 2, 3], numbers
        assert int(client.get(key).value) == 3
        support.wait_for(lambda: cluster.leader_id(), 20, "a leader after the pause")
