"""The hand-written session decoder (``session.wire.decode_varint_fields``) at its limits.

Every replica, whatever its protobuf backend, must accept and refuse exactly the same bytes,
and say why in the same words (a session file that does not decode is reported with them). So
each limit is tested on both sides: the largest valid value and the smallest invalid one.
Bytes are written by hand from the protobuf wire format: a tag is ``field << 3 | wire type``.
"""

from __future__ import annotations

import pytest

from session import Session, SessionDecodeError
from kvstore.proto.log_pb2 import Snapshot
from session.session_pb2 import SessionPB
from session.wire import (
    MAX_FIELD_NUMBER,
    MAX_GROUP_DEPTH,
    WireDecodeError,
    decode_varint_fields,
    parse,
    parse_canonical,
)

KNOWN = range(1, 5)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def groups(depth: int, field: int = 9) -> bytes:
    return tag(field, 3) * depth + tag(field, 4) * depth


@pytest.mark.parametrize("data, fields", [
    pytest.param(tag(1, 0) + varint(2**64 - 1), {1: 2**64 - 1}, id="largest-varint"),
    pytest.param(tag(1, 0) + b"\x80" * 9 + b"\x00", {1: 0}, id="padded-to-10-bytes"),
    pytest.param(tag(MAX_FIELD_NUMBER, 0) + b"\x01" + tag(2, 0) + b"\x07", {2: 7},
                 id="largest-field-number"),
    pytest.param(groups(MAX_GROUP_DEPTH) + tag(3, 0) + b"\x05", {3: 5}, id="deepest-groups"),
    pytest.param(tag(9, 3) + tag(1, 0) + b"\x08" + tag(9, 4), {}, id="known-field-inside-a-group"),
    pytest.param(tag(9, 1) + b"\x00" * 8 + tag(9, 5) + b"\x00" * 4 + tag(9, 2) + b"\x02ab"
                 + tag(1, 0) + b"\x03", {1: 3}, id="unknown-fields-of-every-size"),
    pytest.param(tag(1, 0) + b"\x01" + tag(1, 0) + b"\x02", {1: 2}, id="the-last-value-wins"),
])
def test_valid_encodings_decode(data: bytes, fields: dict[int, int]) -> None:
    assert decode_varint_fields(data, KNOWN) == fields


@pytest.mark.parametrize("data, message", [
    pytest.param(tag(1, 0) + b"\x80" * 9 + b"\x02", "varint over 64 bits", id="varint-of-2**64"),
    pytest.param(tag(1, 0) + b"\x80" * 10 + b"\x00", "varint longer than 10 bytes",
                 id="varint-of-11-bytes"),
    pytest.param(tag(1, 0) + b"\x80", "truncated varint", id="truncated-varint"),
    pytest.param(tag(0, 0) + b"\x01", "invalid field number 0", id="field-0"),
    pytest.param(tag(MAX_FIELD_NUMBER + 1, 0) + b"\x01",
                 f"invalid field number {MAX_FIELD_NUMBER + 1}", id="field-past-the-largest"),
    pytest.param(tag(2, 2) + b"\x01a", "field 2 has wire type 2, not varint",
                 id="known-field-not-a-varint"),
    pytest.param(tag(9, 1) + b"\x00" * 7, "field runs past the end", id="fixed64-cut-short"),
    pytest.param(tag(9, 2) + b"\x05ab", "field runs past the end", id="length-past-the-end"),
    pytest.param(groups(MAX_GROUP_DEPTH + 1), "unknown groups nested too deep",
                 id="groups-one-too-deep"),
    pytest.param(tag(9, 3) + tag(8, 4), "unmatched end of group 8", id="unmatched-end-group"),
    pytest.param(tag(9, 4), "unmatched end of group 9", id="end-group-first"),
    pytest.param(tag(9, 3), "unterminated group", id="unterminated-group"),
    pytest.param(tag(9, 6), "invalid wire type 6", id="wire-type-6"),
])
def test_invalid_encodings_are_refused_with_their_reason(data: bytes, message: str) -> None:
    with pytest.raises(WireDecodeError) as refused:
        decode_varint_fields(data, KNOWN)
    assert str(refused.value) == message


def test_only_bytes_are_decoded() -> None:
    with pytest.raises(WireDecodeError) as refused:
        decode_varint_fields("\x08\x01", KNOWN)  # type: ignore[arg-type]
    assert str(refused.value) == "expected bytes, got str"
    assert decode_varint_fields(memoryview(b"\x08\x01"), KNOWN) == {1: 1}


def test_a_session_that_does_not_decode_says_why() -> None:
    session = Session(1, 2, 3, 0)
    with pytest.raises(SessionDecodeError) as refused:
        session.unmarshal(tag(1, 0) + b"\x80")
    assert str(refused.value) == "not a valid session: truncated varint"
    assert (session.cluster_id, session.client_id, session.series_id) == (1, 2, 3)  # unchanged


def test_parse_refuses_what_is_not_bytes_and_bytes_that_do_not_decode() -> None:
    """``parse`` maps every failure to one error, naming the message type; the decoder's own
    words follow and differ between protobuf backends, so only the start is checked."""
    with pytest.raises(WireDecodeError) as refused:
        parse(SessionPB, "\x08\x01")  # type: ignore[arg-type]
    assert str(refused.value) == "expected bytes, got str"
    with pytest.raises(WireDecodeError) as refused:
        parse(SessionPB, b"\x08")
    assert str(refused.value).startswith("not a valid SessionPB: ")


def test_a_valid_but_not_canonical_encoding_is_refused_by_name() -> None:
    """Fields out of order parse, but protobuf would write them the other way round."""
    with pytest.raises(WireDecodeError, match="^not the canonical encoding of a Snapshot$"):
        parse_canonical(Snapshot, b"\x10\x05\x08\x01")
