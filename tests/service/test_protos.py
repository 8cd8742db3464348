"""The wire contract: committed stubs are exactly what scripts/gen_protos.py makes from protos/ (so users get
working stubs from the package, and a proto change without regenerated stubs fails here), and buf's STANDARD
lint is clean."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools/node_modules/.bin/buf"


def test_committed_stubs_match_the_protos(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts/gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = tmp_path / "proto"
    generated = gen.generate(fresh)
    assert generated
    committed = ROOT / "service/proto"
    for path in generated:
        rel = path.relative_to(fresh)
        assert (committed / rel).read_text() == path.read_text(), \
            f"service/proto/{rel} is stale: run `python scripts/gen_protos.py`"
    stale = {p.relative_to(committed) for p in committed.rglob("*_pb2*.py*")} - \
        {p.relative_to(fresh) for p in generated}
    assert not stale, f"stubs without a proto: {stale}"


def test_buf_lint_standard_is_clean():
    assert BUF.exists(), "buf is installed by scripts/setup.sh (npm @bufbuild/buf)"
    proc = subprocess.run([str(BUF), "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buf_lint_would_catch_a_violation(tmp_path):
    """The lint configuration really lints aim.v1: an enum without an UNSPECIFIED zero value fails it."""
    (tmp_path / "aim/v1").mkdir(parents=True)
    (tmp_path / "buf.yaml").write_text((ROOT / "protos/buf.yaml").read_text())
    (tmp_path / "aim/v1/bad.proto").write_text(
        'syntax = "proto3";\npackage aim.v1;\nenum Color { RED = 0; }\n')
    proc = subprocess.run([str(BUF), "lint"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "_UNSPECIFIED" in proc.stdout + proc.stderr
