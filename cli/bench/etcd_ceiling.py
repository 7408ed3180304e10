"""etcd at its best on this machine: ``etcdctl check perf --load=l``, etcd's own Go load generator.

The etcd target of ``kv bench`` is loaded by the same Python clients as ours, so its figures say
how etcd does behind Python clients. This row says what etcd reaches with Go clients: etcdctl
(Debian's ``etcd-client``) runs its "large" performance check against the cluster the bench
started, 500 gRPC clients putting 256-byte keys with 1 KiB values for a fixed 60 seconds, paced
by a rate limiter at 8,000 writes/s (so 8,000 is the most it can report). It prints, for
example::

    FAIL: Throughput too low: 6491 writes/s
    PASS: Slowest request took 0.204441s
    PASS: Stddev is 0.023631s
    FAIL

and exits non-zero when any check fails: a "FAIL" here is a measurement (etcd did not reach
90% of the cap on this machine), not an error of ours. Without ``etcdctl`` the row says why and
the bench goes on.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from cli.bench.common import with_parent_death

LOAD = "l"
"""The workload model: 500 clients, capped at 8,000 writes/s (etcdctl's ``checkPerfCfgMap``)."""
CAP_WRITES_S = 8000
CLIENTS = 500
DURATION_S = 60
"""Fixed by etcdctl; it cannot be shortened."""
GRACE_S = 60.0
"""Beyond the 60 s of load: connecting 500 clients, deleting the keys it wrote."""
NAME = "etcd ceiling (etcdctl check perf)"
INSTALL_HINT = "etcdctl not found on PATH (Debian/Ubuntu: apt-get install etcd-client)"

_THROUGHPUT = re.compile(r"Throughput (?:is|too low:) (\d+) writes/s")
_SLOWEST = re.compile(r"Slowest request took(?: too long:)? ([0-9.]+)s")
_STDDEV = re.compile(r"Stddev (?:is|too high:) ([0-9.]+)s")
_ERRORS = re.compile(r"FAIL: ERROR\((.*)\) -> (\d+)")


@dataclass(frozen=True)
class Ceiling:
    """What one ``etcdctl check perf`` said; ``ops_s`` is None when it did not measure."""

    ops_s: float | None
    slowest_ms: float | None = None
    stddev_ms: float | None = None
    verdict: str | None = None
    """etcdctl's last line, PASS or FAIL (FAIL: some check missed its bar, see ``note``)."""
    errors: int = 0
    note: str = ""
    """Why there is no figure, or which of etcdctl's checks failed."""
    seconds: float | None = None
    """Wall time of the whole command."""
    etcdctl_cpu_s: float | None = None
    """CPU seconds etcdctl itself used (it shares the machine with etcd)."""

    def as_dict(self) -> dict[str, Any]:
        return {"target": NAME, "load": LOAD, "clients": CLIENTS, "cap_writes_s": CAP_WRITES_S,
                **asdict(self)}


def parse(output: str) -> Ceiling:
    """``etcdctl check perf`` output as numbers; a Ceiling with ``ops_s`` None if it has no
    throughput line (the note then carries the output's last line)."""
    found = _THROUGHPUT.search(output)
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if found is None:
        return Ceiling(None, note="no throughput in etcdctl's output: "
                       + (lines[-1][:200] if lines else "(no output)"))
    slowest, stddev = _SLOWEST.search(output), _STDDEV.search(output)
    verdict = next((line for line in reversed(lines) if line in ("PASS", "FAIL")), None)
    failed = [line for line in lines
              if line.startswith(("FAIL:", "Slowest request took too long", "Stddev too high"))]
    return Ceiling(
        ops_s=float(found.group(1)),
        slowest_ms=float(slowest.group(1)) * 1e3 if slowest else None,
        stddev_ms=float(stddev.group(1)) * 1e3 if stddev else None,
        verdict=verdict,
        errors=sum(int(n) for _, n in _ERRORS.findall(output)),
        note="; ".join(failed),
    )


def etcdctl_binary() -> str | None:
    return shutil.which("etcdctl")


def measure(endpoints: list[str], binary: str | None = None) -> Ceiling:
    """Runs ``etcdctl check perf --load=l`` against ``endpoints`` (host:port, all plain HTTP on
    loopback) and parses what it says. Never raises for a missing tool or a failed check."""
    binary = binary or etcdctl_binary()
    if binary is None:
        return Ceiling(None, note=INSTALL_HINT)
    argv = [binary, f"--endpoints={','.join(endpoints)}", "check", "perf", f"--load={LOAD}"]
    env = {**os.environ, "ETCDCTL_API": "3"}
    cpu_before = _children_cpu()
    started = time.monotonic()
    try:
        done = subprocess.run(with_parent_death(argv), env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=DURATION_S + GRACE_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return Ceiling(None, note=f"etcdctl check perf did not finish within "
                       f"{DURATION_S + GRACE_S:.0f}s")
    except OSError as exc:
        return Ceiling(None, note=f"etcdctl could not run: {exc}")
    seconds = time.monotonic() - started
    result = parse(done.stdout + "\n" + done.stderr)
    fields = asdict(result)
    fields.update(seconds=seconds, etcdctl_cpu_s=_children_cpu() - cpu_before)
    return Ceiling(**fields)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
