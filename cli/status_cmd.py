"""``kv status`` and ``kv health``: the endpoints in use, as etcdctl's ``endpoint status`` and
``endpoint health``.

``status`` is a row per endpoint (``cli.node_status``, the same columns as ``kv cluster
status``); ``health`` answers one question per endpoint, "can I use it?", and exits 0 only when
every endpoint can, and the cluster commits a read through its log.
"""

from __future__ import annotations

import time

import click

from cli import node_status
from cli.exits import ERROR, UNAVAILABLE, CliError
from cli.kv_click import KvCommand
from cli.node_status import Row, Target
from cli.output import Report, emit
from cli.settings import Settings, global_options
from kvstore.errors import KVError

HEALTH_KEY = b"health"
"""The key that ``kv health`` reads through the log (it need not exist)."""


def targets(settings: Settings) -> tuple[list[Target], int | None]:
    """The endpoints in use, named by node id when they come from the local cluster."""
    endpoints, cluster_id = settings.target()
    names = {}
    if cluster_id is not None:
        names = {node.api: node.id for node in settings.cluster.load().nodes}
    return [Target(e, names.get(e)) for e in endpoints], cluster_id


@click.command(cls=KvCommand)
@click.option("--digest/--no-digest", default=True, show_default=True,
              help="Ask each node for its state digest (it hashes the whole state: skip it on "
                   "large stores).")
@global_options
def status(digest: bool) -> None:
    """One row per endpoint in use: role, term, indexes, sessions, keys, digest, alarms.

    A table in a terminal (-w to choose). Exit 2 if no endpoint answers; an endpoint that does
    not is a row saying "unreachable". kv cluster status adds the local nodes' processes.
    """
    settings = Settings.current()
    asked, cluster_id = targets(settings)
    with settings.client() as client:
        rows = [node_status.probe(client, t, cluster_id=cluster_id, with_digest=digest,
                                  timeout=settings.timeout if digest else None)
                for t in asked]
    emit(node_status.report(rows, local=False), settings.output_format(terminal="table"))
    node_status.require_an_answer(rows)


def verdict(row: Row) -> str | None:
    """Why a node's status says it cannot serve; ``None`` if it can."""
    if not node_status.answered(row):
        return str(row["error"])
    if row.get("alarms"):
        return "alarms: " + "; ".join(str(a) for a in row["alarms"])  # type: ignore[union-attr]
    if not row.get("leader"):
        return "no leader"
    if not row.get("has_quorum"):
        return "no quorum"
    return None


@click.command(cls=KvCommand)
@global_options
def health() -> None:
    """Whether each endpoint in use can serve, and the cluster commits (exit 0 only if all).

    An endpoint is healthy when it answers, knows a leader, has a quorum and raises no alarm;
    then one linearizable read goes through the leader's log. Exit 1 when some endpoints are
    unhealthy, 2 when none is or the read fails.
    """
    settings = Settings.current()
    asked, cluster_id = targets(settings)
    with settings.client() as client:
        rows = [node_status.probe(client, t, cluster_id=cluster_id, with_digest=False)
                for t in asked]
        started = time.monotonic()
        try:
            client.get(HEALTH_KEY)
            read: dict[str, object] = {
                "ok": True, "took_ms": round((time.monotonic() - started) * 1000, 1)}
        except KVError as exc:
            read = {"ok": False, "error": str(exc)}
    checked = [{"endpoint": r["endpoint"], "id": r.get("id"), "healthy": verdict(r) is None,
                "took_ms": r.get("took_ms"), "error": verdict(r)} for r in rows]
    emit(_health_report(checked, read), settings.write_out)
    unhealthy = [c for c in checked if not c["healthy"]]
    if not read["ok"]:
        raise CliError(f"the cluster cannot commit: {read['error']}", UNAVAILABLE)
    if len(unhealthy) == len(checked):
        raise CliError("no endpoint is healthy", UNAVAILABLE)
    if unhealthy:
        verb = "is" if len(unhealthy) == 1 else "are"
        raise CliError(f"{len(unhealthy)} of {len(checked)} endpoints {verb} unhealthy", ERROR)


def _health_report(checked: list[dict[str, object]], read: dict[str, object]) -> Report:
    lines = []
    for c in checked:
        if c["healthy"]:
            lines.append(f"{c['endpoint']} is healthy: took {c['took_ms']} ms")
        else:
            lines.append(f"{c['endpoint']} is unhealthy: {c['error']}")
    if read["ok"]:
        lines.append(f"committed a read through the log: took {read['took_ms']} ms")
    else:
        lines.append(f"could not commit a read through the log: {read['error']}")
    rows = [[str(c["endpoint"]), "yes" if c["healthy"] else "no", str(c["took_ms"] or ""),
             str(c["error"] or "")] for c in checked]
    data = {"healthy": bool(read["ok"]) and all(c["healthy"] for c in checked),
            "endpoints": checked, "read": read}
    return Report(data, ["endpoint", "healthy", "took ms", "error"], rows, lines)
