"""Trains a small model with keras_bn layers under
`keras.callbacks.BackupAndRestore`, on the backend given by KERAS_BACKEND.

    python integration/resume_worker.py uninterrupted BACKUP_DIR OUT.npz
    python integration/resume_worker.py crash BACKUP_DIR
    python integration/resume_worker.py resume BACKUP_DIR OUT.npz

`crash` stops the process dead (`os._exit`, no cleanup) in the middle of
the second epoch; `resume` runs the same `fit` again, which restores the
last backup (end of the first epoch) and trains on. The two other modes save
the final weights, moving statistics included, the optimizer's step count,
and the number of epochs that `fit` ran.

Backups are made at the end of each epoch (`save_freq="epoch"`, the
default). Keras 3 restores the epoch of a backup but not the batch: a
backup taken every N batches is reloaded and then trained on from the
first batch of its epoch again, so it cannot match an uninterrupted run.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402

EPOCHS = 3
BATCH = 16
CRASH_EPOCH, CRASH_BATCH = 1, 2
CRASH_CODE = 17


def data():
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(88, 6, 6, 2))).astype("float32")
    y = rng.integers(0, 3, 88)
    return x, y


def build_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    hidden = keras_bn.BatchNormalization(virtual_batch_size=4)(inputs)
    hidden = keras.layers.Conv2D(4, 3, use_bias=False)(hidden)
    hidden = keras_bn.BatchNormalization(momentum=0.8)(hidden)
    hidden = keras.layers.Activation("relu")(hidden)
    hidden = keras.layers.Flatten()(hidden)
    hidden = keras.layers.Dense(8, use_bias=False)(hidden)
    hidden = keras_bn.BatchNormalization(
        virtual_batch_size=5, renorm=True, momentum=0.7
    )(hidden)
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
    )
    return model


class Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == CRASH_EPOCH and batch == CRASH_BATCH:
            os._exit(CRASH_CODE)


def main():
    mode, backup_dir = sys.argv[1:3]
    x, y = data()
    model = build_model()
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir)]
    if mode == "crash":
        callbacks.append(Crash())
    # Deterministic settings: the batches come in the same order in every
    # epoch, whichever process runs it.
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        callbacks=callbacks,
        verbose=0,
    )
    arrays = {
        f"weights/{index:02d}/{weight.path}": np.asarray(weight.numpy())
        for index, weight in enumerate(model.weights)
    }
    arrays["iterations"] = np.asarray(model.optimizer.iterations.numpy())
    arrays["epochs_run"] = np.asarray(len(history.history["loss"]))
    np.savez(sys.argv[3], **arrays)


if __name__ == "__main__":
    main()
