"""Trains and saves, or loads and predicts, a model with keras_bn layers on
the backend given by KERAS_BACKEND.

    python integration/saving_worker.py save DIR
    python integration/saving_worker.py load DIR SOURCE_BACKEND...

`load` loads what each source backend saved, one after the other, in one
process, and prints a line for each that predicts the same; it exits 1
after the others if one failed.
"""

import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402


def data():
    rng = np.random.default_rng(0)
    x = (2.0 + 3.0 * rng.normal(size=(40, 6, 4))).astype("float32")
    y = rng.normal(size=(40, 2)).astype("float32")
    return x, y


def build_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 4))
    hidden = keras_bn.BatchNormalization(virtual_batch_size=6)(inputs)
    hidden = keras.layers.Conv1D(5, 3, data_format="channels_last")(hidden)
    hidden = keras_bn.BatchNormalization(
        axis=[1, 2], renorm=True, renorm_clipping={"rmax": 2.0}
    )(hidden)
    hidden = keras.layers.Flatten()(hidden)
    hidden = keras_bn.BatchNormalization(
        virtual_batch_size=7, momentum=0.8, synchronized=True
    )(hidden)
    outputs = keras.layers.Dense(2)(hidden)
    return keras.Model(inputs, outputs)


def save(directory):
    x, y = data()
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    backend = keras.backend.backend()
    model.save(os.path.join(directory, f"{backend}.keras"))
    model.save_weights(os.path.join(directory, f"{backend}.weights.h5"))
    np.save(os.path.join(directory, f"{backend}.npy"), model.predict(x))


def load(directory, source):
    x, _ = data()
    expected = np.load(os.path.join(directory, f"{source}.npy"))
    loaded = keras.models.load_model(os.path.join(directory, f"{source}.keras"))
    np.testing.assert_allclose(
        loaded.predict(x), expected, rtol=1e-5, atol=1e-5
    )
    rebuilt = build_model()
    rebuilt.load_weights(os.path.join(directory, f"{source}.weights.h5"))
    np.testing.assert_allclose(
        rebuilt.predict(x), expected, rtol=1e-5, atol=1e-5
    )
    print(f"loaded {source} on {keras.backend.backend()}")


if __name__ == "__main__":
    command, directory = sys.argv[1:3]
    if command == "save":
        save(directory)
    else:
        failed = False
        for source in sys.argv[3:]:
            try:
                load(directory, source)
            except Exception:  # reported, then the next source
                traceback.print_exc()
                failed = True
        sys.exit(int(failed))
