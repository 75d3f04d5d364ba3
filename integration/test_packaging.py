"""The distributions `python -m build` makes, the sdist and the wheel: both
hold the license and pass `twine check`, and each, installed into a fresh
virtual environment with Keras and one backend only, imports and trains: the
package declares every dependency it needs, and needs no other backend.

Each backend is installed once, with one of the distributions: the wheel
with TensorFlow and with PyTorch, the sdist with JAX. pip builds the sdist
into a wheel as `python -m build` builds the wheel under test (from the
sdist): the JAX environment checks that build, the package's `[jax]`
extra, and JAX.

The backend itself is not installed again: each environment sees the
backend installed beside these tests, and what that backend depends on,
through a `.pth` file (`_reuse_backend`), and pip installs the package and
everything the package itself requires (Keras and its dependencies) into
it from the distribution's metadata. Slow (a virtual environment and a
build each); deselect with `-m "not slow"`.
"""

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The distribution and the backend of each fresh environment.
INSTALLS = [("wheel", "tensorflow"), ("sdist", "jax"), ("wheel", "torch")]
# What each environment installs besides the package: CPU builds, as in the
# README; `[jax]` and `[torch]` also exercise the package's extras. The
# last item is the backend's distribution, which the environment reuses.
REQUIREMENTS = {
    "tensorflow": ("", ["tensorflow-cpu"], "tensorflow-cpu"),
    "jax": ("[jax]", [], "jax"),
    "torch": ("[torch]", ["torch==2.13.0"], "torch"),
}
SMOKE = """
import importlib.util
import sys

import keras
import numpy as np

import keras_bn

backend = sys.argv[1]
assert keras.backend.backend() == backend, keras.backend.backend()
assert keras_bn.__file__.startswith(sys.prefix), keras_bn.__file__
others = [
    name
    for name in ("tensorflow", "jax", "torch")
    if name != backend and importlib.util.find_spec(name)
]
assert not others, f"installed besides {backend}: {others}"

rng = np.random.default_rng(0)
x = (5.0 + 2.0 * rng.normal(size=(100, 4))).astype("float32")
y = (x[:, 0] > 5.0).astype("int32")
keras.utils.set_random_seed(0)
inputs = keras.Input((4,))
hidden = keras_bn.BatchNormalization(virtual_batch_size=8)(inputs)
hidden = keras.layers.Dense(16, activation="relu")(hidden)
hidden = keras_bn.BatchNormalization()(hidden)
outputs = keras.layers.Dense(2, activation="softmax")(hidden)
model = keras.Model(inputs, outputs)
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=20, epochs=3, verbose=0)
keras_bn.recalibrate(model, x)
model.save("smoke.keras")
loaded = keras.models.load_model("smoke.keras")
np.testing.assert_allclose(loaded.predict(x), model.predict(x), atol=1e-6)
print(f"trained on {backend}, keras {keras.__version__}")
"""


def _call(command, cwd, env=None):
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
    """Builds the sdist, then the wheel from it, from a copy of the sources,
    which leaves no build files in the working tree."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(
        ROOT / "keras_bn",
        source / "keras_bn",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    dist = tmp_path_factory.mktemp("dist")
    _call([sys.executable, "-m", "build", "--outdir", dist, source], cwd=source)
    (sdist,) = dist.glob("keras_bn-*.tar.gz")
    (wheel,) = dist.glob("keras_bn-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_license_in_distributions(distributions):
    license_text = (ROOT / "LICENSE").read_bytes()
    with tarfile.open(distributions["sdist"]) as sdist:
        (top,) = {name.split("/")[0] for name in sdist.getnames()}
        assert sdist.extractfile(f"{top}/LICENSE").read() == license_text
    with zipfile.ZipFile(distributions["wheel"]) as wheel:
        (info,) = {
            name.split("/")[0]
            for name in wheel.namelist()
            if name.split("/")[0].endswith(".dist-info")
        }
        assert wheel.read(f"{info}/licenses/LICENSE") == license_text
        metadata = wheel.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0\n" in metadata
    assert "License-File: LICENSE\n" in metadata


def test_twine_check(distributions):
    output = _call(
        [
            sys.executable,
            "-m",
            "twine",
            "check",
            "--strict",
            *distributions.values(),
        ],
        cwd=ROOT,
    )
    assert output.count("PASSED") == 2, output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("distribution", "backend"),
    INSTALLS,
    ids=[f"{distribution}-{backend}" for distribution, backend in INSTALLS],
)
def test_fresh_environment(tmp_path, distributions, distribution, backend):
    environment = tmp_path / "venv"
    _call([sys.executable, "-m", "venv", environment], cwd=tmp_path)
    python = str(environment / "bin" / "python")
    extra, others, installed = REQUIREMENTS[backend]
    _reuse_backend(
        python, installed, distributions["wheel"], tmp_path / "backend"
    )
    _call(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            f"keras-bn{extra} @ {distributions[distribution].as_uri()}",
            *others,
        ],
        cwd=tmp_path,
    )
    (tmp_path / "smoke.py").write_text(SMOKE)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    # -I: neither the working directory nor PYTHON* variables on the path,
    # so `import keras_bn` can only find the installed package.
    output = _call(
        [python, "-I", "smoke.py", backend],
        cwd=tmp_path,
        env={**env, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert f"trained on {backend}" in output


def _closure(name):
    """The installed distributions `name` needs, itself included, by
    normalized name."""
    found, todo = {}, [name]
    while todo:
        requirement = todo.pop()
        key = re.sub(r"[-_.]+", "-", requirement).lower()
        if key in found:
            continue
        try:
            distribution = importlib.metadata.distribution(requirement)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[key] = distribution
        for line in distribution.requires or []:
            parsed = Requirement(line)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                todo.append(parsed.name)
    return found


def _requirements(wheel):
    """The names of the distributions the wheel requires without extras."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [
            name
            for name in archive.namelist()
            if name.endswith(".dist-info/METADATA")
        ]
        lines = archive.read(metadata).decode().splitlines()
    requirements = [
        Requirement(line.split(":", 1)[1])
        for line in lines
        if line.startswith("Requires-Dist:")
    ]
    return [
        requirement.name
        for requirement in requirements
        if requirement.marker is None
        or requirement.marker.evaluate({"extra": ""})
    ]


def _reuse_backend(python, backend, wheel, directory):
    """Makes the environment of `python` see the installed distribution
    `backend` and its dependencies, but for those the `wheel` requires:
    links to their files in `directory`, on the environment's path through
    a `.pth` file. pip counts them as installed and, as they lie outside the
    environment, never uninstalls them."""
    own = {}
    for requirement in _requirements(wheel):
        own.update(_closure(requirement))
    directory.mkdir()
    for key, distribution in _closure(backend).items():
        if key in own:
            continue
        site = pathlib.Path(distribution.locate_file(""))
        for path in distribution.files or []:
            top = path.parts[0]
            link = directory / top
            if top in ("..", "__pycache__") or link.exists():
                continue
            link.symlink_to(site / top)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = _call([python, "-c", purelib], cwd=directory).strip()
    (pathlib.Path(site_packages) / "reused_backend.pth").write_text(
        f"{directory}\n"
    )
