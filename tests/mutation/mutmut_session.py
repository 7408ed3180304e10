"""``mutmut run`` (mutmut 3.8.1, pinned), with three costs of each run taken out.

**Each mutant's tests run on a test session collected once.** mutmut's fork server forks one
process per mutant, and that process called ``pytest.main``: pytest parsed its options,
registered its 40 plugins, loaded the conftest files and collected every test module the
mutant's tests are in, then ran the first few tests (``-x``: a mutant is killed by its first
failing test). Most mutants are killed by their first test, in milliseconds; that set-up took
0.13 s of each process, twice the rest. Here the fork server sets a pytest session up once,
with the arguments ``pytest.main`` was given: configured, started, the whole test selection
collected (``[tool.mutmut] pytest_add_cli_args_test_selection``, which mutmut's own warm-up
collects too). Each mutant's process, forked from it, keeps the mutant's tests in the
session's order (``tests/conftest.py`` sorts the quickest first) and runs them through pytest's
own test loop (``pytest_runtestloop``: the same hooks, fixtures, timeouts and ``-x``), and exits
with the code ``pytest.main`` gives for what happened: 0 all passed, 1 a test failed, 2
interrupted, 3 an internal error. Not done in each process, and why no verdict can change:

- the session's end (``pytest_sessionfinish``): when every test passed, the last test's
  teardown already tore every fixture down (pytest does after the last item); when a test
  failed, the mutant is killed whatever a teardown would do;
- pytest's output capture is not the fork server's: each process starts its own (the server's
  capture files would be shared by every process at once).

**mutmut's clean run is skipped** (``_first_pass_ran_them``).

**The tests of whole nodes and stores do not run for modules they never caught a mutant of**
(``NOT_RUN_FOR``): they only made those modules' survivors slow.

The main process stays as mutmut keeps it, without pytest: pytest is imported in the fork
server only. ``python tests/mutation/mutmut_session.py run ARGS`` is ``mutmut run ARGS``.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterable
from typing import Any

from mutmut.runners.harness import PytestRunner
from mutmut.utils.file_utils import change_cwd


NOT_RUN_FOR = {
    "tests/unit/test_membership_fence.py": (
        "kvstore/node/journal.py", "kvstore/node/meta_file.py", "kvstore/node/dump_file.py",
        "kvstore/node/member_table.py", "kvstore/snapshot.py", "session/wire.py"),
    "tests/unit/test_d6_fence.py": (
        "kvstore/node/journal.py", "kvstore/node/meta_file.py", "kvstore/node/recovery.py",
        "session/wire.py"),
    "tests/unit/test_durable.py": (
        "kvstore/node/journal.py", "kvstore/node/meta_file.py", "kvstore/node/recovery.py",
        "kvstore/node/membership.py", "kvstore/node/snapshotter.py", "kvstore/node/d6_fence.py",
        "session/wire.py"),
    "tests/unit/test_snapshotter.py": (
        "kvstore/snapshot.py", "kvstore/node/dump_file.py", "kvstore/session_store.py",
        "session/session.py", "session/wire.py"),
    "tests/unit/test_model.py": (
        "kvstore/snapshot.py", "kvstore/commands.py", "kvstore/session_store.py",
        "session/session.py", "session/wire.py"),
    "tests/unit/test_determinism.py": ("kvstore/session_store.py", "session/wire.py"),
    "tests/unit/test_snapshot_stream.py": ("session/wire.py",),
    "tests/unit/test_sync_thread.py": ("kvstore/node/meta_file.py",),
}
"""Test files of whole nodes and whole stores (real ``RaftNode``s driven message by message,
the model and determinism runs), and the modules whose mutants do not run them.

Such a test reaches most of the store: every function that it calls counts it among its tests,
and a mutant that survives runs every test of its function (a survivor of ``Journal.__init__``
ran 245 tests, 16 s, most of it in ``test_membership_fence.py``). In the full run of 3 Dec
2026 (``mutants/mutmut-killers.tsv``, each kill's first failing test) no killed mutant of the
modules listed against a file here was first killed by that file's tests: for those modules,
these tests only added to their survivors' time (about 415 s of tests in all). The one
exception is a mutant of ``Journal._copy`` that hangs (a timeout, so no failing test is
recorded): its 30 tests of ``test_journal_reclaim.py`` and others run before those of
``test_membership_fence.py``, and hang first. Leaving a test out can only turn a kill into a
survival, never the reverse: if a later change makes one of these tests the only one to kill
a mutant, ``make mutate`` reports a new survivor, and the entry here is what to look at."""


def kept(mutant_name: str, tests: Iterable[str]) -> set[str]:
    """The tests of the mutant less those ``NOT_RUN_FOR`` its module."""
    module = mutant_name.rpartition(".")[0].replace(".", "/") + ".py"  # mutmut's own split
    return {test for test in tests if module not in NOT_RUN_FOR.get(test.split("::")[0], ())}


class SessionRunner(PytestRunner):
    """``PytestRunner`` whose ``run_tests``, in the fork server's children, uses the session
    the fork server collected (``warm_up``); everywhere else (mutmut's first pass, its clean
    and forced-fail runs, each in a process of its own) it is mutmut's."""

    def __init__(self) -> None:
        super().__init__()
        self._session: Any = None
        self._nodeids: list[str] = []

    def warm_up(self) -> None:
        from _pytest import __version__ as pytest_version
        from _pytest.config import _prepareconfig
        from _pytest.main import Session

        args = ["--rootdir=.", "--tb=native", *self._pytest_args_regular_run([]),
                *self._pytest_add_cli_args]
        os.environ["PYTEST_VERSION"] = pytest_version  # as pytest.main sets it
        with change_cwd("mutants"):
            config = _prepareconfig(args)
            session = Session.from_config(config)
            config._do_configure()
            config.hook.pytest_sessionstart(session=session)
            config.hook.pytest_collection(session=session)
            if session.testsfailed:  # a collection error would fail every mutant's run
                raise RuntimeError(f"{session.testsfailed} errors collecting the unit tests")
            capture = config.pluginmanager.getplugin("capturemanager")
            capture.stop_global_capturing()
        self._session = session
        self._nodeids = [item.nodeid for item in session.items]

    def run_tests(self, *, mutant_name: str | None, tests: Iterable[str]) -> int:
        if self._session is None:
            return super().run_tests(mutant_name=mutant_name, tests=tests)
        from _pytest import outcomes
        from _pytest.main import ExitCode

        session = self._session
        wanted = kept(mutant_name or "", tests)
        session.items = [item for item, nodeid in zip(session.items, self._nodeids)
                         if nodeid in wanted]
        missing = wanted.difference(self._nodeids)
        if missing:
            raise RuntimeError(f"tests not in the collected session: {sorted(missing)[:5]}")
        session.testscollected = len(session.items)
        session.config.pluginmanager.getplugin("capturemanager").start_global_capturing()
        gc.freeze()  # the collected session too, as tests/conftest.py does the rest
        with change_cwd("mutants"):
            try:
                session.config.hook.pytest_runtestloop(session=session)
            except session.Failed:
                return int(ExitCode.TESTS_FAILED)
            except outcomes.Exit as exc:
                return int(ExitCode.INTERRUPTED if exc.returncode is None else exc.returncode)
            except KeyboardInterrupt:  # pytest's Interrupted too
                return int(ExitCode.INTERRUPTED)
            except BaseException:
                return int(ExitCode.INTERNAL_ERROR)
        if session.testsfailed:
            return int(ExitCode.TESTS_FAILED)
        return int(ExitCode.OK if session.items else ExitCode.NO_TESTS_COLLECTED)


def _first_pass_ran_them(runner: Any, tests: Iterable[str]) -> int:
    """mutmut's clean run, skipped: it runs every test that reaches a mutant, unmutated, to
    check that they pass. ``make mutate`` always starts from nothing (``run.py`` deletes
    ``mutants/``), so mutmut's first pass ran all of those tests, unmutated, a minute before,
    and stopped the run if one failed (``failed to collect stats``)."""
    return 0


def main() -> None:
    import mutmut.workers.isolation as isolation
    from mutmut.__main__ import cli

    isolation.PytestRunner = SessionRunner  # type: ignore[misc]  # what get_mutant_runner builds
    isolation.ForkServerRunner.run_clean_tests = _first_pass_ran_them  # type: ignore[method-assign]
    sys.argv[0] = "mutmut"
    cli()


if __name__ == "__main__":
    main()
