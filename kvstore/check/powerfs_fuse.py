"""The power-loss file system on FUSE: ``python -m kvstore.check.powerfs_fuse``.

Serves a ``kvstore.check.powerfs.Volume`` at a mount point, and takes commands on a Unix socket
(one line each, one line of answer):

    ping                 -> ok
    cut                  -> ok     the power goes: everything unsynced is dropped, the durable
                                   image is saved, and every later operation fails with EIO
    cut torn SEED        -> ok     the same, with torn writes (``Volume.cut``), seeded
    fail-fsync on|off    -> ok     make every fsync fail with EIO (a dying disk)
    stats                -> JSON   counters and unsynced bytes

A clean unmount (``fusermount3 -u``) is a clean shutdown: everything is synced and saved. The
durable image lives in ``--backing`` (``Volume.save``), so the next mount of the same backing
directory is the machine after the reboot.

How the kernel's page cache fits in (checked on Linux 6.x, libfuse 3.14): the file system is
mounted without ``direct_io``, so the kernel caches pages and supports shared writable
``mmap`` (PySyncObj's journal). A ``write()`` reaches this process at once (write-through, no
``writeback_cache``); a store into a shared mapping stays in the kernel's dirty pages until the
kernel writes them back (on ``msync``/``fsync``, on its own writeback timer, or at unmount).
Either way nothing is durable here before an fsync. A process killed with dirty mapped pages
still has them written back later, so a cut must come *before* the kill: the harness freezes
the node (SIGSTOP), cuts, kills it, and unmounts; every write-back that arrives after the cut
is refused. The next mount starts with an empty page cache.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import random
import socket
import stat
import sys
import threading
import time
from typing import Any

import mfusepy as fuse

from kvstore.check.powerfs import FsError, Inode, Volume

log = logging.getLogger("powerfs")


class PowerFs(fuse.Operations):
    use_ns = True

    def __init__(self, volume: Volume, backing: str) -> None:
        self.volume = volume
        self.backing = backing
        self._mutex = threading.RLock()
        self.handles: dict[int, Inode] = {}
        self.next_handle = 1
        self.dead = False

    # -- plumbing -------------------------------------------------------------------------

    def _alive(self) -> None:
        if self.dead:
            raise fuse.FuseOSError(errno.EIO)

    def _node(self, path: str | None, fh: int | None = None) -> Inode:
        if fh is not None and fh in self.handles:
            return self.handles[fh]
        if path is None:
            raise fuse.FuseOSError(errno.EBADF)
        return self.volume.lookup(path)

    def _handle(self, node: Inode) -> int:
        fh = self.next_handle
        self.next_handle += 1
        self.handles[fh] = node
        return fh

    def cut(self, rng: random.Random | None) -> None:
        with self._mutex:
            if self.dead:
                return
            self.volume.cut(rng)
            self.volume.save(self.backing)
            self.dead = True

    def destroy(self, path: str) -> None:
        with self._mutex:
            if not self.dead:
                self.volume.sync_all()
                self.volume.save(self.backing)
                self.dead = True

    # -- metadata -------------------------------------------------------------------------

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        with self._mutex:
            if path != "/":  # the unmount after a cut looks at the root
                self._alive()
            node = self._node(path, fh)
            size = len(node.data) if not node.is_dir else 4096
            return {
                "st_ino": node.ino, "st_mode": node.mode,
                "st_nlink": 2 if node.is_dir else 1, "st_size": size,
                "st_blocks": (size + 511) // 512, "st_blksize": 4096,
                "st_uid": os.getuid(), "st_gid": os.getgid(),
                "st_atime": node.mtime_ns, "st_mtime": node.mtime_ns, "st_ctime": node.mtime_ns,
            }

    def access(self, path: str, amode: int) -> int:
        with self._mutex:
            self._alive()
            self.volume.lookup(path)
            return 0

    def chmod(self, path: str | None, mode: int) -> int:
        with self._mutex:
            self._alive()
            node = self._node(path)
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        with self._mutex:
            self._alive()
            return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        with self._mutex:
            self._alive()
            node = self._node(path)
            node.mtime_ns = times[1] if times else time.time_ns()
            return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 20, "f_bfree": 1 << 19,
                "f_bavail": 1 << 19, "f_files": 1 << 16, "f_ffree": 1 << 15, "f_namemax": 255}

    # -- names ----------------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> int:
        with self._mutex:
            self._alive()
            self.volume.mkdir(path, mode)
            return 0

    def rmdir(self, path: str) -> int:
        with self._mutex:
            self._alive()
            self.volume.rmdir(path)
            return 0

    def unlink(self, path: str) -> int:
        with self._mutex:
            self._alive()
            self.volume.unlink(path)
            return 0

    def rename(self, old: str, new: str) -> int:
        with self._mutex:
            self._alive()
            self.volume.rename(old, new)
            return 0

    def link(self, target: str, source: str) -> int:
        raise fuse.FuseOSError(errno.EPERM)

    def symlink(self, target: str, source: str) -> int:
        raise fuse.FuseOSError(errno.EPERM)

    def opendir(self, path: str) -> int:
        with self._mutex:
            self._alive()
            node = self.volume.lookup(path)
            if not node.is_dir:
                raise fuse.FuseOSError(errno.ENOTDIR)
            return self._handle(node)

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        with self._mutex:
            self._alive()
            node = self._node(path, fh)
            # With use_ino, an entry's inode number must not be 0: readdir(3) skips those.
            inodes = self.volume.inodes
            entries = [(".", node.ino), ("..", node.ino)] + sorted(node.entries.items())
            return [(name, {"st_ino": ino, "st_mode": inodes[ino].mode}, 0)
                    for name, ino in entries]

    def releasedir(self, path: str | None, fh: int) -> int:
        with self._mutex:
            self.handles.pop(fh, None)
            return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        with self._mutex:
            self._alive()
            self.volume.fsync(self._node(path, fh))
            return 0

    # -- files ----------------------------------------------------------------------------

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self._mutex:
            self._alive()
            return self._handle(self.volume.create(path, mode))

    def open(self, path: str, flags: int) -> int:
        with self._mutex:
            self._alive()
            node = self.volume.lookup(path)
            if node.is_dir:
                raise fuse.FuseOSError(errno.EISDIR)
            return self._handle(node)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with self._mutex:
            self._alive()
            return self.volume.read(self._node(path, fh), offset, size)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            self._alive()
            return self.volume.write(self._node(path, fh), offset, data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self._mutex:
            self._alive()
            self.volume.truncate(self._node(path, fh), length)
            return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        with self._mutex:
            self._alive()
            self.volume.fsync(self._node(path, fh))
            return 0

    def flush(self, path: str | None, fh: int) -> int:
        with self._mutex:
            self._alive()
            return 0  # close() is not a sync

    def release(self, path: str | None, fh: int) -> int:
        with self._mutex:
            self.handles.pop(fh, None)
            return 0


def _serve_control(fs: PowerFs, path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path)
    server.listen(8)
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                stream.write((_command(fs, line.decode().split()) + "\n").encode())
                stream.flush()


def _command(fs: PowerFs, words: list[str]) -> str:
    try:
        match words:
            case ["ping"]:
                return "ok"
            case ["cut"]:
                fs.cut(None)
                return "ok"
            case ["cut", "torn", seed]:
                fs.cut(random.Random(int(seed)))
                return "ok"
            case ["fail-fsync", ("on" | "off") as state]:
                with fs._mutex:
                    fs.volume.fail_fsync = state == "on"
                return "ok"
            case ["stats"]:
                with fs._mutex:
                    counters = dict(vars(fs.volume.counters))
                    counters["unsynced_bytes"] = fs.volume.unsynced_bytes()
                    counters["dead"] = fs.dead
                return json.dumps(counters)
        return f"error: unknown command {' '.join(words)!r}"
    except (FsError, OSError, ValueError) as exc:
        return f"error: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--backing", required=True, help="directory of the durable image")
    parser.add_argument("--control", required=True, help="Unix socket for commands")
    args = parser.parse_args(argv)
    backing, control = os.path.abspath(args.backing), os.path.abspath(args.control)
    logging.basicConfig(level=logging.WARNING, format="powerfs %(levelname)s: %(message)s")
    fs = PowerFs(Volume.load(backing), backing)
    threading.Thread(target=_serve_control, args=(fs, control), daemon=True,
                     name="powerfs-control").start()
    # Single-threaded: the lock would serialise the operations anyway; no direct_io (mmap).
    fuse.FUSE(fs, args.mountpoint, foreground=True, nothreads=True, fsname="powerfs",
              subtype="powerfs", use_ino=True, hard_remove=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
