"""The ``kv`` program's entry point: gRPC's log level first, then ``cli.main``.

gRPC's C core reads ``GRPC_VERBOSITY`` once, when grpc is imported, and by default logs a failed
TLS handshake at INFO on stderr. A command's stderr is one error line, so a command imports grpc
with ``ERROR`` (unless the user set a level), then removes the variable again so that the nodes
it starts keep gRPC's default: in a node's log those lines say why it refused a client. This
module imports nothing that loads grpc before that.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def main() -> NoReturn:
    argv = sys.argv[1:]
    is_node = "node" in argv and "run" in argv
    if not is_node and "GRPC_VERBOSITY" not in os.environ:
        os.environ["GRPC_VERBOSITY"] = "ERROR"
        import grpc  # noqa: F401  (reads the level now, once)

        del os.environ["GRPC_VERBOSITY"]
    from cli.main import main as run

    run()
