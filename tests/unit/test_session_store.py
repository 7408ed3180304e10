"""The LRU session store (``kvstore.session_store``): eviction order and forgetting answers.

The ``clear_to`` cases are dragonboat's ``clearTo`` table tests, restated by behaviour.
"""

from __future__ import annotations

import pytest

from kvstore.session_store import ClientSession, SessionStore


def order(store: SessionStore) -> list[int]:
    return [s.client_id for s in store]


def with_responses(responded_to: int, series: list[int]) -> ClientSession:
    return ClientSession(
        1, responded_to, {s: f"r{s}".encode() for s in series}, {s: b"d%07d" % s for s in series}
    )


class TestClearTo:
    @pytest.mark.parametrize(
        ("responded_to", "series", "clear_to", "kept", "new_responded_to"),
        [
            (0, [1, 2, 3], 0, [1, 2, 3], 0),  # nothing acknowledged
            (0, [1, 2, 3], 1, [2, 3], 1),  # the next one acknowledged
            (0, [1, 2, 3], 2, [3], 2),  # several at once
            (0, [1, 2, 3], 3, [], 3),  # all of them
            (0, [1, 2, 3], 10, [], 10),  # past what is cached
            (5, [6, 7], 3, [6, 7], 5),  # an older value never moves it back
            (5, [6, 7], 5, [6, 7], 5),  # the same value changes nothing
            (5, [6, 8], 6, [8], 6),  # with a gap in the cached series
        ],
    )
    def test_clear_to_table(
        self,
        responded_to: int,
        series: list[int],
        clear_to: int,
        kept: list[int],
        new_responded_to: int,
    ) -> None:
        session = with_responses(responded_to, series)
        session.clear_to(clear_to)
        assert sorted(session.responses) == kept
        assert sorted(session.command_digests) == kept, "a digest goes with its result"
        assert session.responded_to == new_responded_to

    def test_clearing_a_result_restored_without_digest_is_fine(self) -> None:
        """Results from a version-1 snapshot have no digest: dropping them must not fail."""
        session = ClientSession(1, 0, {1: b"r1", 2: b"r2"}, {2: b"d2"})
        session.clear_to(2)
        assert session.responses == {} and session.command_digests == {}

    def test_has_responded_up_to_and_including_responded_to(self) -> None:
        session = ClientSession(1, responded_to=4)
        assert session.has_responded(4) and session.has_responded(1)
        assert not session.has_responded(5)


class TestCachedResults:
    def test_record_keeps_the_result_and_its_command_digest_by_series(self) -> None:
        session = ClientSession(1)
        session.record(1, b"r1", b"d1")
        session.record(2, b"r2", b"d2")
        assert [session.cached_response(s) for s in (1, 2, 3)] == [b"r1", b"r2", None]
        assert [session.command_digest(s) for s in (1, 2, 3)] == [b"d1", b"d2", None]

    def test_a_result_without_digest_has_none(self) -> None:
        session = ClientSession(1, 0, {1: b"r1"})
        assert session.cached_response(1) == b"r1" and session.command_digest(1) is None


class TestLRU:
    def test_register_evicts_least_recently_used_when_full(self) -> None:
        store = SessionStore(capacity=3)
        for client in (1, 2, 3):
            assert store.register(client) is None
        assert store.register(4) == 1
        assert order(store) == [2, 3, 4]

    def test_use_marks_most_recently_used(self) -> None:
        store = SessionStore(capacity=3)
        for client in (1, 2, 3):
            store.register(client)
        store.use(1)
        assert store.register(4) == 2, "1 was used after 2, so 2 is evicted"
        assert order(store) == [3, 1, 4]

    def test_peek_does_not_touch_the_order(self) -> None:
        store = SessionStore(capacity=2)
        store.register(1)
        store.register(2)
        assert store.peek(1) is not None
        assert order(store) == [1, 2]

    def test_register_existing_keeps_history_and_marks_used(self) -> None:
        store = SessionStore(capacity=3)
        store.register(1)
        store.register(2)
        store.use(1).record(1, b"cached", b"digest-1")  # type: ignore[union-attr]
        assert store.register(1) is None
        assert order(store) == [2, 1]
        assert store.peek(1).cached_response(1) == b"cached"  # type: ignore[union-attr]
        assert store.peek(1).command_digest(1) == b"digest-1"  # type: ignore[union-attr]

    def test_unregister(self) -> None:
        store = SessionStore(capacity=2)
        store.register(1)
        assert store.unregister(1) and 1 not in store
        assert not store.unregister(1)

    def test_capacity_must_be_positive(self) -> None:
        with pytest.raises(ValueError):
            SessionStore(0)

    def test_restore_keeps_the_given_order(self) -> None:
        store = SessionStore(capacity=3)
        store.restore([ClientSession(3), ClientSession(1), ClientSession(2)])
        assert order(store) == [3, 1, 2]
        assert store.register(4) == 3

    def test_restore_refuses_duplicates_and_overflow(self) -> None:
        store = SessionStore(capacity=2)
        with pytest.raises(ValueError, match="^duplicate client id in the sessions to restore$"):
            store.restore([ClientSession(1), ClientSession(1)])
        with pytest.raises(ValueError, match="^3 sessions exceed the capacity 2$"):
            store.restore([ClientSession(1), ClientSession(2), ClientSession(3)])
