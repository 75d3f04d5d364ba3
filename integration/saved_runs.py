"""The arrays the training workers save, run by run."""

import numpy as np


def run(arrays, name):
    """The arrays of run `name` (saved as `NAME/KEY`), by key."""
    keys = sorted(key for key in arrays if key.startswith(f"{name}/"))
    assert keys, f"no run {name}"
    return {key.split("/", 1)[1]: arrays[key] for key in keys}


def assert_same(actual, expected, tolerance=1e-5):
    """Two runs hold the same arrays, to `tolerance`."""
    assert actual.keys() == expected.keys()
    for key in actual:
        np.testing.assert_allclose(
            actual[key],
            expected[key],
            rtol=tolerance,
            atol=tolerance,
            err_msg=key,
        )
