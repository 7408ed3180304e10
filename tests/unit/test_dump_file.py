"""The dump file (``kvstore.node.dump_file``): written in one pass, verified whole on load."""

from __future__ import annotations

import hashlib
import json
import os
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


def test_a_large_dump_is_synced_as_it_is_written_not_all_at_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``SYNC_EVERY`` bytes reach the disk while the rest is still being written, so no
    final sync holds the disk (and the journal's next fdatasync) for the whole dump."""
    monkeypatch.setattr(dump_file, "SYNC_EVERY", 1000)
    synced_at: list[int] = []
    path = tmp_path / "raft.dump"
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        synced_at.append(path.stat().st_size)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    pieces = [bytes([i]) * 300 for i in range(20)]  # 6,000 bytes
    written(path, pieces)
    assert len(synced_at) == 5 and all(b - a >= 1000 for a, b in zip(synced_at, synced_at[1:]))
    assert synced_at[-1] < path.stat().st_size
    assert dump_file.read(str(path)).snapshot == b"".join(pieces)
