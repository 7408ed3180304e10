"""``kv cert ca|node|client``: certificates for a cluster on several machines.

``kv cluster up`` makes a local cluster's certificates by itself; these commands make the same
kinds of files (``kvstore.pki``) in a directory of their own (``--pki``, default ``./kv-pki``),
to copy to the machines: each node gets ``ca.pem`` and its own pair, each client ``ca.pem`` and
its pair. The CA's key stays where it was made. No file is ever overwritten, and every private
key is written mode 0600.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.certs import CA_NAME, pair, write_issued
from cli.exits import INVALID_INPUT, CliError
from cli.kv_click import KvGroup
from cli.params import Integer
from kvstore.auth import ROLES

if TYPE_CHECKING:
    from kvstore.pki import Issued

_PKI_OPTION = click.option(
    "--pki", "pki_dir", type=click.Path(file_okay=False, path_type=Path),
    default=Path("kv-pki"), show_default=True, help="Directory of the CA and the files made.")
_DAYS_OPTION = click.option("--days", type=Integer(min=1), metavar="N",
                            help="Days the certificate is valid [default: 3650 for a CA, "
                                 "365 otherwise].")


@click.group(cls=KvGroup)
def cert() -> None:
    """Make a CA, node certificates and client certificates (for kv node run on several
    machines; kv cluster up makes its own)."""


@cert.command()
@_PKI_OPTION
@click.option("--name", default="kvstore CA", show_default=True, help="The CA's common name.")
@_DAYS_OPTION
def ca(pki_dir: Path, name: str, days: int | None) -> None:
    """A new CA: PKI/ca.pem (give it to every node and client) and PKI/ca-key.pem."""
    from kvstore import pki

    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    issued = pki.new_ca(name, days=days or pki.CA_DAYS)
    _write(issued, pki_dir, CA_NAME)


@cert.command()
@_PKI_OPTION
@click.option("--name", required=True, help="The node's id (kv node run --id), e.g. n1.")
@click.option("--host", "hosts", multiple=True, required=True, metavar="HOST",
              help="An IP address or DNS name clients dial the node by (repeat for each).")
@_DAYS_OPTION
def node(pki_dir: Path, name: str, hosts: tuple[str, ...], days: int | None) -> None:
    """A node's API certificate, PKI/NAME.pem and PKI/NAME-key.pem, signed by PKI's CA."""
    from kvstore import pki

    _write(pki.issue_node(_load_ca(pki_dir), name, hosts, days=days or pki.LEAF_DAYS),
           pki_dir, name)


@cert.command()
@_PKI_OPTION
@click.option("--name", required=True, help="Who the client is (the certificate's common name).")
@click.option("--role", type=click.Choice(list(ROLES)), default="readwrite", show_default=True,
              help="readwrite: everything; readonly: reads and status only.")
@_DAYS_OPTION
def client(pki_dir: Path, name: str, role: str, days: int | None) -> None:
    """A client certificate, PKI/NAME.pem and PKI/NAME-key.pem, signed by PKI's CA."""
    from kvstore import pki

    _write(pki.issue_client(_load_ca(pki_dir), name, role, days=days or pki.LEAF_DAYS),
           pki_dir, name)


def _load_ca(pki_dir: Path) -> Issued:
    from kvstore import pki

    cert_file, key_file = pair(pki_dir, CA_NAME)
    try:
        return pki.load(cert_file.read_bytes(), key_file.read_bytes())
    except FileNotFoundError as exc:
        raise CliError(f"no CA in {pki_dir} ({exc.filename} is missing): make one with "
                       f"'kv cert ca --pki {pki_dir}'", INVALID_INPUT) from exc
    except ValueError as exc:
        raise CliError(f"{cert_file}: not a CA made by kv cert ca ({exc})", INVALID_INPUT) from exc


def _write(issued: Issued, pki_dir: Path, name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise CliError(f"{name!r} cannot name a file: use letters, digits, '-' or '_'",
                       INVALID_INPUT)
    cert_file, key_file = pair(pki_dir, name)
    for path in (cert_file, key_file):
        if path.exists():
            raise CliError(f"{path} exists: certificates are never overwritten (remove it "
                           "first)", INVALID_INPUT)
    write_issued(issued, cert_file, key_file, exclusive=True)  # exclusive: a race still fails
    click.echo(f"{cert_file}\n{key_file}")
