"""The client's retry rules, in one place and without I/O: both clients run them.

``kvstore.client.Client`` (threads) and ``kvstore.aio.Client`` (asyncio) differ only in how
they wait and how they call gRPC; what a failure means and what to do next is decided here:

* **What a failure means** (``classify``, ``classify_outcome``). A failed attempt is one of:
  an *answer* or a *refusal* the caller must see (a typed ``kvstore.errors`` exception, raised
  at once); **not applied** (no leader, not the leader, queue full, never sent: retrying is
  safe anywhere, even without a session); or **outcome unknown** (a timeout, a leader lost
  mid-proposal, a connection dropped after the request left: only a session makes a retry
  safe, because the cluster answers a repeated series id from its cache).
  A lone ``Propose`` says which with its gRPC status; each proposal of a ``ProposeBatch`` says
  it with its own ``Fate``, which the server derives from the very status a lone ``Propose``
  would have got (``fate_of_status``, shared by both ends), so the two paths cannot disagree.
* **What to do next** (``Attempts``): follow a leader hint at once; else try the next
  endpoint, and after a full pass pause (doubling, capped) while an election runs. With
  ``retry_unknown`` (a session, or a read) one attempt gets at most a quarter of the deadline,
  so a node that hangs cannot use it all up; without, the first unknown outcome is final
  (``OutcomeUnknown``). At the deadline: ``OutcomeUnknown`` if any attempt may have been
  applied, else ``Unavailable``.
* **Which pooled sessions serve again** (``pooled_session_fate``).

Nothing here sleeps, reads a clock or touches a socket: the callers pass ``now`` in, and a
unit test can drive every rule with made-up failures.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import grpc

from kvstore import api_errors, errors, results
from kvstore.proto import api_pb2
from kvstore.proto.log_pb2 import Code, Result

RETRY_BACKOFF = (0.01, 0.2)
"""First and longest pause between passes over the endpoints when no leader is known (an
election is on)."""
ATTEMPT_SHARE = 0.25
MIN_ATTEMPT = 0.5
"""When a retry is safe, one attempt gets at most a quarter of the deadline (and at least
0.5 s), so a node that hangs (paused, partitioned) cannot use up the whole deadline: the next
attempt goes to another node."""

NEVER_SENT = ("failed to connect", "connection refused", "dns resolution failed",
              "name resolution")
"""What gRPC says (UNAVAILABLE) when the request never left: certainly not applied."""
TLS_TROUBLE = ("socket closed", "handshake failed")
"""What gRPC says when a node closed the connection at the TLS handshake (``kvstore.tls``)."""

_UNKNOWN_STATUSES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})
_STATUS_BY_NUMBER: Mapping[int, grpc.StatusCode] = {s.value[0]: s for s in grpc.StatusCode}


class Fate(enum.IntEnum):
    """What became of one proposal that got no answer (``api.proto``'s ``Fate``)."""

    ANSWERED = api_pb2.FATE_ANSWERED
    NOT_APPLIED = api_pb2.FATE_NOT_APPLIED
    OUTCOME_UNKNOWN = api_pb2.FATE_OUTCOME_UNKNOWN
    REFUSED = api_pb2.FATE_REFUSED


@dataclass(frozen=True)
class Failure:
    """One failed attempt as the rules see it: ``error`` to raise now, or a retryable fate."""

    fate: Fate
    detail: str
    error: errors.KVError | None = None
    leader: str = ""
    """The leader's API address, when the node that refused knew it."""
    tls_suspect: bool = False
    """The connection closed at the handshake: perhaps our certificate (``kvstore.tls``)."""


def fate_of_status(code: grpc.StatusCode, details: str,
                   metadata: Mapping[str, str | bytes]) -> Fate:
    """The fate a gRPC status tells, for a call that carried no state-machine answer.

    ``kv-reason`` in the metadata means the *node* refused (rather than the transport
    failing), which is what makes UNAVAILABLE and RESOURCE_EXHAUSTED certain.
    """
    node_answered = api_errors.REASON_METADATA_KEY in metadata
    if metadata.get(api_errors.REASON_METADATA_KEY) == api_errors.MEMBERSHIP_REFUSED:
        return Fate.REFUSED
    if code in (api_errors.NOT_APPLIED_STATUS, api_errors.QUEUE_FULL_STATUS) and node_answered:
        return Fate.NOT_APPLIED
    if code == grpc.StatusCode.UNAVAILABLE and any(s in details.lower() for s in NEVER_SENT):
        return Fate.NOT_APPLIED
    if code in _UNKNOWN_STATUSES:
        return Fate.OUTCOME_UNKNOWN
    return Fate.REFUSED


def classify(code: grpc.StatusCode, details: str,
             metadata: Mapping[str, str | bytes]) -> Failure:
    """What a failed call means (a lone RPC's status, or a whole batch's)."""
    encoded = metadata.get(api_errors.RESULT_METADATA_KEY)
    if isinstance(encoded, bytes):
        result = results.decode(encoded)
        return Failure(Fate.ANSWERED, details, error=result_error(result))
    fate = fate_of_status(code, details, metadata)
    hint = metadata.get(api_errors.LEADER_METADATA_KEY, "")
    leader = hint if isinstance(hint, str) else ""
    reason = metadata.get(api_errors.REASON_METADATA_KEY)
    if fate is Fate.REFUSED:
        return Failure(fate, details, error=refusal_error(code, details, reason))
    return Failure(fate, details, leader=leader,
                   tls_suspect=code == grpc.StatusCode.UNAVAILABLE
                   and any(s in details.lower() for s in TLS_TROUBLE))


def classify_outcome(outcome: api_pb2.ProposeOutcome) -> Result | Failure:
    """One proposal's share of a ``ProposeBatch`` answer: its result, or what failed."""
    if outcome.fate == Fate.ANSWERED:
        if outcome.result.code == Code.OK:
            return outcome.result
        return Failure(Fate.ANSWERED, outcome.result.message,
                       error=result_error(outcome.result))
    code = _STATUS_BY_NUMBER.get(outcome.code, grpc.StatusCode.UNKNOWN)
    if outcome.fate == Fate.NOT_APPLIED:
        return Failure(Fate.NOT_APPLIED, outcome.message, leader=outcome.leader)
    if outcome.fate == Fate.OUTCOME_UNKNOWN:
        return Failure(Fate.OUTCOME_UNKNOWN, outcome.message)
    return Failure(Fate.REFUSED, outcome.message,
                   error=refusal_error(code, outcome.message, outcome.reason or None))


def result_error(result: Result) -> errors.KVError:
    """The typed exception of a state-machine error answer (``api_errors.RESULT_ERRORS``)."""
    _, error_type = api_errors.RESULT_ERRORS[result.code]
    message = f"{results.code_name(result)}: {result.message}"
    if issubclass(error_type, errors.ResultError):
        return error_type(message, result)
    return error_type(message)


def refusal_error(code: grpc.StatusCode, details: str,
                  reason: str | bytes | None) -> errors.KVError:
    """The typed exception of a refusal before the log (nothing applied, retrying cannot help)."""
    if reason == api_errors.MEMBERSHIP_REFUSED:
        return errors.MembershipRefused(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.Unauthenticated(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return errors.PermissionDenied(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION and "cluster mismatch" in details:
        return errors.ClusterMismatch(details)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return errors.InvalidArgument(details)
    return errors.KVError(f"{code.name}: {details}")


@dataclass(frozen=True)
class Call:
    """Next step: one attempt at ``endpoint``, allowed ``timeout`` seconds."""

    endpoint: str
    timeout: float


@dataclass(frozen=True)
class Pause:
    """Next step: wait ``seconds`` (no endpoint answered this pass), then ask again."""

    seconds: float


class Attempts:
    """The retry state of one request: ``next`` says what to do, ``failed`` hears how it went.

    A pass tries the endpoints in the client's rotation (the last known leader first); a leader
    hint ends the pass and starts a new one at once (the caller adopts the hint, so its
    rotation begins there). After a pass without an answer comes a ``Pause``.
    """

    def __init__(self, total: float, now: float, *, retry_unknown: bool,
                 any_node: bool = False, cap_attempts: bool = True) -> None:
        self.deadline = now + total
        self.retry_unknown = retry_unknown
        self.any_node = any_node
        self.attempt_cap = (max(MIN_ATTEMPT, total * ATTEMPT_SHARE)
                            if retry_unknown and cap_attempts else total)
        self.maybe_applied = False
        """Some attempt may have been applied: the deadline then means ``OutcomeUnknown``."""
        self.last_error = "no attempt made"
        self._backoff = RETRY_BACKOFF[0]
        self._left: list[str] = []
        self._pause_due = False

    def remaining(self, now: float) -> float:
        return self.deadline - now

    def next(self, now: float, rotation: Callable[[], list[str]]) -> Call | Pause:
        """The next step; raises ``OutcomeUnknown`` or ``Unavailable`` at the deadline."""
        remaining = self.deadline - now
        if remaining <= 0:
            raise self.timed_out()
        if self._pause_due:
            self._pause_due = False
            pause = min(self._backoff, remaining)
            self._backoff = min(self._backoff * 2, RETRY_BACKOFF[1])
            return Pause(pause)
        if not self._left:
            self._left = rotation()
        endpoint = self._left.pop(0)
        self._pause_due = not self._left
        return Call(endpoint, min(remaining, self.attempt_cap))

    def should_explain(self, failure: Failure) -> bool:
        """Whether to ask ``kvstore.tls.explain_refusal`` about this failure (I/O, the caller's
        business): only while nothing may have been applied, so the answer stays exact."""
        return failure.tls_suspect and not self.maybe_applied

    def failed(self, endpoint: str, failure: Failure) -> str:
        """Records a failed attempt at ``endpoint``; raises the error the caller must see, or
        returns the leader hint to adopt ('' for none)."""
        self.last_error = f"{endpoint}: {failure.detail}"
        if failure.error is not None:
            raise failure.error
        if failure.fate is Fate.OUTCOME_UNKNOWN:
            self.maybe_applied = True
            if not self.retry_unknown:
                raise errors.OutcomeUnknown(f"{self.last_error}; the request may have been applied")
        if failure.leader and not self.any_node:
            self._left = []
            self._pause_due = False
            return failure.leader
        return ""

    def timed_out(self) -> errors.KVError:
        if self.maybe_applied:
            return errors.OutcomeUnknown(
                f"timed out; the request may have been applied ({self.last_error}); "
                "retry with the same session")
        return errors.Unavailable(f"no leader reachable: {self.last_error}")


PooledFate = Literal["complete", "unchanged", "drop"]


def pooled_session_fate(error: BaseException | None) -> PooledFate:
    """What a proposal's end means for the pooled session that carried it (``Client.write``).

    ``complete``: the cluster answered (a result, or an error it cached): the session moves on
    and serves again. ``unchanged``: refused before the log: it serves again as it was.
    ``drop``: the outcome is unknown (a late copy may still apply), or the cluster no longer
    knows the session, or the caller stopped waiting (a cancelled task): it must never carry
    another command.
    """
    if error is None:
        return "complete"
    if isinstance(error, (errors.OutcomeUnknown, errors.SessionExpired, errors.AlreadyResponded,
                          errors.SeriesReused)):
        return "drop"
    if isinstance(error, errors.ResultError):
        return "complete"
    if isinstance(error, errors.KVError):
        return "unchanged"
    return "drop"  # anything else (a cancelled task, a bug): the proposal may be on its way
