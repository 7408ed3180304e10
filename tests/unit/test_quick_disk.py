"""``kvstore.node.quick_disk``: the tick thread syncs only while its last sync was quick."""

from __future__ import annotations

from kvstore.node.quick_disk import QUICK_SYNC, SLOW_DISK_BACKOFF, QuickDisk


class Clock:
    def __init__(self) -> None:
        self.now = 0.0  # exact sums: a sync of exactly QUICK_SYNC takes exactly that

    def __call__(self) -> float:
        return self.now


def sync_taking(clock: Clock, seconds: float) -> None:
    clock.now += seconds


def test_a_disk_is_quick_until_a_sync_on_it_is_slow() -> None:
    clock = Clock()
    disk = QuickDisk(clock)
    assert disk.quick()
    disk.timed(lambda: sync_taking(clock, QUICK_SYNC))  # at the limit: still quick
    assert disk.quick() and disk.slow_syncs == 0


def test_after_a_slow_sync_the_disk_counts_as_slow_for_the_back_off() -> None:
    clock = Clock()
    disk = QuickDisk(clock)
    disk.timed(lambda: sync_taking(clock, QUICK_SYNC * 1.5))
    finished = clock.now
    assert not disk.quick() and disk.slow_syncs == 1
    clock.now = finished + SLOW_DISK_BACKOFF * 0.99
    assert not disk.quick()
    clock.now = finished + SLOW_DISK_BACKOFF
    assert disk.quick()  # the tick thread tries again
    disk.timed(lambda: sync_taking(clock, QUICK_SYNC * 2))
    assert not disk.quick() and disk.slow_syncs == 2
