"""A node restarts from every crash state of issue 10, item 3, or refuses with one line that
names the file and the way out (``kvstore.node.recovery``).

Each test copies the data directory of a one-node cluster that wrote ``KEYS`` keys, damages it
the way a crash or a power loss would, and starts the node again in this process, at the same
addresses (its snapshot records them as its membership). A node that restarts must answer, keep
every entry that was intact, and accept new writes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvstore.client import Client
from kvstore.config import CannotRestart, Member, NodeConfig
from kvstore.errors import KVError
from kvstore.node import dump_file
from kvstore.node import journal as journal_mod
from kvstore.node.journal import MAGIC
from kvstore.node.meta_file import VOTE_UNKNOWN, MetaFile
from kvstore.server import serving
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

KEYS = 12


def member_of(data_dir: Path) -> Member:
    """The node's addresses, kept beside its data directory (the same on every restart)."""
    sidecar = data_dir.parent / f"{data_dir.name}.member"
    if not sidecar.exists():
        sidecar.write_text(f"127.0.0.1:{free_port()} 127.0.0.1:{free_port()}")
    raft, api = sidecar.read_text().split()
    return Member(raft, api)


@contextmanager
def node(data_dir: Path, snapshot_count: int = 1000) -> Iterator[Client]:
    me = member_of(data_dir)
    config = NodeConfig(cluster_id=11, node_id="n1", me=me, peers=(), data_dir=data_dir,
                        secret="crash-states", snapshot_count=snapshot_count)
    with serving(config), Client([me.api_address], timeout=10) as client:
        wait_for(lambda: _answers(client), 20, "the node to elect itself and answer")
        yield client


def _answers(client: Client) -> bool:
    try:
        client.put(b"probe", b"")
        return True
    except KVError:
        return False


def written(root: Path, snapshot_count: int) -> Path:
    data = root / f"golden-{snapshot_count}"
    with node(data, snapshot_count) as client:
        for i in range(KEYS):
            client.put(b"k%d" % i, b"v%d" % i)
    # A stop can interrupt a background snapshot write, which leaves raft.dump.tmp behind (the
    # next start removes it and says so: its own test below). Each test here starts from a
    # directory without one, so that its node says only what its own damage makes it say.
    for leftover in data.glob("*.tmp"):
        leftover.unlink()
    return data


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("golden")
    return {"whole": written(root, 1000), "compacted": written(root, 5)}


@pytest.fixture
def copy(golden: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(kind: str) -> Path:
        target = tmp_path / kind
        shutil.copytree(golden[kind], target)
        source = golden[kind]
        shutil.copy(source.parent / f"{source.name}.member", tmp_path / f"{kind}.member")
        return target
    return make


def keys_present(client: Client) -> list[int]:
    present = []
    for i in range(KEYS):
        try:
            if client.get(b"k%d" % i).value == b"v%d" % i:
                present.append(i)
        except KVError:
            pass
    return present


def restarts_with(data: Path, expected_keys: list[int]) -> None:
    with node(data) as client:
        assert keys_present(client) == expected_keys
        client.put(b"after", b"restart")
        assert client.get(b"after").value == b"restart"


def refuses(data: Path, *names: str) -> str:
    with pytest.raises(CannotRestart) as refusal:
        with node(data):
            pass
    message = str(refusal.value)
    assert "\n" not in message
    assert "must be replaced" in message and "kv cluster add-node" in message
    for name in names:
        assert name in message
    return message


def journal_records(data: Path) -> list[tuple[int, int]]:
    """(offset, index) of each record."""
    raw = (data / "raft.journal").read_bytes()
    offset, found = len(MAGIC), []
    while offset < len(raw):
        length, _crc, index, _term = journal_mod.RECORD.unpack_from(raw, offset)
        found.append((offset, index))
        offset += journal_mod.RECORD.size + length
    return found


ALL = list(range(KEYS))


def test_no_damage_restarts_with_everything(copy) -> None:  # type: ignore[no-untyped-def]
    restarts_with(copy("whole"), ALL)


def test_an_empty_journal_restarts_with_an_empty_log(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    (data / "raft.journal").write_bytes(b"")
    restarts_with(data, [])


def test_a_zero_filled_journal_restarts_with_an_empty_log(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    size = (data / "raft.journal").stat().st_size
    (data / "raft.journal").write_bytes(bytes(size))
    restarts_with(data, [])


def test_a_journal_cut_inside_its_header_restarts_with_an_empty_log(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    (data / "raft.journal").write_bytes(MAGIC[:5])
    restarts_with(data, [])


def test_a_short_journal_keeps_the_entries_before_the_cut(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    records = journal_records(data)
    cut = records[-4][0] + 10  # inside the fourth record from the end
    with open(data / "raft.journal", "r+b") as f:
        f.truncate(cut)
    with node(data) as client:
        present = keys_present(client)
    assert present and present == ALL[:len(present)] and len(present) < KEYS


def test_a_zero_filled_tail_is_dropped_and_every_entry_kept(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    with open(data / "raft.journal", "ab") as f:
        f.write(bytes(65536))
    restarts_with(data, ALL)


def test_a_torn_last_record_is_dropped(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    with open(data / "raft.journal", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xff\xff")
    with node(data) as client:
        assert keys_present(client)[:KEYS - 1] == ALL[:KEYS - 1]


def test_a_corrupt_record_followed_by_good_ones_is_refused(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    offset = journal_records(data)[3][0]
    with open(data / "raft.journal", "r+b") as f:
        f.seek(offset + journal_mod.RECORD.size)
        f.write(b"\x00garbage")
    refuses(data, "raft.journal", "damaged")


def test_a_journal_with_an_unknown_header_is_refused(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    (data / "raft.journal").write_bytes(b"something else entirely")
    refuses(data, "raft.journal", "not a journal")


def test_an_empty_meta_file_restarts_without_a_vote_in_the_recovered_term(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    term = MetaFile(str(data / "raft.meta")).load()[0].term  # type: ignore[union-attr]
    (data / "raft.meta").write_bytes(b"")
    restarts_with(data, ALL)
    stored = MetaFile(str(data / "raft.meta")).load()[0]
    assert stored is not None and stored.term > term, "it campaigned in a later term"


def test_a_missing_meta_file_is_rebuilt_from_the_log_with_no_vote(copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from kvstore.node import recovery

    data = copy("whole")
    (data / "raft.meta").unlink()
    journal = recovery.prepare(str(data))
    try:
        assert journal.getVotedForNodeId() == VOTE_UNKNOWN
        assert journal.getCurrentTerm() == journal[-1][2]
    finally:
        journal._destroy()
    restarts_with(data, ALL)


def test_temporary_files_left_by_a_crash_are_removed(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("compacted")
    leftovers = ["raft.journal.tmp", "raft.meta.tmp", "raft.dump.tmp", "raft.dump.1.tmp",
                 "raft.journal.meta.tmp"]
    for name in leftovers:
        (data / name).write_bytes(b"half written")
    restarts_with(data, ALL)
    assert not [name for name in leftovers if (data / name).exists()]


def test_a_compacted_journal_restarts_from_its_snapshot(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("compacted")
    assert journal_records(data)[0][1] > 1, "the journal was compacted"
    restarts_with(data, ALL)


def test_a_dump_that_fails_its_checksum_is_refused_when_the_journal_was_compacted(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("compacted")
    raw = bytearray((data / "raft.dump").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (data / "raft.dump").write_bytes(bytes(raw))
    refuses(data, "raft.dump", "fails its checksum")


def test_a_damaged_dump_is_set_aside_when_the_journal_holds_everything(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("whole")
    (data / "raft.dump").write_bytes(b"KVSNAP1\n" + bytes(100))
    restarts_with(data, ALL)
    assert (data / "raft.dump.damaged").exists()


def test_a_missing_dump_with_a_compacted_journal_is_refused(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("compacted")
    (data / "raft.dump").unlink()
    refuses(data, "raft.dump is missing", "raft.journal")


def dump_entries(data: Path) -> tuple[int, int]:
    with open(data / "raft.dump", "rb") as f:
        meta = dump_file.read_meta(f)
    return meta["prev"][1], meta["last"][1]


def test_a_snapshot_renamed_before_the_journal_was_compacted_keeps_the_journal_tail(copy) -> None:  # type: ignore[no-untyped-def]
    """D12: PySyncObj keeps the journal only if it starts with the snapshot's two entries;
    otherwise it clears it, dropping every entry after the snapshot."""
    data = copy("compacted")
    prev, last = dump_entries(data)
    records = journal_records(data)
    assert records[0][1] == prev and records[-1][1] > last, "a tail after the snapshot"
    raw = (data / "raft.journal").read_bytes()
    first_term = journal_mod.RECORD.unpack_from(raw, len(MAGIC))[3]
    older = b"".join(journal_mod.encode(i, first_term, b"\x00older") for i in range(prev - 3, prev))
    (data / "raft.journal").write_bytes(MAGIC + older + raw[len(MAGIC):])
    restarts_with(data, ALL)


def test_a_journal_that_starts_after_its_snapshot_is_refused(copy) -> None:  # type: ignore[no-untyped-def]
    data = copy("compacted")
    prev, last = dump_entries(data)
    raw = (data / "raft.journal").read_bytes()
    records = journal_records(data)
    assert records[-1][1] > last + 1
    after = [offset for offset, index in records if index > last + 1][0]
    (data / "raft.journal").write_bytes(MAGIC + raw[after:])
    refuses(data, "raft.journal starts at entry", "missing")


def test_a_journal_and_meta_in_pysyncobjs_format_are_converted(copy) -> None:  # type: ignore[no-untyped-def]
    """A data directory written before this layer existed (PySyncObj's own journal)."""
    from pysyncobj.journal import FileJournal

    data = copy("whole")
    raw = (data / "raft.journal").read_bytes()
    records, offset = [], len(MAGIC)
    while offset < len(raw):
        length, _crc, index, term = journal_mod.RECORD.unpack_from(raw, offset)
        start = offset + journal_mod.RECORD.size
        records.append((raw[start:start + length], index, term))
        offset = start + length
    meta = MetaFile(str(data / "raft.meta")).load()[0]
    assert meta is not None
    (data / "raft.journal").unlink()
    (data / "raft.meta").unlink()
    legacy = FileJournal(str(data / "raft.journal"))
    for record in records:
        legacy.add(*record)
    legacy.setCurrentTerm(meta.term, meta.voted_for)
    legacy._destroy()
    restarts_with(data, ALL)
    assert (data / "raft.journal").read_bytes().startswith(MAGIC)
    assert not (data / "raft.journal.meta").exists()


def test_kv_node_run_refuses_in_one_line_naming_the_file_and_the_way_out(copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    data = copy("compacted")
    (data / "raft.dump").write_bytes(b"KVSNAP1\n" + bytes(64))
    secret = tmp_path / "secret"
    secret.write_text("crash-states")
    run = [sys.executable, "-m", "cli", "node", "run", "--id", "n1", "--cluster-id", "11",
           "--raft", f"127.0.0.1:{free_port()}", "--api", f"127.0.0.1:{free_port()}",
           "--data-dir", str(data), "--secret-file", str(secret)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    refused = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "raft.dump" in lines[0] and "kv cluster remove-node" in lines[0], lines


def test_a_missing_journal_restarts_from_the_snapshot(copy) -> None:  # type: ignore[no-untyped-def]
    """The journal's name never reached the disk, the snapshot's did: the snapshot's state is
    back, the entries after it are not (they are on the peers)."""
    data = copy("compacted")
    (data / "raft.journal").unlink()
    with node(data) as client:
        present = keys_present(client)
    assert present == ALL[:len(present)]
