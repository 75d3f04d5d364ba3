"""Resuming after a crash loses nothing: a training killed in the middle of
an epoch and resumed with `keras.callbacks.BackupAndRestore` ends with the
same weights and moving statistics as one that was never interrupted, on
every backend (`resume_worker.py`)."""

import pathlib

import backend_process
import numpy as np
import pytest

BACKENDS = ("tensorflow", "jax", "torch")
WORKER = pathlib.Path(__file__).with_name("resume_worker.py")
CRASH_CODE = 17  # resume_worker.CRASH_CODE


def _run(backend, *args):
    return backend_process.run(backend, WORKER, *args, timeout=600)


def _load(path):
    with np.load(path) as arrays:
        return dict(arrays)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resumed_training_equals_uninterrupted(tmp_path, backend):
    uninterrupted = _run(
        backend,
        "uninterrupted",
        str(tmp_path / "backup_uninterrupted"),
        str(tmp_path / "uninterrupted.npz"),
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-4000:]

    backup = tmp_path / "backup"
    crash = _run(backend, "crash", str(backup))
    assert crash.returncode == CRASH_CODE, crash.stderr[-4000:]
    assert (backup / "latest.weights.h5").exists()
    resumed = _run(
        backend, "resume", str(backup), str(tmp_path / "resumed.npz")
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    expected = _load(tmp_path / "uninterrupted.npz")
    actual = _load(tmp_path / "resumed.npz")
    # The resumed run redid the crashed epoch and the last one, no more.
    assert expected["epochs_run"] == 3 and actual["epochs_run"] == 2
    assert actual["iterations"] == expected["iterations"] == 3 * 6
    assert actual.keys() == expected.keys()
    moving = [key for key in expected if "moving_" in key]
    assert len(moving) >= 6, sorted(expected)
    for key in moving:
        # The statistics moved away from their initial 0 and 1.
        assert np.max(np.abs(expected[key] - np.round(expected[key]))) > 1e-3
    for key in expected.keys() - {"epochs_run"}:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key
        )
