"""Free TCP ports on loopback for a local cluster, chosen outside the kernel's ephemeral range.

The rule: a port handed out here is one no outgoing connection can take. A port the kernel
picks with ``bind(0)`` comes from the ephemeral range (Linux: ``ip_local_port_range``, 32768-60999
by default), and so does the source port of every outgoing connection. Between the moment a
port is chosen and the moment its node binds it, the nodes already running open connections
to one another, and one of them could take it: the node then failed with "Address already in
use" (seen in CI, on a loaded machine, where a node took seconds to start). Ports outside that
range are only ever taken by a program that listens on them, which the bind check below sees.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

HOST = "127.0.0.1"
"""Every address is on loopback: a local cluster is for development and tests."""

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
"""Linux's range for outgoing connections' source ports (and for ``bind`` to port 0)."""
DEFAULT_EPHEMERAL = (32768, 60999)
"""The range where the file cannot be read (another OS): Linux's default."""
LOWEST = 20000
"""Ports below this are left to the services that are commonly configured there."""
FEWEST_CANDIDATES = 100
"""With fewer ports outside the ephemeral range than this, the kernel picks them instead."""
HANDED_OUT_MEMORY = 4096
"""Ports this process handed out recently, never handed out again before their node binds."""

_handed_out: list[int] = []


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = (int(field) for field in EPHEMERAL_RANGE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def _candidates() -> list[int]:
    low, high = _ephemeral()
    return [port for port in range(LOWEST, 65536) if not low <= port <= high]


def bindable(port: int) -> bool:
    """Whether nothing listens on ``port`` of loopback right now (a bind to it succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports on loopback that nothing listens on right now.

    Another program may still start listening on one before the node binds it; the node then
    fails to start in one line, naming the port."""
    candidates = _candidates()
    if len(candidates) < FEWEST_CANDIDATES:  # an ephemeral range that covers almost all
        return _kernel_ports(count)
    chosen: list[int] = []
    for port in random.sample(candidates, len(candidates)):
        if port in chosen or port in _handed_out or not bindable(port):
            continue
        chosen.append(port)
        if len(chosen) == count:
            break
    else:  # fewer free than asked for: the kernel picks the rest
        chosen += _kernel_ports(count - len(chosen))
    _handed_out.extend(chosen)
    del _handed_out[:-HANDED_OUT_MEMORY]
    return chosen


def free_port() -> int:
    """One port, as ``free_ports``."""
    return free_ports(1)[0]


def _kernel_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel picks (all sockets held open until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
