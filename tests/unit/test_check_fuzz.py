"""The API fuzzer's oracle and report (``kvstore.check.fuzz``), on hand-made requests and answers.

``classify`` decides, before a request is sent, what the contract allows as its answer; the
report's ``unexpected()`` is what ``tests/integration/test_api_fuzz.py`` asserts is empty. A
lenient oracle or a blind report would let a server bug through that run, so both are fed
requests and answers with a known verdict here, wrong answers above all.
"""

from __future__ import annotations

import pytest

from kvstore import ops
from kvstore.check.fuzz import (
    ALLOWED,
    BATCH_REFUSED,
    HARMLESS,
    MALFORMED,
    MAY_APPLY,
    METHODS,
    OVERSIZE,
    REFUSED,
    Case,
    FuzzReport,
    batch_answer_errors,
    classify,
)
from kvstore.limits import MAX_KEY_BYTES
from kvstore.proto import api_pb2
from kvstore.proto import log_pb2 as pb
from kvstore.server import MAX_BATCH_PROPOSALS, MAX_MESSAGE_BYTES
from session import Session, new_noop_session, new_session

CLUSTER = 7


def registered(cluster: int = CLUSTER) -> Session:
    session = new_session(cluster)
    session.prepare_for_register()
    session.prepare_for_propose()
    return session


def propose(session: Session, command: pb.Command) -> bytes:
    return api_pb2.ProposeRequest(session=session.to_pb(), command=command).SerializeToString()


def session_op(session: Session) -> bytes:
    return api_pb2.SessionRequest(session=session.to_pb()).SerializeToString()


def read(command: pb.Command, *, cluster: int = CLUSTER,
         consistency: api_pb2.Consistency = api_pb2.LINEARIZABLE) -> bytes:
    return api_pb2.ReadRequest(cluster_id=cluster, command=command,
                               consistency=consistency).SerializeToString()


def register_request(cluster: int = CLUSTER) -> bytes:
    session = new_session(cluster)
    session.prepare_for_register()
    return session_op(session)


def unregister_request() -> bytes:
    session = new_session(CLUSTER)
    session.prepare_for_unregister()
    return session_op(session)


def responded_past_series() -> bytes:
    pb_session = registered().to_pb()
    pb_session.responded_to = pb_session.series_id + 1  # an answer it cannot have had
    return api_pb2.ProposeRequest(session=pb_session, command=ops.put(b"k", b"v")).SerializeToString()


def client_id_zero() -> bytes:
    pb_session = registered().to_pb()
    pb_session.client_id = 0  # reserved for entries the system makes
    return api_pb2.ProposeRequest(session=pb_session, command=ops.put(b"k", b"v")).SerializeToString()


def batch(*proposals: bytes) -> bytes:
    return api_pb2.ProposeBatchRequest(
        proposals=[api_pb2.ProposeRequest.FromString(p) for p in proposals]).SerializeToString()


VALID_PROPOSAL = propose(registered(), ops.put(b"k", b"v"))
REFUSED_PROPOSAL = propose(registered(), ops.put(b"", b"v"))  # an empty key


CASES = [
    # (method, request bytes, what the contract says): the invalid ones first.
    pytest.param("Propose", b"x" * (MAX_MESSAGE_BYTES + 1), OVERSIZE, id="oversize"),
    pytest.param("Status", b"\xff", MALFORMED, id="undecodable-status"),
    pytest.param("Propose", b"\x0a\x05ab", MALFORMED, id="length-past-the-end"),
    pytest.param("Read", b"\x08", MALFORMED, id="varint-cut-short"),
    pytest.param("Propose", propose(registered(CLUSTER + 1), ops.put(b"k", b"v")), REFUSED,
                 id="wrong-cluster"),
    pytest.param("Propose", propose(registered(), ops.put(b"k" * (MAX_KEY_BYTES + 1), b"v")),
                 REFUSED, id="key-too-long"),
    pytest.param("Propose", propose(registered(), ops.put(b"", b"v")), REFUSED, id="empty-key"),
    pytest.param("Propose", propose(registered(), pb.Command()), REFUSED, id="no-command"),
    pytest.param("Propose", responded_past_series(), REFUSED, id="responded-past-series"),
    pytest.param("Propose", client_id_zero(), REFUSED, id="client-id-zero"),
    pytest.param("Propose", session_op(registered()), REFUSED, id="session-request-as-proposal"),
    pytest.param("Read", read(ops.get(b"k"), cluster=CLUSTER + 1), REFUSED,
                 id="read-wrong-cluster"),
    pytest.param("Read", read(ops.put(b"k", b"v")), REFUSED, id="write-sent-to-read"),
    pytest.param("RegisterSession", session_op(registered()), REFUSED,
                 id="register-without-its-series-id"),
    pytest.param("RegisterSession", register_request(CLUSTER + 1), REFUSED,
                 id="register-wrong-cluster"),
    pytest.param("UnregisterSession", register_request(), REFUSED,
                 id="unregister-with-the-register-series-id"),
    pytest.param("ProposeBatch", b"\x0a\x05ab", MALFORMED, id="undecodable-batch"),
    pytest.param("ProposeBatch", batch(*[VALID_PROPOSAL] * (MAX_BATCH_PROPOSALS + 1)), REFUSED,
                 id="batch-too-many"),
    pytest.param("ProposeBatch", batch(REFUSED_PROPOSAL, client_id_zero()), BATCH_REFUSED,
                 id="batch-of-refused-proposals"),
    pytest.param("ProposeBatch", batch(), BATCH_REFUSED, id="empty-batch"),
    # Valid requests.
    pytest.param("ProposeBatch", batch(REFUSED_PROPOSAL, VALID_PROPOSAL), MAY_APPLY,
                 id="batch-with-one-valid-proposal"),
    pytest.param("ProposeBatch", batch(*[VALID_PROPOSAL] * MAX_BATCH_PROPOSALS), MAY_APPLY,
                 id="batch-of-the-most-proposals"),
    pytest.param("Status", b"", HARMLESS, id="status"),
    pytest.param("Read", read(ops.get(b"k"), consistency=api_pb2.SERIALIZABLE), HARMLESS,
                 id="serializable-read"),
    pytest.param("Read", read(ops.get(b"k")), MAY_APPLY, id="linearizable-read"),
    pytest.param("Propose", propose(registered(), ops.put(b"k", b"v")), MAY_APPLY, id="proposal"),
    pytest.param("Propose", propose(new_noop_session(CLUSTER), ops.incr(b"n")), MAY_APPLY,
                 id="noop-proposal"),
    # Registration is the state machine's to judge (SESSION_EXPIRED), not the contract's.
    pytest.param("Propose", propose(new_session(CLUSTER), ops.put(b"k", b"v")), MAY_APPLY,
                 id="unregistered-proposal"),
    pytest.param("RegisterSession", register_request(), MAY_APPLY, id="register"),
    pytest.param("UnregisterSession", unregister_request(), MAY_APPLY, id="unregister"),
]


@pytest.mark.parametrize("method, data, expect", CASES)
def test_classify_applies_the_contract_before_sending(method: str, data: bytes,
                                                      expect: str) -> None:
    assert classify(method, data, CLUSTER) == expect


def report_of(*answers: tuple[str, str, str]) -> FuzzReport:
    """A report that recorded each (method, expectation, answer code)."""
    report = FuzzReport(seed=1, requested=len(answers), invalid_only=False, endpoints=["e"])
    for method, expect, code in answers:
        report._record(Case(method, b"\x01\x02", "hand-made", expect, "e"), code, "details")
    return report


def test_a_clean_run_has_nothing_unexpected() -> None:
    allowed = [(method, expect, code) for expect, codes in ALLOWED.items()
               for code in codes for method in METHODS]
    valid = [("Propose", MAY_APPLY, code) for code in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED")]
    valid += [("Status", HARMLESS, "OK"), ("Read", HARMLESS, "FAILED_PRECONDITION")]
    report = report_of(*allowed, *valid)
    assert report.unexpected() == []
    assert report.sent == len(allowed) + len(valid)


@pytest.mark.parametrize("method, expect, code", [
    ("Propose", MALFORMED, "OK"),  # a request that does not decode was accepted
    ("Propose", REFUSED, "OK"),  # a wrong cluster's proposal was accepted
    ("Read", REFUSED, "NOT_FOUND"),
    ("Status", OVERSIZE, "INVALID_ARGUMENT"),  # any answer but RESOURCE_EXHAUSTED
    ("Propose", MAY_APPLY, "INTERNAL"),  # a handler raised
    ("Status", HARMLESS, "UNKNOWN"),
    ("RegisterSession", REFUSED, "INTERNAL"),
])
def test_every_answer_outside_the_contract_is_unexpected(method: str, expect: str,
                                                         code: str) -> None:
    report = report_of(("Status", HARMLESS, "OK"), (method, expect, code), (method, expect, code))
    (line,) = report.unexpected()
    assert line.startswith(f"2 x {expect} -> {code}, e.g. {method} <- hand-made")
    assert "0102" in line  # the sample's bytes, to replay it


def test_a_server_that_lets_an_undecodable_entry_into_the_log_is_counted() -> None:
    report = FuzzReport(seed=1, requested=1, invalid_only=False, endpoints=["e"])
    report._record(Case("Propose", b"", "hand-made", MAY_APPLY, "e"), "OK",
                   "MALFORMED_ENTRY: not the canonical encoding of an Entry")
    assert report.malformed_entries == 1


def outcomes(*fates: int) -> bytes:
    return api_pb2.ProposeBatchResponse(
        outcomes=[api_pb2.ProposeOutcome(fate=fate) for fate in fates]).SerializeToString()


def test_a_batch_answer_that_keeps_the_contract_has_no_errors() -> None:
    request = batch(VALID_PROPOSAL, REFUSED_PROPOSAL, VALID_PROPOSAL)
    answer = outcomes(api_pb2.FATE_ANSWERED, api_pb2.FATE_REFUSED, api_pb2.FATE_OUTCOME_UNKNOWN)
    assert batch_answer_errors(request, answer, CLUSTER) == []


@pytest.mark.parametrize("answer, error", [
    # A refused proposal answered: it reached the log.
    (outcomes(api_pb2.FATE_ANSWERED, api_pb2.FATE_ANSWERED),
     "proposal 1 is refused by the contract but its fate is FATE_ANSWERED"),
    (outcomes(api_pb2.FATE_ANSWERED, api_pb2.FATE_NOT_APPLIED),
     "proposal 1 is refused by the contract but its fate is FATE_NOT_APPLIED"),
    (outcomes(api_pb2.FATE_REFUSED, api_pb2.FATE_REFUSED), "proposal 0 is valid but was refused"),
    (outcomes(api_pb2.FATE_ANSWERED), "1 outcomes for 2 proposals"),
    (b"\xff", "the answer (1 B) is not a ProposeBatchResponse"),
], ids=["refused-answered", "refused-not-applied", "valid-refused", "an-outcome-missing",
        "undecodable"])
def test_every_batch_answer_outside_the_contract_is_an_error(answer: bytes, error: str) -> None:
    (found,) = batch_answer_errors(batch(VALID_PROPOSAL, REFUSED_PROPOSAL), answer, CLUSTER)
    assert found.startswith(error)


def test_a_batch_answered_with_wrong_outcomes_is_unexpected() -> None:
    report = report_of(("ProposeBatch", MAY_APPLY, "OK"))
    assert report.unexpected() == []
    report._record(Case("ProposeBatch", b"\x0a\x00", "hand-made", MAY_APPLY, "e"), "OK", "",
                   ["proposal 0 is valid but was refused: 'no'"])
    (line,) = report.unexpected()
    assert line.startswith("1 x ProposeBatch answered OK with wrong outcomes, e.g. proposal 0 is "
                           "valid but was refused: 'no' (hand-made, 2 B on e; bytes 0a00)")
    assert report.to_json()["batch_errors"] == 1
