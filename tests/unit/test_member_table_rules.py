"""More rules of the member table (``kvstore.node.member_table``), one claim per test: the
edges ``tests/unit/test_member_table.py`` leaves open, found by mutation testing
(``make mutate``). Refusals are compared whole: an operator reads them."""

from __future__ import annotations

import pytest

from kvstore.node.member_table import (
    FORMAT_VERSION,
    ChangeRefused,
    MemberInfo,
    Role,
    Table,
    bootstrap,
)
from kvstore.proto.log_pb2 import MemberPB, MemberRole, MembershipPB

A, B, C, D = (f"127.0.0.1:70{i}" for i in range(4))


def member(name: str, raft: str, role: Role = Role.VOTER) -> MemberInfo:
    return MemberInfo(name, raft, raft.replace("127.0.0.1:70", "127.0.0.1:80"), role)


def three() -> Table:
    return bootstrap(member("n1", A), [member("n2", B), member("n3", C)])


def refused(change, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ChangeRefused) as refusal:
        change()
    assert str(refusal.value) == message


# -- what each change is called (it is in the log and in `kv member list`) ----------------------

def test_each_change_names_itself() -> None:
    grown = three().with_learner("n4", D, "127.0.0.1:83")
    assert grown.change == f"add learner n4 ({D})"
    assert grown.promoted(D).change == "promote n4"
    assert three().without(C).change == "remove n3"


def test_a_bootstrap_table_says_whether_it_is_the_initial_configuration() -> None:
    assert three().change == "initial configuration"
    assert bootstrap(None, [member("n1", A)]).change == "joining: the members to contact"
    assert Table((member("n1", A),)).change == "initial configuration"


def test_every_bootstrap_member_is_a_voter_whatever_its_given_role() -> None:
    table = bootstrap(member("n1", A, Role.LEARNER), [member("n2", B, Role.REMOVED)])
    assert table.voters == {A, B} and table.receivers == set()


def test_a_member_without_a_name_is_labelled_by_its_raft_address() -> None:
    assert MemberInfo("", A, "", Role.VOTER).label == A
    assert MemberInfo("n1", A, "", Role.VOTER).label == "n1"


def test_a_change_refused_for_an_unnamed_member_names_its_address() -> None:
    table = Table.of([MemberInfo("", A, "127.0.0.1:80", Role.VOTER),
                      member("n2", B)], "initial configuration")
    refused(lambda: table.promoted(A), f"{A} is already a voter")


# -- the refusals, whole --------------------------------------------------------------------------

def test_a_name_is_refused_once_taken() -> None:
    refused(lambda: three().with_learner("n1", D, "127.0.0.1:83"),
            "there is already a member named n1")


@pytest.mark.parametrize("raft, api", [(A, "127.0.0.1:83"), ("127.0.0.1:800", "127.0.0.1:83"),
                                       (D, A), (D, "127.0.0.1:800")],
                         ids=["raft=raft", "raft=api", "api=raft", "api=api"])
def test_an_address_is_refused_once_any_member_uses_it(raft: str, api: str) -> None:
    """A new member's raft or API address must not be either address of a current member."""
    refused(lambda: three().with_learner("n4", raft, api), f"n1 already uses {raft} or {api}")


def test_a_removed_members_addresses_are_free_again() -> None:
    table = three().without(C)
    again = table.with_learner("n5", "127.0.0.1:802", C)  # n3's API address, and its raft one
    assert again.get(C) is None and again.get("127.0.0.1:802") is not None


@pytest.mark.parametrize("raft, api", [("nowhere", "127.0.0.1:83"), (D, "nowhere")],
                         ids=["raft", "api"])
def test_an_address_that_is_not_host_port_is_refused(raft: str, api: str) -> None:
    refused(lambda: three().with_learner("n4", raft, api),
            "not a host:port address: 'nowhere'")


@pytest.mark.parametrize("name", ["", "n 4", "n4\t", "\n"])
def test_a_name_must_be_non_empty_and_without_spaces(name: str) -> None:
    refused(lambda: three().with_learner(name, D, "127.0.0.1:83"),
            f"a member needs a name without spaces, not {name!r}")


def test_promoting_refuses_a_voter_a_stranger_and_a_removed_member() -> None:
    refused(lambda: three().promoted(A), "n1 is already a voter")
    refused(lambda: three().promoted(D), f"{D} is not a member")
    refused(lambda: three().without(C).promoted(C), f"{C} is not a member")


def test_removing_refuses_a_stranger_a_removed_member_and_the_last_voter() -> None:
    refused(lambda: three().without(D), f"{D} is not a member")
    refused(lambda: three().without(C).without(C), f"{C} is not a member")
    refused(lambda: bootstrap(member("n1", A), []).without(A),
            "n1 is the last voter: a cluster needs one")


def test_the_last_voter_can_lose_its_learner() -> None:
    """Only removing the last *voter* is refused."""
    table = bootstrap(member("n1", A), []).with_learner("n2", B, "127.0.0.1:81")
    assert table.without(B).voters == {A}


# -- one change at a time: tombstones last one change ------------------------------------------------

def test_promoting_drops_the_previous_changes_tombstone() -> None:
    table = three().with_learner("n4", D, "127.0.0.1:83").without(C)
    assert table.promoted(D).get(C) is None


def test_removing_drops_the_previous_changes_tombstone() -> None:
    assert three().without(C).without(B).get(C) is None


def test_find_skips_a_removed_member_by_name_and_by_address() -> None:
    table = three().without(C)
    assert table.find("n3") is None and table.find(C) is None
    assert table.find("n2") == table.get(B) and table.find(B) == table.get(B)


def test_role_of_a_stranger_is_none() -> None:
    assert three().role_of(D) is None and three().role_of(A) is Role.VOTER


def test_a_table_refuses_two_members_at_one_address() -> None:
    with pytest.raises(ValueError, match="^members must be unique and in ascending raft address$"):
        Table((member("a", A), member("b", A)))


# -- the entry's encoding ----------------------------------------------------------------------------

def entry_of(pb: MembershipPB) -> bytes:
    return pb.SerializeToString(deterministic=True)


def test_an_entry_of_another_format_version_is_refused() -> None:
    data = entry_of(MembershipPB(format_version=FORMAT_VERSION + 1, change="x"))
    with pytest.raises(ValueError, match=f"^membership format version {FORMAT_VERSION + 1}$"):
        Table.from_entry(data)


def test_the_format_version_written_is_1() -> None:
    assert MembershipPB.FromString(three().to_entry()).format_version == 1 == FORMAT_VERSION


def test_an_entry_with_a_member_without_a_role_is_refused() -> None:
    data = entry_of(MembershipPB(format_version=FORMAT_VERSION, change="x", members=[
        MemberPB(name="n1", raft_address=A, api_address="127.0.0.1:80",
                 role=MemberRole.MEMBER_ROLE_UNSPECIFIED)]))
    with pytest.raises(ValueError, match="^a member without a role$"):
        Table.from_entry(data)


def test_bytes_that_do_not_decode_are_named_as_not_a_membership_entry() -> None:
    with pytest.raises(ValueError, match="^not a membership entry: "):
        Table.from_entry(b"\xff\xff")


def test_each_role_has_its_own_wire_value() -> None:
    table = Table.of([member("n1", A, Role.VOTER), member("n2", B, Role.LEARNER),
                      member("n3", C, Role.REMOVED)], "x")
    roles = [m.role for m in MembershipPB.FromString(table.to_entry()).members]
    assert roles == [MemberRole.VOTER, MemberRole.LEARNER, MemberRole.REMOVED]


def test_the_json_form_is_what_snapshots_store() -> None:
    """The snapshot file's metadata: its keys and values are a file format."""
    table = Table.of([member("n1", A), member("n2", B, Role.LEARNER)], "add learner n2")
    assert table.to_json() == {"change": "add learner n2", "members": [
        {"name": "n1", "raft": A, "api": "127.0.0.1:800", "role": "voter"},
        {"name": "n2", "raft": B, "api": "127.0.0.1:801", "role": "learner"}]}
    assert [r.value for r in Role] == ["voter", "learner", "removed"]


def test_promoting_makes_that_learner_a_voter_and_no_one_else() -> None:
    """One server at a time: the promoted learner becomes a voter; another learner stays a
    learner and every voter stays a voter."""
    table = three().with_learner("n4", D, "127.0.0.1:83").with_learner(
        "n5", "127.0.0.1:705", "127.0.0.1:85")
    promoted = table.promoted(D)
    assert promoted.role_of(D) is Role.VOTER
    assert promoted.role_of("127.0.0.1:705") is Role.LEARNER
    assert promoted.voters == {A, B, C, D}
    assert promoted.get(D) == MemberInfo("n4", D, "127.0.0.1:83", Role.VOTER)


def test_a_new_learner_is_recorded_with_both_its_addresses() -> None:
    grown = three().with_learner("n4", D, "127.0.0.1:83")
    assert grown.get(D) == MemberInfo("n4", D, "127.0.0.1:83", Role.LEARNER)
