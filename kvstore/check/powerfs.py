"""A volume that loses what was not synced: the model behind the power-loss file system.

A real disk behind a page cache keeps, after a power cut, only what was made durable:

* a file's data is durable once the file is fsynced (``fsync``/``fdatasync``/``msync``);
* a directory's entries (a create, an unlink, a rename) are durable once *that directory* is
  fsynced. A file whose data was fsynced but whose name never was is gone after the cut, and a
  rename not followed by an fsync of the directory is undone.

Everything else is lost, in the worst case all of it, which is what this volume does (POSIX
allows exactly this much loss; a real kernel usually writes dirty data back within about 30 s,
so real machines lose less, but a test must assume the worst).

With ``torn`` the cut is a little kinder and nastier at once, like a disk that was writing when
the power went: in each file the unsynced writes survive in order up to a random one, and of
that one only a random prefix (any byte length, not just whole sectors) reaches the disk.

``Volume`` is pure Python, used by the FUSE adapter (``kvstore.check.powerfs_fuse``) under a
lock; it knows nothing of FUSE, so its rules are unit-tested directly.

Memory: each file keeps its current bytes, its durable bytes and the writes between them. A file
that is written for a long time and never synced would grow that list without bound, so past
``WRITEBACK_BYTES`` of unsynced data the oldest half is written back (made durable), as the
kernel would do under memory pressure. Tests that rely on a loss stay well below that.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

ROOT = 1
WRITEBACK_BYTES = 64 * 1024 * 1024
"""Unsynced bytes in one file past which the oldest half is written back (see the docstring)."""
IMAGE = "image.json"
"""The durable image in the backing directory: inodes and directories; file data beside it."""


class FsError(OSError):
    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(code, os.strerror(code) + (f": {what}" if what else ""))


@dataclass
class Write:
    offset: int
    data: bytes


@dataclass
class Truncate:
    length: int


Op = Write | Truncate


@dataclass
class Inode:
    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)
    """The file's bytes as the programs see them now."""
    durable: bytearray = field(default_factory=bytearray)
    """The file's bytes on the simulated disk."""
    pending: list[Op] = field(default_factory=list)
    """The writes and truncations since ``durable``, in order."""
    pending_bytes: int = 0
    entries: dict[str, int] = field(default_factory=dict)
    """A directory's entries now."""
    durable_entries: dict[str, int] = field(default_factory=dict)
    """A directory's entries on the simulated disk."""
    mtime_ns: int = field(default_factory=time.time_ns)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _apply(content: bytearray, op: Op) -> None:
    if isinstance(op, Truncate):
        if op.length < len(content):
            del content[op.length:]
        else:
            content.extend(bytes(op.length - len(content)))
        return
    end = op.offset + len(op.data)
    if op.offset > len(content):
        content.extend(bytes(op.offset - len(content)))
    content[op.offset:end] = op.data


@dataclass
class Counters:
    writes: int = 0
    bytes_written: int = 0
    fsyncs: int = 0
    dir_fsyncs: int = 0
    cuts: int = 0
    writebacks: int = 0


class Volume:
    """Inodes and directories with a volatile and a durable state each."""

    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {ROOT: Inode(ROOT, stat.S_IFDIR | 0o755)}
        self.next_ino = ROOT + 1
        self.counters = Counters()
        self.fail_fsync = False
        """When set, every fsync fails with EIO and makes nothing durable (a dying disk)."""

    # -- names ----------------------------------------------------------------------------

    def lookup(self, path: str) -> Inode:
        node = self.inodes[ROOT]
        for part in _parts(path):
            if not node.is_dir:
                raise FsError(errno.ENOTDIR, path)
            try:
                node = self.inodes[node.entries[part]]
            except KeyError:
                raise FsError(errno.ENOENT, path) from None
        return node

    def _parent(self, path: str) -> tuple[Inode, str]:
        parts = _parts(path)
        if not parts:
            raise FsError(errno.EEXIST, path)
        parent = self.lookup("/" + "/".join(parts[:-1]))
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, path)
        return parent, parts[-1]

    def _new(self, path: str, mode: int) -> Inode:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise FsError(errno.EEXIST, path)
        node = Inode(self.next_ino, mode)
        self.next_ino += 1
        self.inodes[node.ino] = node
        parent.entries[name] = node.ino
        parent.mtime_ns = time.time_ns()
        return node

    def create(self, path: str, mode: int) -> Inode:
        return self._new(path, stat.S_IFREG | (mode & 0o7777))

    def mkdir(self, path: str, mode: int) -> Inode:
        return self._new(path, stat.S_IFDIR | (mode & 0o7777))

    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        node = self.lookup(path)
        if node.is_dir:
            raise FsError(errno.EISDIR, path)
        del parent.entries[name]

    def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        node = self.lookup(path)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR, path)
        if node.entries:
            raise FsError(errno.ENOTEMPTY, path)
        del parent.entries[name]

    def rename(self, old: str, new: str) -> None:
        old_parent, old_name = self._parent(old)
        node = self.lookup(old)
        new_parent, new_name = self._parent(new)
        existing = new_parent.entries.get(new_name)
        if existing is not None and existing != node.ino:
            target = self.inodes[existing]
            if target.is_dir != node.is_dir:
                raise FsError(errno.EISDIR if target.is_dir else errno.ENOTDIR, new)
            if target.is_dir and target.entries:
                raise FsError(errno.ENOTEMPTY, new)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node.ino
        old_parent.mtime_ns = new_parent.mtime_ns = time.time_ns()

    def names(self, path: str) -> list[str]:
        node = self.lookup(path)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR, path)
        return sorted(node.entries)

    # -- data -----------------------------------------------------------------------------

    def write(self, node: Inode, offset: int, data: bytes) -> int:
        self._record(node, Write(offset, bytes(data)))
        self.counters.writes += 1
        self.counters.bytes_written += len(data)
        return len(data)

    def truncate(self, node: Inode, length: int) -> None:
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._record(node, Truncate(length))

    def _record(self, node: Inode, op: Op) -> None:
        _apply(node.data, op)
        node.pending.append(op)
        node.pending_bytes += len(op.data) if isinstance(op, Write) else 0
        node.mtime_ns = time.time_ns()
        if node.pending_bytes > WRITEBACK_BYTES:
            self._write_back(node, len(node.pending) // 2)

    def _write_back(self, node: Inode, count: int) -> None:
        for op in node.pending[:count]:
            _apply(node.durable, op)
        del node.pending[:count]
        node.pending_bytes = sum(len(op.data) for op in node.pending if isinstance(op, Write))
        self.counters.writebacks += 1

    @staticmethod
    def read(node: Inode, offset: int, size: int) -> bytes:
        return bytes(node.data[offset:offset + size])

    # -- durability -----------------------------------------------------------------------

    def fsync(self, node: Inode) -> None:
        """Makes a file's data durable, or a directory's entries (its names, not their data)."""
        if self.fail_fsync:
            raise FsError(errno.EIO, "fsync failed (injected)")
        if node.is_dir:
            node.durable_entries = dict(node.entries)
            self.counters.dir_fsyncs += 1
        else:
            self._write_back(node, len(node.pending))
            self.counters.fsyncs += 1

    def sync_all(self) -> None:
        """Everything durable: what a clean shutdown (``sync``, unmount) does."""
        for node in self.inodes.values():
            if node.is_dir:
                node.durable_entries = dict(node.entries)
            else:
                self._write_back(node, len(node.pending))

    def cut(self, rng: random.Random | None = None) -> None:
        """The power goes: every file and directory falls back to its durable state.

        With ``rng`` (torn writes), each file keeps its unsynced writes in order up to a random
        one, of which a random prefix survives."""
        self.counters.cuts += 1
        for node in self.inodes.values():
            if node.is_dir:
                node.entries = dict(node.durable_entries)
                continue
            if rng is not None and node.pending:
                kept = rng.randrange(len(node.pending))
                for op in node.pending[:kept]:
                    _apply(node.durable, op)
                last = node.pending[kept]
                if isinstance(last, Write) and last.data:
                    _apply(node.durable, Write(last.offset, last.data[:rng.randrange(len(last.data))]))
            node.pending.clear()
            node.pending_bytes = 0
            node.data = bytearray(node.durable)
        self._forget_unreachable()

    def _forget_unreachable(self) -> None:
        reachable = {ROOT}
        stack = [ROOT]
        while stack:
            for ino in self.inodes[stack.pop()].entries.values():
                if ino not in reachable:
                    reachable.add(ino)
                    stack.append(ino)
        for ino in set(self.inodes) - reachable:
            del self.inodes[ino]

    def unsynced_bytes(self) -> int:
        return sum(node.pending_bytes for node in self.inodes.values())

    def walk(self) -> Iterator[tuple[str, Inode]]:
        """Every path now, the root first."""
        stack = [("/", self.inodes[ROOT])]
        while stack:
            path, node = stack.pop()
            yield path, node
            for name, ino in sorted(node.entries.items(), reverse=True):
                stack.append((os.path.join(path, name), self.inodes[ino]))

    # -- the durable image on the host ----------------------------------------------------

    def save(self, directory: str) -> None:
        """Writes the durable state to ``directory`` (what a restarted machine finds)."""
        os.makedirs(directory, exist_ok=True)
        image = {"next_ino": self.next_ino, "inodes": {}}
        for node in self.inodes.values():
            image["inodes"][str(node.ino)] = {"mode": node.mode, "entries": node.durable_entries}
            if not node.is_dir:
                _write_file(os.path.join(directory, f"{node.ino}.data"), bytes(node.durable))
        _write_file(os.path.join(directory, IMAGE), json.dumps(image).encode())
        for name in os.listdir(directory):
            if name.endswith(".data") and str(name[:-5]) not in image["inodes"]:
                os.unlink(os.path.join(directory, name))

    @classmethod
    def load(cls, directory: str) -> Volume:
        volume = cls()
        try:
            with open(os.path.join(directory, IMAGE), "rb") as f:
                image = json.load(f)
        except FileNotFoundError:
            return volume
        volume.next_ino = image["next_ino"]
        volume.inodes = {}
        for ino_text, doc in image["inodes"].items():
            node = Inode(int(ino_text), doc["mode"], entries=dict(doc["entries"]),
                         durable_entries=dict(doc["entries"]))
            if not node.is_dir:
                with open(os.path.join(directory, f"{ino_text}.data"), "rb") as f:
                    node.durable = bytearray(f.read())
                node.data = bytearray(node.durable)
            volume.inodes[node.ino] = node
        volume._forget_unreachable()
        return volume


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def _write_file(path: str, data: bytes) -> None:
    """The host's copy of the image is written atomically (the host does not lose power)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
