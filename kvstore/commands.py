"""What each command does to the user data: pure functions of (data, command) -> result.

Validation happens here, inside apply, so a bad command is an error *result* that every replica
computes identically, never an exception (an exception inside PySyncObj's apply wedges the
node for good: defect D5).
"""

from __future__ import annotations

import re
from collections.abc import Callable, MutableMapping

from kvstore import results
from kvstore.limits import INT64_MAX, INT64_MIN, MAX_KEY_BYTES, MAX_VALUE_BYTES
from kvstore.proto.log_pb2 import Code, Command, KeyValue, Result

Data = MutableMapping[bytes, bytes]
"""``kvstore.data.Data`` in a replica; any dict of bytes works the same."""

READ_ONLY_OPS = frozenset({"get", "range"})

# A decimal integer as incr writes it: no sign but '-', no spaces, no leading zeros, no '_', no
# "-0". Stricter than int(), so a value means the same thing on every Python version.
_DECIMAL_INT = re.compile(rb"0|-?[1-9][0-9]{0,18}")


class _Rejected(Exception):
    """Internal: a command that fails validation; converted to an error result below."""

    def __init__(self, code: Code.ValueType, message: str) -> None:
        super().__init__(message)
        self.code = code


def execute(data: Data, command: Command) -> Result:
    """Runs ``command`` on ``data`` (mutating it) and returns its result."""
    refused = static_error(command)
    if refused is not None:
        return refused
    op = command.WhichOneof("op")
    try:
        return _HANDLERS[op](data, getattr(command, op))  # type: ignore[index]
    except _Rejected as rejected:
        return results.error(rejected.code, str(rejected))


def static_error(command: Command) -> Result | None:
    """The error result for a command that is invalid whatever the data holds, else ``None``.

    Apply runs it first; the API server runs the same check so such a command is refused
    before it reaches the log.
    """
    op = command.WhichOneof("op")
    if op is None:
        return results.error(Code.INVALID_ARGUMENT, "the request carries no command")
    cmd = getattr(command, op)
    try:
        if op == "range":
            _bounded_key(cmd.prefix, "prefix")
        elif op == "delete" and cmd.prefix:
            _bounded_key(cmd.key, "prefix")  # an empty prefix deletes every key, as in etcd
        elif op == "put_many":
            for kv in cmd.kvs:
                _key(kv.key)
                _value(kv.value)
        else:
            _key(cmd.key)
        if op in ("put", "append", "cas"):
            _value(cmd.value)
    except _Rejected as rejected:
        return results.error(rejected.code, str(rejected))
    return None


def is_read_only(command: Command) -> bool:
    return command.WhichOneof("op") in READ_ONLY_OPS


# Handlers run after static_error() has accepted the command: they check only what depends
# on the data.


def _put(data: Data, cmd: Command) -> Result:
    data[cmd.key] = cmd.value
    return results.ok()


def _put_many(data: Data, cmd: Command) -> Result:
    for kv in cmd.kvs:
        data[kv.key] = kv.value
    return results.ok(count=len(cmd.kvs))


def _delete(data: Data, cmd: Command) -> Result:
    if cmd.prefix:
        doomed = [k for k in data if k.startswith(cmd.key)]
        for k in doomed:
            del data[k]
        return results.ok(count=len(doomed), found=bool(doomed))
    found = data.pop(cmd.key, None) is not None
    return results.ok(count=int(found), found=found)


def _get(data: Data, cmd: Command) -> Result:
    value = data.get(cmd.key)
    return results.ok(found=value is not None, value=value or b"")


def _range(data: Data, cmd: Command) -> Result:
    keys = sorted(k for k in data if k.startswith(cmd.prefix))
    if cmd.limit:
        keys = keys[: cmd.limit]
    kvs = [KeyValue(key=k, value=b"" if cmd.keys_only else data[k]) for k in keys]
    return results.ok(kvs=kvs, count=len(kvs))


def _incr(data: Data, cmd: Command) -> Result:
    key = cmd.key
    current = data.get(key, b"0")
    if not _DECIMAL_INT.fullmatch(current) or not INT64_MIN <= int(current) <= INT64_MAX:
        raise _Rejected(Code.WRONG_TYPE, "the value is not a decimal int64")
    new = int(current) + cmd.delta
    if not INT64_MIN <= new <= INT64_MAX:
        raise _Rejected(Code.OUT_OF_RANGE, f"{int(current)} + {cmd.delta} leaves the int64 range")
    data[key] = str(new).encode()
    return results.ok(number=new)


def _append(data: Data, cmd: Command) -> Result:
    new = _value(data.get(cmd.key, b"") + cmd.value)
    data[cmd.key] = new
    return results.ok(length=len(new))


def _cas(data: Data, cmd: Command) -> Result:
    key, new = cmd.key, cmd.value
    current = data.get(key)
    matches = current is None if cmd.expect_absent else current == cmd.expected
    if matches:
        data[key] = new
        return results.ok(swapped=True, found=True, value=new)
    return results.ok(swapped=False, found=current is not None, value=current or b"")


def _key(key: bytes) -> bytes:
    if not key:
        raise _Rejected(Code.INVALID_ARGUMENT, "the key is empty")
    return _bounded_key(key, "key")


def _bounded_key(key: bytes, what: str) -> bytes:
    if len(key) > MAX_KEY_BYTES:
        raise _Rejected(Code.KEY_TOO_LARGE, f"{what} is {len(key)} bytes, over {MAX_KEY_BYTES}")
    return key


def _value(value: bytes) -> bytes:
    if len(value) > MAX_VALUE_BYTES:
        raise _Rejected(
            Code.VALUE_TOO_LARGE, f"value is {len(value)} bytes, over {MAX_VALUE_BYTES}"
        )
    return value


_HANDLERS: dict[str, Callable[[Data, Command], Result]] = {
    "put": _put,
    "delete": _delete,
    "get": _get,
    "range": _range,
    "incr": _incr,
    "append": _append,
    "cas": _cas,
    "put_many": _put_many,
}
