"""A model with keras_bn layers saved on one backend loads on the others and
predicts the same, as `.keras` and as `.weights.h5`."""

import os
import pathlib
import subprocess
import sys

import pytest

BACKENDS = ("tensorflow", "jax", "torch")
WORKER = pathlib.Path(__file__).with_name("saving_worker.py")
ROOT = WORKER.parents[1]


def _run(backend, *args):
    result = subprocess.run(
        [sys.executable, str(WORKER), *args],
        env={**os.environ, "KERAS_BACKEND": backend},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    for backend in BACKENDS:
        _run(backend, "save", str(directory))
    return directory


@pytest.mark.parametrize(
    "source,target",
    [(s, t) for s in BACKENDS for t in BACKENDS if s != t],
    ids=lambda backend: backend,
)
def test_load_on_another_backend(saved, source, target):
    output = _run(target, "load", str(saved), source)
    assert f"loaded {source} on {target}" in output
