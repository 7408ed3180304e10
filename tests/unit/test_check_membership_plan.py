"""The pure parts of ``kv check``'s ``membership`` fault: the plan of the next change
(``cli.check_membership.plan``), its label, the member view, and the final membership check
(``kvstore.check.verdict.check_membership``).

The plan's claims: the cluster never has fewer voters than it started with (and never fewer
than three), at most one more, and at most one learner; a learner is promoted (or now and then
removed), never left while another is added; the leader is removed about half the time a voter
is; and a cycle makes every kind of change (Raft thesis 4.1: one server at a time).
"""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from cli.check_membership import (
    ADD,
    LEADER_VICTIM,
    MIN_VOTERS,
    PROMOTE,
    REMOVE,
    Change,
    MemberView,
    label,
    plan,
    view_of,
)
from kvstore.check.verdict import MEMBERSHIP, check_membership
from kvstore.proto.api_pb2 import MemberListResponse, MemberStatus

THREE = MemberView(voters=("n1", "n2", "n3"), learners=(), leader="n2")


def after(view: MemberView, change: Change, fresh: str, rng: random.Random) -> MemberView:
    """A model of the cluster once ``change`` is made (a removed leader is replaced by a voter
    at random)."""
    if change.action == ADD:
        return replace(view, learners=(*view.learners, fresh))
    if change.action == PROMOTE:
        return replace(view, voters=(*view.voters, change.node),
                       learners=tuple(n for n in view.learners if n != change.node))
    voters = tuple(n for n in view.voters if n != change.node)
    learners = tuple(n for n in view.learners if n != change.node)
    leader = view.leader if view.leader != change.node else rng.choice(voters)
    return MemberView(voters, learners, leader)


def test_a_cluster_at_its_size_gets_a_fresh_learner() -> None:
    assert plan(THREE, 3, random.Random(1)) == Change(ADD)


def test_a_learner_is_promoted_or_removed_never_left_for_another_add() -> None:
    view = replace(THREE, learners=("n4",))
    seen = {plan(view, 3, random.Random(seed)) for seed in range(200)}
    assert seen == {Change(PROMOTE, "n4"), Change(REMOVE, "n4")}


def test_a_voter_too_many_is_removed_and_half_the_time_it_is_the_leader() -> None:
    view = replace(THREE, voters=("n1", "n2", "n3", "n4"))
    picks = [plan(view, 3, random.Random(seed)) for seed in range(2_000)]
    assert {p.action for p in picks} == {REMOVE}
    assert {p.node for p in picks} == {"n1", "n2", "n3", "n4"}
    leader_share = sum(p.node == "n2" for p in picks) / len(picks)
    expected = LEADER_VICTIM + (1 - LEADER_VICTIM) / 4  # the bias, plus its share at random
    assert abs(leader_share - expected) < 0.05


def test_never_below_three_voters_even_when_asked_for_fewer() -> None:
    view = MemberView(voters=("n1", "n2", "n3"), learners=(), leader="n1")
    assert plan(view, 1, random.Random(3)).action == ADD
    four = replace(view, voters=("n1", "n2", "n3", "n4"))
    assert plan(four, 2, random.Random(3)).action == REMOVE


@given(st.integers(0, 2**31), st.integers(3, 7))
def test_a_run_of_changes_keeps_the_voters_and_makes_every_kind(seed: int, size: int) -> None:
    rng = random.Random(seed)
    view = MemberView(tuple(f"n{i + 1}" for i in range(size)), (), "n1")
    made: list[tuple[str, bool]] = []
    for step in range(60):
        change = plan(view, size, rng)
        made.append((change.action, change.action == REMOVE and change.node == view.leader))
        view = after(view, change, f"n{size + step + 1}", rng)
        assert size <= len(view.voters) <= size + 1
        assert len(view.learners) <= 1
        assert len(view.voters) + len(view.learners) <= size + 1
    actions = {action for action, _ in made}
    assert actions == {ADD, PROMOTE, REMOVE}
    assert any(leader for _, leader in made), "60 changes and the leader never removed"


def test_labels_name_the_step_and_the_node() -> None:
    view = replace(THREE, learners=("n4",))
    assert label(Change(ADD, "n5"), view) == "add n5 (learner)"
    assert label(Change(ADD), view) == "add a fresh node (learner)"
    assert label(Change(PROMOTE, "n4"), view) == "promote n4"
    assert label(Change(REMOVE, "n2"), view) == "remove n2 (leader)"
    assert label(Change(REMOVE, "n4"), view) == "remove n4 (learner)"
    assert label(Change(REMOVE, "n3"), view) == "remove n3"


def listing(*members: tuple[str, str, str, bool]) -> MemberListResponse:
    return MemberListResponse(from_leader=True, members=[
        MemberStatus(name=name, raft_address=raft, role=role, is_leader=leader)
        for name, raft, role, leader in members])


def test_the_view_is_in_the_harness_names_and_leaves_out_removed_members() -> None:
    answer = listing(("n1", "a:1", "voter", False), ("n2", "a:2", "voter", True),
                     ("x", "a:3", "voter", False), ("n4", "a:4", "learner", False),
                     ("n5", "a:5", "removed", False))
    view = view_of(answer, {"a:3": "n3", "a:1": "n1"})
    assert view == MemberView(voters=("n1", "n2", "n3"), learners=("n4",), leader="n2")
    # A removed leader leads until it has handed over: it is no member to plan from.
    handing_over = listing(("n1", "a:1", "voter", False), ("n2", "a:2", "removed", True))
    assert view_of(handing_over, {}).leader is None


NODES = {"a:1": "n1", "a:2": "n2", "a:4": "n4"}


def test_the_final_members_are_the_running_nodes() -> None:
    members = [("n1", "a:1", "voter"), ("n2", "a:2", "voter"), ("n4", "a:4", "voter"),
               ("n3", "a:3", "removed")]
    result = check_membership(NODES, members, 3)
    assert result.valid and result.stats == {"voters": 3, "learners": 0}


def test_a_member_the_harness_removed_is_a_violation() -> None:
    members = [("n1", "a:1", "voter"), ("n2", "a:2", "voter"), ("n4", "a:4", "voter"),
               ("n3", "a:3", "learner")]
    result = check_membership(NODES, members, 3)
    assert [v.kind for v in result.violations] == [MEMBERSHIP]
    assert "n3 (a:3) is still a learner" in result.violations[0].message


def test_a_running_node_the_cluster_dropped_is_a_violation() -> None:
    members = [("n1", "a:1", "voter"), ("n2", "a:2", "voter"), ("n4", "a:4", "removed")]
    result = check_membership(NODES, members, 2)
    assert not result.valid
    assert "n4 (a:4) runs, but the cluster does not list it" in result.violations[0].message


def test_too_few_voters_or_no_answer_is_a_violation() -> None:
    members = [("n1", "a:1", "voter"), ("n2", "a:2", "voter"), ("n4", "a:4", "learner")]
    result = check_membership(NODES, members, MIN_VOTERS)
    assert not result.valid and "2 voters at the end" in result.violations[0].message
    unknown = check_membership(NODES, None, 3)
    assert not unknown.valid and "could not be checked" in unknown.violations[0].message


# -- the report: membership changes are bands ----------------------------------------------------

def test_membership_changes_are_bands_of_their_own_colour_labelled_with_the_step() -> None:
    import re
    import xml.etree.ElementTree as ET

    from kvstore.check.history import Op
    from kvstore.check.report import FAULT_COLOURS, OTHER_FAULT_COLOUR, render_html

    svg_ns, ms, t0 = "{http://www.w3.org/2000/svg}", 1_000_000, 7_000_000_000
    ops = [Op(i, i % 2, "put", "x", i, t0 + i * 100 * ms, t0 + i * 100 * ms + 50 * ms, "ok", None)
           for i in range(10)]
    faults = [
        {"kind": "membership", "target": "add n4 (learner)", "start_ns": t0 + 100 * ms,
         "end_ns": t0 + 300 * ms, "change": "add", "failed": False},
        {"kind": "membership", "target": "remove n2 (leader)", "start_ns": t0 + 500 * ms,
         "end_ns": t0 + 600 * ms, "change": "remove", "failed": False},
        {"kind": "kill", "target": "n1", "start_ns": t0 + 700 * ms, "end_ns": t0 + 800 * ms},
    ]
    page = render_html(ops, faults, [], {})
    match = re.search(r"<svg\b.*?</svg>", page, re.S)
    assert match
    svg = ET.fromstring(match.group(0))
    groups = [g for g in svg.iter(f"{svg_ns}g") if "fault" in g.get("class", "").split()]
    bands = {g.findtext(f"{svg_ns}text"): g for g in groups}
    assert set(bands) == {"membership add n4 (learner)", "membership remove n2 (leader)",
                          "kill n1"}
    colour = FAULT_COLOURS["membership"]
    assert colour not in (OTHER_FAULT_COLOUR, FAULT_COLOURS["kill"])
    for name in ("membership add n4 (learner)", "membership remove n2 (leader)"):
        band = bands[name].find(f"{svg_ns}rect")
        assert band is not None and band.get("fill") == colour
        assert "membership" in bands[name].get("class", "").split()
    add = bands["membership add n4 (learner)"].find(f"{svg_ns}rect")
    remove = bands["membership remove n2 (leader)"].find(f"{svg_ns}rect")
    assert add is not None and remove is not None
    assert float(add.get("width", "")) > float(remove.get("width", ""))  # 200 ms against 100 ms
    assert "membership (fault)" in page  # in the legend
    assert "remove n2 (leader)" in page.split("<h2>Faults")[1]  # and in the table of faults


def test_the_integration_seed_starts_with_add_promote_remove_the_leader() -> None:
    """tests/integration/test_check_membership.py runs ``--faults membership --seed 6`` for a
    few seconds and expects these three first, whichever node leads; this replays the nemesis's
    random stream (a quiet pause, the fault kind, then the plan) on the model above."""
    from cli.nemesis import QUIET

    for leader in ("n1", "n2", "n3"):
        rng = random.Random("6/nemesis")
        view = MemberView(("n1", "n2", "n3"), (), leader)
        made = []
        for step in range(3):
            rng.uniform(*QUIET)
            rng.choice(["membership"])
            change = plan(view, 3, rng)
            made.append(label(change, view))
            view = after(view, change, f"n{4 + step}", rng)
        assert made == ["add a fresh node (learner)", "promote n4", f"remove {leader} (leader)"]
