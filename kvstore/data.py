"""The user data: a map of bytes to bytes that can be frozen at once (copy-on-write by shard).

Why not a plain dict: a snapshot must capture the data at one applied index while applies go
on, and freezing a dict means copying it, one C call that holds the interpreter: about 40 ms at
1M keys on a quiet machine, and 100-400 ms was measured on a busy one, all of it on the Raft
thread. Here the keys are spread over ``SHARDS`` small dicts. ``freeze`` hands out the current
shard dicts and marks every shard shared; the first write to a shared shard copies that shard
(about a thousand keys at 1M: tens of microseconds) before changing it. The frozen view is never
written again, so it is exactly the data at the moment of the freeze, for as long as the
snapshot takes to write.

Which shard a key lands in depends on Python's hash of bytes, which differs from process to
process; nothing observable depends on it: every user of the order (the snapshot, ``range``)
sorts, and ``delete --prefix`` deletes a set.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

SHARDS = 1024
_MASK = SHARDS - 1
_MISSING: Any = object()
_EMPTY: dict[bytes, bytes] = {}


class Data(MutableMapping[bytes, bytes]):
    """A dict of bytes to bytes, as far as commands can tell, with an O(``SHARDS``) ``freeze``."""

    __slots__ = ("_shards", "_owned")

    def __init__(self, items: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]] = ()) -> None:
        # Every shard starts as the one shared empty dict, copied on its first write like any
        # shared shard: a small store costs no more than a dict.
        self._shards: list[dict[bytes, bytes]] = [_EMPTY] * SHARDS
        self._owned = [False] * SHARDS
        """False: the shard is shared (with a frozen view), copy it before writing."""
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, value in pairs:
            self[key] = value

    def freeze(self) -> FrozenData:
        """The data as of now, unchanged by later writes."""
        self._owned = [False] * SHARDS
        return FrozenData(list(self._shards), _MASK)

    def loader(self) -> list[dict[bytes, bytes]]:
        """The shards, all writable, to fill fast (``shards[hash(key) & (SHARDS - 1)][key]``)."""
        for shard in range(SHARDS):
            self._writable(shard)
        return self._shards

    def _writable(self, shard: int) -> dict[bytes, bytes]:
        if not self._owned[shard]:
            self._shards[shard] = dict(self._shards[shard])
            self._owned[shard] = True
        return self._shards[shard]

    def __getitem__(self, key: bytes) -> bytes:
        return self._shards[hash(key) & _MASK][key]

    def get(self, key: bytes, default: Any = None) -> Any:
        return self._shards[hash(key) & _MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._writable(hash(key) & _MASK)[key] = value

    def __delitem__(self, key: bytes) -> None:
        shard = hash(key) & _MASK
        if key not in self._shards[shard]:
            raise KeyError(key)
        del self._writable(shard)[key]

    def pop(self, key: bytes, default: Any = _MISSING) -> Any:
        shard = hash(key) & _MASK
        if key not in self._shards[shard]:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._writable(shard).pop(key)

    def __iter__(self) -> Iterator[bytes]:
        return itertools.chain.from_iterable(self._shards)

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def __repr__(self) -> str:
        return f"Data({dict(self.items())!r})"


RELEASE_SHARDS = 32
"""Shards let go of per step of ``FrozenData.release`` (at 1M keys, about 1 ms of work)."""


def release_of(data: Mapping[bytes, bytes]) -> Iterator[None]:
    """Lets go of ``data``'s shards in steps (``FrozenData.release``): a ``Data`` or a frozen
    view is empty afterwards, and must not be used again; any other mapping is left alone."""
    shards = data._shards if isinstance(data, Data) else getattr(data, "shards", None)
    while shards:
        del shards[-RELEASE_SHARDS:]
        yield


class FrozenData(Mapping[bytes, bytes]):
    """A frozen view: the shard dicts of the moment, and how a key picks its shard."""

    __slots__ = ("shards", "mask")

    def __init__(self, shards: list[dict[bytes, bytes]], mask: int) -> None:
        self.shards = shards
        """Never written, only let go of (``release``)."""
        self.mask = mask

    def release(self) -> Iterator[None]:
        """Lets go of the shards, ``RELEASE_SHARDS`` per step; the view is empty afterwards.

        Why in steps: by the time a snapshot is written, later writes have copied most shards
        (the first write to each), so the view is the only owner of the old ones, and letting
        go of a whole 1M-key view at once is one C call that touches every key and value
        (tens of milliseconds holding the interpreter). A shard still shared with the live data
        is only dereferenced here, never cleared."""
        return release_of(self)

    @classmethod
    def copy_of(cls, data: Mapping[bytes, bytes]) -> FrozenData:
        """A frozen copy of any mapping (a ``Data`` freezes itself instead)."""
        if isinstance(data, Data):
            return data.freeze()
        return cls([dict(data)], 0)

    def __getitem__(self, key: bytes) -> bytes:
        return self.shards[hash(key) & self.mask][key]

    def __iter__(self) -> Iterator[bytes]:
        return itertools.chain.from_iterable(self.shards)

    def __len__(self) -> int:
        return sum(map(len, self.shards))
