"""Checkers for histories recorded by the Jepsen-style harness: pure functions, no I/O, no clocks.

``history`` defines the record (``Op``) and how it is written, read and taken; ``linearizable``,
``list_append`` and ``counter`` judge a history; ``verdict`` holds what they return.
"""
