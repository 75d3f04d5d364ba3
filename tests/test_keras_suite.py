"""Keras's own test module for its batch normalization, run on keras_bn.

The module ships inside the installed `keras` package; it is loaded from
there at test time, unchanged, twice: once with its `layers` pointing at
`keras_bn.BatchNormalization`, once at Keras's own layer. Each of its test
cases runs on Keras's layer first, as a control: a case that fails there
fails on this install for reasons of Keras's own, and is reported as an
expected failure; every other case must pass on keras_bn. Whatever Keras
release is installed, its cases are the ones that run (the file and its
version head the pytest report).
"""

import importlib.util
import types
import unittest
import warnings

import keras
import pytest
from packaging.version import Version

import keras_bn
from tests.harness import KERAS_SUITE

if not KERAS_SUITE.exists():
    if Version(keras.version()) >= Version("3.15.1"):
        raise FileNotFoundError(f"Keras's own tests are gone: {KERAS_SUITE}")
    pytest.skip(
        f"Keras {keras.version()} does not ship its own tests",
        allow_module_level=True,
    )


class _Layers(types.ModuleType):
    """`keras.layers` with another `BatchNormalization`."""

    def __init__(self, batch_normalization):
        super().__init__("layers")
        self.BatchNormalization = batch_normalization

    def __getattr__(self, name):
        return getattr(keras.layers, name)


def _load(batch_normalization):
    """Keras's test module, its `layers` pointing at `batch_normalization`,
    and its test case classes."""
    name = f"keras_suite_on_{batch_normalization.__module__}".replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, KERAS_SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.layers = _Layers(batch_normalization)
    return {
        value.__name__: value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, unittest.TestCase)
        and value.__module__ == name
    }


ON_KERAS_BN = _load(keras_bn.BatchNormalization)
ON_KERAS = _load(keras.layers.BatchNormalization)
CASES = [
    (class_name, method)
    for class_name, case in ON_KERAS_BN.items()
    for method in unittest.defaultTestLoader.getTestCaseNames(case)
]


# The warnings Keras's own test configuration turns into errors: all but
# these categories.
KERAS_IGNORED_WARNINGS = (
    DeprecationWarning,
    ImportWarning,
    RuntimeWarning,
    PendingDeprecationWarning,
    FutureWarning,
    UserWarning,
)


def _run(case, method):
    """Runs one test case with unittest, under the warning filters of
    Keras's own tests; returns its failure, if any."""
    result = unittest.TestResult()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for category in KERAS_IGNORED_WARNINGS:
            warnings.simplefilter("ignore", category)
        case(method).run(result)
    problems = result.errors + result.failures
    if result.skipped:
        pytest.skip(result.skipped[0][1])
    return problems[0][1] if problems else None


def test_the_suite_is_found():
    assert len(CASES) >= 30, CASES
    assert set(ON_KERAS) == set(ON_KERAS_BN)


@pytest.mark.parametrize(
    "class_name,method", CASES, ids=[method for _, method in CASES]
)
def test_keras_suite(class_name, method):
    control = _run(ON_KERAS[class_name], method)
    if control is not None:
        pytest.xfail(f"Keras's own layer fails this case too:\n{control}")
    keras.backend.clear_session()
    failure = _run(ON_KERAS_BN[class_name], method)
    if failure is not None:
        pytest.fail(f"Fails on keras_bn, passes on Keras's layer:\n{failure}")
