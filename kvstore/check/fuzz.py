"""Fuzzing the gRPC API of running nodes: hostile, damaged and valid requests, and what came back.

``fuzz_api(endpoints, count, seed, deadline_s)`` sends ``count`` requests to the nodes' API and
returns a ``FuzzReport`` with the gRPC status codes it got, per method, per kind of input and per
*expectation*. It asserts nothing itself: the caller decides what the report must look like.

Every request goes out as raw bytes (``channel.unary_unary`` with identity (de)serializers), so
the fuzzer can send what no generated stub would. The mix:

* random bytes, to every method;
* valid requests damaged at the byte level: bit flips, truncations, insertions, deletions,
  duplicated slices, splices, two requests concatenated (protobuf merges them), huge length
  prefixes, and sometimes sent to another method than the one they were built for;
* valid requests damaged at the message level: wrong cluster ids, client id 0, reserved series
  ids, ``responded_to`` past ``series_id``, keys over 4 KiB, values over 1 MiB, empty keys,
  non-UTF-8 keys, missing commands, writes sent to ``Read``, unknown enum values, unknown
  fields, deeply nested unknown groups (balanced and not), duplicated fields, field number 0,
  invalid wire types, messages over the server's size limit;
* valid requests (no-op proposals, registrations, reads, ``Status``), so that some succeed;
* ``ProposeBatch`` requests: valid and refused proposals mixed, batches the contract refuses
  whole (too many proposals) and batches of refused proposals only.

Each request is classified *before* it is sent, by the API contract (``api.proto``) applied with
the library's own validators, never by asking the server:

============  ===========================================================  ====================
expectation   the request                                                  allowed answers
============  ===========================================================  ====================
oversize      is over the server's message limit                           RESOURCE_EXHAUSTED
malformed     does not decode as the method's request message              INVALID_ARGUMENT
refused       decodes, but the contract refuses it before the log          INVALID_ARGUMENT,
              (wrong cluster, bad session, invalid command...)             FAILED_PRECONDITION
harmless      valid and never touches the log (Status, serializable read)  anything but a bug
may_apply     valid and may reach the log (a write, a linearizable read)   anything but a bug
batch_refused a ``ProposeBatch`` whose every proposal the contract refuses   OK, or refused whole
              (none may reach the log)                                      (see ALLOWED)
============  ===========================================================  ====================

A ``ProposeBatch`` answered OK is also checked proposal by proposal (``batch_answer_errors``):
one outcome per proposal, ``FATE_REFUSED`` for each proposal the contract refuses, and never
for a valid one. A refused proposal answered any other way may have reached the log.

INTERNAL and UNKNOWN are never a valid answer: they mean an exception escaped a handler.
``FuzzReport.unexpected()`` lists every answer outside this table, and every wrong batch
outcome, with sample inputs.

With ``invalid_only=True`` only oversize, malformed and refused requests are sent, so a caller
can check that none of them reached the log (the leader's commit index does not move).

Inputs are drawn from one ``random.Random(seed)`` on the calling thread, so a seed names the
same sequence of requests (the interleaving of the answers, and the leader, may differ).
``python -m kvstore.check.fuzz --endpoint HOST:PORT ... --count N --seed S`` runs it by hand.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from kvstore import commands
from kvstore.limits import INT64_MAX, INT64_MIN, MAX_KEY_BYTES, MAX_VALUE_BYTES
from kvstore.proto import api_pb2
from kvstore.proto import log_pb2 as pb
from kvstore.server import MAX_BATCH_PROPOSALS, MAX_MESSAGE_BYTES
from kvstore.tls import ClientTLS, open_channel
from session.constants import SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER, UINT64_MAX
from session.errors import SessionInvariantError
from session.session import Session
from session.wire import WireDecodeError, parse

SERVICE = "kvstore.KV"
METHODS: tuple[str, ...] = ("RegisterSession", "UnregisterSession", "Propose", "ProposeBatch",
                             "Read", "Status")
REQUEST_TYPES: dict[str, type] = {
    "RegisterSession": api_pb2.SessionRequest,
    "UnregisterSession": api_pb2.SessionRequest,
    "Propose": api_pb2.ProposeRequest,
    "ProposeBatch": api_pb2.ProposeBatchRequest,
    "Read": api_pb2.ReadRequest,
    "Status": api_pb2.StatusRequest,
}

OVERSIZE = "oversize"
MALFORMED = "malformed"
REFUSED = "refused"
HARMLESS = "harmless"
MAY_APPLY = "may_apply"
BATCH_REFUSED = "batch_refused"
EXPECTATIONS: tuple[str, ...] = (OVERSIZE, MALFORMED, REFUSED, HARMLESS, MAY_APPLY, BATCH_REFUSED)
INVALID: frozenset[str] = frozenset({OVERSIZE, MALFORMED, REFUSED, BATCH_REFUSED})
"""Expectations of requests that must never reach the log."""
ALLOWED: dict[str, frozenset[str]] = {
    OVERSIZE: frozenset({"RESOURCE_EXHAUSTED"}),
    MALFORMED: frozenset({"INVALID_ARGUMENT"}),
    REFUSED: frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION"}),
    # OK with every outcome FATE_REFUSED (checked by batch_answer_errors); UNAVAILABLE from a
    # node that is not the leader, which looks at no proposal before it refuses.
    BATCH_REFUSED: frozenset({"OK", "UNAVAILABLE"}),
}
SERVER_BUG_CODES: frozenset[str] = frozenset({"INTERNAL", "UNKNOWN"})
"""Answers that mean a handler raised: never acceptable."""

DEFAULT_THREADS = 8
DEFAULT_CALL_TIMEOUT = 5.0
DEFAULT_KEY_PREFIX = b"fuzz/"
SAMPLES_PER_BUCKET = 3
_SAMPLE_BYTES = 96
_MALFORMED_ENTRY_ANSWER = pb.Code.Name(pb.Code.MALFORMED_ENTRY) + ":"
"""How the server words an answer of the state machine with that code (``_answer``)."""
_CLIENT_RECEIVE_LIMIT = 64 * 1024 * 1024
"""The fuzzer's own receive limit: a range over a grown key space must not fail on our side."""


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request and its answer, small enough to print."""

    method: str
    kind: str
    expect: str
    code: str
    endpoint: str
    length: int
    head_hex: str
    details: str

    def __str__(self) -> str:
        return (f"{self.method} <- {self.kind} ({self.length} B, expected {self.expect}) on "
                f"{self.endpoint}: {self.code} {self.details!r}; bytes {self.head_hex}")


@dataclass
class FuzzReport:
    seed: int
    requested: int
    invalid_only: bool
    endpoints: list[str]
    sent: int = 0
    elapsed_s: float = 0.0
    deadline_hit: bool = False
    by_method: dict[str, Counter[str]] = field(default_factory=dict)
    by_expect: dict[str, Counter[str]] = field(default_factory=dict)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    """Up to ``SAMPLES_PER_BUCKET`` requests per (expectation, method, code)."""
    malformed_entries: int = 0
    """Answers that the *state machine* gave as MALFORMED_ENTRY: requests the server let into
    the log although their entry does not decode there (the API should refuse them first)."""
    batch_errors: int = 0
    """``ProposeBatch`` answers OK whose outcomes break the contract (``batch_answer_errors``)."""
    batch_error_samples: list[str] = field(default_factory=list)

    def histogram(self) -> Counter[str]:
        """Status code -> how many answers had it, over every method."""
        total: Counter[str] = Counter()
        for codes in self.by_method.values():
            total.update(codes)
        return total

    def codes(self, expect: str) -> Counter[str]:
        return self.by_expect.get(expect, Counter())

    @property
    def rate(self) -> float:
        """Requests answered per second."""
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def unexpected(self) -> list[str]:
        """Every answer the contract does not allow, one line per (expectation, method, code),
        with the sample inputs that got it. Empty when the run is clean."""
        lines = []
        for expect, codes in sorted(self.by_expect.items()):
            allowed = ALLOWED.get(expect)
            for code, n in sorted(codes.items()):
                if code in SERVER_BUG_CODES or (allowed is not None and code not in allowed):
                    for method in METHODS:
                        bucket = self.samples.get(_bucket(expect, method, code), [])
                        if bucket:
                            lines.append(f"{n} x {expect} -> {code}, e.g. " +
                                         " | ".join(str(s) for s in bucket))
        if self.batch_errors:
            lines.append(f"{self.batch_errors} x ProposeBatch answered OK with wrong outcomes, "
                         "e.g. " + " | ".join(self.batch_error_samples))
        return lines

    def summary(self) -> str:
        lines = [
            f"api fuzz: seed={self.seed} sent={self.sent}/{self.requested} "
            f"invalid_only={self.invalid_only} in {self.elapsed_s:.2f} s ({self.rate:.0f} req/s)"
            + (" DEADLINE HIT" if self.deadline_hit else ""),
            "  all: " + _fmt(self.histogram()),
            f"  answered MALFORMED_ENTRY after reaching the log: {self.malformed_entries}",
            f"  ProposeBatch answers with wrong outcomes: {self.batch_errors}",
        ]
        lines += [f"  {m}: {_fmt(c)}" for m, c in sorted(self.by_method.items())]
        lines += [f"  [{e}]: {_fmt(c)}" for e, c in sorted(self.by_expect.items())]
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "seed": self.seed, "requested": self.requested, "sent": self.sent,
            "invalid_only": self.invalid_only, "elapsed_s": round(self.elapsed_s, 3),
            "rate": round(self.rate, 1), "deadline_hit": self.deadline_hit,
            "histogram": dict(self.histogram()),
            "by_method": {k: dict(v) for k, v in self.by_method.items()},
            "by_expect": {k: dict(v) for k, v in self.by_expect.items()},
            "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
            "malformed_entries": self.malformed_entries,
            "batch_errors": self.batch_errors,
            "unexpected": self.unexpected(),
        }

    def _record(self, case: Case, code: str, details: str, batch_errors: Sequence[str] = ()) -> None:
        self.sent += 1
        if batch_errors:
            self.batch_errors += 1
            if len(self.batch_error_samples) < SAMPLES_PER_BUCKET:
                self.batch_error_samples.append(
                    f"{'; '.join(batch_errors[:3])} ({case.kind}, {len(case.data)} B on "
                    f"{case.endpoint}; bytes {case.data[:_SAMPLE_BYTES].hex()})")
        self.by_method.setdefault(case.method, Counter())[code] += 1
        self.by_expect.setdefault(case.expect, Counter())[code] += 1
        self.by_kind.setdefault(case.kind, Counter())[code] += 1
        if details.startswith(_MALFORMED_ENTRY_ANSWER):
            self.malformed_entries += 1
        bucket = self.samples.setdefault(_bucket(case.expect, case.method, code), [])
        if len(bucket) < SAMPLES_PER_BUCKET:
            bucket.append(Sample(case.method, case.kind, case.expect, code, case.endpoint,
                                 len(case.data), case.data[:_SAMPLE_BYTES].hex(), details[:200]))


def _bucket(expect: str, method: str, code: str) -> str:
    return f"{expect}/{method}/{code}"


def _fmt(codes: Counter[str]) -> str:
    return ", ".join(f"{c}={n}" for c, n in codes.most_common())


# --------------------------------------------------------------------------------------------
# The oracle: what the contract says about a request, decided before sending it
# --------------------------------------------------------------------------------------------


def classify(method: str, data: bytes, cluster_id: int) -> str:
    """The expectation for ``data`` sent to ``method`` of a node of cluster ``cluster_id``."""
    if len(data) > MAX_MESSAGE_BYTES:
        return OVERSIZE
    try:
        request = parse(REQUEST_TYPES[method], data)
    except WireDecodeError:
        return MALFORMED
    if method == "Status":
        return HARMLESS
    if method == "ProposeBatch":
        if len(request.proposals) > MAX_BATCH_PROPOSALS:
            return REFUSED
        each = {proposal_expectation(p, cluster_id) for p in request.proposals}
        return MAY_APPLY if MAY_APPLY in each else BATCH_REFUSED
    if method == "Read":
        if request.cluster_id != cluster_id:
            return REFUSED
        if commands.static_error(request.command) is not None or not commands.is_read_only(request.command):
            return REFUSED
        return HARMLESS if request.consistency == api_pb2.SERIALIZABLE else MAY_APPLY
    if method == "Propose":
        return proposal_expectation(request, cluster_id)
    session = Session.from_pb(request.session)
    if session.cluster_id != cluster_id:
        return REFUSED
    wanted = SERIES_ID_FOR_REGISTER if method == "RegisterSession" else SERIES_ID_FOR_UNREGISTER
    if session.series_id != wanted or not session.valid_for_session_op(cluster_id):
        return REFUSED
    return MAY_APPLY


def proposal_expectation(request: api_pb2.ProposeRequest, cluster_id: int) -> str:
    """REFUSED or MAY_APPLY: one decoded proposal, alone or in a batch."""
    session = Session.from_pb(request.session)
    if session.cluster_id != cluster_id:
        return REFUSED
    try:
        valid = session.valid_for_proposal(cluster_id)
    except SessionInvariantError:
        return REFUSED
    if not valid or commands.static_error(request.command) is not None:
        return REFUSED
    return MAY_APPLY


def batch_answer_errors(data: bytes, answer: bytes, cluster_id: int) -> list[str]:
    """What is wrong with ``answer``, an OK answer to the ``ProposeBatch`` request ``data``
    (one that ``classify`` found decodable): empty when the answer keeps the contract."""
    request = parse(api_pb2.ProposeBatchRequest, data)
    try:
        outcomes = api_pb2.ProposeBatchResponse.FromString(answer).outcomes
    except DecodeError:
        return [f"the answer ({len(answer)} B) is not a ProposeBatchResponse"]
    if len(outcomes) != len(request.proposals):
        return [f"{len(outcomes)} outcomes for {len(request.proposals)} proposals"]
    errors = []
    for i, (proposal, outcome) in enumerate(zip(request.proposals, outcomes, strict=True)):
        refused, expect = outcome.fate == api_pb2.FATE_REFUSED, proposal_expectation(proposal, cluster_id)
        if expect == REFUSED and not refused:
            errors.append(f"proposal {i} is refused by the contract but its fate is "
                          f"{api_pb2.Fate.Name(outcome.fate)}")
        elif expect == MAY_APPLY and refused:
            errors.append(f"proposal {i} is valid but was refused: {outcome.message!r}")
    return errors


# --------------------------------------------------------------------------------------------
# Wire-level helpers (the fuzzer writes bytes no encoder would)
# --------------------------------------------------------------------------------------------


def encode_varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_tag(field_number: int, wire_type: int) -> bytes:
    """A field key; no check that the number or the wire type exist."""
    return encode_varint(field_number << 3 | wire_type)


def encode_len_field(field_number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message, bytes or string)."""
    return encode_tag(field_number, 2) + encode_varint(len(payload)) + payload


def _groups(depth: int, field_number: int = 15) -> bytes:
    """``depth`` nested unknown groups, balanced."""
    return encode_tag(field_number, 3) * depth + encode_tag(field_number, 4) * depth


_HUGE_LENGTHS: tuple[bytes, ...] = (
    encode_varint(2**31 - 1), encode_varint(2**31), encode_varint(2**32 + 5), encode_varint(2**63),
    encode_varint(UINT64_MAX), b"\xff" * 10 + b"\x01",  # an 11-byte varint: invalid
    encode_varint(MAX_MESSAGE_BYTES), encode_varint(10**6),
)
_GROUP_DEPTHS = (1, 2, 31, 32, 33, 63, 64, 65, 99, 100, 101, 127, 128, 129, 200, 1000, 5000)


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    method: str
    data: bytes
    kind: str
    expect: str = ""
    endpoint: str = ""


class _Generator:
    """Draws requests from one rng; everything about a case comes from it."""

    def __init__(self, rng: random.Random, cluster_id: int, prefix: bytes) -> None:
        self.rng = rng
        self.cluster_id = cluster_id
        self.prefix = prefix

    # -- building blocks ------------------------------------------------------------------

    def key(self) -> bytes:
        return self.prefix + b"%d" % self.rng.randrange(64)

    def value(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 8, 32, 100)))

    def client_id(self) -> int:
        return self.rng.getrandbits(64) or 1

    def noop(self) -> Session:
        return Session(self.cluster_id, self.client_id(), 0, 0)

    def write_command(self, key: bytes | None = None) -> pb.Command:
        rng = self.rng
        key = self.key() if key is None else key
        op = rng.choice(("put", "put", "incr", "append", "delete", "cas", "cas"))
        if op == "put":
            return pb.Command(put=pb.Put(key=key, value=self.value()))
        if op == "incr":
            delta = rng.choice((1, -1, 7, INT64_MAX, INT64_MIN, rng.randint(-1000, 1000)))
            return pb.Command(incr=pb.Incr(key=key, delta=delta))
        if op == "append":
            return pb.Command(append=pb.Append(key=key, value=self.value()))
        if op == "delete":
            # Never an empty prefix from the generator: that deletes every key of the cluster.
            return pb.Command(delete=pb.Delete(key=key, prefix=rng.random() < 0.2))
        if rng.random() < 0.5:
            return pb.Command(cas=pb.Cas(key=key, expect_absent=True, value=self.value()))
        return pb.Command(cas=pb.Cas(key=key, expected=self.value(), value=self.value()))

    def read_command(self, key: bytes | None = None) -> pb.Command:
        if self.rng.random() < 0.6:
            return pb.Command(get=pb.Get(key=self.key() if key is None else key))
        return pb.Command(range=pb.Range(prefix=self.prefix if key is None else key,
                                         limit=self.rng.choice((1, 5, 10)),
                                         keys_only=self.rng.random() < 0.5))

    def any_command(self, key: bytes | None = None) -> pb.Command:
        return self.write_command(key) if self.rng.random() < 0.7 else self.read_command(key)

    # -- proposals --------------------------------------------------------------------------

    def noop_proposal(self) -> api_pb2.ProposeRequest:
        return api_pb2.ProposeRequest(session=self.noop().to_pb(), command=self.any_command())

    def unregistered_proposal(self) -> api_pb2.ProposeRequest:
        """A session the cluster never registered: applied as SESSION_EXPIRED."""
        series = self.rng.randint(1, 5)
        session = Session(self.cluster_id, self.client_id(), series, series - 1)
        return api_pb2.ProposeRequest(session=session.to_pb(), command=self.write_command())

    def refused_proposal(self) -> api_pb2.ProposeRequest:
        """A proposal the contract refuses before the log (the server must not let it in)."""
        rng, cid = self.rng, self.cluster_id
        how = rng.choice(("wrong-cluster", "client-id-0", "reserved-series", "responded-past",
                          "empty-key", "long-key", "no-command"))
        command = self.write_command()
        session = self.noop()
        if how == "wrong-cluster":
            session = Session(rng.choice((0, cid + 1, UINT64_MAX)), self.client_id(), 0, 0)
        elif how == "client-id-0":
            session = Session(cid, 0, rng.choice((0, 1, 2)), 0)
        elif how == "reserved-series":
            series = rng.choice((SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER))
            session = Session(cid, self.client_id(), series, 0)
        elif how == "responded-past":
            series = rng.randint(0, 10)
            session = Session(cid, self.client_id(), series, series + rng.choice((1, 2**40)))
        elif how == "empty-key":
            command = pb.Command(put=pb.Put(key=b"", value=b"v"))
        elif how == "long-key":
            command = pb.Command(put=pb.Put(key=b"k" * (MAX_KEY_BYTES + 1), value=b"v"))
        else:
            command = pb.Command()
        return api_pb2.ProposeRequest(session=session.to_pb(), command=command)

    def batch(self) -> api_pb2.ProposeBatchRequest:
        """1 to 32 proposals, at least one valid, a few refused, in a random order."""
        rng = self.rng
        proposals = [self.noop_proposal()]
        for _ in range(rng.choice((0, 1, 2, 7, 31))):
            r = rng.random()
            proposals.append(self.noop_proposal() if r < 0.7 else
                             self.unregistered_proposal() if r < 0.85 else self.refused_proposal())
        rng.shuffle(proposals)
        return api_pb2.ProposeBatchRequest(proposals=proposals)

    # -- valid requests -------------------------------------------------------------------

    def valid(self) -> tuple[str, bytes, str]:
        rng = self.rng
        r = rng.random()
        if r < 0.30:
            return "Propose", self.noop_proposal().SerializeToString(), "valid/noop-propose"
        if r < 0.40:
            return "Propose", self.unregistered_proposal().SerializeToString(), \
                "valid/unregistered-propose"
        if r < 0.48:
            return "ProposeBatch", self.batch().SerializeToString(), "valid/batch"
        if r < 0.55:
            session = Session(self.cluster_id, self.client_id(), SERIES_ID_FOR_REGISTER, 0)
            return "RegisterSession", api_pb2.SessionRequest(session=session.to_pb()).SerializeToString(), \
                "valid/register"
        if r < 0.62:
            session = Session(self.cluster_id, self.client_id(), SERIES_ID_FOR_UNREGISTER, 0)
            return "UnregisterSession", api_pb2.SessionRequest(session=session.to_pb()).SerializeToString(), \
                "valid/unregister"
        if r < 0.85:
            consistency = rng.choice((api_pb2.LINEARIZABLE, api_pb2.SERIALIZABLE))
            req = api_pb2.ReadRequest(cluster_id=self.cluster_id, command=self.read_command(),
                                      consistency=consistency)
            return "Read", req.SerializeToString(), "valid/read"
        req = api_pb2.StatusRequest(with_digest=rng.random() < 0.02)
        return "Status", req.SerializeToString(), "valid/status"

    # -- damaged at the message level -------------------------------------------------------

    def semantic(self) -> tuple[str, bytes, str]:
        rng = self.rng
        cid = self.cluster_id
        pick = rng.choices(_SEMANTIC, weights=[w for _, w in _SEMANTIC])[0][0]
        return pick(self, rng, cid)

    # -- damaged at the byte level ----------------------------------------------------------

    def base(self) -> tuple[str, bytes, str]:
        """A request to damage: valid or semantically wrong, never a huge one."""
        for _ in range(20):
            method, data, kind = self.valid() if self.rng.random() < 0.6 else self.semantic()
            if len(data) <= 16 * 1024:
                return method, data, kind
        return method, data[: 16 * 1024], kind

    def mutated(self) -> tuple[str, bytes, str]:
        rng = self.rng
        method, data, base_kind = self.base()
        how = rng.choice(("flip", "flip", "truncate", "insert", "delete", "duplicate", "splice",
                          "concat", "huge-length", "overwrite-varint"))
        buf = bytearray(data)
        if how == "flip" and buf:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(buf))
                buf[pos] ^= 1 << rng.randrange(8)
        elif how == "truncate" and buf:
            del buf[rng.randrange(len(buf)):]
        elif how == "insert":
            pos = rng.randint(0, len(buf))
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif how == "delete" and buf:
            start = rng.randrange(len(buf))
            del buf[start:start + rng.randint(1, 8)]
        elif how == "duplicate" and buf:
            start = rng.randrange(len(buf))
            piece = buf[start:start + rng.randint(1, 32)]
            pos = rng.randint(0, len(buf))
            buf[pos:pos] = piece
        elif how == "splice":
            _, other, _ = self.base()
            buf = buf[: rng.randint(0, len(buf))] + bytearray(other[rng.randint(0, len(other)):])
        elif how == "concat":
            _, other, _ = self.base()
            buf += other  # protobuf merges: later scalars win, the oneof switches
        elif how == "huge-length" and buf:
            # Replace the length of the first length-delimited field (a tag byte 0x0a or 0x12).
            positions = [i for i, b in enumerate(buf[:64]) if b in (0x0A, 0x12)]
            pos = rng.choice(positions) if positions else 0
            end = pos + 1
            while end < len(buf) and buf[end] & 0x80:
                end += 1
            buf[pos + 1:end + 1] = rng.choice(_HUGE_LENGTHS)
        elif how == "overwrite-varint" and buf:
            pos = rng.randrange(len(buf))
            buf[pos:pos + 1] = rng.choice((b"\xff" * 9 + b"\x01", b"\x80" * 10, b"\xff\xff\xff\xff\x0f"))
        if rng.random() < 0.1:
            method = rng.choice(METHODS)  # a request sent to the wrong method
        return method, bytes(buf), f"mutated/{how}"

    def random_bytes(self) -> tuple[str, bytes, str]:
        rng = self.rng
        size = rng.choice((0, 1, 2, 3, 5, 8, 16, 32, 64, 128, 1024, 4096, 65536))
        return rng.choice(METHODS), rng.randbytes(size), "random"

    def draw(self, valid_share: float) -> tuple[str, bytes, str]:
        r = self.rng.random()
        if r < valid_share:
            return self.valid()
        r = self.rng.random()
        if r < 0.25:
            return self.random_bytes()
        if r < 0.65:
            return self.mutated()
        return self.semantic()


# Message-level damage, each: (generator, rng, cluster id) -> (method, bytes, kind).

def _wrong_cluster(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    other = rng.choice((0, cid + 1, cid - 1, UINT64_MAX, rng.getrandbits(64), cid ^ (1 << rng.randrange(64))))
    method = rng.choice(("Propose", "RegisterSession", "UnregisterSession", "Read"))
    if method == "Read":
        req = api_pb2.ReadRequest(cluster_id=other, command=g.read_command())
        return method, req.SerializeToString(), "semantic/wrong-cluster"
    series = {"Propose": 0, "RegisterSession": SERIES_ID_FOR_REGISTER,
              "UnregisterSession": SERIES_ID_FOR_UNREGISTER}[method]
    session = Session(other, g.client_id(), series, 0)
    return method, _session_request(method, session, g.write_command()), "semantic/wrong-cluster"


def _client_id_zero(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    method = rng.choice(("Propose", "RegisterSession", "UnregisterSession"))
    series = rng.choice((0, 1, 2, SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER))
    session = Session(cid, 0, series, 0)
    return method, _session_request(method, session, g.write_command()), "semantic/client-id-0"


def _reserved_series(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    method = rng.choice(("Propose", "RegisterSession", "UnregisterSession"))
    if method == "Propose":
        series = rng.choice((SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER))
    elif method == "RegisterSession":
        series = rng.choice((0, 1, SERIES_ID_FOR_UNREGISTER, 2**63))
    else:
        series = rng.choice((0, 1, SERIES_ID_FOR_REGISTER, 2**63))
    session = Session(cid, g.client_id(), series, rng.choice((0, series)))
    return method, _session_request(method, session, g.write_command()), "semantic/reserved-series"


def _responded_past_series(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    series = rng.randint(0, 10)
    session = Session(cid, g.client_id(), series, series + rng.choice((1, 2, 2**40)))
    return "Propose", _session_request("Propose", session, g.write_command()), "semantic/responded-past-series"


def _long_key(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    size = rng.choice((MAX_KEY_BYTES + 1, MAX_KEY_BYTES + rng.randint(2, 4096), 64 * 1024))
    key = g.prefix + b"k" * (size - len(g.prefix))
    kind = "semantic/key-over-4KiB"
    if rng.random() < 0.2:  # on the boundary: valid
        key, kind = key[:MAX_KEY_BYTES], "semantic/key-exactly-4KiB"
    if rng.random() < 0.3:
        read = pb.Command(get=pb.Get(key=key)) if rng.random() < 0.5 else \
            pb.Command(range=pb.Range(prefix=key, limit=1))
        req = api_pb2.ReadRequest(cluster_id=cid, command=read,
                                  consistency=rng.choice((api_pb2.LINEARIZABLE, api_pb2.SERIALIZABLE)))
        return "Read", req.SerializeToString(), kind
    command = g.write_command(key) if rng.random() < 0.8 else g.read_command(key)
    return "Propose", _session_request("Propose", g.noop(), command), kind


def _long_value(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    value = b"v" * (MAX_VALUE_BYTES + rng.choice((1, 2, rng.randint(3, 1000))))
    key = g.key()
    command = rng.choice((
        pb.Command(put=pb.Put(key=key, value=value)),
        pb.Command(append=pb.Append(key=key, value=value)),
        pb.Command(cas=pb.Cas(key=key, expect_absent=True, value=value)),
    ))
    return "Propose", _session_request("Propose", g.noop(), command), "semantic/value-over-1MiB"


def _empty_key(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    command = rng.choice((
        pb.Command(put=pb.Put(key=b"", value=b"v")),
        pb.Command(incr=pb.Incr(key=b"", delta=1)),
        pb.Command(append=pb.Append(key=b"", value=b"v")),
        pb.Command(cas=pb.Cas(key=b"", expect_absent=True, value=b"v")),
        pb.Command(delete=pb.Delete(key=b"")),
        pb.Command(get=pb.Get(key=b"")),
    ))
    if command.WhichOneof("op") == "get" and rng.random() < 0.5:
        req = api_pb2.ReadRequest(cluster_id=cid, command=command)
        return "Read", req.SerializeToString(), "semantic/empty-key"
    return "Propose", _session_request("Propose", g.noop(), command), "semantic/empty-key"


def _non_utf8_key(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    key = g.prefix + rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\x00\xff"))
    if rng.random() < 0.3:
        req = api_pb2.ReadRequest(cluster_id=cid, command=g.read_command(key),
                                  consistency=api_pb2.SERIALIZABLE)
        return "Read", req.SerializeToString(), "semantic/non-utf8-key"
    return "Propose", _session_request("Propose", g.noop(), g.write_command(key)), "semantic/non-utf8-key"


def _no_command(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    if rng.random() < 0.5:
        return "Read", api_pb2.ReadRequest(cluster_id=cid).SerializeToString(), "semantic/no-command"
    return "Propose", api_pb2.ProposeRequest(session=g.noop().to_pb()).SerializeToString(), \
        "semantic/no-command"


def _write_to_read(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    req = api_pb2.ReadRequest(cluster_id=cid, command=g.write_command(),
                              consistency=rng.choice((api_pb2.LINEARIZABLE, api_pb2.SERIALIZABLE)))
    return "Read", req.SerializeToString(), "semantic/write-in-read"


def _unknown_enum(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    # proto3 enums are open: an unknown consistency decodes and is not SERIALIZABLE.
    value = rng.choice((2, 3, 99, 2**31 - 1, -1))
    data = encode_tag(1, 0) + encode_varint(cid) + encode_len_field(2, g.read_command().SerializeToString()) + \
        encode_tag(3, 0) + encode_varint(value & UINT64_MAX)
    return "Read", data, "semantic/unknown-consistency"


def _unknown_fields(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    method, data, _ = g.valid()
    extra = rng.choice((
        encode_tag(99, 0) + encode_varint(rng.getrandbits(64)),
        encode_len_field(1000, rng.randbytes(rng.randint(0, 64))),
        encode_tag(2**29 - 1, 5) + rng.randbytes(4),
        encode_tag(77, 1) + rng.randbytes(8),
    ))
    pos = rng.choice((0, len(data)))
    return method, data[:pos] + extra + data[pos:], "semantic/unknown-fields"


def _deep_groups(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    depth = rng.choice(_GROUP_DEPTHS)
    shape = rng.choice(("balanced", "balanced", "balanced", "unterminated", "mismatched", "stray-end"))
    if shape == "balanced":
        groups = _groups(depth, rng.choice((15, 100, 2**29 - 1)))
    elif shape == "unterminated":
        groups = encode_tag(15, 3) * depth + encode_tag(15, 4) * (depth - 1)
    elif shape == "mismatched":
        groups = encode_tag(15, 3) * depth + encode_tag(16, 4) * depth
    else:
        groups = encode_tag(15, 4)
    where = rng.choice(("top", "session", "command"))
    noop = g.noop().to_pb().SerializeToString()
    command = g.any_command().SerializeToString()
    if where == "top":
        method, data, _ = g.valid()
        return method, groups + data if rng.random() < 0.5 else data + groups, f"semantic/groups-{shape}"
    if where == "session":
        method = rng.choice(("Propose", "RegisterSession"))
        if method == "RegisterSession":
            session = Session(cid, g.client_id(), SERIES_ID_FOR_REGISTER, 0).to_pb().SerializeToString()
            return method, encode_len_field(1, session + groups), f"semantic/groups-{shape}"
        return method, encode_len_field(1, noop + groups) + encode_len_field(2, command), f"semantic/groups-{shape}"
    return "Propose", encode_len_field(1, noop) + encode_len_field(2, command + groups), f"semantic/groups-{shape}"


def _duplicated_fields(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    # Two sessions or two commands in one request: protobuf merges them, the last scalar wins.
    sessions = [g.noop(), g.noop(), Session(cid + 1, g.client_id(), 0, 0), Session(cid, 0, 0, 0)]
    first, second = rng.choice(sessions), rng.choice(sessions)
    data = encode_len_field(1, first.to_pb().SerializeToString()) + encode_len_field(2, g.any_command().SerializeToString()) + \
        encode_len_field(1, second.to_pb().SerializeToString())
    if rng.random() < 0.5:
        data += encode_len_field(2, g.any_command().SerializeToString())
    return "Propose", data, "semantic/duplicated-fields"


def _huge_length(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    method = rng.choice(("Propose", "RegisterSession", "Read"))
    field_number = 2 if method == "Read" else rng.choice((1, 2))
    body = encode_tag(field_number, 2) + rng.choice(_HUGE_LENGTHS) + rng.randbytes(rng.randint(0, 32))
    if method == "Read":
        body = encode_tag(1, 0) + encode_varint(cid) + body
    return method, body, "semantic/huge-length"


def _bad_tags(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    method, data, _ = g.valid()
    bad = rng.choice((
        encode_tag(0, 0) + b"\x01",           # field number 0
        encode_varint(2**29 << 3) + b"\x01",  # field number past the maximum
        encode_tag(5, 6), encode_tag(5, 7),         # wire types that do not exist
        b"\x8a\x80\x80\x00",            # a padded tag (valid varint, unusual)
        encode_tag(1, 0) + encode_varint(cid),      # a message field sent as a varint
    ))
    return method, bad + data if rng.random() < 0.5 else data + bad, "semantic/bad-tags"


def _oversize(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    size = MAX_MESSAGE_BYTES + rng.choice((1, 1024, 256 * 1024))
    method = rng.choice(METHODS)
    if rng.random() < 0.5:
        return method, rng.randbytes(size), "semantic/oversize"
    command = pb.Command(put=pb.Put(key=g.key(), value=b"v" * size))
    return "Propose", _session_request("Propose", g.noop(), command), "semantic/oversize"


def _batch_too_many(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    size = MAX_BATCH_PROPOSALS + rng.choice((1, 2, 100))
    proposal = api_pb2.ProposeRequest(session=g.noop().to_pb(),
                                      command=pb.Command(put=pb.Put(key=g.key(), value=b"v")))
    request = api_pb2.ProposeBatchRequest(proposals=[proposal] * size)
    return "ProposeBatch", request.SerializeToString(), "semantic/batch-too-many"


def _batch_all_refused(g: _Generator, rng: random.Random, cid: int) -> tuple[str, bytes, str]:
    """Nothing of such a batch may reach the log; none at all (an empty batch) included."""
    proposals = [g.refused_proposal() for _ in range(rng.choice((0, 1, 2, 5, 16)))]
    return "ProposeBatch", api_pb2.ProposeBatchRequest(proposals=proposals).SerializeToString(), \
        "semantic/batch-all-refused"


def _session_request(method: str, session: Session, command: pb.Command) -> bytes:
    if method == "Propose":
        return api_pb2.ProposeRequest(session=session.to_pb(), command=command).SerializeToString()
    return api_pb2.SessionRequest(session=session.to_pb()).SerializeToString()


_SEMANTIC: list[tuple[Callable[[_Generator, random.Random, int], tuple[str, bytes, str]], float]] = [
    (_wrong_cluster, 10), (_client_id_zero, 8), (_reserved_series, 8), (_responded_past_series, 5),
    (_long_key, 6), (_long_value, 1.2), (_empty_key, 6), (_non_utf8_key, 5), (_no_command, 4),
    (_write_to_read, 5), (_unknown_enum, 3), (_unknown_fields, 6), (_deep_groups, 10),
    (_duplicated_fields, 6), (_huge_length, 6), (_bad_tags, 6), (_oversize, 0.3),
    (_batch_too_many, 1), (_batch_all_refused, 6),
]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def discover_cluster_id(endpoints: Sequence[str], timeout: float = 5.0,
                        tls: ClientTLS | None = None) -> int:
    """The cluster id, from the first node whose Status answers."""
    failures = []
    for endpoint in endpoints:
        with open_channel(endpoint, tls) as channel:
            status = channel.unary_unary(f"/{SERVICE}/Status", request_serializer=lambda b: b,
                                         response_deserializer=api_pb2.NodeStatus.FromString)
            try:
                return int(status(b"", timeout=timeout).cluster_id)
            except grpc.RpcError as exc:
                failures.append(f"{endpoint}: {exc.code().name}")
    raise RuntimeError("no endpoint answered Status: " + "; ".join(failures))


def fuzz_api(
    endpoints: Sequence[str],
    count: int,
    seed: int,
    deadline_s: float,
    *,
    cluster_id: int | None = None,
    invalid_only: bool = False,
    threads: int = DEFAULT_THREADS,
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT,
    key_prefix: bytes = DEFAULT_KEY_PREFIX,
    valid_share: float = 0.15,
    tls: ClientTLS | None = None,
) -> FuzzReport:
    """Sends ``count`` requests (fewer if ``deadline_s`` passes first) to ``endpoints``.

    One channel per endpoint, ``threads`` calls in flight at most, each with ``call_timeout_s``.
    Valid writes only touch keys under ``key_prefix``. With ``invalid_only`` every request is
    one the contract refuses before the log (oversize, malformed or refused). ``tls``: the
    client files for a cluster with TLS.
    """
    if not endpoints:
        raise ValueError("no endpoints")
    if count < 0 or deadline_s <= 0 or threads < 1:
        raise ValueError("count must be >= 0, deadline_s and threads positive")
    cluster = discover_cluster_id(endpoints, tls=tls) if cluster_id is None else cluster_id
    rng = random.Random(seed)
    generator = _Generator(rng, cluster, key_prefix)
    report = FuzzReport(seed=seed, requested=count, invalid_only=invalid_only, endpoints=list(endpoints))
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(threads * 2)
    options = [("grpc.max_receive_message_length", _CLIENT_RECEIVE_LIMIT),
               ("grpc.max_send_message_length", -1)]
    channels = {e: open_channel(e, tls, options) for e in endpoints}
    calls = {
        (e, m): channel.unary_unary(f"/{SERVICE}/{m}", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        for e, channel in channels.items() for m in METHODS
    }

    def send(case: Case) -> None:
        batch_errors: list[str] = []
        try:
            answer = calls[(case.endpoint, case.method)](case.data, timeout=call_timeout_s)
            code, details = "OK", ""
            if case.method == "ProposeBatch" and case.expect in (MAY_APPLY, BATCH_REFUSED):
                batch_errors = batch_answer_errors(case.data, answer, cluster)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "NO_CODE"
            details = exc.details() or ""
        except Exception as exc:  # noqa: BLE001 - a client-side failure is recorded, not raised
            code, details = f"CLIENT_{type(exc).__name__}", str(exc)
        with lock:
            report._record(case, code, details, batch_errors)

    def done(_: Future[None]) -> None:
        slots.release()

    start = time.monotonic()
    deadline = start + deadline_s
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="api-fuzz") as pool:
            for _ in range(count):
                if time.monotonic() >= deadline:
                    report.deadline_hit = True
                    break
                case = _next_case(generator, endpoints, cluster, invalid_only, valid_share)
                # Bounded wait: every call in flight ends within its own timeout.
                if not slots.acquire(timeout=call_timeout_s * 2 + 1):
                    report.deadline_hit = True
                    break
                pool.submit(send, case).add_done_callback(done)
    finally:
        for channel in channels.values():
            channel.close()
    report.elapsed_s = time.monotonic() - start
    return report


def _next_case(generator: _Generator, endpoints: Sequence[str], cluster_id: int,
               invalid_only: bool, valid_share: float) -> Case:
    rng = generator.rng
    endpoint = rng.choice(list(endpoints))
    for _ in range(1000):
        method, data, kind = generator.draw(0.0 if invalid_only else valid_share)
        expect = classify(method, data, cluster_id)
        if not invalid_only or expect in INVALID:
            return Case(method, data, kind, expect, endpoint)
    return Case("Propose", b"\xff", "random", MALFORMED, endpoint)  # pragma: no cover


# --------------------------------------------------------------------------------------------
# By hand
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstore.check.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", action="append", required=True, help="host:port of a node's API")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--invalid-only", action="store_true")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    for name in ("--cacert", "--cert", "--key"):
        parser.add_argument(name, type=Path, default=None, help="client TLS file, as for kv")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    tls = (ClientTLS.load(args.cacert, args.cert, args.key)
           if args.cacert or args.cert or args.key else None)
    report = fuzz_api(args.endpoint, args.count, seed, args.deadline, invalid_only=args.invalid_only,
                      threads=args.threads, tls=tls)
    print(json.dumps(report.to_json(), indent=2))
    return 1 if report.unexpected() else 0


if __name__ == "__main__":
    sys.exit(main())
