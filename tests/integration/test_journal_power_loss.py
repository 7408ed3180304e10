"""The journal's background compaction (``Journal.reclaim``) cut by a power loss at every point,
on the power-loss file system (``kvstore.check.powerfs``: a cut keeps only what was fsynced,
files and directory entries alike).

At each point the node has just synced some entries (what a follower would have acknowledged)
and appended more; after the cut, the file named ``raft.journal`` must open and hold every
synced entry, as it was. Skipped where FUSE is not usable.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest

from kvstore.check.powerfs_mount import PowerMount
from kvstore.node import journal as journal_mod
from kvstore.node import recovery
from kvstore.node.journal import Journal
from kvstore.node.meta_file import MetaFile
from tests.integration.test_powerfs import disk  # noqa: F401 - the power-loss mount fixture

pytestmark = pytest.mark.integration

STEPS = 3
CUTS = [f"after step {n}" for n in range(STEPS + 1)] + [
    "before the rename", "before the directory sync", "after the reclaim",
    "after the reclaim and a sync", "after a sync made just before the rename"]




def write_some(journal: Journal, synced: dict[int, Any]) -> None:
    """Three entries appended and synced (they count as acknowledged), two more not."""
    for count in range(5):
        index = journal[-1][1] + 1 if len(journal) else 1
        journal.add(b"entry %d" % index, index, 1)
        if count == 2:
            journal.sync()
            synced.update({e[1]: e for e in journal[:]})


@pytest.mark.parametrize("cut", CUTS)
def test_a_power_cut_during_a_compaction_loses_no_synced_entry(
        disk: PowerMount, cut: str, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = disk.mountpoint
    path = str(directory / recovery.JOURNAL)
    Journal.create(path)
    journal = Journal.open(path, MetaFile(str(directory / recovery.META)),
                           str(directory / recovery.DUMP))
    journal.reclaim_later = lambda: None
    synced: dict[int, Any] = {}
    for _ in range(2):
        write_some(journal, synced)
    journal.deleteEntriesTo(6)
    real_replace, real_fsync_path = os.replace, journal_mod.fsync_path
    cut_now = False
    reclaim = journal.reclaim()

    def replace(a: str, b: str) -> None:
        if cut == "before the rename":
            disk.cut()
        if cut == "after a sync made just before the rename":  # as a leader's tick may
            write_some(journal, synced)
        real_replace(a, b)

    def fsync_path(name: str) -> None:
        if cut == "before the directory sync" and name == journal.directory and cut_now:
            disk.cut()
        real_fsync_path(name)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(journal_mod, "fsync_path", fsync_path)
    with contextlib.suppress(OSError):  # the cut fails every later call
        if cut == "after step 0":
            write_some(journal, synced)
            disk.cut()
        else:
            for step, _ in enumerate(reclaim, start=1):
                cut_now = step == STEPS  # the directory sync of the last step, not the first
                if cut == f"after step {step}" or (cut.startswith("before") and cut_now):
                    write_some(journal, synced)
                if cut == f"after step {step}":
                    disk.cut()
                    break
            else:
                if cut == "after the reclaim and a sync":
                    write_some(journal, synced)
                elif cut == "after the reclaim":  # unsynced: the copy's own fsync is all there is
                    journal.add(b"not synced", journal[-1][1] + 1, 1)
                disk.cut()
    with contextlib.suppress(OSError):
        reclaim.close()  # a reclaim cut short closes its descriptors on the dead mount
    with contextlib.suppress(OSError):  # its descriptors close (a busy mount unmounts lazily)
        journal._destroy()
    monkeypatch.undo()
    disk.unmount()
    disk.mount()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".tmp")  # what recovery does first
    restored = Journal.open(path, MetaFile(str(directory / "check.meta")), "")
    try:
        found = {e[1]: e for e in restored[:]}
        missing = [i for i in synced if i >= journal[0][1] and found.get(i) != synced[i]]
        assert not missing, f"cut {cut}: synced entries lost: {missing}"
    finally:
        restored._destroy()
