"""The client a backend installs (`pip install aim-serve`, no extras) speaks gRPC only: it imports none of the
server's or the reference model's packages, and the CLI names the extra that brings a missing one."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import distribution
from pathlib import Path

from cli.main import _EXTRA_OF

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dist_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement)[0].lower()


def _top_level_modules(dist_name: str) -> set[str]:
    files = distribution(dist_name).files or []
    return {f.parts[0].removesuffix(".py") for f in files
            if f.suffix == ".py" and not f.parts[0].endswith((".dist-info", ".data")) and f.parts[0] != ".."}


def test_the_cli_knows_which_extra_brings_each_module_the_client_install_lacks():
    extras = PROJECT["optional-dependencies"]
    for extra in ("server", "reference"):
        for requirement in extras[extra]:
            name = _dist_name(requirement)
            if name == "aim-serve":
                continue
            modules = _top_level_modules(name) & set(_EXTRA_OF)
            assert modules, f"{name} (extra {extra}): none of its modules is in cli.main._EXTRA_OF"
            assert {_EXTRA_OF[m] for m in modules} == {extra}
    base = {_dist_name(r) for r in PROJECT["dependencies"]}
    assert base == {"protobuf", "grpcio", "grpcio-health-checking"}


def test_importing_the_client_and_the_cli_loads_nothing_of_the_server():
    # grpc itself imports grpc_reflection when it is installed: what `import grpc` loads is not counted
    code = ("import sys, grpc; before = set(sys.modules); import service.client, cli.main; "
            f"print(','.join(m for m in {sorted(_EXTRA_OF)!r} if m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
