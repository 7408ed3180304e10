"""netem in user space: delay with jitter, loss and reordering of one host's packets through
the kernel's NFQUEUE, for kernels built without sch_netem (``tc netem`` is preferred).

Run inside a host's namespace (``ip netns exec NS python -m kvstore.check.nfq_netem ...``),
with iptables rules there sending the packets of its ``eth0``, in and out, to queue QUEUE
(``--queue-bypass``: while no program listens, packets pass untouched). The kernel then holds
each packet until this program gives its verdict, by packet id and in any order:

* ``NF_DROP`` at once for a share ``--loss`` of them (chosen at random);
* ``NF_ACCEPT`` after ``--delay`` plus or minus ``--jitter`` (uniform) for the rest, except a
  share ``--reorder`` accepted at once, which thereby overtakes those still held (netem's
  ``reorder``); jitter alone reorders as well, as it does in netem.

The protocol is nfnetlink_queue (``linux/netfilter/nfnetlink_queue.h``): bind the queue, ask for
metadata only (the packet id is all it needs: nothing of the payload is copied to user space),
receive ``NFQNL_MSG_PACKET`` messages, answer with ``NFQNL_MSG_VERDICT``. On SIGTERM it accepts
every packet it still holds, then exits; if it dies, the kernel drops what it held (a loss, which
TCP repairs). It is bounded: at most ``MAX_HELD`` packets held (past that, new ones are accepted
at once), and it never reads, keeps or changes packet contents.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from types import FrameType

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NFNETLINK_V0 = 0
MAX_HELD = 10_000
RCVBUF = 4 * 1024 * 1024

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the queue number, big-endian)
_NLATTR = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def message(msg: int, queue: int, attrs: bytes, *, flags: int = NLM_F_REQUEST,
            seq: int = 0) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg,
                          flags, seq, 0) + body


def verdict(queue: int, packet_id: int, accept: bool) -> bytes:
    return message(NFQNL_MSG_VERDICT, queue, _attr(
        NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT if accept else NF_DROP, packet_id)))


def packet_ids(data: bytes) -> list[int]:
    """The packet ids in a batch of netlink messages read from the queue's socket."""
    ids, offset = [], 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            at = offset + _NLMSGHDR.size + _NFGENMSG.size
            while at + _NLATTR.size <= offset + length:
                attr_len, attr_type = _NLATTR.unpack_from(data, at)
                if attr_len < _NLATTR.size:
                    break
                if attr_type & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, at + _NLATTR.size)[0])
                at += attr_len + (-attr_len % 4)
        offset += length + (-length % 4)
    return ids


class Schedule:
    """When each packet gets its verdict (pure: a seeded ``random.Random`` and given times)."""

    def __init__(self, rng: random.Random, delay_s: float, jitter_s: float, loss: float,
                 reorder: float) -> None:
        self.rng, self.delay, self.jitter, self.loss, self.reorder = (
            rng, delay_s, jitter_s, loss, reorder)
        self._held: list[tuple[float, int, int]] = []
        self._order = 0

    def __len__(self) -> int:
        return len(self._held)

    def arrive(self, packet_id: int, now: float) -> bool | None:
        """False: drop it now; True: accept it now; None: held (see ``due``)."""
        if self.rng.random() < self.loss:
            return False
        if self.rng.random() < self.reorder or len(self._held) >= MAX_HELD:
            return True
        wait = max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
        self._order += 1
        heapq.heappush(self._held, (now + wait, self._order, packet_id))
        return None

    def due(self, now: float) -> list[int]:
        """The held packets whose time has come, in order of their times."""
        ready = []
        while self._held and self._held[0][0] <= now:
            ready.append(heapq.heappop(self._held)[2])
        return ready

    def next_due(self) -> float | None:
        return self._held[0][0] if self._held else None

    def release_all(self) -> list[int]:
        ready = [packet_id for _, _, packet_id in sorted(self._held)]
        self._held.clear()
        return ready


def _bind(sock: socket.socket, queue: int) -> None:
    """Binds ``queue`` (metadata only) and checks the kernel's acknowledgement of each step."""
    steps = [
        _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)),
        _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_META)),
    ]
    for seq, attrs in enumerate(steps, 1):
        sock.send(message(NFQNL_MSG_CONFIG, queue, attrs, flags=NLM_F_REQUEST | NLM_F_ACK,
                          seq=seq))
        reply = sock.recv(65536)
        _, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
        error = struct.unpack_from("=i", reply, _NLMSGHDR.size)[0] if kind == NLMSG_ERROR else 0
        if error:
            raise OSError(-error, f"binding NFQUEUE {queue}: {os.strerror(-error)}")


def run(queue: int, schedule: Schedule, ready_file: str | None = None) -> None:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((0, 0))
    _bind(sock, queue)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write("ready\n")
    while not stopping:
        now = time.monotonic()
        due = schedule.next_due()
        timeout = 0.5 if due is None else max(0.0, due - now)
        try:
            readable, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        if readable:
            try:
                data = sock.recv(1 << 20)
            except OSError:  # ENOBUFS: the kernel had to drop some (a loss, as on a wire)
                data = b""
            for packet_id in packet_ids(data):
                decision = schedule.arrive(packet_id, now)
                if decision is not None:
                    sock.send(verdict(queue, packet_id, decision))
        for packet_id in schedule.due(now):
            sock.send(verdict(queue, packet_id, True))
    for packet_id in schedule.release_all():
        sock.send(verdict(queue, packet_id, True))
    sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss-percent", type=float, default=0.0)
    parser.add_argument("--reorder-percent", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-file", help="Written once the queue is bound.")
    args = parser.parse_args(argv)
    schedule = Schedule(random.Random(args.seed), args.delay_ms / 1000, args.jitter_ms / 1000,
                        args.loss_percent / 100, args.reorder_percent / 100)
    try:
        run(args.queue, schedule, args.ready_file)
    except OSError as exc:
        print(f"nfq_netem: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
