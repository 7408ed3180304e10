"""The closed-loop load generator: worker processes with client threads inside.

Python clients in one process share one GIL, which caps them well below what a cluster can take
on a small machine; so the clients are spread over worker processes (``WorkerPool``, by default
up to twice the number of cores), each running its share as threads. Each client has one
operation in flight at a time (closed loop), its own connection, and for our cluster its own
session.

A run goes: every worker builds its clients and does one write each (setup, unmeasured) and says
"ready"; the coordinator then broadcasts a ``Window`` on the machine-wide monotonic clock: all
clients start together, run ``warmup`` seconds unmeasured, then ``duration`` measured seconds.
An operation counts if it completes inside the measured window; its latency is taken with
``time.perf_counter``. Each worker also reports its own CPU time over the window, and the
coordinator samples the nodes' CPU time at the window's edges.

The workers are started with "spawn" (not fork: gRPC's threads do not survive a fork), ignore
SIGINT (the coordinator owns Ctrl-C and stops them), and exit when the coordinator's pipe
closes.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

from cli.bench.common import KEYS_PER_CLIENT, Progress, RunResult, RunSpec, Window, client_tls
from cli.bench.stats import CpuWindow
from cli.exits import UNAVAILABLE, CliError

ERROR_PAUSE = 0.01
"""Seconds a client waits after a failed operation, so a refusing target is not spun on."""
SETUP_GRACE = 20.0
"""Seconds (beyond the operation timeout) that clients get to connect and do their first write."""


def default_workers() -> int:
    return 2 * (os.cpu_count() or 1)


def client_keys(client: int) -> list[bytes]:
    return [f"bench/c{client:04d}/k{n:04d}".encode() for n in range(KEYS_PER_CLIENT)]


# -- drivers: one kind of client ---------------------------------------------------------------


class Driver(Protocol):
    """How one client thread talks to a target. ``open``/``recover`` return its state."""

    def open(self, client: int) -> Any: ...
    def write(self, state: Any, key: bytes, value: bytes) -> None: ...
    def read(self, state: Any, key: bytes) -> None: ...
    def recover(self, state: Any, exc: BaseException) -> Any: ...
    def close(self, state: Any) -> None: ...


class _OursState:
    def __init__(self, client: Any, session: Any) -> None:
        self.client = client
        self.session = session


class OursDriver:
    """Our gRPC client: one ``Client`` per worker process, shared by its client threads (as a
    program with many threads would share one: their concurrent proposals then travel together,
    on ``ProposeStream`` or in ``ProposeBatch`` calls), and one session per client thread."""

    def __init__(self, params: dict[str, Any]) -> None:
        from kvstore import ops  # grpc and protobuf only in the workers that need them
        from kvstore.client import Client

        self._ops = ops
        self._client_class = Client
        self.endpoints: list[str] = params["endpoints"]
        self.cluster_id: int | None = params.get("cluster_id")
        self.sessions: bool = params["sessions"]
        self.streaming: bool = params.get("streaming", True)
        self.consistency = "serializable" if params["consistency"] == "s" else "linearizable"
        self.timeout: float = params["op_timeout"]
        self.dial_timeout: float = params["dial_timeout"]
        self.tls = client_tls(params.get("tls_files"))
        self._shared: Any = None
        self._users = 0
        self._lock = threading.Lock()

    def open(self, client: int) -> _OursState:
        with self._lock:
            if self._shared is None:
                self._shared = self._client_class(
                    self.endpoints, timeout=self.timeout, dial_timeout=self.dial_timeout,
                    cluster_id=self.cluster_id, tls=self.tls, streaming=self.streaming)
            self._users += 1
            kv = self._shared
        try:
            return _OursState(kv, self._new_session(kv))
        except BaseException:
            self._release(kv)
            raise

    def _release(self, kv: Any) -> None:
        """One client thread is done with the shared client; the last one closes it."""
        with self._lock:
            self._users -= 1
            last = self._users == 0
            if last:
                self._shared = None
        if last:
            kv.close()

    def _new_session(self, kv: Any) -> Any:
        return kv.sync_get_session() if self.sessions else kv.get_noop_session()

    def write(self, state: _OursState, key: bytes, value: bytes) -> None:
        if state.session is None:  # dropped after an uncertain failure: a new one first
            state.session = self._new_session(state.client)
        state.client.sync_propose(state.session, self._ops.put(key, value), timeout=self.timeout)
        if self.sessions:
            state.session.proposal_completed()

    def read(self, state: _OursState, key: bytes) -> None:
        state.client.read(self._ops.get(key), consistency=self.consistency, timeout=self.timeout)

    def recover(self, state: _OursState, exc: BaseException) -> _OursState:
        from kvstore import errors

        if self.sessions and not isinstance(exc, (errors.Unavailable, errors.InvalidArgument)):
            # The outcome may be unknown (or the session is gone): this session's series id
            # must not carry another command. The next write opens a fresh session.
            state.session = None
        return state

    def close(self, state: _OursState) -> None:
        if self.sessions and state.session is not None:
            # Best effort: an unclosed session is evicted from the LRU store eventually.
            with contextlib.suppress(Exception):
                state.client.sync_close_session(state.session, timeout=self.timeout)
        self._release(state.client)


class _EtcdState:
    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        self.b64: dict[bytes, str] = {}


class EtcdError(Exception):
    """A failed etcd request (an HTTP status other than 200)."""


class EtcdDriver:
    """etcd's HTTP JSON gateway (grpc-gateway): ``POST /v3/kv/put`` and ``/v3/kv/range`` with
    base64 keys and values, one keep-alive ``http.client`` connection per client thread."""

    def __init__(self, params: dict[str, Any]) -> None:
        host, _, port = params["endpoint"].rpartition(":")
        self.host, self.port = host, int(port)
        self.serializable = params["consistency"] == "s"
        self.timeout: float = params["op_timeout"]
        self._value_b64: dict[bytes, str] = {}

    def open(self, client: int) -> _EtcdState:
        return _EtcdState(http.client.HTTPConnection(self.host, self.port, timeout=self.timeout))

    def _b64(self, state: _EtcdState, data: bytes) -> str:
        encoded = state.b64.get(data)
        if encoded is None:
            encoded = state.b64[data] = base64.b64encode(data).decode("ascii")
        return encoded

    def _post(self, state: _EtcdState, path: str, body: dict[str, object]) -> bytes:
        state.conn.request("POST", path, body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = state.conn.getresponse()
        data = response.read()  # always drained: the connection is reused
        if response.status != 200:
            raise EtcdError(f"HTTP {response.status} on {path}: {data[:200]!r}")
        return data

    def write(self, state: _EtcdState, key: bytes, value: bytes) -> None:
        self._post(state, "/v3/kv/put", {"key": self._b64(state, key),
                                         "value": self._b64(state, value)})

    def read(self, state: _EtcdState, key: bytes) -> None:
        body: dict[str, object] = {"key": self._b64(state, key)}
        if self.serializable:
            body["serializable"] = True
        self._post(state, "/v3/kv/range", body)

    def recover(self, state: _EtcdState, exc: BaseException) -> _EtcdState:
        if not isinstance(exc, EtcdError):  # a broken connection: a new one
            state.conn.close()
            state.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return state

    def close(self, state: _EtcdState) -> None:
        state.conn.close()


class AioOursDriver(OursDriver):
    """``--client aio``: one ``kvstore.aio.Client`` per worker process, on one event loop.

    The closed-loop client threads stay as they are (the same counting, the same window); each
    hands its operation to the worker's event loop and waits for it, so all the proposals of a
    worker are in flight on one loop and one client, as an asyncio program would have them
    (that is what lets the client carry concurrent proposals together). A thread blocks on
    its operation's future, as the sync driver blocks on its call: the closed loop is the same
    on both sides.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        import asyncio

        from kvstore import aio

        super().__init__(params)
        self._client_class = aio.Client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="bench-aio-loop")
        self._thread.start()
        self._shared: Any = None

    def _await(self, make: Any) -> Any:
        """Runs the coroutine ``make()`` on the worker's loop; returns its result here."""
        import asyncio

        async def run() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _kv(self) -> Any:
        if self._shared is None:
            async def create() -> Any:
                return self._client_class(self.endpoints, timeout=self.timeout,
                                          dial_timeout=self.dial_timeout,
                                          cluster_id=self.cluster_id, tls=self.tls,
                                          streaming=self.streaming)
            self._shared = self._await(create)
        return self._shared

    def open(self, client: int) -> _OursState:
        kv = self._kv()
        return _OursState(kv, self._new_session(kv))

    def _new_session(self, kv: Any) -> Any:
        if not self.sessions:
            return kv.get_noop_session()
        return self._await(kv.sync_get_session)

    def write(self, state: _OursState, key: bytes, value: bytes) -> None:
        if state.session is None:
            state.session = self._new_session(state.client)
        session, command = state.session, self._ops.put(key, value)
        self._await(lambda: state.client.sync_propose(session, command, timeout=self.timeout))
        if self.sessions:
            session.proposal_completed()

    def read(self, state: _OursState, key: bytes) -> None:
        command = self._ops.get(key)
        self._await(lambda: state.client.read(command, consistency=self.consistency,
                                              timeout=self.timeout))

    def close(self, state: _OursState) -> None:
        if self.sessions and state.session is not None:
            session = state.session
            with contextlib.suppress(Exception):
                self._await(lambda: state.client.sync_close_session(session,
                                                                    timeout=self.timeout))

    def shutdown(self) -> None:
        """After every client thread of the job has closed: the shared client, then the loop."""
        if self._shared is not None:
            with contextlib.suppress(Exception):
                self._await(self._shared.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


DRIVERS: dict[str, type] = {"ours": OursDriver, "etcd": EtcdDriver}


def make_driver(kind: str, params: dict[str, Any]) -> Driver:
    """The driver of a job: ``params["client"]`` picks our sync or asyncio client."""
    if kind == "ours" and params.get("client", "sync") == "aio":
        return AioOursDriver(params)
    return DRIVERS[kind](params)  # type: ignore[no-any-return]


# -- one client --------------------------------------------------------------------------------


class ClientLoop:
    """One closed-loop client: setup (connect, one write), then operations until the window ends.

    Shared by the worker processes and by the raw PySyncObj node (``raw.py``), which runs its
    clients as threads of the leader process.
    """

    def __init__(self, driver: Driver, client: int, spec: RunSpec) -> None:
        self.driver = driver
        self.client = client
        self.spec = spec
        self.keys = client_keys(client)
        self.value = (b"v" * spec.value_size)
        self.ready = threading.Event()
        self.setup_error: str | None = None
        self.window: Window | None = None
        self.aborted = False
        self.counted = 0
        """Operations counted so far (read by the progress reporter)."""
        self.result = RunResult()
        self.thread_cpu: float | None = None
        """CPU seconds of this thread in the window (``time.thread_time``); used by raw.py."""
        self._state: Any = None

    def setup(self) -> bool:
        try:
            self._state = self.driver.open(self.client)
            self.driver.write(self._state, self.keys[0], self.value)
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which stops the run
            self.setup_error = f"client {self.client}: {type(exc).__name__}: {exc}"
            if self._state is not None:
                with contextlib.suppress(Exception):
                    self.driver.close(self._state)
            return False
        finally:
            self.ready.set()
        return True

    def run(self, go: threading.Event) -> None:
        """Setup, wait for ``go`` (with ``window`` set), run, close."""
        if not self.setup():
            return
        go.wait()
        try:
            if not self.aborted and self.window is not None:
                self._loop(self.window)
        finally:
            with contextlib.suppress(Exception):  # the run's numbers are taken already
                self.driver.close(self._state)

    def _loop(self, window: Window) -> None:
        spec, driver, keys, value = self.spec, self.driver, self.keys, self.value
        rng = random.Random(spec.seed * 1_000_003 + self.client)
        read_ratio = spec.read_ratio
        result = self.result
        latencies = result.latencies
        perf, mono = time.perf_counter, time.monotonic
        state = self._state
        written = 1  # key 0 was written in setup
        next_key = 1
        cpu_at_measure: float | None = None
        delay = window.start - mono()
        if delay > 0:
            time.sleep(delay)
        while True:
            reading = read_ratio > 0 and rng.random() < read_ratio
            key = keys[rng.randrange(written)] if reading else keys[next_key % KEYS_PER_CLIENT]
            failure: BaseException | None = None
            t0 = perf()
            try:
                if reading:
                    driver.read(state, key)
                else:
                    driver.write(state, key, value)
            except Exception as exc:  # noqa: BLE001 - a failed operation is counted, not raised
                failure = exc
            t1 = perf()
            now = mono()
            if cpu_at_measure is None and now >= window.measure:
                cpu_at_measure = time.thread_time()
            counted = window.measure <= now <= window.end
            if failure is None:
                if not reading:
                    next_key += 1
                    written = min(KEYS_PER_CLIENT, max(written, next_key))
                if counted:
                    latencies.append(t1 - t0)
                    if reading:
                        result.reads += 1
                    else:
                        result.writes += 1
                    self.counted += 1
            else:
                if counted:
                    name = type(failure).__name__
                    result.errors[name] += 1
                    if len(result.error_samples) < 3:
                        result.error_samples.append(f"{name}: {failure}"[:300])
                state = self._state = driver.recover(state, failure)
                time.sleep(ERROR_PAUSE)
            if now >= window.end:
                break
        if cpu_at_measure is not None:
            self.thread_cpu = time.thread_time() - cpu_at_measure


def run_clients(loops: Sequence[ClientLoop], go: threading.Event) -> list[threading.Thread]:
    threads = [threading.Thread(target=loop.run, args=(go,), daemon=True,
                                name=f"bench-client-{loop.client}") for loop in loops]
    for thread in threads:
        thread.start()
    return threads


# -- a worker process --------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    kind: str
    params: dict[str, Any]
    spec: RunSpec
    clients: tuple[int, ...]
    """The global indices of this worker's clients."""


def worker_main(conn: Connection, counts: Any, slot: int) -> None:
    """A worker process: runs jobs from the coordinator until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] != "job":
            return
        try:
            _run_job(conn, message[1], counts, slot)
        except (EOFError, OSError, BrokenPipeError):
            return


def _exit_with_parent(parent: int) -> None:
    """Ends the worker mid-run if the coordinator died (killed: no one will read its result)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _run_job(conn: Connection, job: Job, counts: Any, slot: int) -> None:
    driver = make_driver(job.kind, job.params)
    try:
        _run_loops(conn, job, driver, counts, slot)
    finally:
        shutdown = getattr(driver, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _run_loops(conn: Connection, job: Job, driver: Driver, counts: Any, slot: int) -> None:
    loops = [ClientLoop(driver, client, job.spec) for client in job.clients]
    go = threading.Event()
    threads = run_clients(loops, go)
    deadline = time.monotonic() + job.spec.op_timeout + SETUP_GRACE
    for loop in loops:
        loop.ready.wait(max(0.0, deadline - time.monotonic()))
    problems = [loop.setup_error for loop in loops if loop.setup_error]
    problems += [f"client {loop.client}: no answer within {SETUP_GRACE + job.spec.op_timeout:.0f}s"
                 for loop in loops if not loop.ready.is_set()]
    conn.send(("ready", problems))
    message = conn.recv()
    if message[0] != "go":
        for loop in loops:
            loop.aborted = True
        go.set()
        for thread in threads:
            thread.join(job.spec.op_timeout + 5)
        return
    window: Window = message[1]
    for loop in loops:
        loop.window = window
    go.set()
    cpu_start: float | None = None
    while (now := time.monotonic()) < window.end:
        if cpu_start is None and now >= window.measure:
            cpu_start = time.process_time()
        counts[slot] = sum(loop.counted for loop in loops)
        next_edge = window.measure if cpu_start is None else window.end
        time.sleep(max(0.0, min(0.25, next_edge - now)))
    if cpu_start is None:
        cpu_start = time.process_time()
    cpu = time.process_time() - cpu_start
    for thread in threads:
        thread.join(job.spec.op_timeout + 5)
    counts[slot] = sum(loop.counted for loop in loops)
    merged = RunResult()
    for loop in loops:
        merged.merge(loop.result)
    conn.send(("result", {
        "latencies": array("d", merged.latencies).tobytes(),
        "reads": merged.reads, "writes": merged.writes, "errors": dict(merged.errors),
        "samples": merged.error_samples, "cpu": cpu,
        "stuck": sum(1 for t in threads if t.is_alive()),
    }))


# -- the coordinator's side --------------------------------------------------------------------


class WorkerPool:
    """``size`` worker processes, started on first use and reused by every run and target."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._counts: Any = None
        self._busy = False
        """A run is in progress: the workers are not listening for "stop"."""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def _ensure_started(self) -> None:
        if self._procs:
            return
        self._counts = self._ctx.Array("q", self.size, lock=False)
        for slot in range(self.size):
            ours, theirs = self._ctx.Pipe()
            proc = self._ctx.Process(target=worker_main, args=(theirs, self._counts, slot),
                                     name=f"kv-bench-worker-{slot}", daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)

    def run(self, kind: str, params: dict[str, Any], spec: RunSpec, node_pids: Sequence[int],
            progress: Progress) -> RunResult:
        """One run of ``spec.clients`` clients of ``kind`` spread over the workers."""
        self._ensure_started()
        self._busy = True
        n = min(self.size, spec.clients)
        shares = [tuple(range(spec.clients))[w::n] for w in range(n)]
        for w in range(self.size):
            self._counts[w] = 0
        for w in range(n):
            self._conns[w].send(("job", Job(kind, params, spec, shares[w])))
        problems: list[str] = []
        for w in range(n):
            problems += self._receive(w, "ready", spec.op_timeout + SETUP_GRACE + 30)
        if problems:
            for w in range(n):
                self._conns[w].send(("abort",))
            raise CliError(f"{kind}: clients could not start: {problems[0]}"
                           + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                           UNAVAILABLE)
        window = Window.after_now(spec)
        for w in range(n):
            self._conns[w].send(("go", window))
        cpu = CpuWindow(node_pids)
        measuring = False
        while (now := time.monotonic()) < window.end:
            if not measuring and now >= window.measure:
                cpu.begin()
                measuring = True
            progress(now - window.measure, sum(self._counts[w] for w in range(n)))
            edge = window.end if measuring else window.measure
            time.sleep(max(0.0, min(0.25, edge - now)))
        if not measuring:
            cpu.begin()
        cpu.end()
        result = RunResult(node_cpu=cpu.node_cpu, busy_cpu=cpu.busy_cpu, client_cpu=0.0)
        stuck = 0
        for w in range(n):
            answer = self._receive(w, "result", spec.op_timeout + 30)
            latencies = array("d")
            latencies.frombytes(answer["latencies"])
            result.merge(RunResult(latencies=latencies.tolist(), reads=answer["reads"],
                                   writes=answer["writes"], errors=Counter(answer["errors"]),
                                   error_samples=answer["samples"], client_cpu=answer["cpu"]))
            stuck += answer["stuck"]
        self._busy = False
        if stuck:
            result.errors["ClientStuck"] += stuck
        progress(spec.duration, len(result.latencies))
        return result

    def _receive(self, w: int, kind: str, timeout: float) -> Any:
        conn, proc = self._conns[w], self._procs[w]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise CliError(f"bench worker {w} exited with code {proc.exitcode}")
            if time.monotonic() > deadline:
                raise CliError(f"bench worker {w} did not answer within {timeout:.0f}s")
        message = conn.recv()
        if message[0] != kind:
            raise CliError(f"bench worker {w} said {message[0]!r}, expected {kind!r}")
        return message[1]

    def close(self) -> None:
        """Stops every worker: asked first (SIGTERM at once if interrupted mid-run), then
        SIGTERM, then SIGKILL."""
        if not self._busy:
            for conn in self._conns:
                try:
                    conn.send(("stop",))
                except (OSError, BrokenPipeError):
                    pass
            deadline = time.monotonic() + 2.0
            for proc in self._procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def alive(self) -> list[int]:
        return [p.pid for p in self._procs if p.is_alive()]
