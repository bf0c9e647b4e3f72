"""`gkd --help` (and every subcommand's --help) must not import torch: it stays instant."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from gkd import cli
try:
    cli.main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "timm", "accelerate") if m in sys.modules)
print(",".join(heavy) or "none")
"""


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["data", "--help"], ["compare", "--help"]])
def test_help_imports_no_torch(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "none", out.stdout + out.stderr
