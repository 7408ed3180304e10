"""Retrying safely with the client library: the loop every exactly-once client runs.

Run from the repository root (``make venv`` sets up .venv the first time; the cluster goes in
./kv-cluster, or set KV_ENDPOINTS to use another):
``make venv && .venv/bin/kv cluster up --detach && .venv/bin/python examples/retry_safely.py; .venv/bin/kv cluster down``
The client certificate comes from KV_CACERT, KV_CERT and KV_KEY, else the cluster's ``tls/``.

The rule: after an answer, call ``proposal_completed()``; after an unknown outcome, propose the
*same* session again. The cluster applies the proposal once and answers every copy alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvstore import errors, ops
from kvstore.client import Client
from kvstore.proto.log_pb2 import Command, Result
from kvstore.tls import ClientTLS
from session import Session

CLUSTER_DIR = Path(os.environ.get("KV_CLUSTER_DIR", "kv-cluster"))


def endpoints() -> list[str]:
    if os.environ.get("KV_ENDPOINTS"):
        return os.environ["KV_ENDPOINTS"].split(",")
    spec = json.loads((CLUSTER_DIR / "cluster.json").read_text())
    return [node["api"] for node in spec["nodes"]]


def tls() -> ClientTLS | None:
    """The CA, certificate and key (``None``: a cluster made with ``--no-tls``)."""
    if os.environ.get("KV_CERT"):
        return ClientTLS.load(*(Path(os.environ[v]) for v in ("KV_CACERT", "KV_CERT", "KV_KEY")))
    files = CLUSTER_DIR / "tls"
    if not (files / "ca.pem").exists():
        return None
    return ClientTLS.load(files / "ca.pem", files / "client-readwrite.pem",
                          files / "client-readwrite-key.pem")


def propose_exactly_once(client: Client, session: Session, command: Command, attempts: int = 10) -> Result:
    """Proposes until an answer arrives; every attempt carries the same series id."""
    for attempt in range(1, attempts + 1):
        try:
            result = client.sync_propose(session, command, timeout=2.0)
        except errors.OutcomeUnknown:
            print(f"  attempt {attempt}: outcome unknown, retrying with series {session.series_id}")
            continue
        session.proposal_completed()  # only now: the answer is in hand
        return result
    raise RuntimeError("no answer; the session can still retry later with the same series id")


def main() -> None:
    with Client(endpoints(), timeout=5, tls=tls()) as client:
        session = client.sync_get_session()
        print(f"session {session.client_id}")
        for _ in range(3):
            result = propose_exactly_once(client, session, ops.incr(b"examples/orders"))
            print(f"  orders = {result.number}")
        try:
            client.incr(b"examples/not-a-number-yet", 1)
            client.put(b"examples/not-a-number", b"abc")
            client.incr(b"examples/not-a-number")
        except errors.CommandFailed as failure:
            print(f"  incr on text fails the same way on every replica: {failure}")
        client.sync_close_session(session)


if __name__ == "__main__":
    main()
