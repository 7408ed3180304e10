"""Building and reading ``Result`` messages, the answer to every applied entry."""

from __future__ import annotations

from kvstore.proto.log_pb2 import Code, Result
from session.wire import parse_canonical


def ok(**fields: object) -> Result:
    return Result(code=Code.OK, **fields)  # type: ignore[arg-type]


def error(code: Code.ValueType, message: str) -> Result:
    return Result(code=code, message=message)


def encode(result: Result) -> bytes:
    """The result's bytes: what apply returns and what a session caches."""
    return result.SerializeToString(deterministic=True)


def decode(data: bytes) -> Result:
    return parse_canonical(Result, data)


def code_name(result: Result) -> str:
    return Code.Name(result.code)
