"""The help paths, `gkd inspect` and `gkd data check` must not import torch: they stay instant."""
from __future__ import annotations

import json
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


def test_inspect_imports_no_torch(tmp_path):
    from torch import nn

    from gkd.handoff import save_handoff

    path = save_handoff(tmp_path / "enc.safetensors", nn.Linear(2, 3), {"name": "linear"}, stage=1,
                        extra={"input_norm": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=["inspect", str(path)])], capture_output=True,
                         text=True, check=True)
    *printed, heavy = out.stdout.strip().splitlines()
    assert heavy == "none", out.stdout + out.stderr
    meta = json.loads("\n".join(printed))
    assert meta["gkd_spec"] == {"name": "linear"} and meta["gkd_stage"] == 1
    assert meta["gkd_input_norm"] == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_data_check_imports_no_torch(folder_dataset):
    root, manifest, _ = folder_dataset
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=["data", "check", str(manifest), "--root", str(root)])],
                         capture_output=True, text=True, check=True)
    *printed, heavy = out.stdout.strip().splitlines()
    assert heavy == "none", out.stdout + out.stderr
    report = "\n".join(printed)
    assert "split train: 24 images, 24 labels, 24 paired" in report, report  # the fixture's counts
    assert "split val: 6 images" in report and "RESULT: OK" in report, report
