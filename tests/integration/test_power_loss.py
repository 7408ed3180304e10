"""``kv check --faults power-loss``: what survives when the power goes.

The nodes' data directories are power-loss file systems (``kvstore.check.powerfs``): a cut
keeps only what was fsynced (files and directories), half the time tearing the last unsynced
writes. Durable mode must lose no acknowledged write and every node must restart; without
fsync the same checkers must see the loss (so we know they can). Skipped, with the reason,
where FUSE is not usable. The 20-losses-of-every-node evidence is the soak test at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.check.powerfs_mount import fuse_unusable
from tests.integration.test_check import kv_check

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def needs_fuse() -> None:
    reason = fuse_unusable()
    if reason:
        pytest.skip(reason)


def test_durable_mode_loses_no_acknowledged_write_across_power_losses(tmp_path: Path) -> None:
    code, summary, _ = kv_check(tmp_path / "report", "--workload", "counter,list-append",
                                "--faults", "power-loss", "--fsync", "--duration", "20s")
    assert summary["verdict"] == "valid", summary
    assert code == 0
    assert summary["faults_injected"].get("power-loss", 0) >= 2, summary  # type: ignore[union-attr]
    assert summary["violations"]["restarts"] == 0  # type: ignore[index]


def test_without_fsync_a_power_loss_of_every_node_is_seen_to_lose_writes(tmp_path: Path) -> None:
    code, summary, _ = kv_check(tmp_path / "report", "--workload", "counter", "--faults",
                                "power-loss", "--power-loss-scope", "all", "--no-fsync",
                                "--duration", "10s")
    assert code == 1
    assert summary["verdict"] == "INVALID"
    violations = summary["violations"]
    assert violations["counter"] > 0, violations  # type: ignore[index]
    assert violations["restarts"] == 0, "without fsync a node loses writes, but restarts"  # type: ignore[index]


@pytest.mark.soak
def test_twenty_power_losses_of_every_node_lose_nothing(tmp_path: Path) -> None:
    code, summary, _ = kv_check(tmp_path / "report", "--workload", "all", "--faults",
                                "power-loss", "--power-loss-scope", "all", "--fsync",
                                "--duration", "300s", timeout=900)
    assert summary["faults_injected"]["power-loss"] >= 20, summary  # type: ignore[index]
    assert summary["verdict"] == "valid", summary
    assert code == 0
