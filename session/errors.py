"""Exceptions raised for misuse of a client session.

Each names one broken rule, so a caller can tell a programming error (calling the protocol's
steps out of order) from bad bytes or a session meant for another cluster.
"""


class SessionError(Exception):
    """Base class of every session error."""


class SessionStateError(SessionError):
    """A protocol step was called in a state where it is not allowed.

    For example ``proposal_completed()`` when the series id is not ``responded_to + 1``, or
    ``prepare_for_propose()`` on a session that has already made proposals (that would reuse
    series ids the cluster has already seen, and its retries would be answered with old results).
    """


class SessionInvariantError(SessionError):
    """The session's fields contradict each other (``responded_to > series_id``)."""


class ClusterMismatchError(SessionError):
    """The session belongs to another cluster than the one it is used with."""


class SessionDecodeError(SessionError, ValueError):
    """Bytes that are not a valid encoding of a session."""


class SessionValueError(SessionError, ValueError):
    """A field outside the uint64 range."""
