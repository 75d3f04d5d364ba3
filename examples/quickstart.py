"""
Title: keras-bn quickstart
Description: Ghost batch normalization in a small classifier, on any backend.

Trains a small classifier whose batch-norm layers normalize ghost batches of
32 samples inside batches of 256 (the last batch of each epoch is smaller, and
not a multiple of 32), evaluates it, then saves it and loads it back with
plain `keras.models.load_model`.

Run it on the backend of your choice:

```
KERAS_BACKEND=jax python examples/quickstart.py
KERAS_BACKEND=tensorflow python examples/quickstart.py
KERAS_BACKEND=torch python examples/quickstart.py
```
"""

import argparse
import os
import tempfile

import keras
import numpy as np

import keras_bn

"""
## Data

Three interleaved spirals in 2-D, with features on very different scales and
a large offset: the kind of input that batch normalization makes easy.
"""


def spirals(samples, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, samples)
    radius = rng.uniform(0.1, 1.0, samples)
    angle = 3.0 * radius + labels * 2.0 * np.pi / 3.0
    angle += rng.normal(0.0, 0.1, samples)
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    features = points * np.array([1000.0, 0.01]) + np.array([5e3, -2.0])
    return features.astype("float32"), labels


"""
## Model

`keras_bn.BatchNormalization` is a drop-in for Keras's own layer;
`virtual_batch_size=32` makes each group of 32 consecutive samples a ghost
batch with its own statistics during training. A training this short (about
400 steps) needs a momentum below the default 0.99 for the moving statistics
to catch up with the data: with 0.99, the moving mean of the first layer
would still be far from the inputs' offset of 5000 and inference would
suffer.
"""


def build_model(virtual_batch_size, momentum=0.9):
    def batch_norm():
        return keras_bn.BatchNormalization(
            momentum=momentum, virtual_batch_size=virtual_batch_size
        )

    inputs = keras.Input((2,))
    hidden = batch_norm()(inputs)
    for _ in range(2):
        hidden = keras.layers.Dense(64, use_bias=False)(hidden)
        hidden = batch_norm()(hidden)
        hidden = keras.layers.Activation("relu")(hidden)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


def main():
    parser = argparse.ArgumentParser(description="keras-bn quickstart")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--virtual-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    x_train, y_train = spirals(5000, seed=args.seed)
    x_test, y_test = spirals(2000, seed=args.seed + 1)

    model = build_model(args.virtual_batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=2,
    )
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"backend: {keras.backend.backend()}")
    print(f"test accuracy: {accuracy:.4f}  test loss: {loss:.4f}")

    # Saved models load with plain Keras once keras_bn is imported.
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "quickstart.keras")
        model.save(path)
        restored = keras.models.load_model(path)
    difference = np.max(
        np.abs(restored.predict(x_test, verbose=0) - model.predict(x_test))
    )
    print(f"reloaded model, largest prediction difference: {difference:.1e}")


if __name__ == "__main__":
    main()
