"""The client session of the exactly-once protocol (Raft thesis 6.3), after dragonboat's ``client``."""

from session.constants import (
    NOOP_SERIES_ID,
    NOT_SESSION_MANAGED_CLIENT_ID,
    SERIES_ID_FIRST_PROPOSAL,
    SERIES_ID_FOR_REGISTER,
    SERIES_ID_FOR_UNREGISTER,
)
from session.errors import (
    ClusterMismatchError,
    SessionDecodeError,
    SessionError,
    SessionInvariantError,
    SessionStateError,
    SessionValueError,
)
from session.session import Session, new_noop_session, new_session

__all__ = [
    "NOOP_SERIES_ID",
    "NOT_SESSION_MANAGED_CLIENT_ID",
    "SERIES_ID_FIRST_PROPOSAL",
    "SERIES_ID_FOR_REGISTER",
    "SERIES_ID_FOR_UNREGISTER",
    "ClusterMismatchError",
    "Session",
    "SessionDecodeError",
    "SessionError",
    "SessionInvariantError",
    "SessionStateError",
    "SessionValueError",
    "new_noop_session",
    "new_session",
]
