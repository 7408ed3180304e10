"""``kvstore.data.Data``: a dict as far as commands can tell, frozen copy-on-write by shard."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import data as data_module
from kvstore.data import SHARDS, Data, FrozenData

keys = st.binary(min_size=1, max_size=3)
ops = st.lists(st.one_of(
    st.tuples(st.just("put"), keys, st.binary(max_size=3)),
    st.tuples(st.just("delete"), keys, st.just(b"")),
    st.tuples(st.just("pop"), keys, st.just(b"")),
    st.tuples(st.just("freeze"), st.just(b""), st.just(b"")),
), max_size=80)


@settings(max_examples=300)
@given(ops)
def test_data_behaves_as_a_dict_and_every_frozen_view_keeps_its_moment(script: list) -> None:
    data, model = Data(), {}
    frozen: list[tuple[FrozenData, dict[bytes, bytes]]] = []
    for op, key, value in script:
        if op == "put":
            data[key] = value
            model[key] = value
        elif op == "delete":
            assert (key in data) == (key in model)
            if key in model:
                del data[key]
                del model[key]
        elif op == "pop":
            assert data.pop(key, None) == model.pop(key, None)
        else:
            frozen.append((data.freeze(), dict(model)))
        assert len(data) == len(model) and dict(data.items()) == model and data == model
    for view, moment in frozen:
        assert dict(view.items()) == moment and len(view) == len(moment)
        assert all(view[k] == v for k, v in moment.items())


def test_a_write_after_a_freeze_copies_one_shard_only() -> None:
    data = Data((b"k%05d" % n, b"v") for n in range(20_000))
    view = data.freeze()
    data[b"k00001"] = b"changed"
    copied = sum(1 for mine, theirs in zip(data._shards, view.shards) if mine is not theirs)
    assert copied == 1 and view[b"k00001"] == b"v" and data[b"k00001"] == b"changed"
    assert len(view.shards) == SHARDS


def test_a_plain_dict_is_frozen_by_copy() -> None:
    plain = {b"a": b"1"}
    view = FrozenData.copy_of(plain)
    plain[b"a"] = b"2"
    assert view[b"a"] == b"1"


def test_in_finds_every_key_whatever_its_shard() -> None:
    data = Data((b"k%d" % n, b"v") for n in range(200))  # keys in many shards
    assert all(b"k%d" % n in data for n in range(200))
    assert b"k200" not in data


def test_deleting_a_missing_key_raises_a_key_error_naming_it_as_a_dict_does() -> None:
    data = Data({b"a": b"1"})
    with pytest.raises(KeyError) as raised:
        del data[b"b"]
    assert raised.value.args == (b"b",)
    assert data == {b"a": b"1"}


def test_popping_a_missing_key_without_a_default_raises_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError) as raised:
        Data().pop(b"b")
    assert raised.value.args == (b"b",)


def test_a_shard_copied_after_a_freeze_is_not_copied_again() -> None:
    """Copy-on-write copies a shared shard once; later writes go to the copy."""
    data = Data({b"k": b"v"})
    data.freeze()
    data[b"k"] = b"1"
    shard = hash(b"k") & (SHARDS - 1)
    copy = data._shards[shard]
    data[b"k"] = b"2"
    assert data._shards[shard] is copy


def test_repr_shows_the_pairs_as_a_dict_does() -> None:
    assert repr(Data({b"k": b"v"})) == "Data({b'k': b'v'})"


def test_a_view_is_let_go_of_in_steps_and_the_live_data_keeps_every_shard(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "RELEASE_SHARDS", 100)
    data = Data((b"k%05d" % n, b"v") for n in range(5_000))
    view = data.freeze()
    data[b"k00001"] = b"changed"  # one shard copied: the view alone holds the old one
    steps = view.release()
    next(steps)
    assert len(view.shards) == SHARDS - 100
    assert sum(1 for _ in steps) == -(-SHARDS // 100) - 1
    assert view.shards == [] and len(view) == 0
    assert len(data) == 5_000 and data[b"k00001"] == b"changed" and data[b"k00002"] == b"v"


def test_release_of_empties_a_data_and_leaves_other_mappings_alone() -> None:
    data, plain = Data({b"a": b"1"}), {b"a": b"1"}
    for _ in data_module.release_of(data):
        pass
    assert data._shards == []
    assert list(data_module.release_of(plain)) == [] and plain == {b"a": b"1"}
