"""The power-loss file system through a real FUSE mount: what survives a cut.

Each test mounts its own ``PowerMount`` (and unmounts it, even on failure), writes through
ordinary system calls, cuts the power, remounts the backing image, and looks. Skipped, with the
reason, where FUSE cannot be used (``fuse_unusable``).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.check.powerfs_mount import PowerMount, fuse_unusable

pytestmark = pytest.mark.integration


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PowerMount]:
    reason = fuse_unusable()
    if reason:
        pytest.skip(reason)
    mount = PowerMount(tmp_path / "mnt", tmp_path / "disk")
    mount.mount()
    try:
        yield mount
    finally:
        mount.unmount()
        assert not os.path.ismount(tmp_path / "mnt"), "a mount was left behind"


def power_cycle(mount: PowerMount, torn_seed: int | None = None) -> None:
    mount.cut(torn_seed)
    mount.unmount()
    mount.mount()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(path.parent)


def test_a_write_not_fsynced_is_lost_after_a_cut(disk: PowerMount) -> None:
    path = disk.mountpoint / "f"
    durable_write(path, b"synced")
    with open(path, "ab") as f:
        f.write(b" and not synced")
    assert path.read_bytes() == b"synced and not synced"
    power_cycle(disk)
    assert path.read_bytes() == b"synced"


def test_an_fsynced_write_survives_a_cut(disk: PowerMount) -> None:
    path = disk.mountpoint / "f"
    durable_write(path, b"one")
    with open(path, "ab") as f:
        f.write(b" two")
        f.flush()
        os.fdatasync(f.fileno())
    power_cycle(disk)
    assert path.read_bytes() == b"one two"


def test_a_file_created_and_fsynced_is_lost_without_a_directory_fsync(disk: PowerMount) -> None:
    path = disk.mountpoint / "new"
    with open(path, "wb") as f:
        f.write(b"data")
        f.flush()
        os.fsync(f.fileno())
    power_cycle(disk)
    assert not path.exists()


def test_a_rename_not_followed_by_a_directory_fsync_is_lost(disk: PowerMount) -> None:
    meta = disk.mountpoint / "meta"
    durable_write(meta, b"old")
    tmp = disk.mountpoint / "meta.tmp"
    with open(tmp, "wb") as f:
        f.write(b"new")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, meta)
    assert meta.read_bytes() == b"new"
    power_cycle(disk)
    assert meta.read_bytes() == b"old"
    assert sorted(os.listdir(disk.mountpoint)) == ["meta"]


def test_a_rename_followed_by_a_directory_fsync_survives(disk: PowerMount) -> None:
    meta = disk.mountpoint / "meta"
    durable_write(meta, b"old")
    tmp = disk.mountpoint / "meta.tmp"
    with open(tmp, "wb") as f:
        f.write(b"new")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, meta)
    fsync_path(disk.mountpoint)
    power_cycle(disk)
    assert meta.read_bytes() == b"new"


def test_torn_writes_leave_a_prefix_of_the_unsynced_appends(disk: PowerMount) -> None:
    path = disk.mountpoint / "log"
    durable_write(path, b"durable|")
    records = [bytes([65 + i]) * 100 for i in range(8)]
    with open(path, "ab", buffering=0) as f:
        for record in records:
            f.write(record)
    power_cycle(disk, torn_seed=7)
    survived = path.read_bytes()
    assert survived.startswith(b"durable|")
    tail = survived[len(b"durable|"):]
    assert b"".join(records).startswith(tail) and len(tail) < 800
    assert len(tail) % 100 != 0, "seed 7 tears a record in the middle"


def test_a_shared_mmap_store_survives_only_after_msync(disk: PowerMount) -> None:
    """PySyncObj's journal is a shared mmap: its stores reach the file system when the kernel
    writes the dirty pages back (msync, fsync, or its writeback timer after about 30 s)."""
    synced, unsynced = disk.mountpoint / "synced", disk.mountpoint / "unsynced"
    for path in (synced, unsynced):
        durable_write(path, bytes(8192))
    for path, flush in ((synced, True), (unsynced, False)):
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            mm[0:5] = b"hello"
            mm[4096:4101] = b"world"
            if flush:
                mm.flush()
        if path is unsynced:
            disk.cut()  # well within the kernel's 30 s writeback delay
    disk.unmount()
    disk.mount()
    assert synced.read_bytes()[:5] == b"hello" and synced.read_bytes()[4096:4101] == b"world"
    assert unsynced.read_bytes() == bytes(8192)


def test_after_a_cut_every_call_fails_until_the_reboot(disk: PowerMount) -> None:
    path = disk.mountpoint / "f"
    durable_write(path, b"x")
    disk.cut()
    with pytest.raises(OSError) as failure:
        path.write_bytes(b"y")
    assert failure.value.errno == errno.EIO
    disk.unmount()
    disk.mount()
    assert path.read_bytes() == b"x"


def test_a_failing_fsync_reports_eio_and_keeps_nothing(disk: PowerMount) -> None:
    path = disk.mountpoint / "f"
    durable_write(path, b"old")
    disk.fail_fsync(True)
    with open(path, "r+b") as f:
        f.write(b"new")
        f.flush()
        with pytest.raises(OSError) as failure:
            os.fsync(f.fileno())
    assert failure.value.errno == errno.EIO
    disk.fail_fsync(False)
    power_cycle(disk)
    assert path.read_bytes() == b"old"


def test_a_clean_unmount_keeps_everything(disk: PowerMount) -> None:
    (disk.mountpoint / "d").mkdir()
    (disk.mountpoint / "d" / "f").write_bytes(b"never fsynced")
    disk.unmount()
    disk.mount()
    assert (disk.mountpoint / "d" / "f").read_bytes() == b"never fsynced"
