"""The Jepsen-style harness behind ``kv check``: record a history under faults, then judge it.

The checkers are pure functions (no I/O, no clocks): ``history`` defines the record (``Op``),
how it is written, read and taken; ``linearizable``, ``list_append`` and ``counter`` judge a
history; ``verdict`` holds what they return, and the replica convergence check.
"""
