"""The pure parts of the namespace network: its plan, the commands it would run, the user-space
netem's schedule and wire format, and the nemesis's choice of impairments (no root needed)."""

from __future__ import annotations

import random
import struct

import pytest

from cli.nemesis import random_netem
from kvstore.check import netns, nfq_netem
from kvstore.check.netns import Netem, Topology
from kvstore.check.nfq_netem import Schedule


def _plan() -> Topology:
    return Topology.plan(3, run="123-abcd", subnet=42)


def test_the_plan_gives_each_host_its_namespace_and_address() -> None:
    topology = _plan()
    assert topology.node_names == ["n1", "n2", "n3"]
    assert [h.address for h in topology.hosts.values()] == [
        "10.77.42.1", "10.77.42.2", "10.77.42.3", "10.77.42.100"]
    assert topology.client.netns == "kvnet-123-abcd-client"
    assert topology.namespaces[0] == "kvnet-123-abcd-hub"
    assert topology.exec_prefix("n2") == ["ip", "netns", "exec", "kvnet-123-abcd-n2"]


def test_every_setup_command_acts_inside_a_namespace_of_the_run() -> None:
    """Never in the machine's own namespace: each command adds one of the run's namespaces or
    runs with ``-n`` in one (a veth's peer is created straight into its host's namespace)."""
    topology = _plan()
    ours = set(topology.namespaces)
    for command in topology.setup_commands():
        assert command[0] == "ip", command
        if command[1:3] == ["netns", "add"]:
            assert command[3] in ours
        else:
            assert command[1] == "-n" and command[2] in ours, command
            if "peer" in command:
                assert command[command.index("netns") + 1] in ours, command


def test_a_description_round_trips_and_refuses_namespaces_it_did_not_make() -> None:
    topology = _plan()
    again = Topology.from_json(topology.to_json())
    assert again.hosts == topology.hosts and again.namespaces == topology.namespaces
    forged = topology.to_json().replace("kvnet-123-abcd-n1", "default")
    with pytest.raises(ValueError, match="not a namespace this module makes"):
        Topology.from_json(forged)


def test_a_plan_has_room_for_the_client() -> None:
    with pytest.raises(ValueError):
        Topology.plan(100, run="1-ab", subnet=1)


def test_netem_arguments() -> None:
    assert Netem(50).args() == ["delay", "50ms"]
    assert Netem(80, 20, 2.5, 10).args() == [
        "delay", "80ms", "20ms", "loss", "2.5%", "reorder", "10%", "50%"]
    assert str(Netem(80, 20, 0, 10)) == "delay 80ms±20ms reorder 10%"


def test_the_nemesis_picks_impairments_within_bounds() -> None:
    rng = random.Random(7)
    picks = [random_netem(rng) for _ in range(500)]
    assert all(20 <= p.delay_ms <= 200 and 0 <= p.jitter_ms <= p.delay_ms // 2 for p in picks)
    assert all(0 <= p.loss_percent <= 10 and 0 <= p.reorder_percent <= 30 for p in picks)
    assert any(p.loss_percent for p in picks) and any(not p.loss_percent for p in picks)
    assert any(p.reorder_percent for p in picks) and any(p.jitter_ms for p in picks)


# -- the user-space netem ---------------------------------------------------------------------


def test_a_held_packet_is_released_after_its_delay_and_not_before() -> None:
    schedule = Schedule(random.Random(1), delay_s=0.1, jitter_s=0, loss=0, reorder=0)
    assert schedule.arrive(7, now=10.0) is None
    assert schedule.due(10.099) == []
    assert schedule.due(10.1) == [7]
    assert len(schedule) == 0


def test_loss_drops_about_its_share_and_reorder_sends_about_its_share_at_once() -> None:
    schedule = Schedule(random.Random(2), delay_s=0.05, jitter_s=0, loss=0.2, reorder=0.25)
    outcomes = [schedule.arrive(i, now=0.0) for i in range(10_000)]
    dropped, sent_now = outcomes.count(False), outcomes.count(True)
    assert 1800 < dropped < 2200
    assert 0.2 < sent_now / (10_000 - dropped) < 0.3  # overtakes the held ones: reordered
    assert len(schedule) == outcomes.count(None)


def test_jitter_reorders_and_stays_within_its_bounds() -> None:
    schedule = Schedule(random.Random(3), delay_s=0.1, jitter_s=0.05, loss=0, reorder=0)
    for i in range(1000):
        schedule.arrive(i, now=i * 0.001)
    assert schedule.due(0.05 - 1e-9) == []
    released = schedule.due(2.0)
    assert sorted(released) == list(range(1000)) and released != list(range(1000))


def test_the_program_holds_at_most_max_held_packets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nfq_netem, "MAX_HELD", 3)
    schedule = Schedule(random.Random(4), delay_s=1, jitter_s=0, loss=0, reorder=0)
    assert [schedule.arrive(i, 0.0) for i in range(5)] == [None, None, None, True, True]
    assert schedule.release_all() == [0, 1, 2]


def _packet_message(packet_id: int, queue: int = 0) -> bytes:
    header = nfq_netem._attr(nfq_netem.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3))
    other = nfq_netem._attr(9, b"\x01\x02\x03")  # an attribute it does not need, padded
    return nfq_netem.message(nfq_netem.NFQNL_MSG_PACKET, queue, other + header)


def test_packet_ids_are_read_from_a_batch_of_messages() -> None:
    batch = _packet_message(5) + _packet_message(70000) + _packet_message(2**32 - 1)
    assert nfq_netem.packet_ids(batch) == [5, 70000, 2**32 - 1]
    assert nfq_netem.packet_ids(b"") == []
    assert nfq_netem.packet_ids(b"\x00" * 16) == []  # a zero length ends the batch


def test_a_verdict_is_the_nfnetlink_queue_layout() -> None:
    data = nfq_netem.verdict(queue=2, packet_id=9, accept=True)
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", data)
    assert length == len(data) == 16 + 4 + 4 + 8
    assert kind == (3 << 8) | 1 and flags == nfq_netem.NLM_F_REQUEST
    assert struct.unpack_from("!BBH", data, 16) == (0, 0, 2)
    assert struct.unpack_from("=HH", data, 20) == (12, nfq_netem.NFQA_VERDICT_HDR)
    assert struct.unpack_from("!II", data, 24) == (nfq_netem.NF_ACCEPT, 9)
    assert struct.unpack_from("!I", nfq_netem.verdict(0, 9, False), 24)[0] == nfq_netem.NF_DROP


def test_with_kernel_netem_both_ends_of_the_link_get_the_qdisc_and_lose_it_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tc path, which a kernel without sch_netem (as on the machine these tests were
    written on) cannot run: the commands it would give, recorded instead of run."""
    ran: list[list[str]] = []
    monkeypatch.setattr(netns, "netem_backend", lambda: "tc")
    monkeypatch.setattr(netns, "_run", lambda command, **_: ran.append(command) or "")
    topology = _plan()
    assert topology.impair("n2", Netem(80, 20, 1, 10)) == "tc"
    qdisc = ["root", "netem", "delay", "80ms", "20ms", "loss", "1%", "reorder", "10%", "50%"]
    assert ran == [["tc", "-n", "kvnet-123-abcd-n2", "qdisc", "add", "dev", "eth0", *qdisc],
                   ["tc", "-n", "kvnet-123-abcd-hub", "qdisc", "add", "dev", "v-n2", *qdisc]]
    ran.clear()
    topology.heal()
    assert ran == [["tc", "-n", "kvnet-123-abcd-n2", "qdisc", "del", "dev", "eth0", "root"],
                   ["tc", "-n", "kvnet-123-abcd-hub", "qdisc", "del", "dev", "v-n2", "root"]]
    ran.clear()
    topology.heal()
    assert ran == [], "healed once is healed"
