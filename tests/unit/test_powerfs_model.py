"""The power-loss volume's rules, on the pure model (``kvstore.check.powerfs.Volume``).

The same rules are checked through a real FUSE mount in ``tests/integration/test_powerfs.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.check.powerfs import WRITEBACK_BYTES, Volume


def volume_with_durable_dir() -> Volume:
    volume = Volume()
    volume.mkdir("/d", 0o755)
    volume.fsync(volume.lookup("/"))
    return volume


def durable_file(volume: Volume, path: str, data: bytes) -> None:
    node = volume.create(path, 0o644)
    volume.write(node, 0, data)
    volume.fsync(node)
    volume.fsync(volume.lookup(path.rsplit("/", 1)[0] or "/"))


def test_a_write_not_fsynced_is_lost() -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/f", b"old")
    volume.write(volume.lookup("/d/f"), 3, b"-new")
    assert volume.read(volume.lookup("/d/f"), 0, 100) == b"old-new"
    volume.cut()
    assert volume.read(volume.lookup("/d/f"), 0, 100) == b"old"


def test_an_fsynced_write_survives() -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/f", b"old")
    node = volume.lookup("/d/f")
    volume.write(node, 3, b"-new")
    volume.fsync(node)
    volume.cut()
    assert volume.read(volume.lookup("/d/f"), 0, 100) == b"old-new"


def test_a_new_file_needs_its_directory_fsynced() -> None:
    volume = volume_with_durable_dir()
    node = volume.create("/d/f", 0o644)
    volume.write(node, 0, b"data")
    volume.fsync(node)  # the data is durable, the name is not
    volume.cut()
    assert volume.names("/d") == []


def test_a_rename_without_a_directory_fsync_is_undone() -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/meta", b"old")
    tmp = volume.create("/d/meta.tmp", 0o644)
    volume.write(tmp, 0, b"new")
    volume.fsync(tmp)
    volume.rename("/d/meta.tmp", "/d/meta")
    volume.cut()
    assert volume.names("/d") == ["meta"]
    assert volume.read(volume.lookup("/d/meta"), 0, 100) == b"old"


def test_a_rename_followed_by_a_directory_fsync_is_kept() -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/meta", b"old")
    tmp = volume.create("/d/meta.tmp", 0o644)
    volume.write(tmp, 0, b"new")
    volume.fsync(tmp)
    volume.rename("/d/meta.tmp", "/d/meta")
    volume.fsync(volume.lookup("/d"))
    volume.cut()
    assert volume.names("/d") == ["meta"]
    assert volume.read(volume.lookup("/d/meta"), 0, 100) == b"new"


def test_a_rename_over_a_file_whose_data_was_not_fsynced_leaves_it_empty() -> None:
    """PySyncObj's meta file pattern (write, rename, no fsync) after a directory fsync from
    someone else: the name is durable, the data is not. This is the 0-byte meta file (D9)."""
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/meta", b"old")
    tmp = volume.create("/d/meta.tmp", 0o644)
    volume.write(tmp, 0, b"new")
    volume.rename("/d/meta.tmp", "/d/meta")
    volume.fsync(volume.lookup("/d"))
    volume.cut()
    assert volume.read(volume.lookup("/d/meta"), 0, 100) == b""


def test_a_directory_not_fsynced_into_its_parent_is_lost() -> None:
    volume = Volume()
    volume.mkdir("/d", 0o755)
    volume.cut()
    assert volume.names("/") == []


def test_truncation_is_a_write_like_any_other() -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/f", b"0123456789")
    node = volume.lookup("/d/f")
    volume.truncate(node, 4)
    volume.cut()
    assert volume.read(volume.lookup("/d/f"), 0, 100) == b"0123456789"


def test_a_torn_cut_keeps_a_prefix_of_the_unsynced_writes() -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/f", b"")
    node = volume.lookup("/d/f")
    writes = [bytes([65 + i]) * 10 for i in range(5)]
    for i, data in enumerate(writes):
        volume.write(node, 10 * i, data)
    volume.cut(random.Random(3))
    survived = volume.read(volume.lookup("/d/f"), 0, 1000)
    assert b"".join(writes).startswith(survived)
    assert len(survived) < 50


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 8))
def test_a_torn_cut_is_always_a_prefix_and_never_the_whole(seed: int, count: int) -> None:
    """Appends, as a journal makes them: what survives is durable content plus a strict prefix
    of the unsynced appends (the last surviving one possibly cut mid-way)."""
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/f", b"durable|")
    node = volume.lookup("/d/f")
    rng = random.Random(seed)
    appended = b""
    for _ in range(count):
        data = rng.randbytes(rng.randint(1, 50))
        volume.write(node, len(b"durable|") + len(appended), data)
        appended += data
    volume.cut(random.Random(seed))
    survived = volume.read(volume.lookup("/d/f"), 0, 10_000)
    assert survived.startswith(b"durable|")
    assert appended.startswith(survived[len(b"durable|"):])
    assert len(survived) < len(b"durable|") + len(appended)


def test_a_long_unsynced_stream_is_written_back_in_part_not_held_without_bound() -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/f", b"")
    node = volume.lookup("/d/f")
    chunk = bytes(1024 * 1024)
    for i in range(WRITEBACK_BYTES // len(chunk) + 2):
        volume.write(node, i * len(chunk), chunk)
    assert volume.unsynced_bytes() <= WRITEBACK_BYTES
    assert volume.counters.writebacks >= 1


def test_a_failing_fsync_makes_nothing_durable() -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/f", b"old")
    node = volume.lookup("/d/f")
    volume.write(node, 0, b"new")
    volume.fail_fsync = True
    try:
        volume.fsync(node)
    except OSError as exc:
        assert exc.errno == 5
    else:
        raise AssertionError("fsync did not fail")
    volume.cut()
    assert volume.read(volume.lookup("/d/f"), 0, 100) == b"old"


def test_the_durable_image_saved_and_loaded_is_what_a_reboot_finds(tmp_path: Path) -> None:
    volume = volume_with_durable_dir()
    durable_file(volume, "/d/f", b"kept")
    volume.write(volume.lookup("/d/f"), 4, b" and lost")
    volume.create("/d/g", 0o644)
    volume.cut()
    volume.save(str(tmp_path))
    rebooted = Volume.load(str(tmp_path))
    assert rebooted.names("/d") == ["f"]
    assert rebooted.read(rebooted.lookup("/d/f"), 0, 100) == b"kept"
    fresh = rebooted.create("/d/h", 0o644)
    assert fresh.ino not in {node.ino for path, node in volume.walk()}
