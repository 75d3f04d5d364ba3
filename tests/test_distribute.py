"""Statistics across replicas: TensorFlow's tf.distribute, and processes of
a torch.distributed job.

TensorFlow fixes its devices when it starts, so the two-replica run happens in
a fresh process; the torch.distributed processes are spawned by one.
"""

import pathlib
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tests import reference
from tests import torch_processes

TORCH_PROCESSES = pathlib.Path(torch_processes.__file__)

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


UNEVEN_REPLICAS = textwrap.dedent(
    """
    import os

    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 3
    )
    import numpy as np

    import keras_bn
    from tests import reference

    # Replicas of 3, 5 and 0 samples (a partial last batch), each of a
    # scale and mean of its own.
    ROWS = (3, 5, 0)
    starts = np.cumsum((0,) + ROWS)
    rng = np.random.default_rng(0)
    replica = np.repeat(np.arange(3), ROWS)[:, None, None]
    x = rng.normal(size=(8, 2, 3)) * (1 + replica) + 2.0 * replica
    x = x.astype("float32")
    upstream = rng.normal(size=x.shape).astype("float32")
    gamma = np.array([1.5, 0.5, 1.0])
    beta = np.array([0.1, -0.2, 0.3])
    # The second mask leaves the second replica no unmasked element.
    masks = {"unmasked": np.ones((8, 2), bool)}
    masks["masked"] = masks["unmasked"].copy()
    masks["masked"][3:] = False
    masks["masked"][1, 0] = False
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1", "CPU:2"])

    def shards(array):
        def shard(context):
            index = context.replica_id_in_sync_group
            return tf.constant(array[starts[index] : starts[index + 1]])

        return strategy.experimental_distribute_values_from_function(shard)

    def joined(values):
        return np.concatenate(
            [t.numpy() for t in strategy.experimental_local_results(values)]
        )

    def step(layer, mask):
        @tf.function
        def run(inputs, cotangent, mask):
            def replica_step(inputs, cotangent, mask):
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    outputs = layer(inputs, training=True, mask=mask)
                    loss = tf.reduce_sum(outputs * cotangent)
                gradients = tape.gradient(
                    loss, [inputs, layer.gamma, layer.beta]
                )
                return outputs, gradients

            return strategy.run(replica_step, args=(inputs, cotangent, mask))

        outputs, (dx, dgamma, dbeta) = run(
            shards(x), shards(upstream), shards(mask)
        )
        per_replica = strategy.experimental_local_results
        return {
            "outputs": joined(outputs),
            "x": joined(dx),
            "gamma": sum(t.numpy() for t in per_replica(dgamma)),
            "beta": sum(t.numpy() for t in per_replica(dbeta)),
        }

    for synchronized in (True, False):
        for name, mask in masks.items():
            with strategy.scope():
                layer = keras_bn.BatchNormalization(
                    synchronized=synchronized, momentum=0.5
                )
                layer.build((None, 2, 3))
                layer.gamma.assign(gamma)
                layer.beta.assign(beta)
            computed = step(layer, mask)
            computed["moving_mean"] = strategy.experimental_local_results(
                layer.moving_mean
            )
            computed["moving_variance"] = (
                strategy.experimental_local_results(layer.moving_variance)
            )
            # Synchronized: one batch of 8; else each replica's own.
            segments = [slice(0, 8)]
            if not synchronized:
                segments = [slice(0, 3), slice(3, 8)]
            expected = reference.segments_step(
                x, upstream, mask, segments, gamma, beta, 0.5
            )
            for key, value in computed.items():
                # The moving statistics: every replica's copy.
                for copy in value if key.startswith("moving") else [value]:
                    copy = np.asarray(copy)
                    assert np.all(np.isfinite(copy)), (synchronized, name, key)
                    np.testing.assert_allclose(
                        copy,
                        expected[key],
                        rtol=1e-5,
                        atol=1e-5,
                        err_msg=f"synchronized={synchronized}, {name}, {key}",
                    )
    print("uneven replicas match")
    """
)


def test_uneven_and_empty_replicas_under_mirrored_strategy():
    """Replicas of 3, 5 and 0 samples (the last, partial batch of an epoch),
    with and without a mask that leaves a replica no element: synchronized
    statistics are those of the 8 samples, per-replica ones each replica's,
    and the moving statistics weigh each replica by its count, with no NaN
    anywhere, outputs and gradients of `x`, `gamma` and `beta` alike."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute runs on TensorFlow")
    result = subprocess.run(
        [sys.executable, "-c", UNEVEN_REPLICAS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "uneven replicas match" in result.stdout


EMPTY_SHARD = textwrap.dedent(
    """
    import os

    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    import keras
    import numpy as np

    import keras_bn
    from tests import reference

    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices())
    )
    # Four shards of 2 samples, each of a scale and mean of its own; the
    # masked run leaves the second shard no unmasked element.
    rng = np.random.default_rng(0)
    shard = np.repeat(np.arange(4), 2)[:, None, None]
    x = rng.normal(size=(8, 2, 3)) * (1 + shard) + 2.0 * shard
    x = x.astype("float32")
    upstream = rng.normal(size=x.shape).astype("float32")
    gamma = np.array([1.5, 0.5, 1.0])
    beta = np.array([0.1, -0.2, 0.3])
    masks = {"unmasked": np.ones((8, 2), bool)}
    masks["masked"] = masks["unmasked"].copy()
    masks["masked"][2:4] = False
    masks["masked"][0, 1] = False
    for synchronized in (True, False):
        for name, mask in masks.items():
            layer = keras_bn.BatchNormalization(
                synchronized=synchronized, momentum=0.5
            )
            layer.build((None, 2, 3))
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)
            non_trainable = [v.value for v in layer.non_trainable_variables]

            def loss(x, gamma_and_beta):
                outputs, updated = layer.stateless_call(
                    gamma_and_beta, non_trainable, x, training=True, mask=mask
                )
                return (outputs * upstream).sum(), (outputs, updated)

            step = jax.jit(
                jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
            )
            (_, (outputs, updated)), (dx, (dgamma, dbeta)) = step(
                x, [v.value for v in layer.trainable_variables]
            )
            computed = {
                "outputs": outputs,
                "x": dx,
                "gamma": dgamma,
                "beta": dbeta,
                "moving_mean": updated[0],
                "moving_variance": updated[1],
            }
            segments = [slice(0, 8)]
            if not synchronized:
                segments = [slice(start, start + 2) for start in (0, 2, 4, 6)]
            expected = reference.segments_step(
                x, upstream, mask, segments, gamma, beta, 0.5
            )
            for key, value in computed.items():
                value = np.asarray(value)
                assert np.all(np.isfinite(value)), (synchronized, name, key)
                np.testing.assert_allclose(
                    value,
                    expected[key],
                    rtol=1e-5,
                    atol=1e-5,
                    err_msg=f"synchronized={synchronized}, {name}, {key}",
                )
    print("empty shard matches")
    """
)


def test_a_shard_without_data_under_keras_distribution():
    """`keras.distribution` on JAX splits the batch into equal shards; a
    mask that leaves one shard no element gives no NaN, synchronized
    statistics are those of the unmasked elements of every shard, and
    per-shard ones leave the moving statistics to the other shards."""
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution's data parallelism runs on JAX")
    result = subprocess.run(
        [sys.executable, "-c", EMPTY_SHARD],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "empty shard matches" in result.stdout


# ---------------------------------------------------------------------------
# torch.distributed: two processes, each with its shard of the global batch.


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def torch_ranks(tmp_path_factory):
    if keras.backend.backend() != "torch":
        pytest.skip("torch.distributed runs on PyTorch")
    out = tmp_path_factory.mktemp("torch_ranks")
    result = subprocess.run(
        [sys.executable, str(TORCH_PROCESSES), str(out), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TORCH_PROCESSES.parents[1],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = []
    for rank in range(torch_processes.WORLD):
        with np.load(out / f"rank{rank}.npz") as arrays:
            ranks.append(dict(arrays))
    return ranks


def _segments(kwargs, rows):
    """The row ranges of the global batch that are normalized together
    (the processes of a group, or each process), and the ghost batch size
    within them."""
    virtual = kwargs.get("virtual_batch_size")
    synchronized = kwargs.get("synchronized", False)
    group = 1
    if virtual is None and synchronized is not False:
        group = len(rows) if synchronized is True else synchronized
    starts = np.cumsum((0,) + tuple(rows))[::group]
    segments = [
        slice(start, end)
        for start, end in zip(starts[:-1], starts[1:], strict=True)
        if end > start
    ]
    return segments, virtual


@pytest.mark.parametrize(
    "index", range(len(torch_processes.CASES)), ids=torch_processes.case_ids()
)
def test_torch_distributed_matches_one_process(torch_ranks, index):
    """Outputs, input gradients and moving statistics of each process are
    those of one process normalizing the same groups of the global batch,
    and the moving statistics are identical on both processes."""
    name, kwargs, rows = torch_processes.CASES[index]
    gamma, beta = torch_processes.parameters(index)
    segments, virtual = _segments(kwargs, rows)
    starts = np.cumsum((0,) + tuple(rows))
    moving = {"moving_mean": 0.0, "moving_variance": 1.0}
    average = kwargs.get("moving_average", "ema")
    variance = (
        "unbiased_variance" if kwargs.get("bessel_correction") else ("variance")
    )
    weight = 0.0
    mask = torch_processes.global_mask(index, rows)
    if mask is None:
        mask = np.ones((sum(rows), 2), bool)
    for step in range(torch_processes.STEPS):
        x, upstream = torch_processes.global_batch(index, step, rows)
        outputs = np.empty(x.shape)
        gradient = np.empty(x.shape)
        counts, means, variances = [], [], []
        for rows_of in segments:
            expected = reference.batch_norm(
                x[rows_of],
                mask=mask[rows_of],
                virtual_batch_size=virtual,
                gamma=gamma,
                beta=beta,
            )
            outputs[rows_of] = expected["outputs"]
            gradient[rows_of] = reference.batch_norm_gradients(
                x[rows_of],
                upstream[rows_of],
                mask=mask[rows_of],
                virtual_batch_size=virtual,
                gamma=gamma,
            )["x"]
            counts.append(expected["count"])
            means.append(expected["mean"])
            variances.append(expected[variance])
        total = np.sum(counts, axis=0)
        for key, values in (
            ("moving_mean", means),
            ("moving_variance", variances),
        ):
            batch = np.sum(np.multiply(counts, values), axis=0) / total
            moving[key], new_weight = reference.moving_update(
                moving[key], batch, 0.5, average, weight
            )
        weight = new_weight
        if average != "ema":
            moving["moving_weight"] = weight
        for rank, saved in enumerate(torch_ranks):
            mine = slice(starts[rank], starts[rank + 1])
            prefix = f"{name}/{step}"
            np.testing.assert_allclose(
                saved[f"{prefix}/outputs"], outputs[mine], rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(
                saved[f"{prefix}/gradient"],
                gradient[mine],
                rtol=1e-5,
                atol=1e-5,
            )
            for key, value in moving.items():
                np.testing.assert_allclose(
                    saved[f"{prefix}/{key}"], value, rtol=1e-5, atol=1e-6
                )
                np.testing.assert_array_equal(
                    saved[f"{prefix}/{key}"], torch_ranks[0][f"{prefix}/{key}"]
                )


@pytest.mark.parametrize("name", list(torch_processes.DDP_RUNS))
def test_torch_ddp_trains_as_one_process(torch_ranks, name):
    """`DistributedDataParallel` averages the processes' gradients: with
    synchronized statistics that is the gradient of the mean loss over
    the global batch, and with statistics per process or group of them
    that of one process with ghost batches of that many samples. Every
    weight, moving statistics included, is that of one process, on every
    process."""
    kwargs = dict(torch_processes.DDP_RUNS[name])
    synchronized = kwargs.pop("synchronized")
    if synchronized is not True:
        share = torch_processes.DDP_BATCH // torch_processes.WORLD
        kwargs["virtual_batch_size"] = share * max(int(synchronized), 1)
    expected = torch_processes.train(lambda model: model, kwargs)
    for saved in torch_ranks:
        for i, weight in enumerate(expected):
            np.testing.assert_allclose(
                saved[f"ddp_{name}/{i}"], weight, rtol=1e-5, atol=1e-6
            )


def test_keras_layer_keeps_each_process_its_own_statistics(torch_ranks):
    """What the docs say of Keras's own layer under torch.distributed
    (docs/guides/distributed.md);
    if this fails, a Keras release has changed it."""
    x, _ = torch_processes.global_batch(0, 0, torch_processes.CASES[0][2])
    for rank, saved in enumerate(torch_ranks):
        np.testing.assert_allclose(
            saved["keras/moving_mean"],
            x[2 * rank : 2 * rank + 2].mean(axis=(0, 1)),
            rtol=1e-5,
        )


def test_a_group_that_does_not_divide_the_processes_is_refused(torch_ranks):
    for saved in torch_ranks:
        message = str(saved["error"])
        assert "synchronized=3 on 4 devices" in message, message
