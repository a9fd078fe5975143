"""The serving path (server and client) never imports torch or transformers."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast


def test_server_and_client_import_neither_torch_nor_transformers():
    code = (
        "import sys, condgen.server.app, condgen.client, condgen.client.frames, condgen.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'optimum', 'sklearn') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
