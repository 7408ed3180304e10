"""The exactly-once rule: how an entry is applied against the session store.

This function is the one place where the protocol of Raft thesis section 6.3 is decided;
the tests (``tests/unit/test_dedup_rules.py``) and the README's table point here.

Why it works. A client retries a proposal with the same ``series_id`` until it gets an answer.
Each retry may commit: the log can hold the same proposal several times. The first copy to be
applied runs the command and caches the result under (client id, series id); every later
copy finds the cache and returns the same bytes without running the command again. Because the
store changes only while applying committed entries, every replica makes the same decision for
every copy. The client's ``responded_to`` lets the store drop results the client has seen.

Where we differ from dragonboat, on purpose (see ``shared/reference/session-api.md``): a
repeated register or unregister succeeds, so session requests can be retried too; an unknown
session gets ``SESSION_EXPIRED`` rather than a generic rejection; a series id the client has
already acknowledged gets ``ALREADY_RESPONDED`` rather than silence.
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore import results
from kvstore.proto.log_pb2 import Code
from kvstore.session_store import SessionStore
from session.constants import (
    NOOP_SERIES_ID,
    NOT_SESSION_MANAGED_CLIENT_ID,
    SERIES_ID_FOR_REGISTER,
    SERIES_ID_FOR_UNREGISTER,
)
from session.session_pb2 import SessionPB

Execute = Callable[[], bytes]
"""Runs the entry's command on the user data and returns the serialized result."""

_OK = results.encode(results.ok())


def apply_with_session(store: SessionStore, session: SessionPB, execute: Execute) -> bytes:
    """Applies one committed entry from ``session``; returns the serialized result.

    ``execute`` is called at most once, and only when the command must take effect.
    """
    client_id, series_id = session.client_id, session.series_id

    # 1. Not session managed (entries the system makes itself): apply, no session logic.
    if client_id == NOT_SESSION_MANAGED_CLIENT_ID:
        return execute()
    # 2. No-op session: the client opted out of deduplication; apply every copy.
    if series_id == NOOP_SERIES_ID:
        return execute()
    # 3. Register: open the session, evicting the least recently used one if the store is
    #    full. Registering an existing session again succeeds and keeps its history.
    if series_id == SERIES_ID_FOR_REGISTER:
        store.register(client_id)
        return _OK
    # 4. Unregister: close the session. Closing one that is not there succeeds too.
    if series_id == SERIES_ID_FOR_UNREGISTER:
        store.unregister(client_id)
        return _OK
    # 5. A proposal: the session must exist (looking it up marks it most recently used).
    client = store.use(client_id)
    if client is None:
        return results.encode(
            results.error(
                Code.SESSION_EXPIRED,
                f"session {client_id} is not registered (never opened, closed or evicted); "
                "the outcome of its earlier proposals is unknown, open a new session",
            )
        )
    # 6. Forget the results the client says it has received.
    client.clear_to(session.responded_to)
    # 7. The client has acknowledged this series id: it cannot be waiting for it.
    if client.has_responded(series_id):
        return results.encode(
            results.error(
                Code.ALREADY_RESPONDED,
                f"series {series_id} of session {client_id} was already answered and "
                f"acknowledged (responded_to={client.responded_to})",
            )
        )
    # 8. A retry of a proposal that was applied: answer from the cache, do not apply again.
    cached = client.cached_response(series_id)
    if cached is not None:
        return cached
    # 9. First time: apply, and cache the result for retries.
    result = execute()
    client.record(series_id, result)
    return result
