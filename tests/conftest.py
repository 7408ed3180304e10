"""Shared pytest hooks. Only one, for ``make mutate`` (``tests/mutation/run.py``).

Under mutmut each mutant runs the tests that reach the mutated function and stops at the first
failure. Most mutants are killed by a quick, targeted test, so running the quickest first (by
the durations mutmut measured in its first pass, ``mutmut-stats.json``) saves most of the run.
Outside a mutation run (no ``MUTANT_UNDER_TEST``) the order is pytest's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

MUTMUT_STATS = Path("mutmut-stats.json")
"""Written by mutmut in its working directory (``mutants/``), where it also runs the tests."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("MUTANT_UNDER_TEST") or not MUTMUT_STATS.exists():
        return
    durations: dict[str, float] = json.loads(MUTMUT_STATS.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
