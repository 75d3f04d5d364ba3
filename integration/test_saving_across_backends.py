"""A model with keras_bn layers saved on one backend loads on the others and
predicts the same, as `.keras` and as `.weights.h5`."""

import pathlib

import backend_process
import pytest

BACKENDS = ("tensorflow", "jax", "torch")
WORKER = pathlib.Path(__file__).with_name("saving_worker.py")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """What each backend printed and wrote loading the models the other two
    saved, in one process per backend."""
    directory = tmp_path_factory.mktemp("saved")
    for backend in BACKENDS:
        result = backend_process.run(
            backend, WORKER, "save", str(directory), timeout=600
        )
        assert result.returncode == 0, result.stderr[-4000:]
    return {
        target: backend_process.run(
            target,
            WORKER,
            "load",
            str(directory),
            *[source for source in BACKENDS if source != target],
            timeout=600,
        )
        for target in BACKENDS
    }


@pytest.mark.parametrize(
    "source,target",
    [(s, t) for s in BACKENDS for t in BACKENDS if s != t],
    ids=lambda backend: backend,
)
def test_load_on_another_backend(loaded, source, target):
    stdout, stderr = loaded[target].stdout, loaded[target].stderr
    assert f"loaded {source} on {target}" in stdout, stderr[-4000:]
