"""Runs the layer's tests on JAX against the oldest Keras the package
declares.

`pyproject.toml` names the oldest Keras keras-bn supports (`keras>=X`);
this builds a virtual environment of its own with exactly that release,
JAX and what the tests need, and runs in it what can differ from one Keras
release to the next: the layer's tests and Keras's own test module where
that release ships it (the moments, the properties, the model tools,
callbacks and devices build on the layer and on public Keras API that the
main suite checks). `tests/run_all.py` runs it with the rest.

    python tests/oldest_keras.py              # into .venv-oldest
    python tests/oldest_keras.py -- -k ghost  # extra arguments for pytest
"""

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ["tests/test_batch_normalization.py", "tests/test_keras_suite.py"]


def oldest_keras():
    """The release in the package's `keras>=` requirement."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^dependencies = \[.*"keras>=([0-9.]+)"', text, re.M)
    if match is None:
        raise ValueError(
            "pyproject.toml declares no `keras>=` dependency. Received: "
            f"{re.findall(r'^dependencies = .*', text, re.M)}"
        )
    return match.group(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv-oldest"))
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest")
    args = parser.parse_args()
    version = oldest_keras()
    print(f"=== oldest keras: {version}, in {args.venv}", flush=True)
    # uv, where this Python has it (CI installs it), installs what pip
    # would in a fraction of the time.
    uv = shutil.which("uv", path=os.path.dirname(sys.executable))
    venv.create(args.venv, with_pip=uv is None, clear=True)
    python = str(pathlib.Path(args.venv) / "bin" / "python")
    if uv is None:
        install = [python, "-m", "pip", "install", "--quiet"]
    else:
        # Compiled to bytecode as pip does: Python cannot write it where
        # PYTHONDONTWRITEBYTECODE is set, and would compile at every import.
        install = [uv, "pip", "install", "--quiet", "--compile-bytecode"]
        install += ["--python", python]
    subprocess.check_call(
        install
        + [
            f"keras=={version}",
            "jax",
            "numpy",
            "pytest>=8",
            "hypothesis>=6.100",
            "h5py",
        ]
    )
    subprocess.check_call(install + ["--no-deps", "-e", str(ROOT)])
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    command = [
        python,
        "-m",
        "pytest",
        *TESTS,
    ]
    return subprocess.call(command + args.pytest_args, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
