"""Regenerate serve/pb/ from proto/ideogram4.proto with grpcio-tools (the `serve` extra pins it).

protoc names Python modules after the .proto's path under its include root, and the message classes carry
that module name (Ray pickles them by it). So the .proto is compiled from a temporary tree where it sits at
ideogram4_engine/serve/pb/ideogram4.proto: the classes then belong to ideogram4_engine.serve.pb.ideogram4_pb2,
an importable name. The wire format does not depend on it (the C++ client compiles proto/ideogram4.proto).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "ideogram4.proto"
PACKAGE_DIR = Path(__file__).resolve().parent / "pb"
IMPORT_PATH = Path("ideogram4_engine/serve/pb")
OUTPUTS = ("ideogram4_pb2.py", "ideogram4_pb2.pyi", "ideogram4_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Write the OUTPUTS into `out`."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / IMPORT_PATH).mkdir(parents=True)
        shutil.copyfile(PROTO, src / IMPORT_PATH / PROTO.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        rc = protoc.main(["grpc_tools.protoc", f"-I{src}", f"--python_out={gen}", f"--pyi_out={gen}",
                          f"--grpc_python_out={gen}", str(IMPORT_PATH / PROTO.name)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit code {rc})")
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copyfile(gen / IMPORT_PATH / name, out / name)
    return [out / name for name in OUTPUTS]


if __name__ == "__main__":
    for p in generate(PACKAGE_DIR if len(sys.argv) < 2 else Path(sys.argv[1])):
        print(p)
