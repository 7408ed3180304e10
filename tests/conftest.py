"""Shared pytest hooks, for ``make mutate`` (``tests/mutation/run.py``) only.

Under mutmut each mutant runs the unit tests that reach the mutated function and stops at the
first failure, so the run's time is the time of those tests, paid once per mutant: about three
thousand times. Four things keep it short, and none changes a test outside mutmut (mutmut
sets ``MUTANT_UNDER_TEST`` in every process it runs tests in, from its first pass to the last
mutant; nothing else does):

- The quickest tests run first: most mutants are killed by a quick, targeted test. A test's
  cost is its call's duration, measured by mutmut in its first pass (``mutmut-stats.json``),
  plus the set-up time of the fixtures it uses, measured here in that same pass
  (``FIXTURE_STATS``): mutmut times only the call, and a test whose module fixture takes
  seconds to set up (``test_fuzz``'s) looked free and ran first for every mutant it reached.
- A property test tries at most ``MUTATION_EXAMPLES`` examples, always the same ones
  (``derandomize``, no example database): a mutant that survives is one that the focused
  tests and that fixed sample both miss, and the verdicts, so the survivors file, are the same
  from run to run. The full example counts still run in ``make test``.
- Every mutant's tests run in a process forked from mutmut's fork server, which has collected
  the whole suite first: a heap of modules and test objects. pytest ends each run with a full
  ``gc.collect()`` (its unraisable-exception check), which walked that whole heap and, by
  writing to every object's header, copied each of its pages into the child: about half of a
  quick mutant's 0.45 s. ``gc.freeze()`` at the start of each run moves what is already there
  out of the collector's reach; what the tests themselves create is collected as before.
- The durations are read once, in the fork server, not again in each mutant's process.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Generator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.support import mutation_settings, under_mutmut

MUTMUT_STATS = Path("mutmut-stats.json")
"""Written by mutmut in its working directory (``mutants/``), where it also runs the tests."""
FIXTURE_STATS = Path("mutmut-fixture-setup.json")
"""The set-up seconds of each fixture, written beside it at the end of mutmut's first pass."""
_fixture_seconds: dict[str, float] = {}


def pytest_configure(config: pytest.Config) -> None:
    if under_mutmut():
        gc.freeze()


def _fixture_key(fixturedef: Any) -> str:
    return f"{fixturedef.baseid}::{fixturedef.argname}"


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
    started = time.perf_counter()
    try:
        return (yield)
    finally:
        if os.environ.get("MUTANT_UNDER_TEST") == "stats":  # mutmut's first pass
            key = _fixture_key(fixturedef)
            _fixture_seconds[key] = max(_fixture_seconds.get(key, 0.0),
                                        time.perf_counter() - started)


KILLERS = Path("mutmut-killers.tsv").absolute()
"""Beside the stats (the conftest is imported there): each mutant killed by a failing test, and
that test (mutant, test, phase, seconds the test took), one line each, for finding where a
run's time goes."""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if report.failed and mutant not in ("", "stats", "fail"):
        with KILLERS.open("a") as killers:  # one short write: lines of parallel mutants stay whole
            killers.write(f"{mutant}\t{report.nodeid}\t{report.when}\t{report.duration:.3f}\n")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if os.environ.get("MUTANT_UNDER_TEST") == "stats" and _fixture_seconds:
        FIXTURE_STATS.write_text(json.dumps(_fixture_seconds))


@cache
def _durations(stamp: tuple[int, int]) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds per test call, set-up seconds per fixture), for the files' (mtime, size)."""
    calls = json.loads(MUTMUT_STATS.read_text()).get("duration_by_test", {})
    fixtures = json.loads(FIXTURE_STATS.read_text()) if FIXTURE_STATS.exists() else {}
    return calls, fixtures


def _cost(item: pytest.Item, calls: dict[str, float], fixtures: dict[str, float]) -> float:
    info = getattr(item, "_fixtureinfo", None)
    used = [defs[-1] for defs in info.name2fixturedefs.values() if defs] if info else []
    return calls.get(item.nodeid, 0.0) + sum(fixtures.get(_fixture_key(d), 0.0) for d in used)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not under_mutmut():
        return
    for item in items:
        test = getattr(item, "obj", None)
        given = getattr(test, "_hypothesis_internal_use_settings", None)
        if given is not None:  # a @given test: hypothesis reads this when the test runs
            test._hypothesis_internal_use_settings = mutation_settings(given)
    if MUTMUT_STATS.exists():
        stat = MUTMUT_STATS.stat()
        calls, fixtures = _durations((stat.st_mtime_ns, stat.st_size))
        items.sort(key=lambda item: _cost(item, calls, fixtures))
