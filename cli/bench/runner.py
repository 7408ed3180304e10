"""One ``kv bench``: start the targets, run every (round, clients, target), stop everything.

Targets alternate run by run (ours, etcd, ours, etcd, ...) so that drift of a shared machine
hits all of them alike; each figure is the median over rounds, and the ratios compare runs
taken side by side. After the targets are stopped, every process they started is looked for
with ``pgrep -f`` by their temporary directories, and SIGKILLed (and reported) if found.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from cli.bench import stats
from cli.bench.common import KEYS_PER_CLIENT, RunSpec, Target
from cli.bench.guard import Guard
from cli.bench.load import WorkerPool

COMPARABLE = ("etcd", "raw", "noop", "plaintext", "calls")


@dataclass(frozen=True)
class BenchOptions:
    clients: list[int]
    duration: float
    warmup: float
    rounds: int
    value_size: int = 100
    read_ratio: float = 0.0
    consistency: str = "l"
    sessions: bool = True
    nodes: int = 3
    fsync: bool = True
    tls: bool = True
    """Our fresh cluster with mutual TLS (``kv cluster up``'s default)."""
    compare: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    tls_files: tuple[str | None, ...] | None = None
    """CA, certificate and key for ``endpoints`` (``None``: plaintext)."""
    op_timeout: float = 5.0
    dial_timeout: float = 2.0
    workers: int = 4
    seed: int = 1
    preload: int = 0
    client: str = "sync"
    """Our client in the workers: ``sync`` or ``aio`` (``load.AioOursDriver``)."""
    streaming: bool = True
    """Our client's proposals on ``ProposeStream`` (else in ``Propose``/``ProposeBatch``)."""
    ceiling: bool = False
    """After the rounds, ``etcdctl check perf --load=l`` on the etcd cluster (``etcd_ceiling``)."""


class Display:
    """Progress on stderr: one line rewritten in place on a TTY; plain lines otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._width = 0
        self._last_plain = 0.0

    def status(self, text: str) -> None:
        if self.tty:
            pad = max(0, self._width - len(text))
            click.echo("\r" + text + " " * pad, nl=False, err=True)
            self._width = len(text)

    def line(self, text: str) -> None:
        if self.tty and self._width:
            click.echo("\r" + " " * self._width + "\r", nl=False, err=True)
            self._width = 0
        click.echo(text, err=True)


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def build_targets(options: BenchOptions, pool: WorkerPool) -> list[Target]:
    """Ours first, then the competitors; raises before anything starts if one is missing."""
    from cli.bench.ours import BatchCallsView, NoopSessionsView, OursTarget

    ours = OursTarget(pool, nodes=options.nodes, endpoints=options.endpoints,
                      fsync=options.fsync, sessions=options.sessions,
                      dial_timeout=options.dial_timeout, tls=options.tls,
                      tls_files=options.tls_files, preload=options.preload,
                      client=options.client, streaming=options.streaming)
    targets: list[Target] = [ours]
    for name in options.compare:
        if name == "noop":
            targets.append(NoopSessionsView(ours))
        elif name == "calls":
            targets.append(BatchCallsView(ours))
        elif name == "plaintext":
            targets.append(OursTarget(pool, nodes=options.nodes, fsync=options.fsync,
                                      sessions=options.sessions,
                                      dial_timeout=options.dial_timeout, tls=False,
                                      name="ours-plaintext", client=options.client,
                                      streaming=options.streaming))
        elif name == "etcd":
            from cli.bench.etcd import EtcdTarget

            targets.append(EtcdTarget(pool, members=options.nodes))
        elif name == "raw":
            from cli.bench.raw import RawTarget

            targets.append(RawTarget(nodes=options.nodes))
    return targets


def run_bench(options: BenchOptions, display: Display,
              make_targets: Callable[[BenchOptions, WorkerPool], list[Target]] = build_targets,
              ) -> dict[str, Any]:
    """Runs the whole benchmark and returns the report document (see ``kv bench --help``)."""
    from cli.bench.ours import OursOtherwise

    pool = WorkerPool(min(options.workers, max(options.clients)))
    targets = make_targets(options, pool)
    guard = Guard()  # cleans up if this process is killed outright
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs: list[dict[str, Any]] = []
    started: list[Target] = []
    leftover: list[dict[str, Any]] = []
    ceiling: dict[str, Any] | None = None
    try:
        for target in targets:
            target.guard = guard
            if target.name == "ours" and options.endpoints:
                display.line(f"using ours at {','.join(options.endpoints)}")
            elif not isinstance(target, OursOtherwise):  # it has nothing of its own to start
                display.line(f"starting {target.name} ({options.nodes} nodes)...")
            started.append(target)
            target.start()
        total = options.rounds * len(options.clients) * len(targets)
        done = 0
        for round_no in range(1, options.rounds + 1):
            for clients in options.clients:
                for target in targets:
                    done += 1
                    runs.append(_one_run(options, target, clients, round_no, done, total, display))
        if options.ceiling:
            ceiling = _measure_ceiling(targets, display)
    finally:
        pool.close()  # first: clients still running (after an interrupt) slow the nodes' stop
        for target in reversed(started):
            try:
                target.stop()
            except Exception as exc:  # noqa: BLE001 - reported; the other targets still stop
                display.line(f"stopping {target.name} failed: {exc}")
        for target in started:
            for marker in target.markers():
                for pid, command in stats.kill_leftovers(marker):
                    leftover.append({"target": target.name, "pid": pid, "command": command})
        for pid in pool.alive():
            leftover.append({"target": "client worker", "pid": pid, "command": ""})
        guard.close()
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    return _document(options, targets, runs, leftover, load_start, load_end, pool.size, ceiling)


def _measure_ceiling(targets: list[Target], display: Display) -> dict[str, Any]:
    """etcd's ceiling with its own Go clients, on the etcd cluster of this run, after the rounds
    (so it disturbs none of them)."""
    from cli.bench import etcd_ceiling

    etcd = next((t for t in targets if t.name == "etcd"), None)
    if etcd is None:
        return etcd_ceiling.Ceiling(None, note="needs --compare etcd").as_dict()
    if etcd_ceiling.etcdctl_binary() is None:
        display.line(f"{etcd_ceiling.NAME}: not measured, {etcd_ceiling.INSTALL_HINT}")
        return etcd_ceiling.Ceiling(None, note=etcd_ceiling.INSTALL_HINT).as_dict()
    leader = etcd.current_leader()  # type: ignore[attr-defined]
    display.status(f"{etcd_ceiling.NAME}: --load={etcd_ceiling.LOAD}, "
                   f"{etcd_ceiling.CLIENTS} clients, {etcd_ceiling.DURATION_S}s...")
    found = etcd_ceiling.measure([leader])
    display.line(f"{etcd_ceiling.NAME}: "
                 + (f"{found.ops_s:8,.0f} writes/s ({found.verdict})" if found.ops_s is not None
                    else f"not measured, {found.note}"))
    return found.as_dict()


def _one_run(options: BenchOptions, target: Target, clients: int, round_no: int, index: int,
             total: int, display: Display) -> dict[str, Any]:
    spec = RunSpec(clients=clients, duration=options.duration, warmup=options.warmup,
                   value_size=options.value_size, read_ratio=options.read_ratio,
                   consistency=options.consistency, sessions=options.sessions,
                   op_timeout=options.op_timeout, seed=options.seed * 7919 + round_no)
    head = (f"[{index}/{total}] round {round_no}/{options.rounds} {target.name:>9} "
            f"{clients:>3} clients")

    def progress(elapsed: float, ops: int) -> None:
        if elapsed < 0:
            display.status(f"{head}: warm-up {-elapsed:4.1f}s")
        else:
            rate = ops / elapsed if elapsed > 0.2 else 0.0
            display.status(f"{head}: {_bar(elapsed / options.duration)} "
                           f"{min(elapsed, options.duration):4.1f}/{options.duration:.0f}s "
                           f"{rate:8,.0f} ops/s")

    display.status(f"{head}: starting clients")
    result = target.run(spec, progress)
    summary = stats.summarize(result, options.duration)
    cpu = summary["node_cpu_us_per_op"]
    display.line(f"{head}: {summary['ops_s']:8,.0f} ops/s  p50 {summary['p50_ms']:7.2f} ms  "
                 f"p99 {summary['p99_ms']:7.2f} ms  errors {summary['errors']}"
                 + (f"  node CPU {cpu:,.0f} us/op" if cpu is not None else ""))
    return {"round": round_no, "target": target.name, "clients": clients, **summary}


def _document(options: BenchOptions, targets: list[Target], runs: list[dict[str, Any]],
              leftover: list[dict[str, Any]], load_start: Any, load_end: Any,
              workers: int, ceiling: dict[str, Any] | None = None) -> dict[str, Any]:
    names = [t.name for t in targets]
    results = []
    for clients in options.clients:
        for name in names:
            mine = [r for r in runs if r["target"] == name and r["clients"] == clients]
            if mine:
                results.append({"target": name, "clients": clients, **stats.median_of_runs(mine)})
    ratios = []
    for other in names[1:]:
        for clients in options.clients:
            ours = _find(results, "ours", clients)
            theirs = _find(results, other, clients)
            if ours is None or theirs is None:
                continue
            per_round = []
            for round_no in range(1, options.rounds + 1):
                a = _find(runs, "ours", clients, round_no)
                b = _find(runs, other, clients, round_no)
                if a is not None and b is not None:
                    per_round.append(stats.ratio(a["ops_s"], b["ops_s"]))
            ratios.append({
                "vs": other, "clients": clients,
                "ops_s": stats.ratio(ours["ops_s"], theirs["ops_s"]),
                "p50_ms": stats.ratio(ours["p50_ms"], theirs["p50_ms"]),
                "p99_ms": stats.ratio(ours["p99_ms"], theirs["p99_ms"]),
                "node_cpu_us_per_op": stats.ratio(ours["node_cpu_us_per_op"],
                                                  theirs["node_cpu_us_per_op"]),
                "ops_s_per_round": per_round,
            })
    if ceiling is not None:
        peak = max((float(r["ops_s"]) for r in results  # type: ignore[arg-type]
                    if r["target"] == "ours" and r["ops_s"] is not None), default=None)
        ceiling = {**ceiling, "ours_peak_ops_s": peak,
                   "ours_peak_ratio": stats.ratio(peak, ceiling.get("ops_s"))}
    config = asdict(options)
    config.update(keys_per_client=KEYS_PER_CLIENT, client_worker_processes=workers,
                  workload=_workload(options))
    return {
        "config": config,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": load_end},
        "targets": {t.name: t.describe() for t in targets},
        "runs": runs,
        "results": results,
        "ratios": ratios,
        "ceiling": ceiling,
        "leftover_processes": leftover,
    }


def _workload(options: BenchOptions) -> str:
    writes = "puts to distinct keys per client"
    if options.read_ratio <= 0:
        return writes
    kind = "serializable" if options.consistency == "s" else "linearizable"
    return f"{options.read_ratio:.0%} {kind} gets, the rest {writes}"


def _find(rows: list[dict[str, Any]], target: str, clients: int,
          round_no: int | None = None) -> dict[str, Any] | None:
    for row in rows:
        if row["target"] == target and row["clients"] == clients and (
                round_no is None or row.get("round") == round_no):
            return row
    return None


# -- the report as text ------------------------------------------------------------------------


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


REPORT_WIDTH = 80
"""Columns of the text report: every line fits a default terminal."""


def _wrapped(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, REPORT_WIDTH, initial_indent=indent,
                         subsequent_indent=indent + "  ", break_on_hyphens=False)


def text_report(doc: dict[str, Any]) -> list[str]:
    """The tables of medians (speed, then CPU), the ratios, what ran, and how to read it."""
    from cli.output import table

    config = doc["config"]
    speed = [[r["target"], str(r["clients"]), _num(r["ops_s"], ",.0f"), _num(r["p50_ms"], ".2f"),
              _num(r["p90_ms"], ".2f"), _num(r["p99_ms"], ".2f"), _num(r["max_ms"], ".1f"),
              str(r["errors"])] for r in doc["results"]]
    cpu = [[r["target"], str(r["clients"]), _num(r["client_cpu_us_per_op"], ",.0f"),
            _num(r["node_cpu_us_per_op"], ",.0f"), _num(r["node_cores"], ".2f"),
            _num(r["other_cores"], ".2f")] for r in doc["results"]]
    ceiling = doc.get("ceiling")
    if ceiling is not None:
        speed.append([ceiling["target"], str(ceiling["clients"]), _num(ceiling["ops_s"], ",.0f"),
                      "-", "-", "-", _num(ceiling["slowest_ms"], ".1f"), str(ceiling["errors"])])
    lines = _wrapped(
        f"kv bench: {config['workload']}, {config['value_size']} B values, "
        f"{config['duration']:g}s measured after {config['warmup']:g}s warm-up, medians of "
        f"{config['rounds']} round(s); {doc['machine']['cpus']} CPUs")
    lines += ["", "Speed (latency in ms):",
              table(["target", "clients", "ops/s", "p50", "p90", "p99", "max", "errors"], speed),
              "", "CPU (microseconds per operation; cores busy during the run):",
              table(["target", "clients", "client us/op", "node us/op", "node cores",
                     "other cores"], cpu)]
    if doc["ratios"]:
        ratio_rows = [[f"ours/{r['vs']}", str(r["clients"]), _num(r["ops_s"], ".2f"),
                       _num(r["p50_ms"], ".2f"), _num(r["p99_ms"], ".2f"),
                       _num(r["node_cpu_us_per_op"], ".2f"),
                       ", ".join(_num(x, ".2f") for x in r["ops_s_per_round"])]
                      for r in doc["ratios"]]
        lines += ["", "Ratios (ours divided by the other, same rounds):",
                  table(["ratio", "clients", "ops/s", "p50", "p99", "node cpu/op",
                         "ops/s per round"], ratio_rows)]
    if ceiling is not None:
        lines += [""] + _wrapped(_ceiling_text(ceiling))
    lines += ["", "What ran:"]
    for name, facts in doc["targets"].items():
        lines.append(f"  {name}")
        for key, value in facts.items():
            if key not in ("endpoints", "dir"):
                lines += _wrapped(f"{key}: {value}", indent="    ")
    load = doc["machine"]
    lines += [""] + _wrapped(
        "How to read this: the machine is shared, so trust the ratios of runs taken side by "
        "side in this one run more than any single number; CPU per operation varies least. "
        "'other cores' is CPU that other programs used meanwhile: when it is high, the run "
        "was disturbed. Load average "
        + _num(load["loadavg_start"] and load["loadavg_start"][0], ".2f") + " before, "
        + _num(load["loadavg_end"] and load["loadavg_end"][0], ".2f") + " after.")
    if doc["leftover_processes"]:
        lines.append(f"LEFTOVER PROCESSES (killed): {doc['leftover_processes']}")
    return lines


def _ceiling_text(ceiling: dict[str, Any]) -> str:
    """What the ceiling row is, and ours' peak set against it."""
    if ceiling["ops_s"] is None:
        return f"{ceiling['target']}: not measured ({ceiling['note']})."
    text = (f"{ceiling['target']}: etcd with its own Go clients, --load={ceiling['load']}: "
            f"{ceiling['clients']} gRPC clients, 256 B keys and 1 KiB values for 60 s, rate-capped "
            f"at {ceiling['cap_writes_s']:,}/s (so {ceiling['cap_writes_s']:,} is the most it "
            f"can show); etcdctl said {ceiling['verdict']}"
            + (f" ({ceiling['note']})" if ceiling["note"] else "") + ". MAX is its slowest "
            "request.")
    if ceiling.get("etcdctl_cpu_s") is not None and ceiling.get("seconds"):
        text += (f" etcdctl itself used {ceiling['etcdctl_cpu_s'] / ceiling['seconds']:.2f} "
                 "cores of this machine meanwhile.")
    if ceiling.get("ours_peak_ratio") is not None:
        text += (f" Ours' peak, {ceiling['ours_peak_ops_s']:,.0f} ops/s, is "
                 f"{ceiling['ours_peak_ratio']:.2f}x this ceiling.")
    return text
