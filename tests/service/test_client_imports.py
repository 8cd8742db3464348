"""The client a backend installs speaks gRPC only: importing it must not load the engine stack."""

import subprocess
import sys


def test_importing_the_client_loads_neither_torch_nor_transformers():
    code = ("import sys, service.client; "
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
