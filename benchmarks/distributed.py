"""
Title: The cost of synchronized statistics
Description: Step time of `fit` on several CPU devices, synchronized or not.

Trains a small convolutional network with four `keras_bn.BatchNormalization`
layers with `fit` on several devices of this CPU: `keras.distribution.
DataParallel` over 4 forced host devices on JAX, `tf.distribute.
MirroredStrategy` over 2 logical CPU devices on TensorFlow. Each setting
(`synchronized=True`, `synchronized=False`, and Keras's own layer for
comparison) trains in turn, twice, interleaved; the median time per step
after warm-up is printed and written as JSON.

```
KERAS_BACKEND=jax python benchmarks/distributed.py
KERAS_BACKEND=tensorflow python benchmarks/distributed.py
```
"""

import argparse
import json
import os
import statistics
import time

BACKEND = os.environ.get("KERAS_BACKEND", "jax")
DEVICES = {"jax": 4, "tensorflow": 2}[BACKEND]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={DEVICES}"
)
if BACKEND == "tensorflow":
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * DEVICES,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402

SETTINGS = {
    "keras_bn synchronized=True": (keras_bn.BatchNormalization, True),
    "keras_bn synchronized=False": (keras_bn.BatchNormalization, False),
    "keras synchronized=False": (keras.layers.BatchNormalization, False),
}


class StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def build_model(layer, synchronized, channels):
    inputs = keras.Input((16, 16, channels))
    hidden = inputs
    for _ in range(4):
        hidden = keras.layers.Conv2D(channels, 3, padding="same")(hidden)
        hidden = layer(synchronized=synchronized)(hidden)
        hidden = keras.layers.Activation("relu")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(10)(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def distribution():
    """The `tf.distribute` strategy or `keras.distribution` to train under:
    both have a `scope()`."""
    if BACKEND == "tensorflow":
        names = [f"CPU:{index}" for index in range(DEVICES)]
        return tf.distribute.MirroredStrategy(names)
    return keras.distribution.DataParallel()


def time_setting(devices, setting, args):
    layer, synchronized = SETTINGS[setting]
    rng = np.random.default_rng(0)
    steps = args.warmup + args.steps
    x = rng.normal(size=(steps * args.batch, 16, 16, args.channels))
    y = rng.integers(0, 10, steps * args.batch)
    with devices.scope():
        model = build_model(layer, synchronized, args.channels)
        times = StepTimes()
        model.fit(
            x.astype("float32"),
            y,
            batch_size=args.batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[times],
        )
    durations = np.diff(times.times)[args.warmup :]
    return statistics.median(durations) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[2])
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="runs/distributed")
    args = parser.parse_args()

    devices = distribution()
    medians = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            medians[setting].append(time_setting(devices, setting, args))
    results = {
        "backend": BACKEND,
        "devices": DEVICES,
        "batch": args.batch,
        "channels": args.channels,
        "keras": keras.__version__,
        "step_ms": {key: min(value) for key, value in medians.items()},
    }
    base = results["step_ms"]["keras_bn synchronized=False"]
    print(f"{BACKEND}, {DEVICES} CPU devices, global batch {args.batch}")
    for setting, milliseconds in results["step_ms"].items():
        ratio = milliseconds / base
        print(f"  {setting:30s} {milliseconds:8.2f} ms  {ratio:.2f}x")
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"{BACKEND}.json")
    with open(path, "w") as file:
        json.dump(results, file, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
