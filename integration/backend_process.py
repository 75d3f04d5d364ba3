"""Runs a Python script in a process of its own, on one Keras backend (Keras
fixes its backend at import)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(backend, *command, env=None, timeout=900):
    """`python COMMAND...` from the repository root with `KERAS_BACKEND`
    set to `backend` and `env` added; returns the finished process."""
    return subprocess.run(
        [sys.executable, *map(str, command)],
        env={
            **os.environ,
            "KERAS_BACKEND": backend,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
