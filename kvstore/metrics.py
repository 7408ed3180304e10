"""Prometheus metrics of one node: ``kv node run --metrics HOST:PORT`` serves ``/metrics``.

What it measures (the README's "Metrics" section lists every metric and its labels):

* proposals, counted where the API server answers them, by kind (a write, a session's
  register or unregister, a linearizable read) and outcome: the result code the state machine
  returned (``OK``, ``SESSION_EXPIRED``, ``ALREADY_RESPONDED``...) or why nothing was applied
  (``NOT_LEADER``, ``TIMEOUT``...);
* latency: from the leader handing a proposal to Raft to its result (commit latency: replicated
  to a majority, synced, applied), and the state machine's apply of one batch; and the number
  of entries in each applied batch;
* the session store: sessions held, sessions evicted, retries answered from the cache;
* Raft: term, leadership, leader changes seen, commit and applied index, log length,
  replicated batches, snapshots written and loaded and how long the last ones took, and the
  longest gap between two passes of the Raft loop (``kvstore.node.health.TickGaps``): the
  figure that says whether anything stalls the node;
* the garbage collector: collections, their time and the longest one, by generation
  (``kvstore.node.gc_pauses``): a collection stops every thread, the Raft loop too.

The rule that keeps it cheap: a request or a tick only adds to plain integers owned by the one
thread that writes them (the API's event loop, or the tick thread); no prometheus_client object
is touched on those paths (its counters and histograms take a lock per update). Everything
else is read when Prometheus scrapes, by ``NodeCollector`` on the HTTP server's thread, which
reads without locks: a number may be one update behind another, never torn. Nothing here runs
inside the state machine's apply, which stays pure: the two counts only apply can know
(evictions and cache answers) are plain integers the session store keeps itself
(``SessionStore.counts``), read here at scrape time.
"""

from __future__ import annotations

import tempfile
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from kvstore.config import split_address
from kvstore.node.health import RECENT_SECONDS
from kvstore.proto.log_pb2 import Code

if TYPE_CHECKING:
    from kvstore.node.kv_node import KVNode
    from kvstore.node.raft_node import RaftNode
    from kvstore.state_machine import StateMachine
    from kvstore.tls import ServerTLS

COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                          2.0, 5.0)
APPLY_SECONDS_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02,
                         0.05, 0.1, 0.5, 1.0)
BATCH_ENTRIES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Up to the node's ``MAX_BATCH_ENTRIES``."""

KINDS = ("propose", "register", "unregister", "read")
"""What a proposal is: a write (``Propose``), a session opened or closed, a linearizable read."""


class Histogram:
    """Bucket counts and a sum, written by one thread only, turned into Prometheus's cumulative
    buckets at scrape time. One ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Bucket i counts bounds[i-1] < value <= bounds[i], as Prometheus's "le" means.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts, total = list(self.counts), self.total
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append((floatToGoString(bound), running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=total)


class Proposals:
    """What the API server saw become of the proposals it handled (on its event loop only)."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, int | str], int] = {}
        """(kind, outcome) -> count; the outcome is a ``Code`` number or a refusal's reason."""
        self.commit_seconds = Histogram(COMMIT_SECONDS_BUCKETS)

    def count(self, kind: str, outcome: int | str) -> None:
        key = (kind, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


class NodeMetrics:
    """The counts a node keeps for its metrics; ``KVNode`` makes one when they are configured."""

    def __init__(self) -> None:
        self.proposals = Proposals()
        self.apply_seconds = Histogram(APPLY_SECONDS_BUCKETS)
        self.batch_entries = Histogram(BATCH_ENTRIES_BUCKETS)
        self.leader_changes = 0
        self._leader: object = None

    def observing(self, state_machine: StateMachine) -> ObservedStateMachine:
        """``state_machine`` as Raft should drive it: each batch timed and counted."""
        return ObservedStateMachine(state_machine, self)

    def leader_watch(self, raft: RaftNode) -> Callable[[], None]:
        """A tick hook counting leader changes: each time this node learns of a leader other
        than the last one it knew (losing the leader and finding the same one again is not a
        change). As etcd's ``leader_changes_seen``, the first leader counts."""
        def on_tick() -> None:
            leader = raft.leader_address()
            if leader is not None and leader != self._leader:
                self._leader = leader
                self.leader_changes += 1
        return on_tick


class ObservedStateMachine:
    """The state machine, as Raft sees it, with each batch's apply timed and its entries counted
    (on the tick thread: two clock reads and two bisects per batch, not per entry). Everything
    but ``apply_batch`` is the state machine's own."""

    def __init__(self, state_machine: StateMachine, metrics: NodeMetrics) -> None:
        self._state_machine = state_machine
        self._metrics = metrics

    def apply_batch(self, batch: bytes) -> list[bytes]:
        started = time.perf_counter()
        results = self._state_machine.apply_batch(batch)
        self._metrics.apply_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_entries.observe(len(results))
        return results

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state_machine, name)


class NodeCollector:
    """Reads a node's numbers when Prometheus scrapes (a prometheus_client custom collector)."""

    def __init__(self, node: KVNode, metrics: NodeMetrics) -> None:
        self._node = node
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node, metrics = self._node, self._metrics
        raft, sm = node.raft, node.state_machine
        proposals = metrics.proposals

        outcomes = CounterMetricFamily(
            "kv_proposals", "Proposals this node handled, by kind and outcome: the result code "
            "of the state machine, or why nothing was applied (NOT_LEADER, TIMEOUT...).",
            labels=("kind", "outcome"))
        for (kind, outcome), count in sorted(proposals.outcomes.copy().items(), key=str):
            outcomes.add_metric((kind, outcome_name(outcome)), count)
        yield outcomes
        yield proposals.commit_seconds.family(
            "kv_commit_duration_seconds", "From the leader handing a proposal to Raft to its "
            "result: replicated to a majority, synced and applied.")
        yield metrics.apply_seconds.family(
            "kv_apply_duration_seconds", "The state machine's apply of one batch of entries.")
        yield metrics.batch_entries.family(
            "kv_batch_entries", "Entries in each batch this node applied (group commit).")

        sessions = sm.sessions
        yield _gauge("kv_sessions", "Client sessions in the session store.", len(sessions))
        yield _gauge("kv_session_capacity", "Sessions kept before the least recently used is "
                     "evicted.", sessions.capacity)
        yield _counter("kv_session_evictions", "Sessions evicted to make room for a new one.",
                       sessions.counts.evictions)
        yield _counter("kv_session_cache_answers", "Retried proposals answered from the "
                       "session's cache instead of being applied again.",
                       sessions.counts.cache_answers)
        yield _gauge("kv_keys", "Keys in the store.", len(sm.data))

        counters = raft.counters
        yield _gauge("kv_raft_term", "The current Raft term.", raft.raftCurrentTerm)
        yield _gauge("kv_raft_is_leader", "1 if this node is the leader.", raft.is_leader())
        yield _counter("kv_raft_leader_changes", "Leaders this node has seen take over "
                       "(the first one included).", metrics.leader_changes)
        yield _gauge("kv_raft_commit_index", "The highest log index known committed.",
                     raft.raftCommitIndex)
        yield _gauge("kv_raft_applied_index", "The highest log index applied.",
                     raft.raftLastApplied)
        yield _gauge("kv_raft_log_entries", "Entries in the log since the last snapshot.",
                     len(raft.internals.raft_log))
        yield _counter("kv_raft_batches", "Batches of proposals this node appended as leader.",
                       counters.get("batches", 0))
        yield _counter("kv_snapshots_written", "Snapshots this node wrote.",
                       counters.get("snapshots_written", 0))
        yield _counter("kv_snapshots_loaded", "Snapshots this node loaded (at start or from "
                       "the leader).", counters.get("snapshots_loaded", 0))
        snapshotter = raft.snapshotter
        yield _gauge("kv_snapshot_last_write_seconds", "How long the last snapshot took to "
                     "write, from freezing the state to renaming the file.",
                     snapshotter.last_write_seconds)
        yield _gauge("kv_snapshot_last_freeze_seconds", "How long the last snapshot held the "
                     "Raft thread to freeze a copy of the state.",
                     snapshotter.last_freeze_seconds)
        yield _gauge("kv_snapshot_last_restore_seconds", "How long the last snapshot from the "
                     "leader took to restore, in the background.",
                     snapshotter.last_restore_seconds)
        gaps = node.health.tick_gaps.figures()
        yield _gauge("kv_tick_gap_max_seconds", "The longest time between two passes of the "
                     "Raft loop since the node started (one still open included).",
                     gaps.since_start)
        yield _gauge("kv_tick_gap_recent_seconds", "The same over the last "
                     f"{RECENT_SECONDS} seconds.", gaps.recent)
        pauses = node.gc_pauses
        for name, documentation, values in (
                ("kv_gc_collections", "Collections of Python's garbage collector, by "
                 "generation.", pauses.count),
                ("kv_gc_pause_seconds", "Time spent in them (every thread waits meanwhile).",
                 pauses.total)):
            family = CounterMetricFamily(name, documentation, labels=("generation",))
            for generation, value in enumerate(values):
                family.add_metric((str(generation),), value)
            yield family
        longest = GaugeMetricFamily("kv_gc_pause_max_seconds", "The longest collection since "
                                    "the node started, by generation.", labels=("generation",))
        for generation, value in enumerate(pauses.longest):
            longest.add_metric((str(generation),), value)
        yield longest
        yield _gauge("kv_node_failed", "1 if the node stopped itself (disk or state machine "
                     "failure: see kv cluster status).", raft.fatal is not None)


def outcome_name(outcome: int | str) -> str:
    return Code.Name(outcome) if isinstance(outcome, int) else outcome  # type: ignore[arg-type]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))


class MetricsServer:
    """``/metrics`` over HTTP on loopback, or over HTTPS requiring a client certificate from the
    API's CA when the node has TLS (``NodeConfig.metrics_address`` says which addresses may
    serve which)."""

    def __init__(self, address: str, collector: NodeCollector, tls: ServerTLS | None) -> None:
        self.address = address
        self._tls = tls
        self.registry = CollectorRegistry()
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total and the like
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listens; raises ``OSError`` in one line if it cannot."""
        host, port = split_address(self.address)
        try:
            if self._tls is None:
                self._httpd, self._thread = start_http_server(port, host, self.registry)
            else:
                self._httpd, self._thread = self._start_https(host, port, self._tls)
        except OSError as exc:
            raise OSError(f"cannot listen on {self.address} (metrics): "
                          f"{exc.strerror or exc}") from None

    def _start_https(self, host: str, port: int, tls: ServerTLS) -> Any:
        # Python's ssl loads certificates and keys from files only: a private directory that
        # lives while the context is made.
        with tempfile.TemporaryDirectory(prefix="kv-metrics-tls-") as private:
            files = {}
            for name, pem in (("cert", tls.cert_pem), ("key", tls.key_pem), ("ca", tls.ca_pem)):
                files[name] = Path(private) / f"{name}.pem"
                files[name].write_bytes(pem)
            return start_http_server(port, host, self.registry, certfile=str(files["cert"]),
                                     keyfile=str(files["key"]), client_cafile=str(files["ca"]),
                                     client_auth_required=True)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
