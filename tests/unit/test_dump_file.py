"""The dump file (``kvstore.node.dump_file``): written in one pass, verified whole on load."""

from __future__ import annotations

import hashlib
import io
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


# -- the exact bytes, and what is refused with which message ------------------------------------

SNAPSHOT = b"state bytes"


def v2_bytes(meta: dict[str, object], snapshot: bytes = SNAPSHOT) -> bytes:
    """A version 2 dump built by hand from the layout in ``dump_file``'s docstring."""
    meta_json = json.dumps(meta, sort_keys=True).encode()
    body = (b"KVSNAP2\n" + snapshot + meta_json
            + struct.pack("<IQ", len(meta_json), len(snapshot)))
    return body + hashlib.sha256(body).digest()


def v1_bytes(meta: dict[str, object], snapshot: bytes = SNAPSHOT) -> bytes:
    meta_json = json.dumps(meta, sort_keys=True).encode()
    body = (b"KVSNAP1\n" + struct.pack("<I", len(meta_json)) + meta_json
            + struct.pack("<Q", len(snapshot)) + snapshot)
    return body + hashlib.sha256(body).digest()


def digested(snapshot: bytes = SNAPSHOT) -> dict[str, object]:
    return {**META, "digest": hashlib.sha256(snapshot).hexdigest()[:16]}


def test_the_writer_and_encode_write_the_documented_layout_byte_for_byte(tmp_path: Path) -> None:
    """One format, whoever writes it: a dump written today is read by every later build (and a
    backup, ``encode``, is a dump). The meta's keys are sorted, so the bytes do not depend on
    the order the meta was built in."""
    assert list(META) != sorted(META)
    path = tmp_path / "raft.dump"
    digest = written(path, [SNAPSHOT[:5], SNAPSHOT[5:]])
    assert digest == dump_file.state_digest(hashlib.sha256(SNAPSHOT))
    assert path.read_bytes() == v2_bytes(digested()) == dump_file.encode(digested(), SNAPSHOT)
    dump_file.write(str(tmp_path / "whole"), digested(), SNAPSHOT)
    assert (tmp_path / "whole").read_bytes() == v2_bytes(digested())


def test_both_versions_are_recognised_and_decoded(tmp_path: Path) -> None:
    for data in (v2_bytes(digested()), v1_bytes(digested())):
        assert dump_file.is_dump(data)
        assert dump_file.decode(data, "backup") == dump_file.Dump(digested(), SNAPSHOT)
    assert not dump_file.is_dump(b"KVSNAP3\n" + v2_bytes(digested())[8:])
    assert not dump_file.is_dump(b"")


def refusal(data: bytes, tmp_path: Path, decoded: bool = True) -> str:
    """The message ``read`` refuses ``data`` with, and ``decode`` too (the same one) unless not
    ``decoded`` (``decode`` checks the file's checksum, not the snapshot's digest)."""
    path = tmp_path / "raft.dump"
    path.write_bytes(data)
    messages = set()
    reads = [lambda: dump_file.read(str(path))]
    if decoded:
        reads.append(lambda: dump_file.decode(data, str(path)))
    for read in reads:
        with pytest.raises(dump_file.DumpCorrupt) as refused:
            read()
        messages.add(str(refused.value))
    assert len(messages) == 1, messages
    return messages.pop().removeprefix(f"{path}: ")


def test_each_kind_of_damage_is_refused_with_its_own_message(tmp_path: Path) -> None:
    good = v2_bytes(digested())
    assert refusal(b"KVSNAPX\n" + good[8:], tmp_path) == "bad magic"
    assert refusal(good[:40], tmp_path) == "truncated"
    assert refusal(good[:-33] + good[-32:], tmp_path) == "lengths do not add up"
    assert refusal(good[:10] + b"?" + good[11:], tmp_path) == "bad checksum"
    assert refusal(v2_bytes(digested(b"other")), tmp_path, decoded=False) == (
        "the snapshot does not match its digest")
    bad_json = b"KVSNAP2\n" + b"{nope" + struct.pack("<IQ", 5, 0)
    assert refusal(bad_json + hashlib.sha256(bad_json).digest(), tmp_path) == (
        "the meta is not JSON")
    not_object = b"KVSNAP2\n" + b"[1]" + struct.pack("<IQ", 3, 0)
    assert refusal(not_object + hashlib.sha256(not_object).digest(), tmp_path) == (
        "the meta is not an object")


def test_the_smallest_possible_file_is_checked_for_its_lengths_not_called_truncated(
        tmp_path: Path) -> None:
    """Magic, trailer and checksum with nothing between: every length adds up (both are 0), so
    what is wrong is the empty meta."""
    body = b"KVSNAP2\n" + struct.pack("<IQ", 0, 0)
    assert refusal(body + hashlib.sha256(body).digest(), tmp_path) == "the meta is not JSON"


def test_a_damaged_version_1_dump_is_refused(tmp_path: Path) -> None:
    good = v1_bytes(digested())
    assert refusal(good[:30] + b"?" + good[31:], tmp_path) == "bad magic or checksum"
    assert refusal(v1_bytes(digested(b"other")), tmp_path, decoded=False) == (
        "the snapshot does not match its digest")
    short = bytearray(good[:-32])
    short[-len(SNAPSHOT) - 8:-len(SNAPSHOT)] = struct.pack("<Q", len(SNAPSHOT) + 1)
    short_body = bytes(short)
    assert refusal(short_body + hashlib.sha256(short_body).digest(), tmp_path) == "truncated"


def test_the_meta_alone_is_read_from_either_version(tmp_path: Path) -> None:
    for data in (v2_bytes(digested()), v1_bytes(digested())):
        path = tmp_path / "raft.dump"
        path.write_bytes(data)
        with open(path, "rb") as f:
            f.read(3)  # read_meta seeks to the start itself
            assert dump_file.read_meta(f, str(path)) == digested()


def open_files(path: Path) -> list[str]:
    """The files this process has open on ``path`` (Linux: /proc/self/fd)."""
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        try:
            if Path(os.readlink(fd)) == path:
                found.append(fd.name)
        except OSError:
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_finish_and_abort_close_the_file_and_abort_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "raft.dump.tmp"
    written(path, [b"abc"])
    assert open_files(path) == []
    writer = dump_file.Writer(str(path))
    writer.write(b"half")
    writer.abort()
    assert not path.exists() and open_files(path) == []
    writer.abort()  # already gone: nothing to do, no error
    dump_file.fsync_directory(str(tmp_path))
    assert open_files(tmp_path) == []


def test_the_bytes_are_complete_when_the_file_is_fsynced(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability: ``fsync`` makes durable what the OS has; a write still in Python's buffer
    when it runs is not. So at each fsync the file must already hold every byte."""
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    written(tmp_path / "a", [SNAPSHOT])
    dump_file.write(str(tmp_path / "b"), digested(), SNAPSHOT)
    dump_file.fsync_directory(str(tmp_path))
    size = len(v2_bytes(digested()))
    assert synced == [(str(tmp_path / "a"), size), (str(tmp_path / "b"), size),
                      (str(tmp_path), os.stat(tmp_path).st_size)]


def test_without_a_path_the_messages_name_the_dump(tmp_path: Path) -> None:
    damaged = v2_bytes(digested())
    damaged = damaged[:10] + b"?" + damaged[11:]
    with pytest.raises(dump_file.DumpCorrupt, match="^dump: bad checksum$"):
        dump_file.read_open(io.BytesIO(damaged))
    with pytest.raises(dump_file.DumpCorrupt, match="^dump: bad magic$"):
        dump_file.read_meta(io.BytesIO(b"KVSNAPX\n" + damaged[8:]))
    with pytest.raises(dump_file.DumpCorrupt, match="^dump: bad magic or checksum$"):
        dump_file.read_v1(b"KVSNAP1\n" + damaged[8:])


def test_a_damaged_version_1_meta_names_the_file(tmp_path: Path) -> None:
    good = v1_bytes(digested())
    with pytest.raises(dump_file.DumpCorrupt, match="^raft.dump: bad magic or checksum$"):
        dump_file.read_meta(io.BytesIO(good[:30] + b"?" + good[31:]), "raft.dump")
    body = b"KVSNAP1\n" + struct.pack("<I", 5) + b"{nope" + struct.pack("<Q", 0)
    with pytest.raises(dump_file.DumpCorrupt, match="^raft.dump: the meta is not JSON$"):
        dump_file.decode(body + hashlib.sha256(body).digest(), "raft.dump")


class CutShort(io.BytesIO):
    """A file that another process truncates while it is hashed: the read of everything but
    the checksum (the hash loop's one block, for a file this small) finds nothing."""

    def read(self, size: int | None = -1) -> bytes:
        if size == len(self.getbuffer()) - 32:
            return b""
        return super().read(size)


def test_a_file_cut_short_while_it_is_hashed_is_refused_as_truncated() -> None:
    with pytest.raises(dump_file.DumpCorrupt, match="^raft.dump: truncated$"):
        dump_file.read_open(CutShort(v2_bytes(digested())), "raft.dump")


def test_a_dump_one_byte_past_a_hash_block_is_hashed_to_its_last_byte(tmp_path: Path) -> None:
    """The checksum covers every byte before it, whatever the file's size in hash blocks."""
    meta_len = len(json.dumps(digested(b""), sort_keys=True).encode())
    snapshot = b"s" * ((1 << 20) + 1 - 8 - meta_len - 12)
    data = v2_bytes(digested(snapshot), snapshot)
    assert len(data) - 32 == (1 << 20) + 1
    path = tmp_path / "raft.dump"
    path.write_bytes(data)
    assert dump_file.read(str(path)).snapshot == snapshot
