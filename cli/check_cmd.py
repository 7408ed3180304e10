"""``kv check``: prove the promise. Runs a cluster under faults, records every operation, and
checks the history: linearizable registers, list-appends with no duplicate and no loss, a
counter within its acknowledged bounds, and every replica converged to the same state.

Exit code 0 only for a valid history.
"""

from __future__ import annotations

import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import click

from cli.check_run import CheckOptions, run_check
from cli.exits import ERROR, CliError
from cli.kv_click import KvCommand
from cli.nemesis import FAULT_KINDS, NETNS_FAULT_KINDS, POWER_LOSS_SCOPES
from cli.output import Report, emit
from cli.params import Duration, Integer
from cli.settings import Settings, global_options
from kvstore.check.workloads import WORKLOADS

PLANTED_BUGS = ("no-dedup",)
NETS = ("loopback", "netns")
NETNS_FAULTS = ("kill", "pause", "partition", *NETNS_FAULT_KINDS)
"""The faults ``--net netns`` knows how to inject (power-loss is not tried in namespaces yet)."""


class Everything(list[str]):
    """``all``: every choice, told apart from the same names listed one by one."""


def _names(choices: tuple[str, ...], allow_none: bool) -> click.ParamType:
    class Names(click.ParamType):
        name = "list"

        def convert(self, value: object, param: click.Parameter | None,
                    ctx: click.Context | None) -> list[str]:
            if isinstance(value, list):
                return value
            text = str(value).strip()
            if text == "all":
                return Everything(choices)
            if allow_none and text in ("", "none"):
                return []
            names = [n.strip() for n in text.split(",") if n.strip()]
            unknown = [n for n in names if n not in choices]
            if unknown or not names:
                self.fail(f"choose from {', '.join(choices)} (comma-separated, or 'all')", param, ctx)
            return names

    return Names()


@click.command(cls=KvCommand)
@click.option("--workload", "workloads", type=_names(tuple(WORKLOADS), False), default="all",
              show_default=True, help=f"Comma list of {', '.join(WORKLOADS)}, or all.")
@click.option("--faults", type=_names(FAULT_KINDS + NETNS_FAULT_KINDS, True), default="all",
              show_default=True, help=f"Comma list of {', '.join(FAULT_KINDS)}, all, or none; "
              f"with --net netns also {', '.join(NETNS_FAULT_KINDS)}.")
@click.option("--duration", type=Duration(), default="60s", show_default=True,
              help="How long the workload runs (30s, 10m, ...).")
@click.option("--seed", type=Integer(), help="Seed of the operations and faults [default: random].")
@click.option("--clients", type=Integer(1, 64), default=4, show_default=True,
              help="Concurrent clients per workload.")
@click.option("--nodes", type=Integer(3, 7), default=3, show_default=True)
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("kv-check-report"), show_default=True,
              help="Directory for history.jsonl, faults.json, verdict.json, report.html.")
@click.option("--fsync/--no-fsync", default=True, show_default=True,
              help="Run the nodes in durable mode (the default) or without fsync.")
@click.option("--power-loss-scope", type=click.Choice(POWER_LOSS_SCOPES), default="any",
              show_default=True, help="Which nodes a power-loss fault takes down at once: one, "
              "a minority, all, or any of these at random.")
@click.option("--net", type=click.Choice(NETS), default="loopback", show_default=True,
              help="loopback: the nodes on 127.0.0.1, a fault proxy on each Raft link. netns: "
              "each node in a network namespace of its own, with its own address and TLS, the "
              "checker in another; partitions are blackhole routes, plus netem and loss on "
              "the links (needs root and ip netns).")
@click.option("--preload", type=Integer(0, 10_000_000), default=0, metavar="N",
              help="First load N keys of 100 B through the log (as kv bench --preload), so "
              "snapshots of a large state are taken, and installed on added members, during "
              "the run.")
@click.option("--planted-bug", type=click.Choice(PLANTED_BUGS), hidden=True,
              help="Run nodes with a known bug, to show the checkers catch it.")
@global_options
def check(workloads: list[str], faults: list[str], duration: float, seed: int | None,
          clients: int, nodes: int, report_dir: Path, fsync: bool, power_loss_scope: str,
          net: str, preload: int, planted_bug: str | None) -> None:
    """Runs workloads against a local cluster under faults and checks the history.

    The power-loss fault puts each node's data directory on a FUSE file system that drops what
    was not fsynced (kvstore/check/powerfs.py); it needs /dev/fuse and Debian's fuse3."""
    settings = Settings.current()
    topology = None
    if net == "netns":
        from cli import check_netns

        topology = check_netns.inside()
        if topology is None:  # build the network, run this command again inside it
            from kvstore.check import netns

            if (reason := netns.unusable()) is not None:
                raise CliError(f"kv check --net netns cannot run here: {reason}")
            click.get_current_context().exit(check_netns.run_outside(nodes))
    seed = secrets.randbelow(2**31) if seed is None else seed
    faults = _usable_faults(faults, net)
    options = CheckOptions(workloads=workloads, faults=faults, duration=duration, seed=seed,
                           clients=clients, nodes=nodes, planted_bug=planted_bug,
                           report_dir=report_dir, fsync=fsync,
                           power_loss_scope=power_loss_scope, topology=topology,
                           preload=preload)
    tty = sys.stderr.isatty()
    where = f", nodes in namespaces on {topology.address('n1')}/24" if topology else ""
    click.echo(f"kv check: seed {seed}, workloads {','.join(workloads)}, faults "
               f"{','.join(faults) or 'none'}, {duration:.0f} s{where}"
               + (f", {preload:,} keys preloaded" if preload else ""), err=True)

    def progress(line: str) -> None:
        click.echo(("\r" + line) if tty else line, err=True, nl=not tty)

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: nodes stopped, disks unmounted

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        outcome = run_check(options, progress)
    except TimeoutError as exc:
        raise CliError(f"the cluster under test did not come up: {exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    if tty:
        click.echo(err=True)
    summary = {**outcome.summary, "report": str(outcome.report) if outcome.report else None}
    lines = _verdict_lines(summary, outcome.violations)
    emit(Report(data=summary, header=("field", "value"),
                rows=[(k, str(v)) for k, v in summary.items()], simple=lines), settings.write_out)
    if not outcome.valid:
        raise CliError(f"the history is not valid (seed {seed}); see {outcome.report}", ERROR)


def _usable_faults(faults: list[str], net: str = "loopback") -> list[str]:
    """The faults to inject: power-loss needs FUSE; without it, ``all`` leaves it out (and says
    so) and naming it is an error. Likewise the faults of a real network need ``--net netns``
    (``all`` on loopback means the others), netem tc netem or iptables, loss nftables."""
    faults = _network_faults(faults, net)
    if "power-loss" not in faults:
        return faults
    from kvstore.check.powerfs_mount import fuse_unusable

    reason = fuse_unusable()
    if reason is None:
        return faults
    if isinstance(faults, Everything):
        click.echo(f"kv check: no power-loss faults: {reason}", err=True)
        return [f for f in faults if f != "power-loss"]
    raise CliError(f"the power-loss fault cannot run here: {reason}")


def _network_faults(faults: list[str], net: str) -> list[str]:
    everything = isinstance(faults, Everything)
    if net != "netns":
        named = [f for f in faults if f in NETNS_FAULT_KINDS]
        if named and not everything:
            raise CliError(f"the {named[0]} fault needs a real network: add --net netns")
        return Everything(f for f in faults if f not in NETNS_FAULT_KINDS) if everything \
            else faults
    from kvstore.check import netns

    untried = [f for f in faults if f not in NETNS_FAULTS]
    if untried and not everything:
        raise CliError(f"the {untried[0]} fault does not run with --net netns yet (there: "
                       f"{', '.join(NETNS_FAULTS)})")
    faults = Everything(f for f in faults if f in NETNS_FAULTS) if everything else faults
    for kind, unusable in (("netem", netns.impair_unusable), ("loss", netns.nft_unusable)):
        if kind in faults and (reason := unusable()) is not None:
            if not everything:
                raise CliError(f"the {kind} fault cannot run here: {reason}")
            click.echo(f"kv check: no {kind} faults: {reason}", err=True)
            faults = Everything(f for f in faults if f != kind)
    return faults


def _verdict_lines(s: dict[str, Any], violations: list[Any]) -> list[str]:
    lines = [
        f"verdict: {s['verdict']} (seed {s['seed']})",
        f"ops: ok {s['ops_ok']}, failed {s['ops_failed']}, unknown {s['ops_unknown']}",
        "faults: " + (", ".join(f"{k} {v}" for k, v in sorted(s["faults_injected"].items()))
                      or "none"),
        "violations: " + ", ".join(f"{k} {v}" for k, v in s["violations"].items()),
    ]
    if s.get("preloaded_keys"):
        snaps = s["snapshots"]
        lines.insert(3, f"preloaded {s['preloaded_keys']:,} keys in {s['preload_s']} s; snapshots "
                        f"written {sum(snaps['written'].values())}, loaded "
                        f"{sum(snaps['loaded'].values())} (final members); longest tick gap "
                        f"{snaps['tick_gap_max_ms']} ms")
    if "membership" in s["faults_injected"]:
        changes = s["membership_changes"]
        lines.insert(3, f"membership changes: add {changes['add']}, promote {changes['promote']}"
                        f", remove {changes['remove']} (the leader {changes['remove-leader']})")
    lines += [f"  - {v.kind} on {v.key}: {v.message}" for v in violations[:10]]
    lines += [f"  nemesis: {error}" for error in s["nemesis_errors"]]
    if s["report"]:
        lines.append(f"report: {s['report']}")
    return lines
