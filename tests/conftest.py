"""Shared pytest hooks, for ``make mutate`` (``tests/mutation/run.py``) only.

Under mutmut each mutant runs the unit tests that reach the mutated function and stops at the
first failure, so the run's time is the time of those tests, paid once per mutant: about three
thousand times. Two things keep it short, and neither changes a test outside mutmut (mutmut
sets ``MUTANT_UNDER_TEST`` in every process it runs tests in, from its first pass to the last
mutant; nothing else does):

- The quickest tests run first (by the durations mutmut measured in its first pass,
  ``mutmut-stats.json``): most mutants are killed by a quick, targeted test.
- A property test tries at most ``MUTATION_EXAMPLES`` examples, always the same ones
  (``derandomize``, no example database): a mutant that survives is one that the focused
  tests and that fixed sample both miss, and the verdicts, so the survivors file, are the same
  from run to run. The full example counts still run in ``make test``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import mutation_settings, under_mutmut

MUTMUT_STATS = Path("mutmut-stats.json")
"""Written by mutmut in its working directory (``mutants/``), where it also runs the tests."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not under_mutmut():
        return
    for item in items:
        test = getattr(item, "obj", None)
        given = getattr(test, "_hypothesis_internal_use_settings", None)
        if given is not None:  # a @given test: hypothesis reads this when the test runs
            test._hypothesis_internal_use_settings = mutation_settings(given)
    if MUTMUT_STATS.exists():
        durations: dict[str, float] = json.loads(MUTMUT_STATS.read_text()).get(
            "duration_by_test", {})
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
