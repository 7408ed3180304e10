"""The node layer: the only code that knows PySyncObj (see ``raft_node`` for the defects it fences)."""

from kvstore.node.health import NodeStatusView
from kvstore.node.kv_node import KVNode
from kvstore.node.outcomes import NotApplied, OutcomeUnknown

__all__ = ["KVNode", "NodeStatusView", "NotApplied", "OutcomeUnknown"]
