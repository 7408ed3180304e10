"""``kvstore.metrics``: what the collector exposes, the histograms' buckets, the counts the
session store keeps for it, and where metrics may listen (the real endpoint, scraped from real
nodes, is tests/integration/test_metrics.py)."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvstore import StateMachine, encode_entry, ops, results
from kvstore.config import ConfigError, Member, NodeConfig
from kvstore.entry import encode_batch
from kvstore.metrics import Histogram, NodeCollector, NodeMetrics
from kvstore.node.gc_pauses import GcPauses
from kvstore.node.health import TickGaps
from kvstore.proto.log_pb2 import Code
from kvstore.session_store import SessionStore
from session import Session, new_session

CLUSTER = 5


def samples(collector: NodeCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape in Prometheus's text format, parsed back: (name, labels) ->
    value."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def registered(sm: StateMachine, seed: int) -> Session:
    session = new_session(CLUSTER, random.Random(seed))
    session.prepare_for_register()
    assert results.decode(sm.apply(encode_entry(session))).code == Code.OK
    session.prepare_for_propose()
    return session


def test_a_histogram_counts_a_value_equal_to_a_bound_in_that_bucket_and_is_cumulative() -> None:
    histogram = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 7.0):
        histogram.observe(value)
    family = histogram.family("h", "doc")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "h_bucket"}
    assert buckets == {"1.0": 2, "2.0": 4, "+Inf": 5}
    assert {s.name: s.value for s in family.samples if "le" not in s.labels} == \
        {"h_count": 5, "h_sum": 12.0}


def test_the_store_counts_each_eviction() -> None:
    store = SessionStore(capacity=2)
    for client_id in (1, 2, 3, 4, 3):  # the second register of 3 evicts nothing
        store.register(client_id)
    assert store.counts.evictions == 2
    store.unregister(4)
    store.register(5)  # room again: no eviction
    assert store.counts.evictions == 2


def test_only_a_retry_answered_from_the_cache_counts_as_a_cache_answer() -> None:
    sm = StateMachine(CLUSTER)
    session = registered(sm, 1)
    retries = 0
    for n in range(4):
        entry = encode_entry(session, ops.put(b"k%d" % n, b"v"))
        first = sm.apply(entry)
        for _ in range(n):  # proposal n is retried n times
            assert sm.apply(entry) == first
            retries += 1
        session.proposal_completed()
    assert sm.sessions.counts.cache_answers == retries == 6
    # Not answered from the cache: a series id reused for another command, an acknowledged one,
    # an unknown session, a no-op session's repeat.
    reused = Session(CLUSTER, session.client_id, session.series_id - 1, session.responded_to - 1)
    acked = Session(CLUSTER, session.client_id, 1, session.responded_to)
    unknown = Session(CLUSTER, session.client_id + 1, 1, 0)
    for other, code in ((reused, Code.SERIES_REUSED), (acked, Code.ALREADY_RESPONDED),
                        (unknown, Code.SESSION_EXPIRED)):
        assert results.decode(sm.apply(encode_entry(other, ops.put(b"x", b"y")))).code == code
    assert sm.sessions.counts.cache_answers == 6


def test_a_restored_replica_keeps_its_own_counts() -> None:
    sm = StateMachine(CLUSTER, session_capacity=1)
    registered(sm, 1)
    registered(sm, 2)  # evicts the first
    image = StateMachine(CLUSTER, session_capacity=1).snapshot()  # a state with no evictions
    sm.restore(image)
    assert sm.sessions.counts.evictions == 1
    assert len(sm.sessions) == 0, "the restore did not take the snapshot's sessions"


def test_the_counts_are_not_replicated_state() -> None:
    """A snapshot and the digest are the same whatever the counts say: they are per replica."""
    busy, quiet = StateMachine(CLUSTER, session_capacity=1), StateMachine(CLUSTER, 1)
    registered(busy, 1)
    registered(busy, 2)
    busy.sessions.counts.cache_answers = 99
    quiet.restore(busy.snapshot())
    assert (quiet.snapshot(), quiet.digest()) == (busy.snapshot(), busy.digest())
    assert quiet.sessions.counts.evictions == 0


def test_the_observed_state_machine_times_each_batch_and_counts_its_entries() -> None:
    sm = StateMachine(CLUSTER)
    metrics = NodeMetrics()
    observed = metrics.observing(sm)
    noop = Session(CLUSTER, 7, 0, 0)  # a no-op session: applied without deduplication
    batch = encode_batch([encode_entry(noop, ops.put(b"k%d" % i, b"v")) for i in range(3)])
    assert len(observed.apply_batch(batch)) == 3
    assert observed.apply_batch(encode_batch([encode_entry(noop, ops.put(b"z", b"v"))]))
    assert (sum(metrics.batch_entries.counts), metrics.batch_entries.total) == (2, 4.0)
    assert sum(metrics.apply_seconds.counts) == 2 and metrics.apply_seconds.total > 0
    assert observed.snapshot() == sm.snapshot() and observed.cluster_id == CLUSTER
    assert len(sm.data) == 4


def test_the_collector_reads_the_node_at_scrape_time() -> None:
    sm = StateMachine(CLUSTER, session_capacity=1)
    metrics = NodeMetrics()
    raft = SimpleNamespace(counters=Counter(batches=3, snapshots_written=2), raftCurrentTerm=4,
                           raftCommitIndex=10, raftLastApplied=9, fatal=None,
                           internals=SimpleNamespace(raft_log=[None] * 6),
                           is_leader=lambda: True, leader_address=lambda: "127.0.0.1:1")
    raft.snapshotter = SimpleNamespace(last_write_seconds=1.5, last_freeze_seconds=0.25,
                                       last_restore_seconds=0.0)
    gaps = TickGaps()
    pauses = GcPauses()
    node = SimpleNamespace(raft=raft, state_machine=sm, health=SimpleNamespace(tick_gaps=gaps),
                           gc_pauses=pauses)
    collector = NodeCollector(node, metrics)  # type: ignore[arg-type]
    before = samples(collector)
    assert before[("kv_sessions", ())] == 0 and before[("kv_raft_term", ())] == 4
    assert not any(name == "kv_proposals_total" for name, _ in before)

    registered(sm, 1)
    session = registered(sm, 2)  # an eviction
    entry = encode_entry(session, ops.put(b"k", b"v"))
    sm.apply(entry)
    sm.apply(entry)  # a cache answer
    metrics.proposals.count("propose", Code.OK)
    metrics.proposals.count("propose", Code.OK)
    metrics.proposals.count("propose", Code.SESSION_EXPIRED)
    metrics.proposals.count("register", "NOT_LEADER")
    metrics.proposals.commit_seconds.observe(0.003)
    watch = metrics.leader_watch(raft)  # type: ignore[arg-type]
    watch()
    watch()  # the same leader: not a change
    raft.raftCurrentTerm = 5
    gaps.on_tick()
    time.sleep(0.02)  # the gap measured
    gaps.on_tick()
    pauses.on_collection("start", {"generation": 2})
    time.sleep(0.01)  # a collection of the oldest generation, 10 ms or more
    pauses.on_collection("stop", {"generation": 2, "collected": 0})
    after = samples(collector)

    def proposals(kind: str, outcome: str) -> float:
        return after[("kv_proposals_total", (("kind", kind), ("outcome", outcome)))]
    assert proposals("propose", "OK") == 2
    assert proposals("propose", "SESSION_EXPIRED") == 1
    assert proposals("register", "NOT_LEADER") == 1
    assert after[("kv_commit_duration_seconds_count", ())] == 1
    assert after[("kv_commit_duration_seconds_bucket", (("le", "0.005"),))] == 1
    assert after[("kv_commit_duration_seconds_bucket", (("le", "0.002"),))] == 0
    expected = {"kv_sessions": 1, "kv_session_capacity": 1, "kv_session_evictions_total": 1,
                "kv_session_cache_answers_total": 1, "kv_keys": 1, "kv_raft_term": 5,
                "kv_raft_is_leader": 1, "kv_raft_leader_changes_total": 1,
                "kv_raft_commit_index": 10, "kv_raft_applied_index": 9,
                "kv_raft_log_entries": 6, "kv_raft_batches_total": 3,
                "kv_snapshots_written_total": 2, "kv_snapshots_loaded_total": 0,
                "kv_snapshot_last_write_seconds": 1.5, "kv_snapshot_last_freeze_seconds": 0.25,
                "kv_snapshot_last_restore_seconds": 0, "kv_node_failed": 0}
    assert {name: after[(name, ())] for name in expected} == expected
    assert 0.02 <= after[("kv_tick_gap_recent_seconds", ())] <= \
        after[("kv_tick_gap_max_seconds", ())] < 5
    assert after[("kv_gc_collections_total", (("generation", "2"),))] == 1
    assert after[("kv_gc_collections_total", (("generation", "0"),))] == 0
    assert 0.01 <= after[("kv_gc_pause_max_seconds", (("generation", "2"),))] == \
        after[("kv_gc_pause_seconds_total", (("generation", "2"),))] < 5


def _config(tmp_path: Path, metrics_address: str) -> NodeConfig:
    return NodeConfig(cluster_id=1, node_id="n1", me=Member("127.0.0.1:1", "127.0.0.1:2"),
                      peers=(), data_dir=tmp_path, secret="s", metrics_address=metrics_address)


@pytest.mark.parametrize("address", ["0.0.0.0:9100", "192.0.2.1:9100", "[::]:9100"])
def test_metrics_on_a_public_address_need_tls(tmp_path: Path, address: str) -> None:
    with pytest.raises(ConfigError, match="refusing to serve metrics on .* without TLS"):
        _config(tmp_path, address)


@pytest.mark.parametrize("address", ["127.0.0.1:9100", "localhost:9100", "[::1]:9100"])
def test_metrics_on_loopback_need_no_tls(tmp_path: Path, address: str) -> None:
    assert _config(tmp_path, address).metrics_address == address


def test_a_metrics_address_must_be_host_and_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a host:port"):
        _config(tmp_path, "9100")
