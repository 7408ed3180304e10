"""Known bugs planted on purpose, to show that ``kv check`` catches what it claims to catch.

A checker that never fails proves nothing. ``kv check --planted-bug no-dedup`` runs the nodes
with ``NoDedupStateMachine``: sessions are still registered, but every proposal is applied as
if its session were a no-op session, so a retried proposal is applied again. The list-append
checker must then find duplicates and the counter checker an overcount.
"""

from __future__ import annotations

from kvstore.entry import decode_entry
from kvstore.state_machine import StateMachine
from session.constants import NOOP_SERIES_ID, SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER
from session.wire import WireDecodeError


class NoDedupStateMachine(StateMachine):
    """The real state machine with deduplication turned off for proposals (rule 8 skipped)."""

    def apply(self, entry: bytes) -> bytes:
        try:
            decoded = decode_entry(entry)
        except WireDecodeError:
            return super().apply(entry)
        session = decoded.session
        if session.client_id and session.series_id not in (SERIES_ID_FOR_REGISTER,
                                                            SERIES_ID_FOR_UNREGISTER):
            session.series_id = NOOP_SERIES_ID
            return super().apply(decoded.SerializeToString(deterministic=True))
        return super().apply(entry)


PLANTED_BUGS: dict[str, type[StateMachine]] = {"no-dedup": NoDedupStateMachine}
