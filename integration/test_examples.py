"""Every example runs end to end on every backend, with tiny settings, on
scikit-learn's digits as a user would run it (the four of a backend one
after another in one process, `examples_worker.py`, which imports Keras
once for them); and each example on `mnist`
through `tfds.testing.mock_data` (`tfds_worker.py`), on every backend
among them. Its metrics must be there and
finite, its pictures valid PNG files. Without the data, a tensorflow-datasets
example says how to provide it, without a traceback.
"""

import functools
import importlib.util
import json
import math
import pathlib
import struct
import zlib

import backend_process
import pytest

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "integration" / "tfds_worker.py"
EXAMPLES_WORKER = ROOT / "integration" / "examples_worker.py"
EXAMPLES = ROOT / "examples"
TINY = ["--epochs", "1", "--limit", "48", "--batch-size", "16"]
# Example: (extra arguments, the pictures it writes, the number of models
# it reports).
SCRIPTS = {
    "compare": ([], ["curves.png"], 4),
    "large_batch_ghost_bn": (
        ["--repeats", "1", "--large-batch-size", "48", "--width", "4"],
        ["curves.png"],
        3,
    ),
    "tabular_ghost_bn": (["--repeats", "1"], ["curves.png"], 2),
    "recalibrate": (
        ["--epochs", "2", "--checkpoints", "2", "--units", "16"],
        ["accuracy.png"],
        4,
    ),
}
MISSING = [
    module
    for module in ("sklearn", "matplotlib", "tensorflow_datasets")
    if importlib.util.find_spec(module) is None
]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the examples need {MISSING}: pip install -e '.[examples]'",
)


def _run(backend, command, env=None):
    return backend_process.run(backend, *command, env=env, timeout=600)


def _check_png(path):
    """A PNG whose chunks all have valid checksums and whose image data
    decompresses to the size its header announces."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    position, chunks, pixels = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(
            ">I", data[position + 8 + length : position + 12 + length]
        )
        assert zlib.crc32(kind + body) == crc, f"{path}: bad {kind} chunk"
        chunks.append(kind)
        if kind == b"IDAT":
            pixels += body
        position += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND", chunks
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    assert width > 100 and height > 100 and depth == 8
    assert len(zlib.decompress(pixels)) == height * (1 + width * channels)


def _reported_models(value):
    """Every dict in the metrics that holds a model's test results."""
    if isinstance(value, dict):
        found = [value] if "test_accuracy" in value else []
        for item in value.values():
            found += _reported_models(item)
        return found
    if isinstance(value, list):
        return [model for item in value for model in _reported_models(item)]
    return []


def _check_outputs(directory, backend, pictures, models):
    def refuse(constant):
        raise AssertionError(f"metrics.json holds {constant}")

    metrics = json.loads(
        (directory / "metrics.json").read_text(), parse_constant=refuse
    )
    assert metrics["backend"] == backend
    # The models themselves, not the repeats nested in an average.
    reported = [
        model
        for model in _reported_models(metrics["results"])
        if "name" in model
    ]
    assert len(reported) == models, reported
    for model in reported:
        assert 0.0 <= model["test_accuracy"] <= 1.0
        assert math.isfinite(model["test_loss"])
        for values in model.get("history", {}).values():
            assert values and all(math.isfinite(v) for v in values)
    for picture in pictures:
        _check_png(directory / picture)


# Every example on every backend on digits, as a user first runs them. The
# tensorflow-datasets path (one loader in examples/common.py, then the
# example's own model) runs every example once and every backend at least
# once; PyTorch where its convolutions' backward pass meets TensorFlow's
# runtime in one process (tfds_worker.py).
TFDS_BACKENDS = {
    "compare": "jax",
    "large_batch_ghost_bn": "torch",
    "tabular_ghost_bn": "tensorflow",
    "recalibrate": "torch",
}
RUNS = [
    (example, backend, "digits") for example in SCRIPTS for backend in BACKENDS
] + [(example, backend, "mnist") for example, backend in TFDS_BACKENDS.items()]


@pytest.fixture(scope="module", name="digits")
def digits_fixture(tmp_path_factory):
    """`digits(backend)`: runs every example on digits on `backend`, in one
    process, once; returns each example's output folder, exit code and
    standard output, by example."""

    @functools.cache
    def digits(backend):
        directory = tmp_path_factory.mktemp(f"digits-{backend}")
        runs = [
            [
                example,
                [str(EXAMPLES / f"{example}.py"), *TINY, *extra]
                + ["--output-dir", str(directory / example)],
            ]
            for example, (extra, _, _) in SCRIPTS.items()
        ]
        result = _run(backend, [str(EXAMPLES_WORKER), json.dumps(runs)])
        assert result.returncode == 0, result.stderr[-4000:]
        found = {}
        for section in result.stdout.split("=== start ")[1:]:
            example, output = section.split("\n", 1)
            last = output.rstrip().rsplit("\n", 1)[-1].split()
            assert last[:3] == ["===", "exit", example], output[-2000:]
            found[example] = (directory / example, int(last[3]), output)
        assert list(found) == list(SCRIPTS), result.stdout[-2000:]
        return found, result.stderr

    return digits


@pytest.mark.parametrize(
    "example,backend,dataset", RUNS, ids=["-".join(run) for run in RUNS]
)
def test_example(tmp_path, digits, example, backend, dataset):
    extra, pictures, models = SCRIPTS[example]
    if dataset == "digits":
        found, stderr = digits(backend)
        directory, code, stdout = found[example]
        # The process's error output, from this example's start on.
        stderr = stderr.split(f"=== start {example}\n", 1)[-1]
    else:
        directory = tmp_path
        arguments = [*TINY, *extra, "--output-dir", str(tmp_path)]
        command = [str(WORKER), "mock", str(EXAMPLES / f"{example}.py")]
        command += ["--dataset", dataset, *arguments]
        result = _run(backend, command)
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert code == 0, stderr[-4000:]
    assert "| --- |" in stdout, stdout[-2000:]
    _check_outputs(directory, backend, pictures, models)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quickstart(backend):
    """The quickstart runs with every warning an error but one that any
    model's `save` raises under NumPy 2: Keras's variables (and TensorFlow's,
    on TensorFlow) convert to arrays through an `__array__` without the
    `copy` argument, which NumPy deprecates (Keras 3.15.1)."""
    warnings = [
        "-W",
        "error",
        "-W",
        "ignore:__array__ implementation doesn't accept a copy keyword"
        ":DeprecationWarning",
    ]
    result = _run(
        backend, [*warnings, "examples/quickstart.py", "--epochs", "1"]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"backend: {backend}" in result.stdout


def test_no_data_without_network(tmp_path):
    closed = "http://127.0.0.1:9"
    result = _run(
        "jax",
        [
            str(WORKER),
            "offline",
            "examples/compare.py",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path / "empty"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        env={
            "HTTPS_PROXY": closed,
            "HTTP_PROXY": closed,
            "https_proxy": closed,
            "http_proxy": closed,
            "NO_PROXY": "",
            "no_proxy": "",
        },
    )
    assert result.returncode != 0
    assert "--data-dir" in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert not (tmp_path / "out").exists()


def test_unknown_dataset():
    result = _run(
        "jax",
        ["examples/compare.py", "--dataset", "no_such_dataset"],
    )
    assert result.returncode != 0
    assert "no_such_dataset" in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_process(tmp_path, backend):
    """Two processes on 127.0.0.1 train one model: the launcher waits for
    both, and every weight, moving statistics included, is the same in
    both."""
    result = _run(
        backend,
        [
            "examples/multi_process.py",
            "--epochs",
            "1",
            "--limit",
            "256",
            "--batch-size",
            "32",
            "--output-dir",
            tmp_path,
            "--timeout",
            "300",
        ],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "largest difference between the processes' weights: 0\n" in (
        result.stdout + "\n"
    ), result.stdout[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["backend"] == backend
    assert metrics["processes"] == 2
    assert metrics["largest_weight_difference"] == 0.0
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert math.isfinite(metrics["test_loss"])
    assert metrics["seconds_per_step"] > 0.0
    saved = sorted(path.name for path in tmp_path.glob("weights_*.npz"))
    assert saved == ["weights_0.npz", "weights_1.npz"]


def test_study_quick(tmp_path):
    """`study.py --quick` runs every experiment (on JAX, the fastest here):
    its tables, its plots, and metrics with every run of every setting,
    every number finite and every accuracy in [0, 1]."""

    def refuse(constant):
        raise AssertionError(f"metrics.json holds {constant}")

    result = _run(
        "jax", ["examples/study.py", "--quick", "--output-dir", tmp_path]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| --- |" in result.stdout, result.stdout[-2000:]
    for picture in ("batch_size", "learning_rate", "gradients", "depth"):
        _check_png(tmp_path / f"{picture}.png")
    metrics = json.loads(
        (tmp_path / "metrics.json").read_text(), parse_constant=refuse
    )
    assert metrics["backend"] == "jax"
    arguments = metrics["arguments"]
    seeds = arguments["repeats"]
    results = metrics["results"]
    assert sorted(results) == [
        "batch_size",
        "depth",
        "gradients",
        "learning_rate",
        "statistics",
    ]

    def check_runs(runs):
        assert len(runs) == seeds, runs
        for run in runs:
            assert 0.0 <= run["test_accuracy"] <= 1.0, run
            for key in ("training_mode_accuracy", "gap"):
                if run.get(key) is not None:
                    assert -1.0 <= run[key] <= 1.0, run
            loss = run["final_training_loss"]
            assert loss is None or loss >= 0.0, run

    batch_sizes = [str(size) for size in arguments["batch_sizes"]]
    names = list(results["batch_size"])
    assert len(names) == 9 and "none" in names, names
    for name in names:
        assert list(results["batch_size"][name]) == batch_sizes, name
        for runs in results["batch_size"][name].values():
            check_runs(runs)
    # Batch norm has two modes; normalizations without batch statistics one.
    for name in ("keras_bn", "keras BatchNormalization"):
        for runs in results["batch_size"][name].values():
            assert all(run["gap"] is not None for run in runs)
    for runs in results["batch_size"]["none"].values():
        assert all(run["gap"] is None for run in runs)

    rates = [str(rate) for rate in arguments["learning_rates"]]
    sweep = results["learning_rate"]
    assert sorted(sweep["runs"]) == ["keras_bn", "none"]
    assert sorted(sweep["largest_rate_that_trains"]) == ["keras_bn", "none"]
    for by_rate in sweep["runs"].values():
        assert list(by_rate) == rates
        for runs in by_rate.values():
            check_runs(runs)
            for run in runs:
                assert run["diverged"] == (run["final_training_loss"] is None)

    layers = arguments["gradient_depth"] + 1
    assert sorted(results["gradients"]) == ["keras_bn", "none"]
    for runs in results["gradients"].values():
        check_runs(runs)
        for run in runs:
            for key in ("initial", "trained"):
                assert len(run[key]) == layers, run
                assert all(0.0 <= norm < math.inf for norm in run[key])

    depths = [str(depth) for depth in arguments["depths"]]
    for by_depth in results["depth"].values():
        assert list(by_depth) == depths
        for runs in by_depth.values():
            check_runs(runs)

    # Batch norm learns gamma and beta; its statistics are not trained.
    for row in results["statistics"]:
        assert row["trainable"] == "gamma, beta", row
        assert row["non_trainable"] == "moving_mean, moving_variance", row
        assert row["median_moving_std_over_data_std"] > 0.0, row
