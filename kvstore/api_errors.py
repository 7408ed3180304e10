"""How failures cross the gRPC boundary: one table, read by the server and by the client.

The server turns a state-machine error result into a gRPC status and attaches the result
itself as binary metadata; the client turns that back into a typed exception. Keeping both
directions here means the mapping cannot drift between the two sides.
"""

from __future__ import annotations

from typing import Final

import grpc

from kvstore import errors
from kvstore.proto.log_pb2 import Code

RESULT_METADATA_KEY: Final = "kv-result-bin"
"""Binary metadata carrying the serialized ``Result`` of a failed proposal."""

LEADER_METADATA_KEY: Final = "kv-leader"
"""The API address of the leader, on a refusal by a node that is not the leader."""

REASON_METADATA_KEY: Final = "kv-reason"
"""Why the node refused or gave up (PySyncObj's FAIL_REASON name, or ours). Its presence also
tells the client that the *node* answered, rather than the transport failing."""

# Result code -> (gRPC status code, exception the client raises). MALFORMED_ENTRY and
# CLUSTER_MISMATCH are decided before the session rules, so nothing is cached and the session
# stays where it was: their exceptions are not ``ResultError``s. The other codes are answers.
# ALREADY_EXISTS says "this series id is taken" for both of its codes (answered and
# acknowledged; used by another command); the client tells them apart by the result, attached
# as metadata, whose code also begins the status details.
RESULT_ERRORS: Final[dict[int, tuple[grpc.StatusCode, type[errors.KVError]]]] = {
    Code.MALFORMED_ENTRY: (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    Code.CLUSTER_MISMATCH: (grpc.StatusCode.FAILED_PRECONDITION, errors.ClusterMismatch),
    Code.SESSION_EXPIRED: (grpc.StatusCode.FAILED_PRECONDITION, errors.SessionExpired),
    Code.ALREADY_RESPONDED: (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyResponded),
    Code.SERIES_REUSED: (grpc.StatusCode.ALREADY_EXISTS, errors.SeriesReused),
    Code.INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidCommand),
    Code.KEY_TOO_LARGE: (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidCommand),
    Code.VALUE_TOO_LARGE: (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidCommand),
    Code.WRONG_TYPE: (grpc.StatusCode.FAILED_PRECONDITION, errors.CommandFailed),
    Code.OUT_OF_RANGE: (grpc.StatusCode.OUT_OF_RANGE, errors.CommandFailed),
}

MEMBERSHIP_REFUSED: Final = "MEMBERSHIP_REFUSED"
"""The ``kv-reason`` of a membership change the leader refuses to make (it would lose the
quorum, the learner is not in sync, no such member...): FAILED_PRECONDITION, nothing changed."""

# Refusals and give-ups of the node, by reason -> gRPC status code.
NOT_APPLIED_STATUS: Final = grpc.StatusCode.UNAVAILABLE
QUEUE_FULL_STATUS: Final = grpc.StatusCode.RESOURCE_EXHAUSTED
TIMEOUT_STATUS: Final = grpc.StatusCode.DEADLINE_EXCEEDED
UNKNOWN_OUTCOME_STATUS: Final = grpc.StatusCode.ABORTED
