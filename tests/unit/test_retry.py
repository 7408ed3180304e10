"""The retry rules both clients run (``kvstore.retry``), driven with made-up failures.

The exactness claim: the client says ``OutcomeUnknown`` only when some attempt may have been
applied, ``Unavailable`` only when none was; it retries an unknown outcome only with a session;
and a proposal of a ``ProposeBatch`` is judged exactly as the same proposal sent alone.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import api_errors, errors, results, retry, server
from kvstore.node.outcomes import NotApplied, OutcomeUnknown, ProposeError
from kvstore.proto import api_pb2
from kvstore.proto.log_pb2 import Code
from kvstore.retry import Attempts, Call, Failure, Fate, Pause

REASON, LEADER, RESULT = (api_errors.REASON_METADATA_KEY, api_errors.LEADER_METADATA_KEY,
                          api_errors.RESULT_METADATA_KEY)
S = grpc.StatusCode


# -- what a failure means ----------------------------------------------------------------------

@pytest.mark.parametrize(("code", "details", "metadata", "fate"), [
    (S.UNAVAILABLE, "not the leader", {REASON: "NOT_LEADER", LEADER: "h:1"}, Fate.NOT_APPLIED),
    (S.RESOURCE_EXHAUSTED, "queue full", {REASON: "QUEUE_FULL"}, Fate.NOT_APPLIED),
    (S.UNAVAILABLE, "failed to connect to all addresses", {}, Fate.NOT_APPLIED),
    (S.UNAVAILABLE, "Connection refused", {}, Fate.NOT_APPLIED),
    (S.UNAVAILABLE, "Socket closed", {}, Fate.OUTCOME_UNKNOWN),  # the request may have left
    (S.DEADLINE_EXCEEDED, "timed out", {REASON: "TIMEOUT"}, Fate.OUTCOME_UNKNOWN),
    (S.DEADLINE_EXCEEDED, "Deadline Exceeded", {}, Fate.OUTCOME_UNKNOWN),
    (S.ABORTED, "leader changed", {REASON: "LEADER_CHANGED"}, Fate.OUTCOME_UNKNOWN),
    (S.CANCELLED, "cancelled", {}, Fate.OUTCOME_UNKNOWN),
    (S.UNKNOWN, "?", {}, Fate.OUTCOME_UNKNOWN),
    (S.RESOURCE_EXHAUSTED, "message too large", {}, Fate.REFUSED),  # gRPC's, not the node's
    (S.INVALID_ARGUMENT, "empty key", {}, Fate.REFUSED),
    (S.FAILED_PRECONDITION, "x", {REASON: api_errors.MEMBERSHIP_REFUSED}, Fate.REFUSED),
])
def test_fate_of_a_status(code: grpc.StatusCode, details: str,
                          metadata: dict[str, str], fate: Fate) -> None:
    assert retry.fate_of_status(code, details, metadata) is fate
    failure = retry.classify(code, details, metadata)
    assert failure.fate is fate
    assert (failure.error is not None) == (fate is Fate.REFUSED)


@pytest.mark.parametrize(("code", "details", "metadata", "error"), [
    (S.UNAUTHENTICATED, "no cert", {}, errors.Unauthenticated),
    (S.PERMISSION_DENIED, "readonly", {}, errors.PermissionDenied),
    (S.FAILED_PRECONDITION, "cluster mismatch: 1 vs 2", {}, errors.ClusterMismatch),
    (S.INVALID_ARGUMENT, "empty key", {}, errors.InvalidArgument),
    (S.RESOURCE_EXHAUSTED, "message too large", {}, errors.InvalidArgument),
    (S.FAILED_PRECONDITION, "no quorum", {REASON: api_errors.MEMBERSHIP_REFUSED},
     errors.MembershipRefused),
    (S.INTERNAL, "boom", {}, errors.KVError),
])
def test_refusals_raise_their_typed_error(code: grpc.StatusCode, details: str,
                                          metadata: dict[str, str],
                                          error: type[errors.KVError]) -> None:
    failure = retry.classify(code, details, metadata)
    assert type(failure.error) is error


@pytest.mark.parametrize(("code", "error"), [
    (Code.SESSION_EXPIRED, errors.SessionExpired), (Code.ALREADY_RESPONDED, errors.AlreadyResponded),
    (Code.SERIES_REUSED, errors.SeriesReused), (Code.WRONG_TYPE, errors.CommandFailed),
    (Code.VALUE_TOO_LARGE, errors.InvalidCommand),
])
def test_an_answer_of_the_state_machine_is_final_alone_or_in_a_batch(
        code: int, error: type[errors.KVError]) -> None:
    answer = results.error(code, "no")  # type: ignore[arg-type]
    status, _ = api_errors.RESULT_ERRORS[code]
    alone = retry.classify(status, "no", {RESULT: results.encode(answer)})
    batched = retry.classify_outcome(api_pb2.ProposeOutcome(fate=api_pb2.FATE_ANSWERED,
                                                            result=answer))
    assert isinstance(batched, Failure)
    assert type(alone.error) is type(batched.error) is error
    assert batched.error.result == answer  # type: ignore[union-attr]


def test_an_ok_answer_in_a_batch_is_the_result() -> None:
    ok = results.ok(number=3)
    assert retry.classify_outcome(api_pb2.ProposeOutcome(fate=api_pb2.FATE_ANSWERED,
                                                         result=ok)) == ok


class _Leaderless:
    """Just what ``KVService._not_leader`` asks of the node: who leads (nobody known, or h:9)."""

    metrics = None  # no metrics endpoint (kvstore.metrics)

    def __init__(self, leader: str) -> None:
        self.leader = leader

    def leader_address(self) -> str:
        return "raft-of-leader" if self.leader else ""

    def api_address_of(self, raft: str) -> str:
        return self.leader if raft else ""


@pytest.mark.parametrize("failure", [
    NotApplied("NOT_LEADER"), NotApplied("QUEUE_FULL"), NotApplied("DISCARDED"),
    NotApplied("MISSING_LEADER"), OutcomeUnknown("TIMEOUT"), OutcomeUnknown("LEADER_CHANGED"),
    OutcomeUnknown("UNKNOWN_OUTCOME"),
])
@pytest.mark.parametrize("leader", ["", "127.0.0.1:9"])
def test_a_proposal_in_a_batch_fails_as_it_would_alone(failure: ProposeError, leader: str) -> None:
    """The server builds a batch outcome from the very refusal a lone Propose sends; the
    client must read the same fate, the same hint and the same detail from both."""
    service = server.KVService(_Leaderless(leader), None)  # type: ignore[arg-type]
    refusal = service._propose_refusal(failure)
    alone = retry.classify(refusal.code, refusal.message, dict(refusal.metadata))
    batched = retry.classify_outcome(server._refused_outcome(refusal))
    assert isinstance(batched, Failure)
    assert (batched.fate, batched.leader, batched.detail, batched.error) == \
        (alone.fate, alone.leader, alone.detail, None)
    expected = Fate.NOT_APPLIED if isinstance(failure, NotApplied) else Fate.OUTCOME_UNKNOWN
    assert alone.fate is expected
    if expected is Fate.NOT_APPLIED and failure.reason != "QUEUE_FULL":
        assert alone.leader == leader


@pytest.mark.parametrize("refusal", [
    server.Refused(S.INVALID_ARGUMENT, "INVALID_ARGUMENT: empty key (refused before the log)"),
    server.Refused(S.FAILED_PRECONDITION, "cluster mismatch: request for cluster 1, this is 2"),
])
def test_a_refused_proposal_in_a_batch_raises_as_it_would_alone(refusal: server.Refused) -> None:
    alone = retry.classify(refusal.code, refusal.message, dict(refusal.metadata))
    batched = retry.classify_outcome(server._refused_outcome(refusal))
    assert isinstance(batched, Failure) and batched.fate is Fate.REFUSED
    assert type(batched.error) is type(alone.error)
    assert type(alone.error) in (errors.InvalidArgument, errors.ClusterMismatch)


# -- what to do next ---------------------------------------------------------------------------

ENDPOINTS = ["a:1", "b:1", "c:1"]

failures = st.one_of(
    st.builds(lambda h: Failure(Fate.NOT_APPLIED, "not leader", leader=h),
              st.sampled_from(["", "b:1", "c:1"])),
    st.just(Failure(Fate.NOT_APPLIED, "connection refused")),
    st.just(Failure(Fate.OUTCOME_UNKNOWN, "deadline")),
    st.just(Failure(Fate.ANSWERED, "expired", error=errors.SessionExpired("x", results.ok()))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(failures, st.floats(0.0, 0.6)), max_size=40),
       st.floats(0.1, 5.0), st.booleans(), st.booleans())
def test_attempts_are_exact_about_what_may_have_been_applied(
        script: list[tuple[Failure, float]], total: float, retry_unknown: bool,
        any_node: bool) -> None:
    now = 100.0
    preferred = [ENDPOINTS[0]]

    def rotation() -> list[str]:
        return [preferred[0]] + [e for e in ENDPOINTS if e != preferred[0]]

    plan = Attempts(total, now, retry_unknown=retry_unknown, any_node=any_node)
    cap = max(retry.MIN_ATTEMPT, total * retry.ATTEMPT_SHARE) if retry_unknown else total
    any_unknown = False
    expect_hint = ""
    for failure, elapsed in script:
        try:
            step = plan.next(now, rotation)
        except errors.KVError as exc:
            assert now >= plan.deadline
            # At the deadline: unknown exactly when some attempt may have been applied.
            assert type(exc) is (errors.OutcomeUnknown if any_unknown else errors.Unavailable)
            return
        if isinstance(step, Pause):
            assert not expect_hint, "a leader hint is followed at once, without a pause"
            assert 0 < step.seconds <= retry.RETRY_BACKOFF[1]
            now += step.seconds
            continue
        assert isinstance(step, Call)
        assert 0 < step.timeout <= min(plan.deadline - now, cap) + 1e-9
        if expect_hint:
            assert step.endpoint == expect_hint
        expect_hint = ""
        now += min(elapsed, step.timeout)
        try:
            hint = plan.failed(step.endpoint, failure)
        except errors.KVError as exc:
            if failure.error is not None:
                assert exc is failure.error
            else:  # the only other reason to stop before the deadline
                assert failure.fate is Fate.OUTCOME_UNKNOWN and not retry_unknown
                assert isinstance(exc, errors.OutcomeUnknown)
            return
        assert failure.error is None
        any_unknown = any_unknown or failure.fate is Fate.OUTCOME_UNKNOWN
        assert hint == ("" if any_node else failure.leader)
        if hint:
            preferred[0] = hint
            expect_hint = hint
        assert plan.maybe_applied == any_unknown


def test_a_pass_without_an_answer_ends_in_a_pause_that_doubles() -> None:
    plan = Attempts(10.0, 0.0, retry_unknown=True)
    pauses = []
    now = 0.0
    for _ in range(4 * len(ENDPOINTS)):
        step = plan.next(now, lambda: list(ENDPOINTS))
        if isinstance(step, Pause):
            pauses.append(step.seconds)
            now += step.seconds
            continue
        plan.failed(step.endpoint, Failure(Fate.NOT_APPLIED, "no leader"))
    assert pauses == [0.01, 0.02, 0.04]


def test_an_unknown_outcome_is_final_without_a_session() -> None:
    plan = Attempts(5.0, 0.0, retry_unknown=False)
    step = plan.next(0.0, lambda: list(ENDPOINTS))
    assert isinstance(step, Call) and step.timeout == 5.0  # no cap: it gets one attempt
    with pytest.raises(errors.OutcomeUnknown):
        plan.failed(step.endpoint, Failure(Fate.OUTCOME_UNKNOWN, "deadline"))


def test_tls_refusals_are_explained_only_while_nothing_may_be_applied() -> None:
    plan = Attempts(5.0, 0.0, retry_unknown=True)
    closed = Failure(Fate.OUTCOME_UNKNOWN, "Socket closed", tls_suspect=True)
    assert plan.should_explain(closed)
    plan.failed("a:1", closed)
    assert not plan.should_explain(closed)


@pytest.mark.parametrize(("error", "fate"), [
    (None, "complete"),
    (errors.CommandFailed("x", results.ok()), "complete"),
    (errors.Unavailable("x"), "unchanged"),
    (errors.InvalidArgument("x"), "unchanged"),
    (errors.OutcomeUnknown("x"), "drop"),
    (errors.SessionExpired("x", results.ok()), "drop"),
    (errors.AlreadyResponded("x", results.ok()), "drop"),
    (errors.SeriesReused("x", results.ok()), "drop"),
    (KeyboardInterrupt(), "drop"),
])
def test_which_pooled_sessions_serve_again(error: BaseException | None, fate: str) -> None:
    assert retry.pooled_session_fate(error) == fate
