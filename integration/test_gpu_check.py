"""`tests/gpu_check.py` on a machine without an NVIDIA GPU: it says so and
exits 0 without running anything."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_and_exits(tmp_path):
    # An `nvidia-smi` that finds no GPU, as on a machine with the driver's
    # tools but no device.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 9\n")
    fake.chmod(0o755)
    output = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, ROOT / "tests" / "gpu_check.py", "--output", output],
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "No NVIDIA GPU here" in result.stdout
    assert not output.exists()
