"""``benchmarks/write_stages.py``'s pure parts: reading tcpdump and ss, cutting writes into
stages by the packets each one causes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

CLIENT, LEADER, FOLLOWER_1, FOLLOWER_2 = 10, 20, 30, 40
PORTS = {5000: CLIENT, 6000: LEADER, 6001: LEADER, 7000: FOLLOWER_1, 8000: FOLLOWER_2}


@pytest.fixture(scope="module")
def ws() -> ModuleType:
    path = Path(__file__).parents[2] / "benchmarks" / "write_stages.py"
    spec = importlib.util.spec_from_file_location("write_stages", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["write_stages"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tcpdump_lines_become_packets(ws: ModuleType) -> None:
    lines = ["1796323820.625956 IP 127.0.0.1.41256 > 127.0.0.1.26933: tcp 190",
             "tcpdump: verbose output suppressed, use -v[v]... for full protocol decode",
             "1796323820.627037 IP 127.0.0.1.26768 > 127.0.0.1.36430: tcp 0"]
    assert ws.parse_tcpdump(lines) == [ws.Packet(1796323820.625956, 41256, 26933, 190),
                                       ws.Packet(1796323820.627037, 26768, 36430, 0)]


def test_ss_lines_give_each_local_port_its_process(ws: ModuleType) -> None:
    out = ('ESTAB 0 0 127.0.0.1:5000 127.0.0.1:6000 users:(("python3",pid=10,fd=7))\n'
           'ESTAB 0 0 127.0.0.1:6000 127.0.0.1:5000 users:(("etcd",pid=20,fd=9),("etcd",pid=20,'
           'fd=10))\n'
           'ESTAB 0 0 127.0.0.1:9999 127.0.0.1:6000\n')  # no process shown: left out
    assert ws.port_owners(out) == {5000: 10, 6000: 20}



def test_a_write_is_cut_at_the_first_append_the_first_answer_and_the_reply(
        ws: ModuleType) -> None:
    p = ws.Packet
    packets = [
        p(1.000, 5000, 6000, 190),  # the request
        p(1.001, 6000, 5000, 0),  # its TCP ack: says nothing
        p(1.002, 6001, 7000, 40),  # a heartbeat, shorter than the value: not the append
        p(1.004, 6001, 7000, 561),  # the append to the first follower
        p(1.0045, 6001, 8000, 561),
        p(1.007, 8000, 6001, 211),  # the first answer (from the second follower)
        p(1.008, 7000, 6001, 211),
        p(1.010, 6000, 5000, 47),  # the reply
        p(1.011, 5000, 6000, 13),  # a window update: not a write
        p(1.013, 5000, 6000, 190),  # the next write
        p(1.014, 6001, 7000, 561),
        p(1.016, 7000, 6001, 211),
        p(1.017, 6000, 5000, 47),
    ]
    cut = ws.stages(packets, PORTS.get, CLIENT, LEADER)
    assert cut["leader in"] == pytest.approx([0.004, 0.001])
    assert cut["replication"] == pytest.approx([0.003, 0.002])
    assert cut["leader out"] == pytest.approx([0.003, 0.001])
    assert cut["client"] == pytest.approx([0.003])


def test_a_write_seen_only_in_part_is_not_counted(ws: ModuleType) -> None:
    p = ws.Packet
    packets = [
        p(1.000, 6001, 7000, 561),  # the capture began inside a write
        p(1.001, 7000, 6001, 211),
        p(1.002, 6000, 5000, 47),
        p(1.003, 5000, 6000, 190),  # a write answered without an append seen: not counted
        p(1.004, 6000, 5000, 47),
        p(1.005, 5000, 6000, 190),
        p(1.006, 6001, 7000, 561),
        p(1.008, 7000, 6001, 211),
        p(1.009, 6000, 5000, 47),
    ]
    cut = ws.stages(packets, PORTS.get, CLIENT, LEADER)
    assert cut["leader in"] == pytest.approx([0.001])
    assert cut["client"] == [], "a client's part counts only after a write counted"
