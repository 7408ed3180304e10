"""What every benchmark target takes and gives back: one run's spec and its raw result."""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cli.bench.guard import Guard
    from kvstore.tls import ClientTLS

KEYS_PER_CLIENT = 1000
"""Each client writes its own keys, ``bench/c<client>/k<n mod this>``: distinct keys per
client, and a state that stops growing (so later rounds do not pay for a bigger snapshot)."""

START_DELAY = 0.2
"""Seconds between the "go" and the first operation, so every client starts together."""


def client_tls(files: Sequence[str | None] | None) -> ClientTLS | None:
    """The client files ``(CA, certificate, key)``, passed by name to the worker processes, as
    a ``ClientTLS``; ``None`` for plaintext."""
    if not files:
        return None
    from kvstore.tls import ClientTLS

    ca, cert, key = (Path(f) if f else None for f in files)
    return ClientTLS.load(ca, cert, key)


@dataclass(frozen=True)
class RunSpec:
    """One closed-loop run: ``clients`` clients, each one operation in flight at a time."""

    clients: int
    duration: float
    """Measured seconds."""
    warmup: float
    """Seconds of load before the measurement starts (not counted)."""
    value_size: int = 100
    read_ratio: float = 0.0
    consistency: str = "l"
    """``l``: linearizable reads; ``s``: serializable (one replica, possibly stale)."""
    sessions: bool = True
    """Our cluster only: each client with its own session (else no-op sessions)."""
    op_timeout: float = 5.0
    seed: int = 0


@dataclass(frozen=True)
class Window:
    """The times of one run, on the system-wide monotonic clock (``time.monotonic``, the
    same clock in every process of the machine)."""

    start: float
    """Clients start here (warm-up)."""
    measure: float
    """Measurement starts."""
    end: float
    """Measurement ends; clients stop after their operation in flight."""

    @staticmethod
    def after_now(spec: RunSpec) -> Window:
        start = time.monotonic() + START_DELAY
        return Window(start, start + spec.warmup, start + spec.warmup + spec.duration)


@dataclass
class RunResult:
    """What clients saw during the measured window of one run."""

    latencies: list[float] = field(default_factory=list)
    """Seconds, one per operation that completed inside the window."""
    reads: int = 0
    writes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Failed operations inside the window, by exception type."""
    error_samples: list[str] = field(default_factory=list)
    client_cpu: float | None = None
    """CPU seconds of the client side during the window."""
    node_cpu: float | None = None
    """CPU seconds of the node processes during the window (without the client's)."""
    busy_cpu: float | None = None
    """CPU seconds of the whole machine during the window (for the share of others)."""

    def merge(self, other: RunResult) -> None:
        self.latencies.extend(other.latencies)
        self.reads += other.reads
        self.writes += other.writes
        self.errors.update(other.errors)
        self.error_samples.extend(other.error_samples[: max(0, 5 - len(self.error_samples))])
        if other.client_cpu is not None:
            self.client_cpu = (self.client_cpu or 0.0) + other.client_cpu


Progress = Callable[[float, int], None]
"""Called during a run with (seconds since the measurement started, negative during
warm-up; operations completed in the window so far)."""


class Target(Protocol):
    """A system under load. ``start`` before the first run, ``stop`` always at the end."""

    name: str
    guard: Guard | None
    """Told about every directory the target creates, before anything runs in it."""

    def start(self) -> None: ...
    def run(self, spec: RunSpec, progress: Progress) -> RunResult: ...
    def stop(self) -> None: ...
    def describe(self) -> dict[str, object]:
        """Facts for the report: what was measured, and how."""
        ...
    def markers(self) -> Sequence[str]:
        """Strings that appear in the command line of every process this target started
        (its temporary directory): ``pgrep -f`` finds leftovers by them."""
        ...


def with_parent_death(argv: list[str]) -> list[str]:
    """``argv`` run so that it is SIGKILLed if ``kv bench`` dies without stopping it (Linux:
    util-linux ``setpriv --pdeathsig``, which then execs ``argv``: same pid, same command line).
    Without setpriv, ``argv`` as it is: the normal ways out (errors, Ctrl-C, SIGTERM) stop the
    targets anyway."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv
