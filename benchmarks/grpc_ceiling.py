"""The ceiling Python gRPC itself puts on this machine: an echo server with nothing behind it.

Why: every request to our cluster crosses a Python gRPC server, and ``kv bench`` drives it from
Python gRPC clients on the same machine. This script measures that path alone (no Raft, no
state, no protobuf): one server process whose only handler returns its request bytes, loaded
the way ``kv bench`` loads a cluster. Whatever ops/s it reaches is an upper bound for any
Python gRPC server driven by Python gRPC clients here; a target above it is physically
unreachable, and the CPU per operation it reports is the floor that gRPC alone costs.

Run:

    .venv/bin/python benchmarks/grpc_ceiling.py --clients 1,16,64 --duration 5

``-w json`` (or ``--json``) prints one JSON object per client count instead of the table.

``--rpc stream`` sends each client's requests as messages on one open call (a bidirectional
stream, as ``ProposeStream``), each reply read by the thread that wrote the request; set
against the default ``--rpc unary`` (one call per request), it is what a call's own set-up
costs, on either server:

    .venv/bin/python benchmarks/grpc_ceiling.py --clients 1,16 --server aio --rpc unary
    .venv/bin/python benchmarks/grpc_ceiling.py --clients 1,16 --server aio --rpc stream

``--server`` picks the server: ``sync`` (default) is ``grpc.server`` on 64 pool threads, as
ours; ``aio`` is ``grpc.aio.server`` on one asyncio event loop. With the default ``--handoff 0``
the handler answers at once, so the rows are each server's own cost. ``--handoff SECONDS``
models how our server waits for Raft: the handler hands the request to one "engine" thread that
plays our node's tick thread. It sleeps in ``select.poll`` on a wake pipe (10 ms at most), takes
every waiting request as one batch, sleeps SECONDS (the replication round trip, no CPU), then
completes the batch. With ``sync`` each request blocks a pool thread on a ``threading.Event``
until then (what we ship); with ``aio`` one ``call_soon_threadsafe`` completes the whole batch's
futures on the loop. Set against the ``--handoff 0`` rows, this shows what each way of waiting
costs in ops/s, latency and server CPU:

    .venv/bin/python benchmarks/grpc_ceiling.py --clients 1,16,64 --handoff 0.001 --server sync
    .venv/bin/python benchmarks/grpc_ceiling.py --clients 1,16,64 --handoff 0.001 --server aio

The load is closed-loop: each client is a thread with its own ``grpc.insecure_channel`` (as our
``Client`` makes them) and one request in flight; the clients are spread over ``--workers``
processes (started with "spawn": gRPC does not survive a fork). As with our ``Client``, gRPC's
global subchannel pool makes the channels of one process share one TCP connection. All clients
start together on the machine-wide monotonic clock, run ``--warmup`` seconds unmeasured, then
``--duration`` measured seconds; an operation counts if it completes inside the measured window.
The server's CPU time comes from ``/proc/<pid>/stat`` at the window's edges; each worker reports
its own (``getrusage``) over the window. ``busy`` is what the whole machine used meanwhile
(``/proc/stat``): well above ``cores``, other load shared the machine and the numbers are low.

Everything listens on and talks to 127.0.0.1 only, every wait is bounded, and the server and
workers are stopped on every exit (Ctrl-C included); children that outlive a killed parent end
themselves within half a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import resource
import select
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

import grpc

HOST = "127.0.0.1"
SERVICE, METHOD, STREAM_METHOD = "bench.Echo", "Echo", "EchoStream"
SERVER_THREADS = 64
CALL_TIMEOUT = 5.0
"""Seconds one echo may take before it counts as an error."""
HANDOFF_TIMEOUT = 5.0
"""Seconds a handler waits for the engine before it fails the call."""
TICK_MS = 10
"""Milliseconds the engine's ``poll`` waits at most when no request wakes it."""
SERVE_TIMEOUT = 10.0
"""Seconds the server gets to start serving."""
SETUP_TIMEOUT = 30.0
"""Seconds the workers get to start, connect and do their first (unmeasured) call."""
START_DELAY = 0.2
"""Seconds between broadcasting the window and its start, so every client starts together."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Window:
    """One run's edges on ``time.monotonic`` (CLOCK_MONOTONIC: the same clock in every process)."""

    start: float
    measure: float
    end: float


@dataclass
class ClientResult:
    latencies: list[float] = field(default_factory=list)
    """Seconds per successful call inside the measured window."""
    errors: int = 0


@dataclass(frozen=True)
class WorkerResult:
    latencies: list[float]
    errors: int
    cpu: float
    """CPU seconds of the whole worker process (all its threads) over the measured window."""


@dataclass(frozen=True)
class Row:
    server: str
    rpc: str
    """``unary``: one call per request; ``stream``: one message on an open call per request."""
    handoff: float
    """Seconds the engine holds each batch (0: no engine, the handler answers itself)."""
    clients: int
    workers: int
    ops_per_s: float
    p50_ms: float
    server_us_per_op: float
    client_us_per_op: float
    cores: float
    """Server + client CPU seconds per wall second of the measured window."""
    busy: float
    """Cores the whole machine kept busy meanwhile: above ``cores`` is someone else's load."""
    errors: int


# -- helpers shared by the processes ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def identity(data: bytes) -> bytes:
    return data


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process, all threads (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces: count fields from after its ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        # cpu  user nice system idle iowait irq softirq steal ...
        user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def become_child() -> None:
    """The parent owns Ctrl-C and stops its children; a child whose parent died ends itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# -- the server process -------------------------------------------------------------------------


W = TypeVar("W")


class Engine(Generic[W]):
    """Our Raft node's tick thread, simulated: it completes the requests handed to it in batches.

    Handlers ``submit`` a request with whatever they wait on (``W``); the engine thread sleeps in
    ``poll`` on a wake pipe, takes every waiting request as one batch, holds it ``round_trip``
    seconds without CPU (replication), and passes it to ``complete``, which wakes the waiters.
    """

    def __init__(self, round_trip: float,
                 complete: Callable[[list[tuple[bytes, W]]], object]) -> None:
        self.round_trip, self.complete = round_trip, complete
        self.waiting: deque[tuple[bytes, W]] = deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK)
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, request: bytes, waiter: W) -> None:
        self.waiting.append((request, waiter))
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the engine has a wake-up pending already
            pass

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        while True:
            poller.poll(TICK_MS)
            try:  # drain before taking the batch: a later submit wakes the next poll
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            batch = [self.waiting.popleft() for _ in range(len(self.waiting))]
            if batch:
                time.sleep(self.round_trip)
                self.complete(batch)


Echo = Callable[[bytes, grpc.ServicerContext], bytes | Awaitable[bytes]]


def echo_handler(echo: Echo, echo_stream: Callable[..., Any]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=identity, response_serializer=identity),
        STREAM_METHOD: grpc.stream_stream_rpc_method_handler(
            echo_stream, request_deserializer=identity, response_serializer=identity),
    })


def sync_echo_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    """``--rpc stream`` on ``grpc.server``: each message answered on the same call."""
    yield from requests


async def aio_echo_stream(requests: AsyncIterator[bytes],
                          context: grpc.ServicerContext) -> AsyncIterator[bytes]:
    """``--rpc stream`` on ``grpc.aio.server``."""
    async for request in requests:
        yield request


def sync_echo(handoff: float) -> Echo:
    """The echo for ``grpc.server``: each call blocks its pool thread until the engine answers."""
    if not handoff:
        return lambda request, context: request

    def finish(batch: list[tuple[bytes, tuple[threading.Event, list[bytes]]]]) -> None:
        for request, (done, box) in batch:
            box.append(request)
            done.set()

    engine = Engine(handoff, finish)

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        done = threading.Event()
        box: list[bytes] = []
        engine.submit(request, (done, box))
        if not done.wait(HANDOFF_TIMEOUT):
            raise TimeoutError("the engine did not answer")
        return box[0]

    return echo


def aio_echo(handoff: float) -> Echo:
    """The echo for ``grpc.aio.server``: each call awaits a future the engine's batch completes."""
    async def echo_now(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    if not handoff:
        return echo_now
    loop = asyncio.get_running_loop()

    def finish(batch: list[tuple[bytes, asyncio.Future[bytes]]]) -> None:
        for request, future in batch:
            if not future.done():  # not given up on by a timed-out handler
                future.set_result(request)

    engine: Engine[asyncio.Future[bytes]] = Engine(
        handoff, lambda batch: loop.call_soon_threadsafe(finish, batch))

    async def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        future = loop.create_future()
        engine.submit(request, future)
        return await asyncio.wait_for(future, HANDOFF_TIMEOUT)

    return echo


# No SO_REUSEPORT (as our server): a port someone else holds fails instead of being shared.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


async def serve_aio(port: int, handoff: float) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((echo_handler(aio_echo(handoff), aio_echo_stream),))
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    await server.wait_for_termination()


def serve(port: int, kind: str, handoff: float) -> None:
    become_child()
    if kind == "aio":
        asyncio.run(serve_aio(port, handoff))
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS),
                         options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((echo_handler(sync_echo(handoff), sync_echo_stream),))
    server.add_insecure_port(f"{HOST}:{port}")
    server.start()
    server.wait_for_termination()


# -- a client worker process --------------------------------------------------------------------


def run_client(call: Callable[..., bytes], request: bytes, window: Window,
               result: ClientResult) -> None:
    """One closed-loop client: one call in flight, back to back until the window ends."""
    perf, mono = time.perf_counter, time.monotonic
    sleep_until(window.start)
    while True:
        t0 = perf()
        try:
            call(request, timeout=CALL_TIMEOUT)
            ok = True
        except grpc.RpcError:
            ok = False
        latency = perf() - t0
        now = mono()
        if window.measure <= now <= window.end:
            if ok:
                result.latencies.append(latency)
            else:
                result.errors += 1
        if now >= window.end:
            return


class StreamCall:
    """``--rpc stream``: a client's requests as messages on one open call, each reply read by
    the thread that wrote the request (as ``kvstore.streams.ProposalStream`` does)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.replies = channel.stream_stream(
            f"/{SERVICE}/{STREAM_METHOD}", request_serializer=identity,
            response_deserializer=identity)(iter(self.requests.get, None))

    def __call__(self, request: bytes, timeout: float) -> bytes:
        self.requests.put(request)
        reply: bytes = next(self.replies)  # the server is local: no deadline of its own
        return reply

    def close(self) -> None:
        self.requests.put(None)


def client_worker(conn: Connection, port: int, clients: int, value_size: int,
                  rpc: str) -> None:
    """Connects ``clients`` channels, says "ready", runs the window it is sent, reports."""
    become_child()
    request = b"v" * value_size
    channels = [grpc.insecure_channel(f"{HOST}:{port}") for _ in range(clients)]
    calls: list[Callable[..., bytes]] = [
        StreamCall(channel) if rpc == "stream" else
        channel.unary_unary(f"/{SERVICE}/{METHOD}", request_serializer=identity,
                            response_deserializer=identity) for channel in channels]
    for call in calls:  # connect, and one round trip each: setup, not measured
        call(request, timeout=CALL_TIMEOUT)
    conn.send("ready")
    window: Window = conn.recv()
    results = [ClientResult() for _ in calls]
    threads = [threading.Thread(target=run_client, args=(call, request, window, result),
                                daemon=True) for call, result in zip(calls, results, strict=True)]
    for thread in threads:
        thread.start()
    sleep_until(window.measure)
    cpu_start = own_cpu()
    sleep_until(window.end)
    cpu = own_cpu() - cpu_start
    for thread in threads:
        thread.join(CALL_TIMEOUT + 1)
    conn.send(WorkerResult([x for r in results for x in r.latencies],
                           sum(r.errors for r in results), cpu))
    for call in calls:
        if isinstance(call, StreamCall):
            call.close()
    for channel in channels:
        channel.close()


# -- the parent ---------------------------------------------------------------------------------


def receive(conn: Connection, timeout: float) -> object:
    if not conn.poll(timeout):
        raise TimeoutError(f"a client worker did not answer within {timeout:.0f}s")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError("a client worker died (its traceback is above)") from None


def stop(proc: BaseProcess) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def measure(ctx: mp.context.SpawnContext, port: int, server_pid: int, clients: int,
            workers: int, value_size: int, warmup: float, duration: float, server: str,
            handoff: float, rpc: str = "unary") -> Row:
    """One closed-loop run of ``clients`` clients over ``min(workers, clients)`` processes."""
    n = min(workers, clients)
    shares = [clients // n + (i < clients % n) for i in range(n)]
    procs: list[BaseProcess] = []
    conns: list[Connection] = []
    try:
        for share in shares:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=client_worker,
                               args=(theirs, port, share, value_size, rpc), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        setup_deadline = time.monotonic() + SETUP_TIMEOUT
        for conn in conns:
            receive(conn, max(0.0, setup_deadline - time.monotonic()))
        start = time.monotonic() + START_DELAY
        window = Window(start, start + warmup, start + warmup + duration)
        for conn in conns:
            conn.send(window)
        sleep_until(window.measure)
        server_start, busy_start = process_cpu(server_pid), machine_busy()
        sleep_until(window.end)
        server_cpu = process_cpu(server_pid) - server_start
        busy = machine_busy() - busy_start
        results: list[WorkerResult] = []
        for conn in conns:
            result = receive(conn, CALL_TIMEOUT + 5)
            assert isinstance(result, WorkerResult)
            results.append(result)
    finally:
        for proc in procs:
            stop(proc)
    latencies = [x for r in results for x in r.latencies]
    ops = len(latencies)
    client_cpu = sum(r.cpu for r in results)
    return Row(
        server=server,
        rpc=rpc,
        handoff=handoff,
        clients=clients,
        workers=n,
        ops_per_s=ops / duration,
        p50_ms=statistics.median(latencies) * 1e3 if latencies else float("nan"),
        server_us_per_op=server_cpu / ops * 1e6 if ops else float("nan"),
        client_us_per_op=client_cpu / ops * 1e6 if ops else float("nan"),
        cores=(server_cpu + client_cpu) / duration,
        busy=busy / duration,
        errors=sum(r.errors for r in results),
    )


COLUMNS = [("server", "{:>6}"), ("rpc", "{:>6}"), ("handoff", "{:>7.4f}"), ("clients", "{:>7}"),
           ("workers", "{:>7}"), ("ops_per_s", "{:>9.0f}"), ("p50_ms", "{:>6.2f}"),
           ("server_us_per_op", "{:>16.0f}"), ("client_us_per_op", "{:>16.0f}"),
           ("cores", "{:>5.2f}"), ("busy", "{:>5.2f}"), ("errors", "{:>6}")]


def print_row(row: Row, as_json: bool) -> None:
    values = asdict(row)
    if as_json:
        print(json.dumps(values), flush=True)
    else:
        print("  ".join(fmt.format(values[name]) for name, fmt in COLUMNS), flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,16,64",
                        type=lambda s: [int(c) for c in s.split(",")],
                        help="comma-separated client counts, one run each (default 1,16,64)")
    parser.add_argument("--workers", type=int, default=4,
                        help="client worker processes (at most one per client; default 4)")
    parser.add_argument("--value-size", type=int, default=150,
                        help="request bytes (default 150: a ProposeRequest with a 100 B value)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="unmeasured seconds before each run (default 1)")
    parser.add_argument("--server", choices=["sync", "aio"], default="sync",
                        help="grpc.server on 64 threads, or grpc.aio.server (default sync)")
    parser.add_argument("--rpc", choices=["unary", "stream"], default="unary",
                        help="one call per request, or one message per request on an open "
                             "call per client (default unary)")
    parser.add_argument("--handoff", type=float, default=0.0, metavar="SECONDS",
                        help="complete requests in batches on an engine thread that holds "
                             "each batch SECONDS (default 0: the handler answers itself)")
    parser.add_argument("-w", "--write-out", choices=["table", "json"], default="table")
    parser.add_argument("--json", dest="write_out", action="store_const", const="json",
                        help="same as -w json")
    args = parser.parse_args(argv)
    if (min(args.clients) < 1 or args.workers < 1 or args.value_size < 0 or args.duration <= 0
            or args.handoff < 0):
        parser.error("--clients and --workers must be >= 1, --duration > 0, --handoff >= 0")
    if args.rpc == "stream" and args.handoff:
        parser.error("--rpc stream measures the messages alone: it takes no --handoff")
    return args


def main() -> None:
    args = parse_args()
    as_json = args.write_out == "json"
    ctx = mp.get_context("spawn")
    port = free_port()
    server = ctx.Process(target=serve, args=(port, args.server, args.handoff), daemon=True)
    server.start()
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=SERVE_TIMEOUT)
        assert server.pid is not None
        if not as_json:
            print("  ".join(f"{name:>{len(fmt.format(0))}}" for name, fmt in COLUMNS))
        for clients in args.clients:
            print_row(measure(ctx, port, server.pid, clients, args.workers, args.value_size,
                              args.warmup, args.duration, args.server, args.handoff, args.rpc),
                      as_json)
    finally:
        stop(server)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the server and workers are stopped already
        sys.exit(130)
