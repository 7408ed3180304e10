"""Hostile bytes: the decoders fail only in the ways they promise, under both protobuf backends.

Every byte of a log entry comes from a client, and ``apply`` runs on every replica: if it raised,
PySyncObj would wedge the node (defect D5), and if one replica accepted what another rejected,
their states would part (Raft thesis 2.1: replicas must be deterministic). So:

* ``StateMachine.apply`` never raises and always returns bytes that decode as a ``Result``;
* ``kvstore.decode_entry`` and ``kvstore.results.decode`` raise only ``WireDecodeError``;
* ``StateMachine.restore`` raises only ``SnapshotError`` and then leaves the state as it was;
* ``Session.unmarshal`` raises only ``SessionDecodeError`` (and then leaves the session as it was).

protobuf has two Python backends that fail differently on the same bytes (``session/wire.py``
exists for that), so the same fuzz run is made twice: in this process with the default backend
(upb), and in a child process with ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``, which
reports the backend it really used. The inputs are random bytes and valid encodings damaged by
bit flips, truncations, insertions, splices and duplicated slices, all drawn from one seed:
``FUZZ_SEED=<n>`` reruns a reported failure (``python tests/unit/test_fuzz.py --seed <n>`` runs
it standalone and prints JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf.internal import api_implementation

from kvstore import SnapshotError, StateMachine, decode_entry, encode_entry, ops, results
from kvstore.proto.log_pb2 import Code
from session import (
    NOT_SESSION_MANAGED_CLIENT_ID,
    Session,
    SessionDecodeError,
    new_noop_session,
    new_session,
)
from session.wire import WireDecodeError

SEED = int(os.environ.get("FUZZ_SEED", "1926"))
ITERATIONS = 300 if "MUTANT_UNDER_TEST" in os.environ else 3000
"""Per target and per backend: a few seconds in all. A tenth under mutmut (the test of
``tests.support.under_mutmut``, written out: this file also runs as a script, without the
repository on its path), which runs the module's fixtures again for every mutant."""
CLUSTER = 5
REPO_ROOT = Path(__file__).resolve().parents[2]

Outcome = str
"""What one input did, comparable across processes: "err", or a hash of what it decoded to."""


@dataclass
class FuzzRun:
    backend: str
    seed: int
    input_hashes: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Valid inputs, and ways to damage them
# --------------------------------------------------------------------------------------------


def _valid_entries() -> list[bytes]:
    """Every kind of entry the system writes: session ops, proposals, no-op and system ones."""
    rng = random.Random(0)
    session = new_session(CLUSTER, rng=rng)
    session.prepare_for_register()
    entries = [encode_entry(session)]
    session.prepare_for_propose()
    for command in (
        ops.put(b"key", b"value" * 8),
        ops.incr(b"n", -3),
        ops.append(b"key", b"!"),
        ops.cas(b"key", b"new", expected=None),
        ops.get(b"key"),
        ops.delete(b"k", prefix=True),
        ops.range_(b"", limit=2, keys_only=True),
    ):
        entries.append(encode_entry(session, command))
        session.proposal_completed()
    entries.append(encode_entry(new_noop_session(CLUSTER, rng=rng), ops.incr(b"n", 1)))
    system = Session(CLUSTER, NOT_SESSION_MANAGED_CLIENT_ID)
    entries.append(encode_entry(system, ops.put(b"s", b"y")))
    closing = dataclasses.replace(session)
    closing.prepare_for_unregister()
    entries.append(encode_entry(closing))
    return entries


def _replica_with_history() -> StateMachine:
    """A state machine with sessions, cached answers and data, so mutants hit every rule."""
    replica = StateMachine(CLUSTER, session_capacity=4)
    for entry in _valid_entries()[:-1]:  # all but the unregister: the session stays
        replica.apply(entry)
    return replica


def _valid_results() -> list[bytes]:
    replica = StateMachine(CLUSTER, session_capacity=4)
    answers = [replica.apply(entry) for entry in _valid_entries()]
    answers.append(results.encode(results.error(Code.SESSION_EXPIRED, "gone: é ü")))
    return answers


def _valid_sessions() -> list[bytes]:
    return [
        Session(CLUSTER, 42, 7, 6).marshal(),
        Session().marshal(),
        Session(2**64 - 1, 2**64 - 1, 2**64 - 2, 2**64 - 1).marshal(),
    ]


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """One to three random edits of the kinds that break a protobuf decoder's assumptions."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        edit = rng.randrange(6)
        if edit == 0 and out:  # bit flip
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif edit == 1:  # truncation
            del out[rng.randrange(len(out) + 1) :]
        elif edit == 2:  # insertion
            i = rng.randrange(len(out) + 1)
            out[i:i] = rng.randbytes(rng.randint(1, 4))
        elif edit == 3:  # splice: this one's head, another valid input's tail
            other = rng.choice(others)
            out = out[: rng.randrange(len(out) + 1)] + other[rng.randrange(len(other) + 1) :]
        elif edit == 4 and out:  # a byte that means something to a varint
            out[rng.randrange(len(out))] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
        else:  # a duplicated slice: repeated fields, bad lengths
            a = rng.randrange(len(out) + 1)
            b = rng.randrange(a, len(out) + 1)
            out[b:b] = out[a:b]
    return bytes(out)


def hostile_inputs(rng: random.Random, valid: list[bytes], n: int) -> list[bytes]:
    """Mostly damaged valid inputs (they get past the first bytes), some plain noise."""
    return [
        rng.randbytes(rng.randrange(48))
        if rng.random() < 0.15
        else mutate(rng, rng.choice(valid), valid)
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------------
# The targets: each returns what an input did, and records broken promises
# --------------------------------------------------------------------------------------------

Target = Callable[[bytes, list[str]], Outcome]


def _apply_target() -> Target:
    replica = _replica_with_history()

    def check(data: bytes, violations: list[str]) -> Outcome:
        try:
            answer = replica.apply(data)
        except Exception as exc:  # noqa: BLE001 - the claim is that nothing escapes
            violations.append(f"apply raised {type(exc).__name__}: {exc}")
            return "raised"
        if not isinstance(answer, bytes):
            violations.append(f"apply returned {type(answer).__name__}, not bytes")
            return "not bytes"
        try:
            result = results.decode(answer)
        except WireDecodeError as exc:
            violations.append(f"apply returned bytes that are not a Result: {exc}")
            return "bad result"
        # The text of MALFORMED_ENTRY quotes the backend's own error: compare the code only.
        if result.code == Code.MALFORMED_ENTRY:
            return "MALFORMED_ENTRY"
        return f"{Code.Name(result.code)}:{_h(answer)}"

    return check


def _parse_target(decode: Callable[[bytes], object]) -> Target:
    def check(data: bytes, violations: list[str]) -> Outcome:
        try:
            message = decode(data)
        except WireDecodeError:
            return "err"
        except Exception as exc:  # noqa: BLE001
            violations.append(f"raised {type(exc).__name__}, not WireDecodeError: {exc}")
            return "raised"
        return _h(message.SerializeToString(deterministic=True))  # type: ignore[attr-defined]

    return check


def _restore_target() -> Target:
    replica = _replica_with_history()
    baseline = replica.snapshot()

    def check(data: bytes, violations: list[str]) -> Outcome:
        try:
            replica.restore(data)
        except SnapshotError:
            if replica.snapshot() != baseline:
                violations.append("a failed restore changed the state")
            return "err"
        except Exception as exc:  # noqa: BLE001
            violations.append(f"restore raised {type(exc).__name__}, not SnapshotError: {exc}")
            return "raised"
        image = replica.snapshot()
        again = StateMachine(CLUSTER)
        again.restore(image)
        if again.snapshot() != image:
            violations.append("an accepted snapshot does not survive snapshot/restore")
        replica.restore(baseline)
        return _h(image)

    return check


def _unmarshal_target() -> Target:
    def check(data: bytes, violations: list[str]) -> Outcome:
        session = Session(1, 2, 3, 2)
        try:
            session.unmarshal(data)
        except SessionDecodeError:
            if session != Session(1, 2, 3, 2):
                violations.append("a failed unmarshal changed the session")
            return "err"
        except Exception as exc:  # noqa: BLE001
            violations.append(f"unmarshal raised {type(exc).__name__}: {exc}")
            return "raised"
        again = Session()
        again.unmarshal(session.marshal())
        if again != session:
            violations.append("an accepted session does not survive marshal/unmarshal")
        return str(session)

    return check


def fuzz(seed: int, iterations: int) -> FuzzRun:
    """The whole fuzz run under the current backend; never raises, reports instead."""
    run = FuzzRun(backend=api_implementation.Type(), seed=seed)
    entries = _valid_entries()
    snapshots = [_replica_with_history().snapshot(), StateMachine(CLUSTER).snapshot()]
    plan: dict[str, tuple[list[bytes], Target]] = {
        "apply": (entries, _apply_target()),
        "decode_entry": (entries, _parse_target(decode_entry)),
        "results.decode": (_valid_results(), _parse_target(results.decode)),
        "restore": (snapshots, _restore_target()),
        "unmarshal": (_valid_sessions(), _unmarshal_target()),
    }
    for name, (valid, target) in plan.items():
        inputs = hostile_inputs(random.Random(f"{seed}:{name}"), valid, iterations)
        run.input_hashes[name] = _h(b"".join(len(i).to_bytes(4, "big") + i for i in inputs))
        outcomes = []
        for data in inputs:
            broken: list[str] = []
            outcomes.append(target(data, broken))
            run.violations += [f"{name}({data.hex()}): {v}" for v in broken]
        run.outcomes[name] = outcomes
    return run


# --------------------------------------------------------------------------------------------
# Probes: single inputs, each checked under both backends
# --------------------------------------------------------------------------------------------

INVALID_UTF8_RESULT = bytes([0x08, Code.INVALID_ARGUMENT, 0x12, 0x02, 0xC3, 0x28])
"""A Result whose field 2, ``message`` (a proto3 ``string``), holds the bytes C3 28: not UTF-8."""


def _utf8_probe() -> list[str]:
    """How results.decode fails on INVALID_UTF8_RESULT: [error type, type of its cause]."""
    try:
        results.decode(INVALID_UTF8_RESULT)
    except Exception as exc:  # noqa: BLE001 - the test checks which type it was
        return [type(exc).__name__, type(exc.__cause__).__name__]
    return ["accepted", ""]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _entry(session_bytes: bytes, command_bytes: bytes = b"") -> bytes:
    return (b"\x0a" + _varint(len(session_bytes)) + session_bytes
            + b"\x12" + _varint(len(command_bytes)) + command_bytes)


_PUT_K_V = bytes.fromhex("0a060a016b120176")  # Command{put{key: "k", value: "v"}}
# Valid-but-unusual bytes on which the two protobuf backends, left to themselves, decide
# differently. The core must decide them alike: entries are decoded canonically
# (session.wire.parse_canonical) and sessions by hand (session.wire.decode_varint_fields).
DIVERGENT_PROBES: dict[str, tuple[str, bytes]] = {
    # client_id's tag 0x10 written as the two-byte varint 90 00: valid protobuf (a varint may be
    # padded). upb reads client_id 42; the python backend files it as an unknown field and reads
    # client_id 0, so it applies the put as a system entry (rule 1) while upb rejects it.
    "padded tag": ("apply", _entry(b"\x08\x05" + b"\x90\x00\x2a" + b"\x18\x01", _PUT_K_V)),
    # An unknown field whose number is 2**29 (the largest is 2**29 - 1): upb rejects the entry,
    # the python backend keeps it as an unknown field and applies the entry.
    "field number 2**29": ("apply", _entry(b"\x08\x05\x18\x00", _PUT_K_V)
                           + _varint(2**29 << 3) + b"\x01"),
    # An unknown group nested 100 deep: upb accepts, the python backend hits its recursion limit.
    "groups nested 100 deep": ("apply", _entry(b"\x08\x05\x18\x00", _PUT_K_V)
                               + _varint(9 << 3 | 3) * 100 + _varint(9 << 3 | 4) * 100),
    # Session.unmarshal: the padded tag again. upb reads cluster_id 5; the python backend sees an
    # unknown field 1. Our hand decoder reads cluster_id 5 under both.
    "padded tag in a session": ("unmarshal", b"\x88\x00\x05"),
}


def _probe_outcomes() -> dict[str, Outcome]:
    targets = {"apply": _apply_target, "unmarshal": _unmarshal_target}
    return {
        name: targets[kind]()(data, [])  # a fresh target per probe: no history between them
        for name, (kind, data) in DIVERGENT_PROBES.items()
    }


# --------------------------------------------------------------------------------------------
# One report per backend; the child process sends its report as JSON
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    run: FuzzRun
    utf8_probe: list[str]
    probes: dict[str, Outcome]

    @classmethod
    def make(cls, seed: int, iterations: int) -> Report:
        return cls(fuzz(seed, iterations), _utf8_probe(), _probe_outcomes())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Report:
        fields = json.loads(text)
        return cls(FuzzRun(**fields["run"]), fields["utf8_probe"], fields["probes"])


@pytest.fixture(scope="module")
def default_backend() -> Report:
    return Report.make(SEED, ITERATIONS)


@pytest.fixture(scope="module")
def python_backend() -> Report:
    """The same run in a child process on the pure-Python backend (chosen before protobuf loads,
    which is why it takes a process of its own)."""
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    child = subprocess.run(
        [sys.executable, __file__, "--seed", str(SEED), "--iterations", str(ITERATIONS)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert child.returncode == 0, f"seed={SEED}: the child failed:\n{child.stderr}"
    return Report.from_json(child.stdout)


def _broken_promises(run: FuzzRun) -> str:
    shown = "\n".join(run.violations[:10])
    return (f"{len(run.violations)} broken promises under the {run.backend} backend; "
            f"rerun with FUZZ_SEED={run.seed}:\n{shown}")


only_when_default_is_upb = pytest.mark.skipif(
    api_implementation.Type() != "upb", reason="compares upb (the default) with python"
)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_hostile_bytes_break_no_promise_under_the_default_backend(default_backend: Report) -> None:
    """apply never raises (defect D5) and the decoders raise only their own error types."""
    run = default_backend.run
    assert run.backend == api_implementation.Type()
    assert not run.violations, _broken_promises(run)
    # Not vacuous: inputs get past the parser to the session rules, and the parsers refuse some.
    assert {o.split(":")[0] for o in run.outcomes["apply"]} >= {
        "MALFORMED_ENTRY", "CLUSTER_MISMATCH", "SESSION_EXPIRED", "ALREADY_RESPONDED", "OK"}
    for name, seen in run.outcomes.items():
        assert name == "apply" or "err" in seen, f"{name}: no input was refused"
        assert any(o not in ("err", "raised") for o in seen), f"{name}: no input was accepted"


def test_hostile_bytes_break_no_promise_under_the_python_backend(python_backend: Report) -> None:
    """The same claims where protobuf raises other exceptions (session/wire.py)."""
    run = python_backend.run
    assert run.backend == "python", "the child did not run the pure-Python backend"
    assert not run.violations, _broken_promises(run)


def test_both_backends_fuzzed_the_same_inputs(
    default_backend: Report, python_backend: Report
) -> None:
    """Input generation is backend independent, so a comparison of outcomes compares decoding."""
    assert default_backend.run.input_hashes == python_backend.run.input_hashes


@only_when_default_is_upb
def test_invalid_utf8_in_a_result_message_is_a_wire_decode_error_under_both_backends(
    default_backend: Report, python_backend: Report
) -> None:
    """Result.message is a proto3 string, which must be UTF-8. upb raises DecodeError, the python
    backend UnicodeDecodeError; results.decode turns both into WireDecodeError."""
    assert default_backend.utf8_probe == ["WireDecodeError", "DecodeError"]
    assert python_backend.utf8_probe == ["WireDecodeError", "UnicodeDecodeError"]


@only_when_default_is_upb
def test_both_backends_decide_every_fuzzed_input_alike(
    default_backend: Report, python_backend: Report
) -> None:
    """Thesis 2.1: replicas on different backends (PyPy, and platforms without a upb wheel, fall
    back to the python one) must accept, refuse and decode every entry alike, or they part."""
    ours, theirs = default_backend.run.outcomes, python_backend.run.outcomes
    differing = {
        name: sum(a != b for a, b in zip(ours[name], theirs[name], strict=True)) for name in ours
    }
    assert not any(differing.values()), f"seed={SEED}: inputs decided differently: {differing}"


@only_when_default_is_upb
@pytest.mark.parametrize("probe", sorted(DIVERGENT_PROBES))
def test_both_backends_decide_the_probe_alike(
    probe: str, default_backend: Report, python_backend: Report
) -> None:
    """One input each, small enough to read: see the comments in DIVERGENT_PROBES."""
    assert default_backend.probes[probe] == python_backend.probes[probe]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the fuzz targets; print a JSON report.")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    args = parser.parse_args()
    print(Report.make(args.seed, args.iterations).to_json())
