"""Exceptions of the client API, one per thing the caller must do differently.

The split that matters for exactly-once is between *not applied* and *outcome unknown*:

* ``Unavailable``: the request was definitely not applied (no leader, not the leader, queue
  full). Retrying anywhere is safe, even without a session.
* ``OutcomeUnknown``: the request may or may not have been applied (timeout, leadership lost
  mid-proposal, connection dropped after sending). Retry it with the *same* session and series
  id: the session makes the retry safe. Without a session a retry may apply it twice.
"""

from __future__ import annotations

from kvstore.proto.log_pb2 import Result


class KVError(Exception):
    """Base class of every client-side error."""

    exit_code = 1
    """The CLI's exit code for this error (etcdctl's conventions where they exist)."""


class Unavailable(KVError):
    """Not applied: no leader, not the leader, queue full, or no endpoint reachable."""

    exit_code = 2


class OutcomeUnknown(KVError):
    """May or may not have been applied; retry with the same session and series id."""

    exit_code = 4


class InvalidArgument(KVError):
    """Refused: a malformed request, an empty key, a key or value over the limit."""

    exit_code = 3


class ClusterMismatch(KVError):
    """The session or request names another cluster than the one that answered."""

    exit_code = 3


class MembershipRefused(KVError):
    """The leader refused a membership change that must not be made now: it would lose the
    quorum, the learner is not caught up, the member does not exist... Nothing changed."""


class ResultError(KVError):
    """The state machine answered with an error; ``result`` holds its full answer."""

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


class SessionExpired(ResultError):
    """The session is not registered (never opened, closed, or evicted from the LRU store).

    The outcome of its earlier proposals is unknown; open a new session.
    """


class AlreadyResponded(ResultError):
    """The series id was already acknowledged by this session: a stale copy of the session."""


class SeriesReused(ResultError):
    """The series id was already used by this session for another command: nothing applied.

    Not retryable: it is a client bug (two clients sharing one session, or an old copy of a
    session restored), and the same request gets the same answer until the session's owner
    acknowledges that series. The session must not move on either: this was not an answer.
    """

    exit_code = 3


class CommandFailed(ResultError):
    """The command ran and failed deterministically (``incr`` on a non-integer, int64 overflow).

    Like every ``ResultError`` but ``SessionExpired``, ``AlreadyResponded`` and
    ``SeriesReused``, it is an *answer*: the cluster cached it under the proposal's series id,
    so the session moves on (``proposal_completed()``), and a retry of that series gets the
    same error.
    """


class InvalidCommand(CommandFailed):
    """The state machine refused the command as invalid: an answer, cached like any other.

    Most invalid commands are refused before the log (``InvalidArgument``); this one got there,
    for example an ``append`` that would grow a value past 1 MiB.
    """

    exit_code = 3


class AccessDenied(KVError):
    """The node refused the caller's credentials or role: nothing was applied. Retrying with the
    same credentials cannot help."""

    exit_code = 6


class Unauthenticated(AccessDenied):
    """No acceptable client certificate: none given, one from a CA the node does not trust, an
    expired one; or a plaintext client talking to a TLS node (or the reverse)."""


class PermissionDenied(AccessDenied):
    """The certificate's role does not allow the call (a ``readonly`` client writing)."""
