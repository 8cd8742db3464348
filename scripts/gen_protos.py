"""Generates the Python stubs in service/proto/ from protos/ (committed; tests/service/test_protos.py checks
that the committed stubs are exactly what this script produces from the current protos).

    python scripts/gen_protos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
FILES = ["aim/v1/aim_service.proto", "inference/grpc_service.proto"]


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *FILES]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    written = []
    for path in sorted(out.rglob("*.py*")):
        # protoc writes absolute imports ("from aim.v1 import x_pb2"); make them package-relative so the stubs
        # live inside service.proto without a top-level `aim` package (the name of another project).
        text = re.sub(r"^from (aim\.v1|inference) import (\w+_pb2)", r"from . import \2", path.read_text(),
                      flags=re.M)
        path.write_text(text)
        written.append(path)
    for pkg in {p.parent for p in written} | {out}:
        (pkg / "__init__.py").touch()
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "service" / "proto"))
    for p in generate(Path(parser.parse_args().out)):
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
