"""Size limits and defaults of the replicated state.

They are checked while applying, so they are part of the protocol: every replica must use the
same values, or one replica would accept an entry that another rejects and their states would
part. Clients check them too, to refuse bad requests before they reach the log.
"""

from typing import Final

MAX_KEY_BYTES: Final[int] = 4 * 1024
"""Longest key, in bytes. Keys are never empty."""

MAX_VALUE_BYTES: Final[int] = 1024 * 1024
"""Longest value, in bytes, including a value grown by ``append``."""

DEFAULT_SESSION_CAPACITY: Final[int] = 4096
"""Sessions kept before the least recently used is evicted (dragonboat's default)."""

INT64_MIN: Final[int] = -(2**63)
INT64_MAX: Final[int] = 2**63 - 1
