"""The global options, accepted before the subcommand and after it, as etcdctl allows.

``kv -w json get k`` and ``kv get k -w json`` mean the same. The root group declares each option
with its environment variable and default; every subcommand declares it again *without* them,
and overrides the root's value only when the option is on its own command line. (Declaring the
env var twice would let ``KV_WRITE_OUT`` on the subcommand beat ``-w`` typed before it.)

Endpoints come from ``--endpoints``, else ``KV_ENDPOINTS``, else the API addresses of the local
cluster in ``--dir`` (``KV_CLUSTER_DIR``, else ``./kv-cluster``), so after ``kv cluster up``
every command finds the cluster without configuration; its certificates too (``cli.certs``
says which files a command uses).
"""

from __future__ import annotations

from collections.abc import Callable
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import click
from click.core import ParameterSource

from cli import certs, params
from cli.cluster_dir import ClusterDir, ClusterSpec
from cli.exits import UNAVAILABLE, CliError
from cli.output import FORMATS

if TYPE_CHECKING:
    from kvstore.client import Client
    from kvstore.tls import ClientTLS

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Settings:
    endpoints: list[str] = field(default_factory=list)
    """Explicit endpoints (``--endpoints`` or ``KV_ENDPOINTS``); empty: the cluster dir's."""
    write_out: str = "simple"
    timeout: float = 5.0
    dial_timeout: float = 2.0
    dir: Path = Path("kv-cluster")
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    debug: bool = False
    chosen: set[str] = field(default_factory=set)
    """The settings the user chose (on a command line or in the environment), by field name;
    the others hold their defaults."""

    @staticmethod
    def current() -> Settings:
        return click.get_current_context().ensure_object(Settings)

    def output_format(self, *, terminal: str = "simple") -> str:
        """The ``-w`` format; when none was chosen, ``terminal`` if stdout is a terminal (a
        status table reads better than comma-separated fields), else ``simple``."""
        if "write_out" in self.chosen or not sys.stdout.isatty():
            return self.write_out
        return terminal

    @property
    def cluster(self) -> ClusterDir:
        return ClusterDir(self.dir)

    def target(self) -> tuple[list[str], int | None]:
        """The endpoints to use and, when they come from the cluster dir, its cluster id.

        Passing the known cluster id to the client makes it refuse a node of another cluster
        that happens to listen on a recorded port.
        """
        spec = self._local_spec()
        return (self.endpoints, None) if spec is None else (spec.endpoints, spec.cluster_id)

    def client_tls(self, spec: ClusterSpec | None = None) -> ClientTLS | None:
        """The client files for the local cluster ``spec``, else for the endpoints in use."""
        if spec is None:
            spec = self._local_owner(self.endpoints) if self.endpoints else self._local_spec()
        local = self.cluster.certs if spec is not None and spec.tls else None
        return certs.client_tls(self.cacert, self.cert, self.key, local)

    def _local_owner(self, endpoints: list[str]) -> ClusterSpec | None:
        """The local cluster, if every one of ``endpoints`` is a node of it (then its files
        serve, though ``--endpoints`` named the nodes)."""
        if not self.cluster.exists():
            return None
        try:
            spec = self.cluster.load()
        except CliError:
            return None  # not ours to judge here: the endpoints were given
        return spec if set(endpoints) <= set(spec.endpoints) else None

    def _local_spec(self) -> ClusterSpec | None:
        """The local cluster, when the endpoints come from it (no ``--endpoints``)."""
        if self.endpoints:
            return None
        cluster = self.cluster
        if not cluster.exists():
            raise CliError(
                f"no endpoints: pass --endpoints, set KV_ENDPOINTS, or start a cluster with "
                f"'kv cluster up' (no cluster in {cluster.path})",
                UNAVAILABLE,
            )
        return cluster.load()

    def client(self, spec: ClusterSpec | None = None) -> Client:
        """A client with the command's timeouts, for the endpoints in use or for ``spec``'s nodes
        (the cluster commands always mean the local cluster, whatever ``--endpoints`` says)."""
        from kvstore.client import Client  # grpc is slow to import; `kv --help` does not need it

        if spec is None:
            spec = self._local_spec()
        if spec is None:
            endpoints, cluster_id = self.endpoints, None
        else:
            endpoints, cluster_id = spec.endpoints, spec.cluster_id
        return Client(endpoints, timeout=self.timeout, dial_timeout=self.dial_timeout,
                      cluster_id=cluster_id, tls=self.client_tls(spec))


class _GlobalOption(NamedTuple):
    names: tuple[str, ...]
    attr: str
    """The ``Settings`` field it sets (its default is the option's default)."""
    envvar: str
    click_settings: dict[str, Any]


_OPTIONS = [
    _GlobalOption(("--endpoints",), "endpoints", "KV_ENDPOINTS", {
        "metavar": "HOST:PORT,...", "help": "Comma-separated API endpoints [env KV_ENDPOINTS]."}),
    _GlobalOption(("-w", "--write-out"), "write_out", "KV_WRITE_OUT", {
        "type": click.Choice(FORMATS),
        "help": "Output format [env KV_WRITE_OUT; default simple]."}),
    _GlobalOption(("--timeout", "--command-timeout"), "timeout", "KV_COMMAND_TIMEOUT", {
        "type": params.Duration(), "metavar": "DURATION",
        "help": "Time limit of the whole command: 5s, 500ms, 1m [env KV_COMMAND_TIMEOUT; "
                "default 5s]."}),
    _GlobalOption(("--dial-timeout",), "dial_timeout", "KV_DIAL_TIMEOUT", {
        "type": params.Duration(), "metavar": "DURATION",
        "help": "Time limit to connect to an endpoint [env KV_DIAL_TIMEOUT; default 2s]."}),
    _GlobalOption(("--dir",), "dir", "KV_CLUSTER_DIR", {
        "type": click.Path(file_okay=False, path_type=Path),
        "help": "Local cluster directory [env KV_CLUSTER_DIR; default ./kv-cluster]."}),
    _GlobalOption(("--cacert",), "cacert", "KV_CACERT", {
        "type": click.Path(dir_okay=False, path_type=Path), "metavar": "FILE",
        "help": "CA bundle that signed the nodes' certificates [env KV_CACERT; default: the "
                "local cluster's]."}),
    _GlobalOption(("--cert",), "cert", "KV_CERT", {
        "type": click.Path(dir_okay=False, path_type=Path), "metavar": "FILE",
        "help": "Client certificate [env KV_CERT; default: the local cluster's readwrite one]."}),
    _GlobalOption(("--key",), "key", "KV_KEY", {
        "type": click.Path(dir_okay=False, path_type=Path), "metavar": "FILE",
        "help": "The client certificate's private key [env KV_KEY]."}),
    _GlobalOption(("--debug",), "debug", "KV_DEBUG", {
        "is_flag": True, "help": "Show tracebacks of internal errors [env KV_DEBUG=1]."}),
]


GLOBAL_PARAM_NAMES = frozenset(option.attr + "_" for option in _OPTIONS)
"""The click parameter names of the global options (each subcommand declares them again)."""


def global_help_records(ctx: click.Context) -> list[tuple[str, str]]:
    """The global options' lines for a subcommand's ``--help``."""
    records = []
    for option in _OPTIONS:
        shown = click.Option(option.names, **option.click_settings)
        record = shown.get_help_record(ctx)
        if record is not None:
            records.append(record)
    return records


def _store(attr: str, only_if_given: bool) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        source = ctx.get_parameter_source(param.name or "")
        given = source == ParameterSource.COMMANDLINE
        if only_if_given and not given:
            return
        if attr == "endpoints":
            try:
                value = params.endpoints(value)
            except click.BadParameter as exc:
                if source == ParameterSource.ENVIRONMENT:
                    raise click.BadParameter(f"{exc.message} (in KV_ENDPOINTS)") from None
                raise
        settings = ctx.ensure_object(Settings)
        setattr(settings, attr, value)
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            settings.chosen.add(attr)
    return callback


def _decorate(f: F, *, root: bool) -> F:
    defaults = Settings()
    for option in reversed(_OPTIONS):
        extra = dict(option.click_settings)
        if root:
            # Endpoints are a list in Settings but a comma-separated string here; none by default.
            default = None if option.attr == "endpoints" else getattr(defaults, option.attr)
            extra.update(envvar=option.envvar, default=default)
        else:
            extra["hidden"] = True  # documented once, on `kv --help`
            if not extra.get("is_flag"):
                extra["default"] = None
        f = click.option(*option.names, option.attr + "_", expose_value=False,
                         callback=_store(option.attr, only_if_given=not root), **extra)(f)
    return f


def root_options(f: F) -> F:
    """The global options on the root group: env vars and defaults apply here."""
    return _decorate(f, root=True)


def global_options(f: F) -> F:
    """The same options on a subcommand: they override the root's when given."""
    return _decorate(f, root=False)
