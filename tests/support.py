"""Helpers shared by the tests: waiting on a condition with a deadline, and a free port.

Tests never sleep and hope: they poll a condition until a deadline, and fail saying what they
were waiting for.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, *,
             error: type[Exception] = AssertionError, poll: float = 0.05) -> T:
    """Polls ``predicate`` until it returns something truthy, which is returned; raises
    ``error`` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
