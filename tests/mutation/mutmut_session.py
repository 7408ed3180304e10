"""``mutmut run`` (mutmut 3.8.1, pinned), with two costs of each run taken out.

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
        wanted = set(tests)
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
