"""What each piece of one write costs in CPU, piece by piece, in this process (no cluster).

The pieces a 100-byte put goes through on the leader and on a follower, outside gRPC: the API's
protobuf work (parse the request, build the entry), the batch, the state machine's apply, the
Raft messages (PySyncObj's pickle, its zlib, our seal), a journal write with its fdatasync, and
a wake-up through a pipe. Each figure is the best of several repeats (the least disturbed by
other programs on a shared machine), in microseconds.

    .venv/bin/python benchmarks/write_path_costs.py
"""

from __future__ import annotations

import os
import tempfile
import time
import timeit
import zlib
from collections.abc import Callable

import pysyncobj.pickle as pysyncobj_pickle

from kvstore import ops, results
from kvstore.dedup import SERIES_ID_FOR_REGISTER
from kvstore.entry import decode_batch, encode_batch, encode_entry
from kvstore.node.lean_wire import LEAN_LEVEL
from kvstore.node.wire_crypto import WireCrypto
from kvstore.proto import api_pb2
from kvstore.state_machine import StateMachine
from session.session import Session
from session.wire import parse

CLUSTER = 7
CLIENT = 123456789


def best_us(work: Callable[[], object], number: int = 2000, repeat: int = 7) -> float:
    return min(timeit.repeat(work, number=number, repeat=repeat)) / number * 1e6


def _wire_rows(name: str, message: object, crypto: WireCrypto) -> list[tuple[str, float]]:
    """One Raft message through PySyncObj's send and receive steps, step by step."""
    pickled = pysyncobj_pickle.dumps(message)
    packed = zlib.compress(pickled, 3)
    sealed = crypto.encrypt_at_time(packed, 0)
    return [
        (f"wire, {name} ({len(pickled)} B): pickle",
         best_us(lambda: pysyncobj_pickle.dumps(message))),
        (f"wire, {name}: zlib level 3 (PySyncObj)", best_us(lambda: zlib.compress(pickled, 3))),
        (f"wire, {name}: zlib level {LEAN_LEVEL} (lean_wire, to unknown peers)",
         best_us(lambda: zlib.compress(pickled, LEAN_LEVEL))),
        (f"wire, {name}: zlib decompress", best_us(lambda: zlib.decompress(packed))),
        (f"wire, {name}: unpickle", best_us(lambda: pysyncobj_pickle.loads(pickled))),
        (f"wire, {name}: seal (AES-GCM)", best_us(lambda: crypto.encrypt_at_time(packed, 0))),
        (f"wire, {name}: open", best_us(lambda: crypto.decrypt(sealed))),
    ]


def main() -> None:
    session = Session(cluster_id=CLUSTER, client_id=CLIENT, series_id=1000, responded_to=999)
    command = ops.put(b"bench/c0001/k0001", b"v" * 100)
    request = api_pb2.ProposeRequest(session=session.to_pb(), command=command).SerializeToString()
    parsed = parse(api_pb2.ProposeRequest, request)
    entry = encode_entry(session, command)
    batch = encode_batch([entry])
    rows = [
        ("API: parse the ProposeRequest", best_us(lambda: parse(api_pb2.ProposeRequest, request))),
        ("API: Session.from_pb", best_us(lambda: Session.from_pb(parsed.session))),
        ("API: encode_entry", best_us(lambda: encode_entry(session, parsed.command))),
        ("node: encode_batch of 1 entry", best_us(lambda: encode_batch([entry]))),
        ("apply: decode_batch of 1 entry", best_us(lambda: decode_batch(batch))),
    ]
    machine = StateMachine(CLUSTER)
    register = Session(cluster_id=CLUSTER, client_id=CLIENT, series_id=SERIES_ID_FOR_REGISTER)
    machine.apply_batch(encode_batch([encode_entry(register)]))
    series = [1000]
    batches = []
    for _ in range(7 * 500):
        series[0] += 1
        proposal = Session(cluster_id=CLUSTER, client_id=CLIENT, series_id=series[0],
                           responded_to=series[0] - 1)
        batches.append(encode_batch([encode_entry(proposal, command)]))
    pending = iter(batches)
    rows.append(("apply: one batch of 1 put, with its session",
                 best_us(lambda: machine.apply_batch(next(pending)), number=500)))
    answer = machine.apply_batch(encode_batch([encode_entry(Session(
        cluster_id=CLUSTER, client_id=CLIENT, series_id=series[0] + 1,
        responded_to=series[0]), command)]))[0]
    rows.append(("API: results.decode of the answer", best_us(lambda: results.decode(answer))))
    append = {"type": "append_entries", "term": 3, "commit_index": 1234,
              "entries": [(b"\x00" + batch, 1235, 3)], "prevLogIdx": 1234, "prevLogTerm": 3}
    ack = {"type": "next_node_idx", "next_node_idx": 1236, "reset": False, "success": True}
    crypto = WireCrypto("write-path-costs")
    rows += _wire_rows("append of 1 batch", append, crypto)
    rows += _wire_rows("acknowledgement", ack, crypto)
    with tempfile.TemporaryDirectory(prefix="write-path-costs-") as root:
        fd = os.open(os.path.join(root, "journal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        record = b"x" * 250

        def write_and_sync() -> None:
            os.write(fd, record)
            os.fdatasync(fd)

        times = []
        for _ in range(300):
            started = time.perf_counter()
            write_and_sync()
            times.append((time.perf_counter() - started) * 1e6)
        os.close(fd)
    times.sort()
    rows.append(("journal: write + fdatasync, median of 300", times[len(times) // 2]))
    rows.append(("journal: write + fdatasync, p90", times[len(times) * 9 // 10]))
    wake_r, wake_w = os.pipe()

    def wake() -> None:
        os.write(wake_w, b"w")
        os.read(wake_r, 16)

    rows.append(("wake-up: pipe write + read", best_us(wake)))
    width = max(len(name) for name, _ in rows)
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:8.1f} us")


if __name__ == "__main__":
    main()
