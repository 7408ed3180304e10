"""``make mutate``: mutation testing of the safety modules, and the record of what survives.

A safety rule that no test defends will break. mutmut changes the modules listed under
``[tool.mutmut] only_mutate`` in ``pyproject.toml`` one small edit at a time (a ``<`` for a
``<=``, a ``return`` of ``None``, a deleted call...) and runs the unit tests that reach the
changed function against each such *mutant*. A mutant the tests fail on is killed; one they pass
on *survived*: a rule of ours that no test would miss.

Every survivor must be killed by a new test, or listed in ``survivors.toml`` beside this file
with the reason no test can kill it (an equivalent mutant: it behaves exactly like the original,
or differs only where nothing can observe it here). This script runs mutmut from scratch, then
compares: a survivor the file does not list fails the run (it is added to the file marked
``UNEXPLAINED``, for its author to kill or explain), and an entry whose mutant no longer survives
is removed. So the committed file always says exactly what survives and why.

A mutant is named in the file by its module, its function and the lines it changes (compared
without indentation), not by mutmut's numbers, which shift whenever a function changes.

The modules fall into ``GROUPS``; ``--group NAME`` (``make mutate GROUP=NAME``) mutates one
group only and reconciles only its entries, for working on one part of the store.

mutmut runs through ``mutmut_session.py`` beside this file: ``mutmut run`` with each mutant's
tests run on one pytest session collected up front, and the whole-node tests left out for the
modules they never caught a mutant of (its docstring says why neither can hide a survivor).

    python tests/mutation/run.py [--max-children N] [--group NAME]   # what `make mutate` runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SURVIVORS = Path(__file__).with_name("survivors.toml")
UNEXPLAINED = "UNEXPLAINED: kill this mutant with a test, or say why no test can."
KILLED = frozenset({"killed", "timeout", "segfault", "caught by type check"})
"""mutmut's verdicts that mean the tests noticed (a crash or a hang counts: the test run failed)."""
HEADER = """\
# Mutants of the safety modules that survive the unit tests, and why no test can kill them.
# Kept current by `make mutate` (tests/mutation/run.py): a survivor missing here fails the run
# and is added with the reason UNEXPLAINED; an entry whose mutant no longer survives is
# removed. `change` is what the mutant changes (lines without their indentation).
"""


@dataclass(frozen=True)
class Mutant:
    file: str
    function: str
    change: str

    def key(self) -> tuple[str, str, str]:
        return self.file, self.function, self.change


@dataclass
class Outcome:
    statuses: Counter[str]
    survivors: list[tuple[str, Mutant, str]]
    """(mutmut's name, the mutant, its status) for each mutant the tests did not notice."""


GROUPS = {
    "sessions": ("session/session.py", "session/wire.py", "kvstore/dedup.py",
                 "kvstore/session_store.py", "kvstore/commands.py"),
    "snapshot": ("kvstore/snapshot.py", "kvstore/data.py"),
    "durability": ("kvstore/node/journal.py", "kvstore/node/recovery.py",
                   "kvstore/node/meta_file.py", "kvstore/node/durable.py",
                   "kvstore/node/sync_thread.py", "kvstore/node/quick_disk.py",
                   "kvstore/node/dump_file.py"),
    "raft": ("kvstore/node/d6_fence.py", "kvstore/node/member_table.py",
             "kvstore/node/append_rounds.py"),
    "membership": ("kvstore/node/membership.py",),
    "snapshotter": ("kvstore/node/snapshotter.py", "kvstore/node/send_pacing.py"),
    "streams": ("kvstore/streams.py",),
}
"""Every module of ``only_mutate`` in exactly one group (``check_groups``)."""


def check_groups(only_mutate: list[str]) -> None:
    grouped = [path for paths in GROUPS.values() for path in paths]
    if sorted(grouped) != sorted(only_mutate):
        sys.exit("make mutate: the GROUPS of tests/mutation/run.py must list every module of "
                 "[tool.mutmut] only_mutate once; not in a group: "
                 f"{sorted(set(only_mutate) - set(grouped))}, not in only_mutate: "
                 f"{sorted(set(grouped) - set(only_mutate))}")


def mutant_glob(path: str) -> str:
    """mutmut's names for the mutants of one module: ``kvstore.node.journal.*``."""
    return path.removesuffix(".py").replace("/", ".") + ".*"


WORKERS_PER_CORE = 2
"""Mutants tested at once, per core. The tests a slow mutant runs mostly wait (a real
``RaftNode``'s ticks and elections: 23% of a core), so a worker per core left the cores idle;
at 2 per core a CPU-bound test takes twice as long, still well inside its 15 s timeout."""

LOG = ROOT / "mutants" / "mutmut.log"
"""mutmut's own output (``debug = true`` in ``[tool.mutmut]``: every pytest run, verbose)."""


def run_mutmut(max_children: int, files: tuple[str, ...] | None) -> None:
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # from scratch: no stale verdicts
    LOG.parent.mkdir()
    mutmut = Path(__file__).with_name("mutmut_session.py")  # `mutmut run`, one session per worker
    print(f"make mutate: mutmut runs with {max_children} workers; its output goes to "
          f"{LOG.relative_to(ROOT)}", flush=True)
    with LOG.open("w") as log:
        names = [mutant_glob(path) for path in files] if files else []
        done = subprocess.run([sys.executable, str(mutmut), "run", "--max-children",
                               str(max_children), *names],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = LOG.read_text(errors="replace").replace("\r", "\n").splitlines()[-60:]
        print("\n".join(tail))
        sys.exit(f"make mutate: mutmut run exited {done.returncode} (the end of its output "
                 f"is above; all of it in {LOG.relative_to(ROOT)})")


def change_of(diff: str) -> str:
    """The lines a mutant removes and adds, without indentation."""
    lines = []
    for line in diff.splitlines():
        if line.startswith(("---", "+++")) or not line.startswith(("-", "+")):
            continue
        lines.append(f"{line[0]} {line[1:].strip()}".rstrip())
    return "\n".join(lines)


def collect(files: tuple[str, ...] | None) -> Outcome:
    """mutmut's verdicts, read back through its own API (pinned in the ``mutate`` extra)."""
    from mutmut.configuration import config
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    config()  # reads [tool.mutmut] from the current directory
    statuses: Counter[str] = Counter()
    survivors = []
    for path in sorted(walk_mutatable_files()):
        if files and str(path) not in files:
            continue
        data = SourceFileMutationData(path=path)
        data.load()
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[exit_code]
            statuses[status] += 1
            if status in KILLED:
                continue
            function, cls = orig_function_and_class_names_from_key(name)
            mutant = Mutant(str(path), f"{cls}.{function}" if cls else function,
                            change_of(get_diff_for_mutant(name, path=path)))
            survivors.append((name, mutant, status))
    return Outcome(statuses, survivors)


def load_explanations() -> list[tuple[Mutant, str]]:
    if not SURVIVORS.exists():
        return []
    entries = tomllib.loads(SURVIVORS.read_text()).get("survivor", [])
    return [(Mutant(e["file"], e["function"], e["change"].strip("\n")), e["reason"].strip("\n"))
            for e in entries]


def _literal(text: str) -> str:
    if "'''" in text:
        raise ValueError(f"cannot write ''' in a literal string: {text!r}")
    return f"'''\n{text}\n'''"


def save_explanations(entries: list[tuple[Mutant, str]]) -> None:
    blocks = [HEADER.rstrip("\n")]
    for mutant, reason in sorted(entries, key=lambda e: e[0].key()):
        blocks.append("\n".join([
            "[[survivor]]",
            f'file = "{mutant.file}"',
            f'function = "{mutant.function}"',
            f"change = {_literal(mutant.change)}",
            f"reason = {_literal(reason)}",
        ]))
    SURVIVORS.write_text("\n\n".join(blocks) + "\n")


def reconcile(outcome: Outcome, files: tuple[str, ...] | None
              ) -> tuple[list[tuple[Mutant, str]], list[tuple[str, Mutant]], list[Mutant]]:
    """The file's new entries, the survivors without a reason, and the entries now stale.
    Entries of modules outside ``files`` (when given) are kept as they are."""
    explained: dict[tuple[str, str, str], list[str]] = {}
    kept, unexplained = [], []
    for mutant, reason in load_explanations():
        if files and mutant.file not in files:
            kept.append((mutant, reason))
        else:
            explained.setdefault(mutant.key(), []).append(reason)
    for name, mutant, _ in outcome.survivors:
        reasons = explained.get(mutant.key())
        reason = reasons.pop(0) if reasons else UNEXPLAINED
        kept.append((mutant, reason))
        if reason == UNEXPLAINED:
            unexplained.append((name, mutant))
    stale = [Mutant(*key) for key, reasons in explained.items() for _ in reasons]
    return kept, unexplained, stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--max-children", type=int,
                        default=WORKERS_PER_CORE * (os.cpu_count() or 1))
    parser.add_argument("--group", choices=sorted(GROUPS), help="mutate this group only")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    check_groups(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
                 ["only_mutate"])
    files = GROUPS[args.group] if args.group else None
    started = time.monotonic()
    run_mutmut(args.max_children, files)
    outcome = collect(files)
    kept, unexplained, stale = reconcile(outcome, files)
    save_explanations(kept)
    minutes, seconds = divmod(round(time.monotonic() - started), 60)

    total = sum(outcome.statuses.values())
    scope = f"group {args.group}" if args.group else "all groups"
    print(f"\nmake mutate ({scope}): {total} mutants in {minutes} min {seconds:02d} s: "
          + ", ".join(f"{n} {status}" for status, n in outcome.statuses.most_common()))
    print(f"  survivors explained in {SURVIVORS.relative_to(ROOT)}: "
          f"{sum(1 for m, _ in kept if not files or m.file in files) - len(unexplained)}")
    for mutant in stale:
        print(f"  no longer survives, removed from the file: {mutant.file} {mutant.function}: "
              f"{mutant.change!r}")
    for name, mutant in unexplained:
        print(f"\nUNEXPLAINED survivor {name} ({mutant.file}, {mutant.function}):\n"
              + "\n".join("    " + line for line in mutant.change.splitlines()))
    if unexplained:
        print(f"\nmake mutate: {len(unexplained)} unexplained survivors: kill each with a test, "
              f"or give the reason no test can in {SURVIVORS.relative_to(ROOT)} "
              "(`mutmut show NAME` shows the whole mutant).")
        return 1
    print("make mutate: every survivor is explained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
