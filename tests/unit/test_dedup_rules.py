"""One test per rule of ``kvstore.dedup.apply_with_session``, through ``StateMachine.apply``.

Rule numbers are those of ``shared/reference/session-api.md`` ("Server side") and of the
comments in ``kvstore/dedup.py``; the protocol is Raft thesis section 6.3. Tests named after
dragonboat's (``TestDuplicatedUpdateWillNotBeAppliedTwice`` ...) port their behaviour.
"""

from __future__ import annotations

import random

from kvstore import StateMachine, encode_entry, ops, results
from kvstore.proto.log_pb2 import Code, Command, Result
from session import Session, new_noop_session, new_session

CLUSTER = 11


class Client:
    """A test client that follows the protocol: register, propose, complete, unregister."""

    def __init__(self, sm: StateMachine, seed: int) -> None:
        self.sm = sm
        self.session = new_session(CLUSTER, random.Random(seed))

    def register(self) -> Result:
        self.session.prepare_for_register()
        result = self.send(encode_entry(self.session))
        self.session.prepare_for_propose()
        return result

    def unregister(self) -> Result:
        saved = self.session.series_id
        self.session.prepare_for_unregister()
        entry = encode_entry(self.session)
        self.session.series_id = saved
        return self.send(entry)

    def entry(self, command: Command) -> bytes:
        """The bytes of the current proposal; sending them again is a retry."""
        return encode_entry(self.session, command)

    def propose(self, command: Command) -> tuple[bytes, Result]:
        entry = self.entry(command)
        result = self.send(entry)
        self.session.proposal_completed()
        return entry, result

    def send(self, entry: bytes) -> Result:
        return results.decode(self.sm.apply(entry))


def counter(sm: StateMachine, key: bytes = b"n") -> int:
    return int(sm.data.get(key, b"0"))


def lru_order(sm: StateMachine) -> list[int]:
    return [s.client_id for s in sm.sessions]


class TestRule1NotSessionManaged:
    def test_client_id_zero_is_applied_every_time_without_a_session(self) -> None:
        sm = StateMachine(CLUSTER)
        entry = encode_entry(Session(cluster_id=CLUSTER, client_id=0, series_id=7), ops.incr(b"n"))
        for _ in range(3):
            assert results.decode(sm.apply(entry)).code == Code.OK
        assert counter(sm) == 3 and len(sm.sessions) == 0


class TestRule2NoopSession:
    def test_noop_session_is_applied_every_time(self) -> None:
        """What sessions prevent: without one, a retry is a second increment."""
        sm = StateMachine(CLUSTER)
        entry = encode_entry(new_noop_session(CLUSTER, random.Random(1)), ops.incr(b"n"))
        values = [results.decode(sm.apply(entry)).number for _ in range(3)]
        assert values == [1, 2, 3] and len(sm.sessions) == 0

    def test_noop_session_needs_no_registration(self) -> None:
        sm = StateMachine(CLUSTER)
        entry = encode_entry(new_noop_session(CLUSTER), ops.put(b"k", b"v"))
        assert results.decode(sm.apply(entry)).code == Code.OK


class TestRule3Register:
    def test_register_creates_the_session(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        assert client.register().code == Code.OK
        assert lru_order(sm) == [client.session.client_id]

    def test_register_evicts_the_least_recently_used_session_when_full(self) -> None:
        sm = StateMachine(CLUSTER, session_capacity=2)
        a, b, c = Client(sm, 1), Client(sm, 2), Client(sm, 3)
        a.register()
        b.register()
        a.propose(ops.put(b"k", b"v"))  # a is now more recent than b
        c.register()
        assert lru_order(sm) == [a.session.client_id, c.session.client_id]
        assert b.propose(ops.incr(b"n"))[1].code == Code.SESSION_EXPIRED

    def test_retried_register_succeeds_and_keeps_cached_results(self) -> None:
        """Our difference from dragonboat: a client that lost the register answer may retry."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        entry = client.entry(ops.incr(b"n"))
        first = client.send(entry)
        client.session.prepare_for_register()
        assert client.send(encode_entry(client.session)).code == Code.OK
        assert client.send(entry) == first and counter(sm) == 1


class TestRule4Unregister:
    def test_unregister_removes_the_session(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        assert client.unregister().code == Code.OK
        assert len(sm.sessions) == 0
        assert client.propose(ops.incr(b"n"))[1].code == Code.SESSION_EXPIRED

    def test_retried_unregister_succeeds(self) -> None:
        """Our difference from dragonboat: closing a session that is gone is not an error."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        assert client.unregister().code == Code.OK
        assert client.unregister().code == Code.OK


class TestRule5UnknownSession:
    def test_update_from_unregistered_client_will_be_reported(self) -> None:
        """dragonboat TestUpdateFromUnregisteredClientWillBeReported; ours is SESSION_EXPIRED."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.session.prepare_for_propose()
        result = client.propose(ops.incr(b"n"))[1]
        assert result.code == Code.SESSION_EXPIRED and "open a new session" in result.message
        assert counter(sm) == 0

    def test_lookup_marks_the_session_most_recently_used(self) -> None:
        sm = StateMachine(CLUSTER, session_capacity=3)
        a, b, c = Client(sm, 1), Client(sm, 2), Client(sm, 3)
        for client in (a, b, c):
            client.register()
        a.propose(ops.get(b"k"))
        assert lru_order(sm) == [b.session.client_id, c.session.client_id, a.session.client_id]

    def test_an_expired_session_leaves_the_store_unchanged(self) -> None:
        sm = StateMachine(CLUSTER, session_capacity=2)
        a, stranger = Client(sm, 1), Client(sm, 2)
        a.register()
        before = sm.snapshot()
        stranger.session.prepare_for_propose()
        stranger.propose(ops.put(b"k", b"v"))
        assert sm.snapshot() == before


class TestRule6ClearTo:
    def test_responded_to_drops_cached_results(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        client.propose(ops.incr(b"n"))
        stored = sm.sessions.peek(client.session.client_id)
        assert stored is not None and sorted(stored.responses) == [1]
        client.propose(ops.incr(b"n"))  # carries responded_to=1
        assert sorted(stored.responses) == [2] and stored.responded_to == 1

    def test_an_older_responded_to_arriving_late_changes_nothing(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        client.propose(ops.incr(b"n"))
        client.propose(ops.incr(b"n"))
        client.propose(ops.incr(b"n"))  # responded_to=2 is now recorded
        stale = Session(CLUSTER, client.session.client_id, series_id=4, responded_to=1)
        assert client.send(encode_entry(stale, ops.incr(b"n"))).number == 4
        stored = sm.sessions.peek(client.session.client_id)
        assert stored is not None and stored.responded_to == 2


class TestRule7AlreadyResponded:
    def test_responded_update_will_not_be_applied_twice(self) -> None:
        """dragonboat TestRespondedUpdateWillNotBeAppliedTwice; ours answers ALREADY_RESPONDED."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        old_entry, _ = client.propose(ops.incr(b"n"))
        client.propose(ops.incr(b"n"))  # carries responded_to=1
        late_copy = client.send(old_entry)
        assert late_copy.code == Code.ALREADY_RESPONDED
        assert counter(sm) == 2


class TestRule8CachedResult:
    def test_duplicated_update_will_not_be_applied_twice(self) -> None:
        """dragonboat TestDuplicatedUpdateWillNotBeAppliedTwice; thesis 6.3."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        entry = client.entry(ops.incr(b"n", 5))
        first = sm.apply(entry)
        assert sm.apply(entry) == first and sm.apply(entry) == first
        assert counter(sm) == 5

    def test_retry_after_other_clients_wrote_returns_the_original_answer(self) -> None:
        sm = StateMachine(CLUSTER)
        a, b = Client(sm, 1), Client(sm, 2)
        a.register()
        b.register()
        entry = a.entry(ops.incr(b"n"))
        first = a.send(entry)
        b.propose(ops.incr(b"n", 10))
        assert a.send(entry) == first and first.number == 1 and counter(sm) == 11

    def test_error_results_are_cached_too(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        sm.data[b"s"] = b"text"
        entry = client.entry(ops.incr(b"s"))
        assert client.send(entry).code == Code.WRONG_TYPE
        sm.data[b"s"] = b"1"  # even if the key changed since, the retry gets the same answer
        assert client.send(entry).code == Code.WRONG_TYPE


class TestRule9FirstApplication:
    def test_new_series_is_applied_and_cached(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        entry = client.entry(ops.append(b"log", b"x"))
        assert client.send(entry).length == 1
        stored = sm.sessions.peek(client.session.client_id)
        assert stored is not None and stored.cached_response(1) == sm.apply(entry)


class TestBeforeTheRules:
    def test_wrong_cluster_is_rejected_without_touching_anything(self) -> None:
        sm = StateMachine(CLUSTER)
        before = sm.snapshot()
        entry = encode_entry(new_noop_session(CLUSTER + 1), ops.put(b"k", b"v"))
        assert results.decode(sm.apply(entry)).code == Code.CLUSTER_MISMATCH
        assert sm.snapshot() == before

    def test_garbage_is_a_malformed_entry_result(self) -> None:
        sm = StateMachine(CLUSTER)
        assert results.decode(sm.apply(b"\xff\xff\xff")).code == Code.MALFORMED_ENTRY
        assert results.decode(sm.apply(b"")).code == Code.MALFORMED_ENTRY  # no session

    def test_proposal_without_command_is_invalid(self) -> None:
        sm = StateMachine(CLUSTER)
        entry = encode_entry(new_noop_session(CLUSTER))
        assert results.decode(sm.apply(entry)).code == Code.INVALID_ARGUMENT


class TestSnapshotOfSessions:
    def test_lru_session_can_be_saved_and_restored_with_lru_order_preserved(self) -> None:
        """dragonboat TestLRUSessionCanBeSavedAndRestoredWithLRUOrderPreserved."""
        sm = StateMachine(CLUSTER, session_capacity=4)
        clients = [Client(sm, seed) for seed in range(4)]
        for client in clients:
            client.register()
        for client in (clients[2], clients[0], clients[3]):
            client.propose(ops.incr(b"n"))
        restored = StateMachine(CLUSTER)
        restored.restore(sm.snapshot())
        assert lru_order(restored) == lru_order(sm)
        assert restored.sessions.capacity == 4

    def test_session_save_order_with_eviction(self) -> None:
        """dragonboat TestSessionSaveOrderWithEviction: a restored replica evicts the same one."""
        sm = StateMachine(CLUSTER, session_capacity=3)
        a, b, c, d = (Client(sm, seed) for seed in range(4))
        for client in (a, b, c):
            client.register()
        b.propose(ops.incr(b"n"))
        a.propose(ops.incr(b"n"))  # LRU order now: c, b, a
        restored = StateMachine(CLUSTER)
        restored.restore(sm.snapshot())
        d.sm = restored
        d.register()
        assert c.session.client_id not in restored.sessions
        d.sm = sm
        d.register()
        assert lru_order(restored) == lru_order(sm)
        assert restored.snapshot() == sm.snapshot()

    def test_retry_after_restore_is_answered_from_the_cache(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        entry = client.entry(ops.incr(b"n"))
        first = sm.apply(entry)
        restored = StateMachine(CLUSTER)
        restored.restore(sm.snapshot())
        assert restored.apply(entry) == first and counter(restored) == 1
