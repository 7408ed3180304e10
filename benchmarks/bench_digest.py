"""Why the command digest is XXH3-64: candidate digests on the apply path, side by side.

Run: ``.venv/bin/python benchmarks/bench_digest.py``. Applies the session-managed puts of
``bench_apply.py`` (100 B values, then 1 MiB) with ``kvstore.dedup.command_digest`` replaced by
each candidate in turn, in alternating order round after round, in one process, and reports
each one's CPU time per entry against a constant digest (the cost of everything else). Only
the time is of interest: the state each candidate produces differs from ours in its digests.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_apply  # noqa: E402 - a sibling script, not a package

from kvstore import dedup  # noqa: E402

CANDIDATES: dict[str, Callable[[bytes], bytes]] = {
    "constant (no digest)": lambda command: b"\0" * dedup.COMMAND_DIGEST_SIZE,
    "XXH3-64 (ours)": xxhash.xxh3_64_digest,
    "BLAKE2b-64": lambda command: hashlib.blake2b(command, digest_size=8).digest(),
    "SHA-256, 8 bytes": lambda command: hashlib.sha256(command).digest()[:8],
}


def compare(value_size: int, entries: int, rounds: int, keys: int) -> None:
    workload = bench_apply.session_workload(entries, 64, b"v" * value_size, keys)
    seconds: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    bench_apply.time_round(workload)  # warm-up
    real = dedup.command_digest
    try:
        for r in range(rounds):
            for name in list(CANDIDATES)[:: 1 if r % 2 == 0 else -1]:
                dedup.command_digest = CANDIDATES[name]
                seconds[name].append(bench_apply.time_round(workload))
    finally:
        dedup.command_digest = real
    per_entry = {name: statistics.median(s) / entries * 1e6 for name, s in seconds.items()}
    base = per_entry["constant (no digest)"]
    print(f"\nsession-managed puts of {value_size:,} B, median of {rounds} rounds (CPU time)")
    for name, us in per_entry.items():
        print(f"  {name:<22} {us:>10.2f} us/entry   {us - base:>+9.2f} us   x{us / base:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    compare(100, 50_000, args.rounds, 10_000)
    compare(2**20, 40, args.rounds, 4)


if __name__ == "__main__":
    main(sys.argv[1:])
