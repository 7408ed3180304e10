"""Workloads of ``kv check``: concurrent clients that record every operation they run.

Each worker is one client process in the history: it runs one operation at a time, and retries
an operation whose outcome is unknown with the *same* session and series id, as the protocol
says. How each attempt ended decides what the history records:

* ``ok``: an answer arrived (the result is recorded);
* ``fail``: every attempt certainly applied nothing (no leader, refused);
* ``unknown``: some attempt may have been applied and no answer came before the deadline. The
  session is then abandoned: its in-flight proposal may still commit, and only a fresh session
  can start over without confusing the two.

Reads go through the log and change nothing, so a read that got no answer is recorded as
``fail``: it had no effect either way.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvstore import errors, ops
from kvstore.check.counter import check_counter
from kvstore.check.history import Op, Recorder
from kvstore.check.linearizable import check_register
from kvstore.check.list_append import check_list_append
from kvstore.client import Client
from kvstore.proto.log_pb2 import Command, Result
from session import Session

OP_DEADLINE = 4.0
"""How long a worker keeps retrying one operation before recording it unknown (or failed)."""
ATTEMPT_TIMEOUT = 1.0
"""The client library's deadline for one attempt (it retries within it too)."""
SEPARATOR = ";"
"""Ends each value appended in the list-append workload."""


@dataclass
class Worker:
    """One client of the history: its own connection, session and random stream."""

    process: int
    client: Client
    recorder: Recorder
    rng: random.Random
    session: Session | None = None
    written: int = 0
    last_seen: dict[str, str | None] = field(default_factory=dict)

    def unique_value(self) -> str:
        self.written += 1
        return f"p{self.process}v{self.written}"

    def write(self, kind: str, key: str, value: Any, command: Command,
              interpret: Callable[[Result], Any]) -> Op:
        """Runs a write with this worker's session, retrying an unknown outcome until the deadline."""
        op = self.recorder.invoke(self.process, kind, key, value)
        deadline = time.monotonic() + OP_DEADLINE
        maybe_applied = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.session = None  # abandon it: its proposal may still commit
                self.recorder.complete(op, "unknown" if maybe_applied else "fail", None)
                return op
            try:
                if self.session is None:
                    self.session = self.client.sync_get_session(min(ATTEMPT_TIMEOUT, remaining))
                result = self.client.sync_propose(self.session, command,
                                                  min(ATTEMPT_TIMEOUT, remaining))
            except errors.OutcomeUnknown:
                maybe_applied = True
                continue
            except errors.Unavailable:
                continue
            except errors.SessionExpired:
                self.session = None
                self.recorder.complete(op, "unknown" if maybe_applied else "fail", None)
                return op
            except errors.CommandFailed as failure:
                result = failure.result  # an answer, cached like any other
            self.session.proposal_completed()
            self.recorder.complete(op, "ok", interpret(result))
            return op

    def read(self, kind: str, key: str, interpret: Callable[[Result], Any]) -> Op:
        op = self.recorder.invoke(self.process, kind, key, None)
        deadline = time.monotonic() + OP_DEADLINE
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                result = self.client.get(key.encode(), timeout=min(ATTEMPT_TIMEOUT, remaining))
            except (errors.OutcomeUnknown, errors.Unavailable):
                continue
            self.recorder.complete(op, "ok", interpret(result))
            return op
        self.recorder.complete(op, "fail", None)
        return op


def _value_or_none(result: Result) -> str | None:
    return result.value.decode() if result.found else None


def _as_list(result: Result) -> list[str]:
    return [v for v in result.value.decode().split(SEPARATOR) if v] if result.found else []


class Workload:
    """A kind of load: what each step does, what is read at the end, and how it is checked."""

    name = ""

    def __init__(self, keys: int) -> None:
        self.keys = [f"{self.name}/{i}" for i in range(keys)]

    def step(self, worker: Worker) -> Op:
        raise NotImplementedError

    def final_reads(self, worker: Worker) -> list[Op]:
        return []

    def check(self, history: list[Op]) -> Any:
        raise NotImplementedError


class RegisterWorkload(Workload):
    """put / get / cas on a few keys, each written value unique: checked for linearizability."""

    name = "register"

    def step(self, worker: Worker) -> Op:
        key = worker.rng.choice(self.keys)
        roll = worker.rng.random()
        if roll < 0.45:
            op = worker.read("get", key, _value_or_none)
            if op.status == "ok":
                worker.last_seen[key] = op.result
            return op
        new = worker.unique_value()
        if roll < 0.85:
            op = worker.write("put", key, new, ops.put(key.encode(), new.encode()), lambda r: None)
            return op
        expected = worker.last_seen.get(key)
        command = ops.cas(key.encode(), new.encode(),
                          expected=None if expected is None else expected.encode())
        return worker.write("cas", key, [expected, new], command, lambda r: bool(r.swapped))

    def check(self, history: list[Op]) -> Any:
        return check_register(history)


class ListAppendWorkload(Workload):
    """Appends of unique values and reads of whole lists: catches a retry applied twice.

    A key takes at most ``APPENDS_PER_KEY`` appends and is then replaced by a fresh one (as
    Jepsen does), so reads stay short however long the run: a read returns the whole list.
    """

    name = "list-append"
    APPENDS_PER_KEY = 300

    def __init__(self, keys: int) -> None:
        super().__init__(keys)
        self._lock = threading.Lock()
        self._appends: dict[str, int] = {}
        self._retired: list[str] = []
        self._next_key = len(self.keys)

    def step(self, worker: Worker) -> Op:
        with self._lock:
            slot = worker.rng.randrange(len(self.keys))
            key = self.keys[slot]
            reading = worker.rng.random() < 0.3
            if not reading:
                self._appends[key] = self._appends.get(key, 0) + 1
                if self._appends[key] >= self.APPENDS_PER_KEY:
                    self._retired.append(key)
                    self.keys[slot] = f"{self.name}/{self._next_key}"
                    self._next_key += 1
        if reading:
            return worker.read("read", key, _as_list)
        value = worker.unique_value()
        return worker.write("append", key, value,
                            ops.append(key.encode(), (value + SEPARATOR).encode()), lambda r: None)

    def final_reads(self, worker: Worker) -> list[Op]:
        return [worker.read("read", key, _as_list) for key in self._retired + self.keys]

    def check(self, history: list[Op]) -> Any:
        return check_list_append(history)


class CounterWorkload(Workload):
    """Increments of one counter: the final value must lie within what was acknowledged."""

    name = "counter"

    def __init__(self, keys: int) -> None:
        super().__init__(1)

    def step(self, worker: Worker) -> Op:
        key = self.keys[0]
        return worker.write("incr", key, 1, ops.incr(key.encode(), 1), lambda r: int(r.number))

    def final_reads(self, worker: Worker) -> list[Op]:
        return [worker.read("get", self.keys[0], _value_or_none)]

    def check(self, history: list[Op]) -> Any:
        finals = [op for op in history if op.kind == "get" and op.status == "ok"]
        final_value = int(finals[-1].result or 0) if finals else 0
        return check_counter([op for op in history if op.kind == "incr"], final_value)


WORKLOADS: dict[str, type[Workload]] = {
    w.name: w for w in (RegisterWorkload, ListAppendWorkload, CounterWorkload)
}


def run_workers(workload: Workload, clients: list[Client], recorder: Recorder, seed: int,
                stop: threading.Event, first_process: int = 0) -> list[threading.Thread]:
    """Starts one thread per client running ``workload`` steps until ``stop`` is set."""
    threads = []
    for process, client in enumerate(clients, start=first_process):
        worker = Worker(process, client, recorder, random.Random(f"{seed}/{process}"))

        def loop(worker: Worker = worker) -> None:
            while not stop.is_set():
                workload.step(worker)

        thread = threading.Thread(target=loop, name=f"worker-{process}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads
