"""A model with keras_bn layers saved on one backend loads on the others and
predicts the same, as `.keras` and as `.weights.h5`."""

import pathlib

import backend_process
import pytest

BACKENDS = ("tensorflow", "jax", "torch")
WORKER = pathlib.Path(__file__).with_name("saving_worker.py")


def _run(backend, *args):
    result = backend_process.run(backend, WORKER, *args, timeout=600)
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
