"""Regenerates the committed protobuf and gRPC code: ``make proto`` (``python kvstore/protogen.py``).

Run as a script, not with ``-m``: importing the ``kvstore`` package needs the generated code
that this is about to write.

The generated modules are committed so that a user needs no code generator to run the project.
``tests/unit/test_generated_code.py`` regenerates into a temporary directory and fails when the
committed files differ, so a ``.proto`` edited without running this cannot land.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# (proto file relative to the repo root, whether it defines a gRPC service)
PROTO_FILES: tuple[tuple[str, bool], ...] = (
    ("session/session.proto", False),
    ("kvstore/proto/log.proto", False),
    ("kvstore/proto/api.proto", True),
)


def generated_files(proto: str, has_service: bool) -> list[str]:
    """Paths, relative to the output root, of the modules protoc writes for ``proto``."""
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py"] + ([f"{stem}_pb2_grpc.py"] if has_service else [])


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) on every proto file, writing under ``out_dir``."""
    from grpc_tools import protoc  # a test/dev dependency, imported only when generating

    written: list[Path] = []
    for proto, has_service in PROTO_FILES:
        args = ["protoc", f"-I{REPO_ROOT}", f"--python_out={out_dir}"]
        if has_service:
            args.append(f"--grpc_python_out={out_dir}")
        args.append(str(REPO_ROOT / proto))
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        written += [out_dir / name for name in generated_files(proto, has_service)]
    return written


if __name__ == "__main__":
    for path in generate(REPO_ROOT):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    sys.exit(0)
