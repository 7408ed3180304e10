"""One power-loss file system mount, as the harness drives it: mount, cut the power, unmount.

``PowerMount`` runs ``python -m kvstore.check.powerfs_fuse`` on a mount point with a backing
directory that holds the durable image. A power loss of the machine that uses the mount is:

    mount.cut()        # the disk keeps only what was synced; the mount now fails every call
    (kill the processes that used it)
    mount.unmount()    # the page cache goes with the mount
    mount.mount()      # the machine boots: the durable image, nothing else

``unmount`` never leaves a mount behind: it tries a normal unmount, then a lazy one, then
aborts the FUSE connection and kills the daemon. ``fuse_unusable()`` says why FUSE cannot be
used here (no /dev/fuse, no libfuse, no permission to mount), or None.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT = 10.0
UNMOUNT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0


class PowerFsError(RuntimeError):
    """The power-loss file system did not do what it was told."""


class PowerMount:
    def __init__(self, mountpoint: Path, backing: Path, log_path: Path | None = None) -> None:
        self.mountpoint = Path(mountpoint).absolute()
        self.backing = Path(backing).absolute()
        self.control = self.backing.parent / f".{self.backing.name}.sock"
        self.log_path = log_path or self.backing.parent / f"{self.backing.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def mounted(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def mount(self) -> None:
        if self.mounted:
            return
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "kvstore.check.powerfs_fuse", str(self.mountpoint),
                 "--backing", str(self.backing), "--control", str(self.control)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise PowerFsError(f"powerfs exited at mount: {self._log_tail()}")
            if os.path.ismount(self.mountpoint) and self.control.exists():
                with contextlib.suppress(OSError):
                    if self.command("ping") == "ok":
                        return
            time.sleep(0.02)
        self.unmount()
        raise PowerFsError(f"powerfs did not mount {self.mountpoint} within {MOUNT_TIMEOUT} s")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(COMMAND_TIMEOUT)
            s.connect(str(self.control))
            with s.makefile("rwb") as stream:
                stream.write(line.encode() + b"\n")
                stream.flush()
                answer = stream.readline().decode().strip()
        if answer.startswith("error"):
            raise PowerFsError(f"powerfs {line!r}: {answer}")
        return answer

    def cut(self, torn_seed: int | None = None) -> None:
        """The power goes: only what was synced stays; every later call on the mount fails."""
        self.command("cut" if torn_seed is None else f"cut torn {torn_seed}")

    def fail_fsync(self, on: bool) -> None:
        self.command(f"fail-fsync {'on' if on else 'off'}")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = json.loads(self.command("stats"))
        return stats

    def unmount(self) -> None:
        """Unmounts (a clean shutdown unless ``cut`` came first); never leaves a mount behind."""
        proc, self._proc = self._proc, None
        if os.path.ismount(self.mountpoint):
            for args in (["-u"], ["-uz"]):
                if subprocess.run(["fusermount3", *args, str(self.mountpoint)],
                                  capture_output=True, check=False).returncode == 0:
                    break
        if proc is not None:
            try:
                proc.wait(UNMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                _abort_connection(self.mountpoint)
                proc.kill()
                proc.wait(UNMOUNT_TIMEOUT)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return "(no log)"

    def __enter__(self) -> PowerMount:
        self.mount()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.unmount()


def _abort_connection(mountpoint: Path) -> None:
    """Fails every pending and future request of a stuck FUSE mount (then it can go)."""
    with contextlib.suppress(OSError):
        minor = os.minor(os.stat(mountpoint).st_dev)
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


@cache
def fuse_unusable() -> str | None:
    """Why the power-loss file system cannot run on this machine, or None if it can (checked by
    mounting one, once per process)."""
    if not sys.platform.startswith("linux"):
        return f"FUSE power-loss tests need Linux, not {sys.platform}"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse is not usable: {exc.strerror}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian: apt-get install fuse3)"
    probe = subprocess.run([sys.executable, "-c", "import mfusepy"], capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        return f"mfusepy or libfuse3 is missing: {probe.stderr.strip().splitlines()[-1]}"
    with tempfile.TemporaryDirectory(prefix="powerfs-probe-") as tmp:
        mount = PowerMount(Path(tmp) / "mnt", Path(tmp) / "disk")
        try:
            mount.mount()
        except PowerFsError as exc:
            return f"cannot mount a FUSE file system here: {exc}"
        finally:
            mount.unmount()
    return None
