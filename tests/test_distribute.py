"""Synchronized statistics across replicas (TensorFlow's tf.distribute).

TensorFlow fixes its devices when it starts, so the two-replica run happens in
a fresh process.
"""

import pathlib
import subprocess
import sys
import textwrap

import keras
import pytest

TWO_REPLICAS = textwrap.dedent(
    """
    import os

    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    import numpy as np

    import keras_bn
    from tests import reference

    rng = np.random.default_rng(0)
    # Shards of different scale: per-replica statistics would differ.
    x = np.concatenate(
        [rng.normal(0, 1, (4, 3)), rng.normal(5, 3, (4, 3))]
    ).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    with strategy.scope():
        ours = keras_bn.BatchNormalization(synchronized=True, momentum=0.0)
        theirs = keras.layers.BatchNormalization(
            synchronized=True, momentum=0.0
        )
        ours.build((None, 3))
        theirs.build((None, 3))
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(8)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))

    @tf.function
    def step(batch):
        def replica_step(inputs):
            return ours(inputs, training=True), theirs(inputs, training=True)

        return strategy.run(replica_step, args=(batch,))

    mine, keras_outputs = step(batch)
    mine = np.concatenate(
        [t.numpy() for t in strategy.experimental_local_results(mine)]
    )
    keras_outputs = np.concatenate(
        [t.numpy() for t in strategy.experimental_local_results(keras_outputs)]
    )
    expected = reference.batch_norm(x)
    np.testing.assert_allclose(mine, expected["outputs"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mine, keras_outputs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), expected["variance"], rtol=1e-5
    )
    np.testing.assert_allclose(
        ours.moving_mean.numpy(), expected["mean"], rtol=1e-5, atol=1e-6
    )

    # Ghost batches stay within a replica (here: one ghost batch each); the
    # moving statistics average every replica's ghost batches.
    with strategy.scope():
        ghost = keras_bn.BatchNormalization(
            synchronized=True, momentum=0.0, virtual_batch_size=4
        )
        ghost.build((None, 3))

    @tf.function
    def ghost_step(batch):
        return strategy.run(
            lambda inputs: ghost(inputs, training=True), args=(batch,)
        )

    outputs = np.concatenate(
        [
            t.numpy()
            for t in strategy.experimental_local_results(ghost_step(batch))
        ]
    )
    expected = reference.batch_norm(x, virtual_batch_size=4)
    np.testing.assert_allclose(
        outputs, expected["outputs"], rtol=1e-5, atol=1e-5
    )
    for name in ("moving_mean", "moving_variance"):
        for copy in strategy.experimental_local_results(getattr(ghost, name)):
            np.testing.assert_allclose(
                copy.numpy(), expected[name.split("_")[1]], rtol=1e-5, atol=1e-6
            )
    print("synchronized statistics match")
    """
)


def test_synchronized_under_mirrored_strategy():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute runs on TensorFlow")
    result = subprocess.run(
        [sys.executable, "-c", TWO_REPLICAS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "synchronized statistics match" in result.stdout
