"""Numbers: percentiles, medians over rounds, CPU seconds from ``/proc``, leftover processes."""

from __future__ import annotations

import math
import os
import shutil
import signal
import statistics
import subprocess
from collections.abc import Iterable, Sequence

from cli.bench.common import RunResult

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank ``p`` percentile (0 < p <= 1) of an ascending sequence; 0 if empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p * len(ordered) - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(result: RunResult, duration: float) -> dict[str, object]:
    """One run as plain numbers: throughput, latency in ms, errors, CPU per operation."""
    ordered = sorted(result.latencies)
    ops = len(ordered)

    def per_op(seconds: float | None) -> float | None:
        return seconds / ops * 1e6 if seconds is not None and ops else None

    others = None
    if result.busy_cpu is not None and result.node_cpu is not None:
        others = max(0.0, result.busy_cpu - result.node_cpu - (result.client_cpu or 0.0))
    return {
        "ops": ops,
        "reads": result.reads,
        "writes": result.writes,
        "ops_s": ops / duration,
        "p50_ms": percentile(ordered, 0.50) * 1e3,
        "p90_ms": percentile(ordered, 0.90) * 1e3,
        "p99_ms": percentile(ordered, 0.99) * 1e3,
        "max_ms": (ordered[-1] if ordered else 0.0) * 1e3,
        "errors": sum(result.errors.values()),
        "errors_by_type": dict(result.errors),
        "error_samples": result.error_samples[:5],
        "client_cpu_s": result.client_cpu,
        "node_cpu_s": result.node_cpu,
        "client_cpu_us_per_op": per_op(result.client_cpu),
        "node_cpu_us_per_op": per_op(result.node_cpu),
        "node_cores": result.node_cpu / duration if result.node_cpu is not None else None,
        "other_cores": others / duration if others is not None else None,
    }


MEDIAN_FIELDS = ("ops_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "client_cpu_us_per_op",
                 "node_cpu_us_per_op", "node_cores", "other_cores")


def median_of_runs(runs: Sequence[dict[str, object]]) -> dict[str, object]:
    """Each field's median over rounds (fields independently); errors and ops are summed."""
    out: dict[str, object] = {"rounds": len(runs)}
    for name in MEDIAN_FIELDS:
        values = [float(r[name]) for r in runs if r.get(name) is not None]  # type: ignore[arg-type]
        out[name] = statistics.median(values) if values else None
    out["ops"] = sum(int(r["ops"]) for r in runs)  # type: ignore[call-overload]
    out["errors"] = sum(int(r["errors"]) for r in runs)  # type: ignore[call-overload]
    return out


def ratio(a: object, b: object) -> float | None:
    if a is None or b is None or not float(b):  # type: ignore[arg-type]
        return None
    return float(a) / float(b)  # type: ignore[arg-type]


# -- CPU time ----------------------------------------------------------------------------------


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads); ``None`` if gone or
    without ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    # After "pid (comm) ": state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def total_cpu(pids: Iterable[int]) -> float | None:
    """The sum of ``process_cpu`` over ``pids``; ``None`` if any is unreadable."""
    total = 0.0
    for pid in pids:
        value = process_cpu(pid)
        if value is None:
            return None
        total += value
    return total


def machine_busy() -> float | None:
    """CPU seconds the whole machine spent not idle since boot (``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class CpuWindow:
    """CPU seconds of some processes, and of the machine, between ``begin`` and ``end``."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._nodes: float | None = None
        self._busy: float | None = None
        self.node_cpu: float | None = None
        self.busy_cpu: float | None = None

    def begin(self) -> None:
        self._nodes = total_cpu(self.pids) if self.pids else None
        self._busy = machine_busy()

    def end(self) -> None:
        nodes = total_cpu(self.pids) if self.pids else None
        busy = machine_busy()
        if nodes is not None and self._nodes is not None:
            self.node_cpu = nodes - self._nodes
        if busy is not None and self._busy is not None:
            self.busy_cpu = busy - self._busy


# -- leftovers ---------------------------------------------------------------------------------


def leftovers(marker: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``marker`` (``pgrep -f``), without us."""
    found: list[tuple[int, str]] = []
    pgrep = shutil.which("pgrep")
    if pgrep:
        done = subprocess.run([pgrep, "-a", "-f", "--", marker], capture_output=True, text=True,
                              check=False)
        for line in done.stdout.splitlines():
            pid_text, _, command = line.partition(" ")
            if pid_text.isdigit():
                found.append((int(pid_text), command))
    else:  # no procps: read /proc ourselves
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if marker in command:
                found.append((int(entry), command))
    me = os.getpid()
    return [(pid, command) for pid, command in found if pid != me and "pgrep" not in command]


def kill_leftovers(marker: str) -> list[tuple[int, str]]:
    """SIGKILLs whatever ``leftovers(marker)`` finds, and returns what it found."""
    found = leftovers(marker)
    for pid, _ in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found
