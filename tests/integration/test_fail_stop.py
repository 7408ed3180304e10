"""A failed fsync stops the node (fail-stop): it reports ``fatal`` and acknowledges nothing more.

After a failed fsync the kernel may have dropped the dirty pages and will report the next
fsync as a success, so retrying would vouch for data that is gone. The node's data directory is
a power-loss file system (``kvstore.check.powerfs``) told to fail every fsync.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.check.powerfs_mount import PowerMount, fuse_unusable
from kvstore.client import Client
from kvstore.config import Member, NodeConfig
from kvstore.errors import KVError
from kvstore.server import serving
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[PowerMount]:
    reason = fuse_unusable()
    if reason:
        pytest.skip(reason)
    with PowerMount(tmp_path / "data", tmp_path / "disk") as mount:
        yield mount


def test_a_failed_fsync_stops_the_node_and_status_says_fatal(disk: PowerMount) -> None:
    me = Member(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    config = NodeConfig(cluster_id=3, node_id="n1", me=me, peers=(), data_dir=disk.mountpoint,
                        secret="fail-stop")
    with serving(config), Client([me.api_address], timeout=3) as client:
        wait_for(lambda: _put(client, b"before"), 20, "the node to accept writes")
        disk.fail_fsync(True)
        assert not _put(client, b"during"), "a write was acknowledged though its fsync failed"
        status = wait_for(lambda: _fatal(client, me.api_address), 10, "status to report fatal")
        assert "disk failure" in status and "Input/output error" in status
        disk.fail_fsync(False)
        assert not _put(client, b"after"), "the node went on after a failed fsync"


def _put(client: Client, key: bytes) -> bool:
    try:
        client.put(key, b"v", timeout=2)
        return True
    except KVError:
        return False


def _fatal(client: Client, endpoint: str) -> str | None:
    alarms = client.status(endpoint, timeout=5).alarms
    return next((a for a in alarms if a.startswith("fatal:")), None)
