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
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=_SLOW_EXAMPLES,
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Each test starts with a clean session, seed and dtype policy."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
