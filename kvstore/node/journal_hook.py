"""Hands our journal (``kvstore.node.journal``) to PySyncObj instead of its own.

``SyncObj.__init__`` makes its journal by calling ``createJournal(conf.journalFile)``, a name
imported into ``pysyncobj.syncobj``; there is no hook for it. ``providing(path, journal)``
replaces that name, once per process, with a function that returns the journal registered for
``path`` (and PySyncObj's own for any other path, e.g. a plain PySyncObj in a benchmark), for
the duration of a ``SyncObj.__init__``. This is the only place that touches it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pysyncobj.syncobj as _syncobj

_lock = threading.Lock()
_provided: dict[str, Any] = {}
_original = _syncobj.createJournal


def _create_journal(journal_file: str | None = None) -> Any:
    with _lock:
        journal = _provided.pop(journal_file, None) if journal_file is not None else None
    return journal if journal is not None else _original(journal_file)


@contextmanager
def providing(path: str, journal: Any) -> Iterator[None]:
    """PySyncObj's ``createJournal(path)`` returns ``journal`` inside this block."""
    with _lock:
        if _syncobj.createJournal is not _create_journal:
            if _syncobj.createJournal is not _original:
                raise RuntimeError("pysyncobj.syncobj.createJournal was replaced by someone else")
            _syncobj.createJournal = _create_journal
        _provided[path] = journal
    try:
        yield
    finally:
        with _lock:
            _provided.pop(path, None)
