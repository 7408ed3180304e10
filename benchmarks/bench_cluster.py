"""Closed-loop puts on a fresh local cluster, sessions vs no-op sessions: now ``kv bench``.

This script is kept for ``make bench-cluster`` and runs

    kv bench --clients 1,16 --rounds 3 --compare noop [ARGS...]

``kv bench`` (``cli/bench/``) does what this script did (worker processes, alternating
configurations, medians) and more: p90/max latency, client and node CPU per operation, a
progress line, ``-w json``, and ``--compare etcd`` / ``--compare raw`` to run etcd or plain
PySyncObj in the same run. Any ARGS are passed on and win over the defaults above, e.g.

    .venv/bin/python benchmarks/bench_cluster.py --clients 1,16,64 --duration 10s
"""

from __future__ import annotations

import os
import sys

DEFAULTS = ["--clients", "1,16", "--rounds", "3", "--compare", "noop"]


def main() -> None:
    argv = [sys.executable, "-m", "cli", "bench", *DEFAULTS, *sys.argv[1:]]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
