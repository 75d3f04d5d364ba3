import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings  # noqa: E402

# The randomized tests (test_properties.py): `ci`, the default, is bounded
# and deterministic; `pytest --hypothesis-profile=thorough` explores more.
_SLOW_EXAMPLES = [HealthCheck.too_slow, HealthCheck.filter_too_much]
settings.register_profile(
    "ci",
    max_examples=75,
    derandomize=True,
    deadline=None,
    suppress_health_check=_SLOW_EXAMPLES,
)
# `quick`: a few examples per property, for the oldest-Keras run
# (tests/oldest_keras.py), which checks compatibility rather than depth.
settings.register_profile(
    "quick",
    max_examples=10,
    derandomize=True,
    deadline=None,
    suppress_health_check=_SLOW_EXAMPLES,
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=_SLOW_EXAMPLES,
)
settings.load_profile("ci")


def _full_float32_matmuls():
    """GPUs may run float32 matmuls and convolutions in TF32 (10-bit
    mantissas), which the float32 tolerances of these tests do not allow:
    turned off on every backend. Batch norm itself has no matmul; the
    models in the tests do."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


_full_float32_matmuls()


def pytest_collection_finish(session):
    """The backend, Keras and the test modules are imported by now: their
    hundreds of thousands of objects live as long as the process. Frozen,
    they are left out of every later garbage collection, so that the one
    `clear_session` runs after each test scans only what the tests made
    (0.3 to 0.9 s a test otherwise, most of the suite's time on PyTorch)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Each test starts with a clean session, seed and dtype policy."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()


def pytest_report_header(config):
    from tests.harness import KERAS_SUITE

    suite = KERAS_SUITE if KERAS_SUITE.exists() else "not in this release"
    return (
        f"Keras {keras.version()}, backend {keras.backend.backend()}; "
        f"Keras's own batch normalization tests: {suite}"
    )
