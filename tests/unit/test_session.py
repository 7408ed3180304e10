"""The client session (``session``): its API, its protocol steps, and its wire format.

The API follows ``shared/reference/session-api.md`` (dragonboat's ``client.Session`` in Python
names); the encoding vectors are computed by hand from the protobuf wire format, not with our
own encoder, so a change in how we encode cannot make them agree with itself.
"""

from __future__ import annotations

import random

import pytest

import session
from session import (
    NOOP_SERIES_ID,
    NOT_SESSION_MANAGED_CLIENT_ID,
    SERIES_ID_FIRST_PROPOSAL,
    SERIES_ID_FOR_REGISTER,
    SERIES_ID_FOR_UNREGISTER,
    ClusterMismatchError,
    Session,
    SessionDecodeError,
    SessionInvariantError,
    SessionStateError,
    SessionValueError,
    new_noop_session,
    new_session,
)

U64 = 2**64 - 1


def registered(cluster_id: int = 1, client_id: int = 42) -> Session:
    s = Session(cluster_id=cluster_id, client_id=client_id, series_id=SERIES_ID_FOR_REGISTER)
    s.prepare_for_propose()
    return s


class TestConstants:
    def test_values_match_dragonboat(self) -> None:
        assert NOT_SESSION_MANAGED_CLIENT_ID == 0
        assert NOOP_SERIES_ID == 0
        assert SERIES_ID_FOR_REGISTER == 2**64 - 2
        assert SERIES_ID_FOR_UNREGISTER == 2**64 - 1
        assert SERIES_ID_FIRST_PROPOSAL == 1

    def test_package_exports_the_whole_api(self) -> None:
        for name in session.__all__:
            assert hasattr(session, name)
        for method in (
            "prepare_for_register", "prepare_for_unregister", "prepare_for_propose",
            "proposal_completed", "valid_for_proposal", "valid_for_session_op",
            "cluster_id_must_match", "is_noop_session", "marshal", "unmarshal", "size",
            "reset", "__str__",
        ):
            assert callable(getattr(Session, method))


class TestConstruction:
    def test_new_session_has_random_nonzero_client_id_and_is_not_registered(self) -> None:
        s = new_session(7)
        assert s.cluster_id == 7 and s.client_id != 0
        assert (s.series_id, s.responded_to) == (1, 0) and not s.is_noop_session()
        assert new_session(7).client_id != s.client_id  # 2**-64 chance of a false failure

    def test_injected_rng_makes_client_ids_reproducible(self) -> None:
        assert new_session(1, random.Random(5)).client_id == new_session(1, random.Random(5)).client_id

    def test_client_id_zero_from_the_rng_is_skipped(self) -> None:
        class Draws:
            def __init__(self) -> None:
                self.values = [0, 0, 99]

            def getrandbits(self, k: int) -> int:
                assert k == 64
                return self.values.pop(0)

        assert new_session(1, Draws()).client_id == 99

    def test_noop_session_has_series_zero(self) -> None:
        s = new_noop_session(3, random.Random(1))
        assert s.is_noop_session() and s.client_id != 0 and s.cluster_id == 3

    @pytest.mark.parametrize("bad", [-1, 2**64, 1.0, "1", None, True])
    def test_fields_outside_uint64_are_refused(self, bad: object) -> None:
        with pytest.raises(SessionValueError):
            Session(cluster_id=bad)  # type: ignore[arg-type]


class TestProtocolSteps:
    def test_prepare_for_register_and_unregister_set_reserved_series(self) -> None:
        s = new_session(1)
        s.prepare_for_register()
        assert s.series_id == SERIES_ID_FOR_REGISTER and s.valid_for_session_op(1)
        s.prepare_for_unregister()
        assert s.series_id == SERIES_ID_FOR_UNREGISTER and s.valid_for_session_op(1)

    def test_prepare_for_propose_starts_the_series_at_one(self) -> None:
        s = new_session(1)
        s.prepare_for_register()
        s.prepare_for_propose()
        assert s.series_id == SERIES_ID_FIRST_PROPOSAL and s.valid_for_proposal(1)

    def test_proposal_completed_advances_series_and_responded_to(self) -> None:
        s = registered()
        for expected in range(1, 5):
            s.proposal_completed()
            assert (s.responded_to, s.series_id) == (expected, expected + 1)

    def test_proposal_completed_out_of_order_raises(self) -> None:
        s = Session(cluster_id=1, client_id=2, series_id=5, responded_to=2)
        with pytest.raises(SessionStateError, match="out of order"):
            s.proposal_completed()

    def test_proposal_completed_on_register_series_raises(self) -> None:
        s = new_session(1)
        s.prepare_for_register()
        with pytest.raises(SessionStateError, match="register or unregister"):
            s.proposal_completed()

    def test_proposal_completed_on_noop_session_raises(self) -> None:
        with pytest.raises(SessionStateError, match="no-op"):
            new_noop_session(1).proposal_completed()

    def test_prepare_for_propose_after_proposals_raises(self) -> None:
        """Restarting the series would reuse ids the cluster has cached answers for."""
        s = registered()
        s.proposal_completed()
        with pytest.raises(SessionStateError, match="once"):
            s.prepare_for_propose()

    def test_prepare_for_propose_on_noop_session_raises(self) -> None:
        with pytest.raises(SessionStateError):
            new_noop_session(1).prepare_for_propose()


class TestValidity:
    def test_valid_for_proposal_false_for_wrong_cluster(self) -> None:
        assert not registered(cluster_id=1).valid_for_proposal(2)

    def test_valid_for_proposal_false_for_reserved_client_id(self) -> None:
        assert not Session(cluster_id=1, client_id=0, series_id=1).valid_for_proposal(1)

    @pytest.mark.parametrize("series", [SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER])
    def test_valid_for_proposal_false_for_session_ops(self, series: int) -> None:
        assert not Session(cluster_id=1, client_id=5, series_id=series).valid_for_proposal(1)

    def test_valid_for_proposal_true_for_noop_session(self) -> None:
        assert new_noop_session(1).valid_for_proposal(1)

    def test_broken_invariant_raises(self) -> None:
        s = Session(cluster_id=1, client_id=5, series_id=3, responded_to=4)
        with pytest.raises(SessionInvariantError, match="^responded_to 4 is past series_id 3$"):
            s.valid_for_proposal(1)

    def test_valid_for_session_op_only_for_reserved_series(self) -> None:
        assert not registered().valid_for_session_op(1)
        s = new_session(1)
        s.prepare_for_register()
        assert not s.valid_for_session_op(2)
        assert not Session(cluster_id=1, client_id=0, series_id=SERIES_ID_FOR_REGISTER).valid_for_session_op(1)

    def test_cluster_id_must_match(self) -> None:
        s = registered(cluster_id=9)
        s.cluster_id_must_match(9)
        with pytest.raises(ClusterMismatchError, match="cluster 9"):
            s.cluster_id_must_match(10)


# Hand-computed from the protobuf wire format: tag = field_number << 3 | 0 (varint), so
# 0x08, 0x10, 0x18, 0x20 for fields 1..4; values are little-endian base-128 varints.
ENCODING_VECTORS = [
    (Session(0, 0, 0, 0), "08 00 10 00 18 00 20 00"),
    (Session(1, 2, 3, 4), "08 01 10 02 18 03 20 04"),
    (Session(127, 128, 300, 16384), "08 7f 10 80 01 18 ac 02 20 80 80 01"),
    (
        Session(1, U64, SERIES_ID_FOR_REGISTER, 0),
        "08 01 10 ff ff ff ff ff ff ff ff ff 01 18 fe ff ff ff ff ff ff ff ff 01 20 00",
    ),
]


class TestEncoding:
    @pytest.mark.parametrize(("s", "hex_bytes"), ENCODING_VECTORS)
    def test_marshal_matches_dragonboat_bytes(self, s: Session, hex_bytes: str) -> None:
        assert s.marshal() == bytes.fromhex(hex_bytes)
        assert s.size() == len(bytes.fromhex(hex_bytes))

    @pytest.mark.parametrize(("s", "hex_bytes"), ENCODING_VECTORS)
    def test_unmarshal_reads_dragonboat_bytes(self, s: Session, hex_bytes: str) -> None:
        decoded = Session()
        decoded.unmarshal(bytes.fromhex(hex_bytes))
        assert decoded == s

    @pytest.mark.parametrize(
        ("hex_bytes", "expected"),
        [
            ("", Session(0, 0, 0, 0)),  # every field omitted: zeros
            ("20 04 18 03 10 02 08 01", Session(1, 2, 3, 4)),  # reverse order
            ("08 01 08 05", Session(5, 0, 0, 0)),  # repeated field: last wins
            ("08 01 28 07 32 01 61", Session(1, 0, 0, 0)),  # unknown fields 5, 6 skipped
            ("08 81 00", Session(1, 0, 0, 0)),  # non-minimal varint
            ("88 00 05", Session(5, 0, 0, 0)),  # padded tag (the python backend alone misreads it)
            ("2b 08 01 2c 08 02", Session(2, 0, 0, 0)),  # an unknown group holding a field 1
            ("29 01 02 03 04 05 06 07 08 2d 01 02 03 04 08 03", Session(3, 0, 0, 0)),  # fixed64/32
        ],
    )
    def test_unmarshal_accepts_any_valid_encoding(self, hex_bytes: str, expected: Session) -> None:
        decoded = Session(9, 9, 9, 9)
        decoded.unmarshal(bytes.fromhex(hex_bytes))
        assert decoded == expected

    @pytest.mark.parametrize(
        "hex_bytes",
        [
            "08",  # tag without value
            "08 ff",  # truncated varint
            "0a 01 01",  # field 1 as length-delimited
            "0d 01 00 00 00",  # field 1 as fixed32
            "08 ff ff ff ff ff ff ff ff ff ff 01",  # varint longer than 10 bytes
            "00 01",  # field number 0
            "32 05 61",  # length past the end
            "2b 08 01",  # unterminated group
            "2c",  # end of a group never started
            "80 80 80 80 10 01",  # field number 2**29, over the maximum
        ],
    )
    def test_unmarshal_rejects_garbage(self, hex_bytes: str) -> None:
        s = Session(1, 2, 3, 4)
        with pytest.raises(SessionDecodeError):
            s.unmarshal(bytes.fromhex(hex_bytes))
        assert s == Session(1, 2, 3, 4), "a failed unmarshal must not change the session"

    def test_unmarshal_rejects_non_bytes(self) -> None:
        with pytest.raises(SessionDecodeError):
            Session().unmarshal("08 01")  # type: ignore[arg-type]

    def test_reset_zeroes_every_field(self) -> None:
        s = Session(1, 2, 3, 4)
        s.reset()
        assert s == Session() and s.marshal() == bytes.fromhex("08 00 10 00 18 00 20 00")

    def test_str_names_every_field(self) -> None:
        assert str(Session(1, 2, 3, 4)) == "cluster_id:1 client_id:2 series_id:3 responded_to:4"
