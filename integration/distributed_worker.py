"""Trains a small model with keras_bn layers with `fit` on several devices
of this CPU, and the same model on one device, and saves the results.

    python integration/distributed_worker.py tensorflow OUT.npz [DEVICES]
    python integration/distributed_worker.py jax OUT.npz

With DEVICES, only the runs on that many devices (and the references):
TensorFlow's collectives of strategies over different numbers of devices
collide in one process (the group of one strategy's collectives takes the
key of another's), so its 4-device runs take a process of their own.

TensorFlow runs `tf.distribute.MirroredStrategy` over 2 (and 4) logical CPU
devices; JAX runs `keras.distribution.DataParallel` over 4 (and 2) forced host
devices. Every run starts from the same weights and sees the same batches,
in order, so runs that mean the same must end with the same weights. The
saved arrays are named `RUN/weights/I` (the model's weights after training,
moving statistics included), `RUN/predictions` (inference on the data) and
`RUN/recalibrated/I` (the moving statistics after `keras_bn.recalibrate` on
the data, on the same devices).
"""

import functools
import os
import sys

BACKEND = sys.argv[1]
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=4",
    ]
)
if BACKEND == "tensorflow":
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 4,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402

BATCH = 16
STEPS = 4

# (run name, layer arguments, number of devices); "local" is
# synchronized=False. The single-device references follow in REFERENCES.
DISTRIBUTED = {
    "tensorflow": [
        ("synchronized_2", {"synchronized": True}, 2),
        ("local_2", {"synchronized": False}, 2),
        ("ghost4_synchronized_2", {"synchronized": True, "ghost": 4}, 2),
        ("ghost4_local_2", {"synchronized": False, "ghost": 4}, 2),
        ("ghost3_local_2", {"synchronized": False, "ghost": 3}, 2),
        ("group2_4", {"synchronized": 2}, 4),
    ],
    "jax": [
        ("synchronized_4", {"synchronized": True}, 4),
        ("local_4", {"synchronized": False}, 4),
        ("ghost2_synchronized_4", {"synchronized": True, "ghost": 2}, 4),
        ("ghost2_local_4", {"synchronized": False, "ghost": 2}, 4),
        ("synchronized_2", {"synchronized": True}, 2),
        ("local_2", {"synchronized": False}, 2),
        ("ghost4_synchronized_2", {"synchronized": True, "ghost": 4}, 2),
        ("ghost4_local_2", {"synchronized": False, "ghost": 4}, 2),
        ("ghost3_local_2", {"synchronized": False, "ghost": 3}, 2),
        ("group2_4", {"synchronized": 2}, 4),
    ],
}
REFERENCES = [
    ("plain", {}),
    ("ghost8", {"ghost": 8}),
    ("ghost4", {"ghost": 4}),
    ("ghost2", {"ghost": 2}),
]


def data():
    rng = np.random.default_rng(0)
    # Every device's shard has its own scale and offset: per-device
    # statistics differ from global ones at every split.
    scale = np.repeat(np.arange(1.0, 9.0), 8)[:, None]
    x = (scale * rng.normal(size=(BATCH * STEPS, 6)) + scale).astype("float32")
    y = rng.normal(size=(BATCH * STEPS, 2)).astype("float32")
    return x, y


def build_model(synchronized=False, ghost=None):
    def batch_norm():
        return keras_bn.BatchNormalization(
            momentum=0.5, synchronized=synchronized, virtual_batch_size=ghost
        )

    inputs = keras.Input((6,))
    hidden = batch_norm()(inputs)
    hidden = keras.layers.Dense(8)(hidden)
    hidden = batch_norm()(hidden)
    hidden = keras.layers.Activation("tanh")(hidden)
    outputs = keras.layers.Dense(2)(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    model.set_weights(
        [
            rng.normal(size=w.shape).astype("float32")
            if "moving" not in w.path
            else w.numpy()
            for w in model.weights
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def train(scope, **layer_arguments):
    x, y = data()
    with scope():
        model = build_model(**layer_arguments)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        predictions = model.predict(x, batch_size=BATCH, verbose=0)
        results = {"predictions": predictions}
        for index, weight in enumerate(model.get_weights()):
            results[f"weights/{index}"] = weight
        keras_bn.recalibrate(model, x, batch_size=BATCH, verbose=0)
    moving = [w for w in model.weights if "moving" in w.path]
    for index, weight in enumerate(moving):
        results[f"recalibrated/{index}"] = keras.ops.convert_to_numpy(weight)
    return results


@functools.cache
def device_scope(devices):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # One strategy per device count, and one device count per process
        # (see the module docstring).
        names = [f"CPU:{index}" for index in range(devices)]
        return tf.distribute.MirroredStrategy(names).scope
    import jax

    distribution = keras.distribution.DataParallel(
        devices=jax.devices()[:devices]
    )
    return distribution.scope


def no_scope():
    import contextlib

    return contextlib.nullcontext()


def main():
    out = sys.argv[2]
    only = int(sys.argv[3]) if len(sys.argv) > 3 else None
    results = {}
    for name, arguments, devices in DISTRIBUTED[BACKEND]:
        if only not in (None, devices):
            continue
        for key, value in train(device_scope(devices), **arguments).items():
            results[f"{name}/{key}"] = value
    for name, arguments in REFERENCES:
        for key, value in train(no_scope, **arguments).items():
            results[f"{name}/{key}"] = value
    np.savez(out, **results)
    print(f"trained {len(results)} arrays on {BACKEND}")


if __name__ == "__main__":
    main()
