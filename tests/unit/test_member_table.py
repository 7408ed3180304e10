"""The member table's one-server changes and its encodings (``kvstore.node.member_table``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.node.member_table import (
    ENTRY_TYPE,
    ChangeRefused,
    MemberInfo,
    Role,
    Table,
    bootstrap,
    entry_bytes,
    is_membership_entry,
)

A, B, C, D = (f"127.0.0.1:70{i}" for i in range(4))


def three() -> Table:
    return bootstrap(MemberInfo("n1", A, "127.0.0.1:80", Role.VOTER),
                     [MemberInfo("n2", B, "127.0.0.1:81", Role.VOTER),
                      MemberInfo("n3", C, "127.0.0.1:82", Role.VOTER)])


def test_a_new_member_is_a_learner_and_changes_no_majority() -> None:
    """Thesis 4.2.1 / etcd: a new server joins without a vote, so adding it changes nothing
    the cluster needs to commit."""
    grown = three().with_learner("n4", D, "127.0.0.1:83")
    assert grown.role_of(D) is Role.LEARNER
    assert grown.voters == three().voters
    assert grown.receivers == {D}


def test_each_change_moves_at_most_one_voter() -> None:
    """Thesis 4.1: one server at a time, so old and new majorities overlap."""
    t = three()
    steps = [t.with_learner("n4", D, "127.0.0.1:83")]
    steps.append(steps[-1].promoted(D))
    steps.append(steps[-1].without(A))
    steps.append(steps[-1].without(B))
    for before, after in zip([t, *steps], steps, strict=False):
        assert len(before.voters ^ after.voters) <= 1


def test_a_removed_member_is_listed_once_then_forgotten() -> None:
    """The removing change lists it as REMOVED (so it is still sent the log and learns it was
    removed); the next change no longer lists it."""
    removed = three().without(C)
    assert removed.role_of(C) is Role.REMOVED and C in removed.receivers
    assert removed.find("n3") is None
    assert removed.with_learner("n4", D, "127.0.0.1:83").get(C) is None


def test_refused_changes() -> None:
    t = three()
    with pytest.raises(ChangeRefused, match="already a member named n1"):
        t.with_learner("n1", D, "127.0.0.1:83")
    with pytest.raises(ChangeRefused, match="already uses"):
        t.with_learner("n4", A, "127.0.0.1:83")
    with pytest.raises(ChangeRefused, match="already uses"):
        t.with_learner("n4", D, "127.0.0.1:80")
    with pytest.raises(ChangeRefused, match="not a host:port"):
        t.with_learner("n4", "nowhere", "127.0.0.1:83")
    with pytest.raises(ChangeRefused, match="name"):
        t.with_learner("", D, "127.0.0.1:83")
    with pytest.raises(ChangeRefused, match="already a voter"):
        t.promoted(A)
    with pytest.raises(ChangeRefused, match="not a member"):
        t.promoted(D)
    with pytest.raises(ChangeRefused, match="not a member"):
        t.without(C).without(C)
    one = bootstrap(MemberInfo("n1", A, "127.0.0.1:80", Role.VOTER), [])
    with pytest.raises(ChangeRefused, match="last voter"):
        one.without(A)


def test_a_removed_address_can_be_added_again() -> None:
    t = three().without(C)
    again = t.with_learner("n5", C, "127.0.0.1:99")
    assert again.role_of(C) is Role.LEARNER and again.get(C).name == "n5"  # type: ignore[union-attr]


def test_a_joining_node_is_not_in_its_bootstrap_table() -> None:
    joining = bootstrap(None, [MemberInfo("n1", A, "127.0.0.1:80", Role.VOTER)])
    assert joining.voters == {A} and joining.get(D) is None


def test_the_table_is_kept_in_address_order() -> None:
    with pytest.raises(ValueError):
        Table((MemberInfo("b", B, "", Role.VOTER), MemberInfo("a", A, "", Role.VOTER)))
    assert [m.raft_address for m in three().members] == sorted([A, B, C])


names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8)


@given(st.lists(st.tuples(names, st.integers(1, 65535), st.sampled_from(list(Role))),
                max_size=6, unique_by=lambda t: t[1]))
def test_entries_and_json_round_trip(members: list[tuple[str, int, Role]]) -> None:
    table = Table.of([MemberInfo(n, f"127.0.0.1:{p}", f"127.0.0.2:{p}", r)
                      for n, p, r in members], "a change")
    entry = entry_bytes(table)
    assert entry[0] == ENTRY_TYPE and is_membership_entry(entry)
    assert Table.from_entry(entry[1:]) == table
    assert Table.from_json(table.to_json()) == table
    assert entry_bytes(Table.from_entry(entry[1:])) == entry  # one encoding per table


def test_bytes_that_are_not_a_table_are_refused() -> None:
    with pytest.raises(ValueError):
        Table.from_entry(b"\xff\xff")
    assert not is_membership_entry(b"\x00regular")
