"""The reserved values of the session protocol.

A series id is a uint64 that numbers one client's proposals. Three of its values are not
proposal numbers: 0 marks a session without deduplication, and the two largest values mark
the requests that open and close a session. Proposals count up from 1 and in practice never
reach the reserved top of the range (2**64 - 2 proposals).
"""

from typing import Final

UINT64_MAX: Final[int] = 2**64 - 1

NOT_SESSION_MANAGED_CLIENT_ID: Final[int] = 0
"""Client id of entries the system makes itself (never a user session's)."""

NOOP_SERIES_ID: Final[int] = 0
"""Series id of a no-op session: every proposal is applied, nothing is deduplicated."""

SERIES_ID_FOR_REGISTER: Final[int] = UINT64_MAX - 1
"""Series id of the request that registers (opens) a session."""

SERIES_ID_FOR_UNREGISTER: Final[int] = UINT64_MAX
"""Series id of the request that unregisters (closes) a session."""

SERIES_ID_FIRST_PROPOSAL: Final[int] = 1
"""Series id of a registered session's first proposal."""
