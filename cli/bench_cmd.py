"""``kv bench``: closed-loop load on a local cluster, optionally against etcd or raw PySyncObj.

The machinery is in ``cli/bench/``; this module is the command line. Everything runs on
127.0.0.1, every run is bounded in time, and nothing is left running: the targets are stopped
in ``finally`` (also on Ctrl-C, SIGTERM and errors) and leftovers are looked for with pgrep.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import click

from cli.bench.load import default_workers
from cli.bench.runner import COMPARABLE, BenchOptions, Display, run_bench, text_report
from cli.exits import BAD_ARGUMENTS, ERROR, CliError
from cli.kv_click import KvCommand
from cli.params import Duration, Integer
from cli.settings import Settings, global_options


def _client_counts(_ctx: click.Context, _param: click.Parameter, text: str) -> list[int]:
    try:
        counts = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 1 or n > 1024 for n in counts):
        raise click.BadParameter(f"{text!r} is not a comma list of client counts (1 to 1024)")
    return counts


def _compare(_ctx: click.Context, _param: click.Parameter, text: str) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in COMPARABLE]
    if unknown:
        raise click.BadParameter(f"choose from {', '.join(COMPARABLE)} (comma list) or none")
    return list(dict.fromkeys(names))


def _tls_files(settings: Settings) -> tuple[str | None, ...] | None:
    """The client files for ``--endpoints`` (checked here, passed by name to the workers)."""
    if not settings.endpoints:
        return None
    tls = settings.client_tls()
    return None if tls is None else tuple(
        str(f) if f else None for f in (tls.ca_file, tls.cert_file, tls.key_file))


@click.command(cls=KvCommand)
@click.option("--clients", default="1,16,64", show_default=True, callback=_client_counts,
              metavar="N,N,...", help="Concurrent clients; one run per count.")
@click.option("--duration", default="10s", show_default=True, type=Duration(),
              metavar="DURATION", help="Measured time per run (10s, 500ms, 2m).")
@click.option("--warmup", default="2s", show_default=True, type=Duration(positive=False),
              metavar="DURATION", help="Unmeasured load before each run's measurement.")
@click.option("--rounds", type=Integer(1, 100), default=3, show_default=True,
              help="Rounds of every run; the report shows medians.")
@click.option("--value-size", type=Integer(0, 1 << 20), default=100, show_default=True,
              metavar="BYTES", help="Size of each written value.")
@click.option("--read-ratio", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of reads (gets of the client's own keys); the rest are puts.")
@click.option("--consistency", type=click.Choice(["l", "s"]), default="l", show_default=True,
              help="Reads: l linearizable (through the log), s serializable (one replica).")
@click.option("--sessions", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Ours: each client with its own session (on) or no-op sessions (off).")
@click.option("--nodes", type=Integer(1, 7), default=3, show_default=True,
              help="Nodes of each cluster started (ours, etcd members, raw).")
@click.option("--fsync/--no-fsync", default=None,
              help="Start our nodes in durable mode (the default) or with --no-fsync.")
@click.option("--tls/--no-tls", default=True, show_default=True,
              help="Our fresh cluster with its client API over mutual TLS, as kv cluster up "
                   "makes it (--no-tls: plaintext, as etcd's HTTP gateway here).")
@click.option("--compare", default="none", show_default=True, callback=_compare,
              metavar="etcd,raw,noop,plaintext,calls", help="Also run the same load, alternating, "
              "against etcd (the etcd binary, Debian etcd-server), a plain PySyncObj dict (raw), "
              "our cluster with no-op sessions (noop: what exactly-once costs), a second "
              "cluster of ours without TLS (plaintext: what TLS costs), and/or our cluster with "
              "proposals in calls rather than on the stream (calls: what the stream buys).")
@click.option("--preload", type=Integer(0, 100_000_000), default=0, metavar="N",
              help="Ours: first load N keys of 100 B through the log (put_many batches), so "
              "the runs meet snapshots of a large state.")
@click.option("--workers", type=Integer(1, 256), default=default_workers(),
              show_default=True, help="Client worker processes (threads inside).")
@click.option("--client", "client_kind", type=click.Choice(["sync", "aio"]), default="sync",
              show_default=True, help="Ours: kvstore.Client (sync) or kvstore.aio.Client (aio, "
              "one per worker process on one event loop).")
@click.option("--stream/--no-stream", "streaming", default=True, show_default=True,
              help="Ours: the client's proposals as messages on one ProposeStream call per "
              "node, or (--no-stream) in Propose and ProposeBatch calls.")
@click.option("--ceiling/--no-ceiling", default=None,
              help="With --compare etcd (default on): after the rounds, etcd's own Go load "
              "generator, etcdctl check perf --load=l (60 s, Debian etcd-client), as one more "
              "row: etcd at its best on this machine.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              metavar="FILE.svg", help="Also draw throughput and p99 against client count, "
              "every target side by side, as an SVG file.")
@global_options
def bench(clients: list[int], duration: float, warmup: float, rounds: int, value_size: int,
          read_ratio: float, consistency: str, sessions: str, nodes: int, fsync: bool | None,
          tls: bool, compare: list[str], preload: int, workers: int, client_kind: str,
          streaming: bool, ceiling: bool | None, plot: str | None) -> None:
    """Closed-loop load: ops/s, latency percentiles, errors, client and node CPU per op.

    \b
    Starts a fresh local cluster in a temporary directory (kv cluster up --detach), or uses
    --endpoints. Each client has one operation in flight; clients run in worker processes.
    --timeout is the per-operation time limit. Progress goes to stderr; the table (or -w json)
    to stdout.
    \b
      kv bench --clients 1,16,64 --duration 10s --rounds 3 --compare etcd
      kv bench --compare raw --duration 2s --rounds 1 -w json
      kv bench --clients 1,16,64 --compare etcd --plot bench.svg
    """
    settings = Settings.current()
    if "plaintext" in compare and not tls:
        raise CliError("--compare plaintext compares TLS with plaintext: it needs --tls",
                       BAD_ARGUMENTS)
    if "plaintext" in compare and settings.endpoints:
        raise CliError("--compare plaintext starts two clusters of its own (TLS and plaintext): "
                       "it does not take --endpoints", BAD_ARGUMENTS)
    if ceiling and "etcd" not in compare:
        raise CliError("--ceiling runs etcdctl check perf on the etcd cluster of the run: it "
                       "needs --compare etcd", BAD_ARGUMENTS)
    if ceiling is None:
        ceiling = "etcd" in compare
    if plot is not None and not plot.endswith(".svg"):
        raise CliError(f"--plot writes SVG: name a .svg file, not {plot!r}", BAD_ARGUMENTS)
    if plot is not None and not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
        raise CliError(f"--plot: no directory for {plot!r}", BAD_ARGUMENTS)
    if "calls" in compare and not streaming:
        raise CliError("--compare calls compares the stream with calls: it needs --stream",
                       BAD_ARGUMENTS)
    if "noop" in compare and sessions == "off":
        raise CliError("--compare noop compares sessions with no-op sessions: it needs "
                       "--sessions on", BAD_ARGUMENTS)
    if fsync is not None and settings.endpoints:
        raise CliError("--fsync/--no-fsync apply to the cluster kv bench starts, not to "
                       "--endpoints", BAD_ARGUMENTS)
    if fsync is None:
        fsync = True
    options = BenchOptions(
        clients=clients, duration=duration, warmup=warmup, rounds=rounds,
        value_size=value_size, read_ratio=read_ratio, consistency=consistency,
        sessions=sessions == "on", nodes=nodes, fsync=fsync, tls=tls, compare=compare,
        endpoints=list(settings.endpoints), tls_files=_tls_files(settings),
        op_timeout=settings.timeout,
        dial_timeout=settings.dial_timeout, workers=workers, preload=preload,
        client=client_kind, streaming=streaming, ceiling=ceiling)

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: targets stopped

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        doc = run_bench(options, Display())
    finally:
        signal.signal(signal.SIGTERM, previous)
    if plot is not None:
        from cli.bench.plot import write_svg

        try:
            write_svg(doc, plot)
        except OSError as exc:
            raise CliError(f"--plot: cannot write {plot}: {exc.strerror or exc}", ERROR) from exc
    if settings.write_out == "json":
        click.echo(json.dumps(doc))
    else:
        for line in text_report(doc):
            click.echo(line)
    if doc["leftover_processes"]:
        raise CliError(f"{len(doc['leftover_processes'])} process(es) were still running after "
                       "the benchmark and were killed", ERROR)
    empty = [f"{r['target']} with {r['clients']} clients (round {r['round']})"
             for r in doc["runs"] if r["ops"] == 0]
    if empty:
        raise CliError(f"no operation completed: {empty[0]}", ERROR)
