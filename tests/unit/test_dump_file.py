"""The dump file (``kvstore.node.dump_file``): written in one pass, verified whole on load."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from kvstore.node import dump_file

META = {"last": ["00", 7, 1], "prev": ["00", 6, 1], "cluster": ["127.0.0.1:1"]}


def written(path: Path, pieces: list[bytes]) -> str:
    writer = dump_file.Writer(str(path))
    for piece in pieces:
        writer.write(piece)
    return writer.finish(META)


def test_a_dump_written_in_pieces_reads_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "raft.dump"
    digest = written(path, [b"abc", b"", b"def" * 1000])
    dump = dump_file.read(str(path))
    assert dump.snapshot == b"abc" + b"def" * 1000
    assert dump.meta == {**META, "digest": digest}
    assert digest == hashlib.sha256(dump.snapshot).hexdigest()[:16]
    with open(path, "rb") as f:
        assert dump_file.read_meta(f) == dump.meta


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_a_damaged_dump_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "raft.dump"
    written(path, [b"x" * 5000])
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[100] ^= 1
    elif damage == "truncate":
        del data[-10:]
    else:
        data += b"!"
    path.write_bytes(bytes(data))
    with pytest.raises(dump_file.DumpCorrupt):
        dump_file.read(str(path))


def test_a_version_1_dump_is_still_read(tmp_path: Path) -> None:
    snapshot = b"state bytes"
    meta = {**META, "digest": hashlib.sha256(snapshot).hexdigest()[:16]}
    meta_json = json.dumps(meta, sort_keys=True).encode()
    body = (dump_file.MAGIC_V1 + struct.pack("<I", len(meta_json)) + meta_json
            + struct.pack("<Q", len(snapshot)) + snapshot)
    path = tmp_path / "raft.dump"
    path.write_bytes(body + hashlib.sha256(body).digest())
    assert dump_file.read(str(path)) == dump_file.Dump(meta, snapshot)
    with open(path, "rb") as f:
        assert dump_file.read_meta(f) == meta
