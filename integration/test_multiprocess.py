"""Training over several processes on 127.0.0.1, as each backend launches
it, equals training in one process (`multiprocess_worker.py`).

PyTorch: two processes with `DistributedDataParallel`; TensorFlow: two
`MultiWorkerMirroredStrategy` workers; JAX: two processes of two devices
with `jax.distributed` and `keras.distribution.DataParallel`. Every weight,
moving statistics included, and the predictions after three steps match
the single-process run that means the same (1e-5), are identical in both
processes, and the backends agree with one another (1e-4). Keras's own
layer, launched the same way, is the control.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import saved_runs

from tests import reference

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
ROOT = WORKER.parents[1]
BACKENDS = ("torch", "tensorflow", "jax")


def _free_ports(count):
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [str(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _launch(backend, out):
    """Both processes of the job, then the reference; every process is
    killed after its timeout, so that a hung collective fails the test."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    ports = _free_ports(2)
    command = [sys.executable, str(WORKER), backend, str(out)]
    processes = [
        subprocess.Popen(
            command + [str(index), *ports],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=420)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    reference = subprocess.run(
        command + ["reference"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert reference.returncode == 0, reference.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for backend in BACKENDS:
        out = tmp_path_factory.mktemp(backend)
        _launch(backend, out)
        results[backend] = {}
        for process in ("0", "1", "reference"):
            with np.load(out / f"{process}.npz") as arrays:
                results[backend][process] = dict(arrays)
    return results


CASES = [
    (backend, run)
    for backend in BACKENDS
    for run in ("synchronized", "local", "ghost2")
] + [("jax", "group2")]


@pytest.mark.parametrize("backend,run", CASES, ids=str)
def test_processes_equal_one_process(runs, backend, run):
    reference = saved_runs.run(runs[backend]["reference"], run)
    for process in ("0", "1"):
        saved_runs.assert_same(
            saved_runs.run(runs[backend][process], run), reference, 1e-5
        )


@pytest.mark.parametrize("backend,run", CASES, ids=str)
def test_the_processes_are_identical(runs, backend, run):
    first, second = (saved_runs.run(runs[backend][p], run) for p in ("0", "1"))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


@pytest.mark.parametrize("run", ["synchronized", "ghost2"])
@pytest.mark.parametrize("process", ["0", "reference"])
def test_the_backends_agree(runs, run, process):
    jax = saved_runs.run(runs["jax"][process], run)
    for backend in ("torch", "tensorflow"):
        saved_runs.assert_same(
            saved_runs.run(runs[backend][process], run), jax, 1e-4
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_layer_under_the_same_launch(runs, backend):
    """The control: Keras's own layer keeps each process's moving
    statistics on PyTorch and TensorFlow, which then differ; on JAX it
    normalizes over the global batch, like `synchronized=True`."""
    first, second = (
        saved_runs.run(runs[backend][p], "keras") for p in ("0", "1")
    )
    moving = [key for key in first if key.startswith("weights/")]
    differ = any(not np.allclose(first[k], second[k]) for k in moving)
    assert differ == (backend != "jax")
    if backend == "jax":
        saved_runs.assert_same(
            first, saved_runs.run(runs["jax"]["0"], "synchronized"), 1e-5
        )


@pytest.mark.parametrize("synchronized", [True, False])
@pytest.mark.parametrize("name", ["uneven", "empty"])
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_uneven_and_empty_shares(runs, backend, name, synchronized):
    """A process with fewer rows, or none, takes part in the same
    all-reduces: no hang, nothing NaN, statistics weighted by counts, and
    the same moving statistics in both processes."""
    first, second = (
        saved_runs.run(runs[backend][p], f"{name}_{synchronized}")
        for p in ("0", "1")
    )
    inputs = np.concatenate([first["inputs"], second["inputs"]])
    starts = np.cumsum([0, len(first["inputs"]), len(second["inputs"])])
    assert len(inputs) == 16 and (starts[1] == 16) == (name == "empty")
    shares = [
        slice(start, end)
        for start, end in zip(starts[:-1], starts[1:], strict=True)
        if end > start
    ]
    groups = [slice(0, starts[-1])] if synchronized else shares
    expected_outputs = np.empty(inputs.shape)
    counts, means, variances = [], [], []
    for group in groups:
        expected = reference.batch_norm(inputs[group])
        expected_outputs[group] = expected["outputs"]
        counts.append(expected["count"])
        means.append(expected["mean"])
        variances.append(expected["variance"])
    total = np.sum(counts, axis=0)
    for process, saved in enumerate((first, second)):
        mine = slice(starts[process], starts[process + 1])
        np.testing.assert_allclose(
            saved["outputs"], expected_outputs[mine], rtol=1e-5, atol=1e-5
        )
        for key, values, start in (
            ("moving_mean", means, 0.0),
            ("moving_variance", variances, 1.0),
        ):
            batch = np.sum(np.multiply(counts, values), axis=0) / total
            np.testing.assert_allclose(
                saved[key],
                reference.moving_average(start, batch, 0.5),
                rtol=1e-5,
                atol=1e-6,
            )
            np.testing.assert_array_equal(saved[key], first[key])
