"""One test per rule of ``kvstore.dedup.apply_with_session``, through ``StateMachine.apply``.

Rule numbers are those of ``shared/reference/session-api.md`` ("Server side") and of the
comments in ``kvstore/dedup.py``; the protocol is Raft thesis section 6.3. Tests named after
dragonboat's (``TestDuplicatedUpdateWillNotBeAppliedTwice`` ...) port their behaviour. Rule 8b
(a series id reused for another command) is ours: dragonboat answers it from the cache.
"""

from __future__ import annotations

import random

import pytest

from kvstore import StateMachine, encode_entry, ops, results
from kvstore.dedup import COMMAND_DIGEST_SIZE, command_digest
from kvstore.entry import command_bytes, decode_entry, encode_batch
from kvstore.proto.log_pb2 import Code, Command, Entry, Result
from session import Session, new_noop_session, new_session
from session.constants import UINT64_MAX
from tests.unit.old_snapshots import as_version_1

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


def reused(client: Client, command: Command) -> Result:
    """``command`` proposed under the client's current series id, as a copy of its session
    (another client, an old file) would send it; the client's own session does not move."""
    return client.send(encode_entry(client.session, command))


class TestRule8bSeriesReused:
    """A cached result answers only the command that produced it (ours; dragonboat and LogCabin
    answer any command under a cached series id with the cached result)."""

    def test_another_command_under_a_cached_series_is_refused_and_nothing_applied(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        first = client.send(client.entry(ops.put(b"y", b"1")))
        before = sm.snapshot()
        refused = reused(client, ops.incr(b"x"))
        assert refused.code == Code.SERIES_REUSED
        assert f"series 1 of session {client.session.client_id}" in refused.message
        assert b"x" not in sm.data, "the other command must not be applied"
        assert sm.snapshot() == before, "nothing changes: no data, no cache, no acknowledgement"
        assert client.send(client.entry(ops.put(b"y", b"1"))) == first, "the cache still holds"

    def test_the_same_command_again_is_a_retry(self) -> None:
        """Byte for byte the same command: the cached answer, as in rule 8."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        first = sm.apply(client.entry(ops.incr(b"n", 3)))
        again = encode_entry(client.session, ops.incr(b"n", 3))  # encoded anew, same bytes
        assert sm.apply(again) == first and counter(sm) == 3

    @pytest.mark.parametrize(
        ("original", "other"),
        [
            (ops.put(b"k", b"x" * 30), ops.append(b"k", b"x" * 30)),  # only the op's tag differs
            (ops.put(b"k", b"x" * 30), ops.put(b"k", b"x" * 29 + b"y")),  # only the last byte
            (ops.incr(b"n", 1), ops.incr(b"n", 2)),
            (ops.delete(b"k"), ops.delete(b"k", prefix=True)),
            (ops.get(b"k"), Command()),  # a proposal without a command: empty command bytes
            (Command(), ops.get(b"k")),
        ],
        ids=["op", "last byte", "delta", "flag", "to no command", "from no command"],
    )
    def test_any_difference_in_the_command_is_seen(self, original: Command, other: Command) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        first = client.send(client.entry(original))
        assert reused(client, other).code == Code.SERIES_REUSED
        assert client.send(client.entry(original)) == first

    def test_only_the_command_is_digested_not_responded_to(self) -> None:
        """A copy of the same proposal that carries an older ``responded_to`` (a copy of the
        entry from before the client saw an answer it reported since) is still a retry."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        client.propose(ops.incr(b"n"))
        client.propose(ops.incr(b"n"))
        entry = client.entry(ops.incr(b"n"))  # series 3, responded_to 2
        first = client.send(entry)
        older = Session(CLUSTER, client.session.client_id, series_id=3, responded_to=1)
        assert client.send(encode_entry(older, ops.incr(b"n"))) == first and counter(sm) == 3

    def test_a_different_command_after_the_series_was_acknowledged_is_already_responded(
        self,
    ) -> None:
        """Rule 7 comes first, as before: once responded_to passed the series, its result and
        digest are gone, and every copy, of whatever command, is ALREADY_RESPONDED."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        copy = Session(**{f: getattr(client.session, f) for f in
                          ("cluster_id", "client_id", "series_id", "responded_to")})
        client.propose(ops.put(b"y", b"1"))
        client.propose(ops.put(b"y", b"2"))  # carries responded_to=1
        late = client.send(encode_entry(copy, ops.incr(b"x")))
        assert late.code == Code.ALREADY_RESPONDED and b"x" not in sm.data

    def test_a_copy_that_acknowledges_its_own_series_is_already_responded(self) -> None:
        """The entry itself carries responded_to >= series_id: rule 6 drops the cached result
        first, so rule 7 answers, not 8b."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        client.send(client.entry(ops.put(b"y", b"1")))
        odd = Session(CLUSTER, client.session.client_id, series_id=1, responded_to=1)
        assert client.send(encode_entry(odd, ops.incr(b"x"))).code == Code.ALREADY_RESPONDED

    def test_the_session_carries_on_after_a_refusal(self) -> None:
        """The owner of the session is unaffected: its retry is answered, its next series
        applies; and the refused copy, sent again, is refused again."""
        sm = StateMachine(CLUSTER)
        owner = Client(sm, 1)
        owner.register()
        copy = Session(CLUSTER, owner.session.client_id, series_id=1, responded_to=0)
        owner.propose(ops.incr(b"n"))
        for _ in range(2):
            assert owner.send(encode_entry(copy, ops.put(b"n", b"100"))).code == Code.SERIES_REUSED
        assert owner.propose(ops.incr(b"n"))[1].number == 2 and counter(sm) == 2

    def test_two_copies_in_one_batch(self) -> None:
        """Group commit: each entry of a batch is deduplicated on its own, in order."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        one, other = client.entry(ops.incr(b"n")), client.entry(ops.put(b"n", b"9"))
        answers = [results.decode(r) for r in sm.apply_batch(encode_batch([one, other, one]))]
        assert [a.code for a in answers] == [Code.OK, Code.SERIES_REUSED, Code.OK]
        assert answers[2].number == 1 and counter(sm) == 1

    def test_a_retried_register_keeps_the_digests(self) -> None:
        """Rule 3 keeps an existing session's history, digests included."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        client.send(client.entry(ops.incr(b"n")))
        series = client.session.series_id
        client.session.prepare_for_register()
        client.send(encode_entry(client.session))
        client.session.series_id = series
        assert reused(client, ops.incr(b"m")).code == Code.SERIES_REUSED

    def test_a_session_opened_again_after_unregister_starts_with_no_digests(self) -> None:
        """Rule 4 forgets the session: the same client id registered again has an empty
        cache (the "very late register" limit of the README), so series 1 applies anew."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        client.send(client.entry(ops.incr(b"n")))
        client.unregister()
        client.register()
        assert reused(client, ops.incr(b"m")).number == 1

    def test_noop_and_system_entries_keep_no_digest(self) -> None:
        """Rules 1 and 2 come first: the same series fields with other commands all apply."""
        sm = StateMachine(CLUSTER)
        noop = new_noop_session(CLUSTER, random.Random(2))
        system = Session(CLUSTER, 0, series_id=1)
        for session in (noop, system):
            sm.apply(encode_entry(session, ops.incr(b"n")))
            other = results.decode(sm.apply(encode_entry(session, ops.incr(b"n", 10))))
            assert other.code == Code.OK
        assert counter(sm) == 22 and len(sm.sessions) == 0

    def test_a_result_restored_without_digest_answers_any_command(self) -> None:
        """A version-1 snapshot holds results without digests: they keep answering every
        copy of their series from the cache, as they did, until acknowledged."""
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        first = client.send(client.entry(ops.put(b"y", b"1")))
        restored = StateMachine(CLUSTER)
        restored.restore(as_version_1(sm.snapshot()))
        client.sm = restored
        assert reused(client, ops.incr(b"x")) == first and b"x" not in restored.data
        client.session.proposal_completed()  # the answer arrived; series 2 has a digest again
        client.send(client.entry(ops.incr(b"n")))
        assert reused(client, ops.incr(b"m")).code == Code.SERIES_REUSED


class TestWhatIsDigested:
    def test_the_digest_recorded_is_that_of_the_entrys_command_bytes(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        entry = client.entry(ops.put(b"k", b"v"))
        client.send(entry)
        stored = sm.sessions.peek(client.session.client_id)
        assert stored is not None
        assert stored.command_digest(1) == command_digest(command_bytes(entry))

    def test_the_digest_is_xxh3_64_and_never_changes(self) -> None:
        """Digests are replicated state and live in snapshots: a library whose output moved
        would make replicas disagree. XXH3-64 of the empty input is xxHash's published value."""
        assert command_digest(b"") == bytes.fromhex("2d06800538d394c2")
        get_k = command_bytes(encode_entry(Session(CLUSTER, 1, 1, 0), ops.get(b"k")))
        assert get_k == bytes.fromhex("12051a030a016b")
        assert command_digest(get_k) == bytes.fromhex("87f20d2942553dc6")
        assert len(command_digest(b"x" * 1000)) == COMMAND_DIGEST_SIZE == 8

    @pytest.mark.parametrize(
        "session",
        [Session(CLUSTER, 1, 1, 0), Session(UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX),
         Session(0, 0, 0, 0)],
        ids=["small", "largest", "zeros"],
    )
    @pytest.mark.parametrize(
        "command", [ops.put(b"k", b"v" * 300), ops.get(b""), Command(), None],
        ids=["put", "empty key", "empty command", "no command"],
    )
    def test_command_bytes_is_the_encoded_command_field(
        self, session: Session, command: Command | None
    ) -> None:
        """``command_bytes`` slices the entry's own bytes: they must be exactly the command's
        encoding (field 2) for every session, the largest one included."""
        entry = encode_entry(session, command)
        decode_entry(entry)  # canonical
        expected = b"" if command is None else Entry(command=command).SerializeToString(
            deterministic=True)
        assert command_bytes(entry) == expected


class TestRule9FirstApplication:
    def test_new_series_is_applied_and_cached(self) -> None:
        sm = StateMachine(CLUSTER)
        client = Client(sm, 1)
        client.register()
        entry = client.entry(ops.append(b"log", b"x"))
        assert client.send(entry).length == 1
        stored = sm.sessions.peek(client.session.client_id)
        assert stored is not None and stored.cached_response(1) == sm.apply(entry)
        assert stored.command_digest(1) == command_digest(command_bytes(entry))


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
