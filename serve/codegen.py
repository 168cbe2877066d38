"""Regenerate serve/pb/ from proto/ideogram4.proto with grpcio-tools (the `serve` extra pins it).

The generated *_pb2_grpc.py imports its *_pb2 module by bare name; it is rewritten to a relative import so
that the package works wherever it is installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "ideogram4.proto"
PACKAGE_DIR = Path(__file__).resolve().parent / "pb"


def generate(out: Path) -> list[Path]:
    """Write ideogram4_pb2.py, ideogram4_pb2.pyi and ideogram4_pb2_grpc.py into `out`."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", str(PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit code {rc})")
    grpc_file = out / "ideogram4_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("\nimport ideogram4_pb2 as", "\nfrom . import ideogram4_pb2 as"))
    return sorted(out.glob("ideogram4_pb2*"))


if __name__ == "__main__":
    for p in generate(PACKAGE_DIR if len(sys.argv) < 2 else Path(sys.argv[1])):
        print(p)
