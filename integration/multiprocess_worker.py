"""One process of a training job spread over several processes on this
machine, on one backend, or the same training in one process.

    python integration/multiprocess_worker.py BACKEND OUT PROCESS PORT...
    python integration/multiprocess_worker.py BACKEND OUT reference

Each backend launches as its users launch it, over 127.0.0.1:

- `torch`: a process per device with `torch.distributed` (gloo), the Keras
  model wrapped in `DistributedDataParallel` and trained with a torch
  optimizer, as in Keras's guide to distributed training with PyTorch.
- `tensorflow`: `MultiWorkerMirroredStrategy` over two workers named in
  `TF_CONFIG`. Keras 3.15.1's `fit` fails under it on this machine (for a
  model without batch norm too: its symbolic build reduces a value it
  cannot convert), so a custom training step runs under `strategy.run`,
  with Keras's optimizer, which sums the replicas' gradients.
- `jax`: two processes of two forced CPU devices each,
  `jax.distributed.initialize` with gloo collectives, and
  `keras.distribution.DataParallel` over the four devices with `fit`.

Every process feeds its consecutive share of every global batch. Each run
(`RUNS`) trains the same model from the same weights on the same global
batches; `OUT/PROCESS.npz` holds its weights (moving statistics included)
and predictions as `RUN/weights/I` and `RUN/predictions`; the `reference`
process trains each run's single-process equivalent (`REFERENCES`). On
PyTorch and TensorFlow each process also runs one training call of a layer
on shares of different sizes (`UNEVEN`), and saves its outputs and moving
statistics as `NAME_SYNCHRONIZED/...`.
"""

import datetime
import json
import os
import sys

BACKEND, OUT, PROCESS, *PORTS = sys.argv[1:]
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REFERENCE = PROCESS == "reference"
PROCESSES = 1 if REFERENCE else 2
INDEX = 0 if REFERENCE else int(PROCESS)
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
if BACKEND == "tensorflow" and not REFERENCE:
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in PORTS]},
            "task": {"type": "worker", "index": INDEX},
        }
    )

import numpy as np  # noqa: E402

BATCH = 16
STEPS = 3
# (run, layer arguments); "keras" is Keras's own layer, the control.
RUNS = {
    "synchronized": {"synchronized": True},
    "local": {"synchronized": False},
    "ghost2": {"virtual_batch_size": 2},
    "keras": None,
}
if BACKEND == "jax":
    RUNS["group2"] = {"synchronized": 2}
# The single-process runs each distributed run equals.
REFERENCES = {
    "synchronized": {},
    "local": {"virtual_batch_size": BATCH // 2 if BACKEND != "jax" else 4},
    "ghost2": {"virtual_batch_size": 2},
    "group2": {"virtual_batch_size": 8},
}


def data():
    """The global batches, one after another; every quarter of a batch has
    a scale and mean of its own."""
    rng = np.random.default_rng(0)
    scale = np.tile(np.repeat(np.arange(1.0, 5.0), BATCH // 4), STEPS)
    x = scale[:, None] * rng.normal(size=(BATCH * STEPS, 6)) + scale[:, None]
    y = rng.normal(size=(BATCH * STEPS, 2))
    return x.astype("float32"), y.astype("float32")


def build_model(arguments):
    import keras

    import keras_bn

    def batch_norm():
        if arguments is None:
            return keras.layers.BatchNormalization(momentum=0.5)
        return keras_bn.BatchNormalization(momentum=0.5, **arguments)

    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8)(batch_norm()(inputs))
    hidden = keras.layers.Activation("tanh")(batch_norm()(hidden))
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    rng = np.random.default_rng(1)
    model.set_weights(
        [
            rng.normal(size=w.shape).astype("float32")
            if "moving" not in w.path
            else w.numpy()
            for w in model.weights
        ]
    )
    return model


def share(values, step):
    """This process's rows of a step's global batch."""
    batch = values[step * BATCH : (step + 1) * BATCH]
    rows = BATCH // PROCESSES
    return batch[INDEX * rows : (INDEX + 1) * rows]


def train_torch(arguments):
    import torch

    model = build_model(arguments)
    wrapped = model
    if not REFERENCE:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    x, y = data()
    for step in range(STEPS):
        optimizer.zero_grad()
        outputs = wrapped(torch.tensor(share(x, step)), training=True)
        loss = torch.nn.functional.mse_loss(
            outputs, torch.tensor(share(y, step))
        )
        loss.backward()
        optimizer.step()
    return model


def train_tensorflow(arguments, strategy):
    import keras
    import tensorflow as tf

    with strategy.scope():
        model = build_model(arguments)
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            # The mean squared error over the global batch.
            loss = tf.reduce_sum(tf.square(outputs - y)) / (BATCH * 2)
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))

    @tf.function
    def step(x, y):
        strategy.run(replica_step, args=(x, y))

    x, y = data()
    for index in range(STEPS):
        step(share(x, index), share(y, index))
    return model


def train_jax(arguments):
    import jax
    import keras

    distribution = None
    if not REFERENCE:
        distribution = keras.distribution.DataParallel(devices=jax.devices())
        # Every process feeds its own share of each batch.
        distribution.auto_shard_dataset = False
    keras.distribution.set_distribution(distribution)
    model = build_model(arguments)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = data()
    rows = BATCH // PROCESSES
    local = np.concatenate([share(x, step) for step in range(STEPS)])
    targets = np.concatenate([share(y, step) for step in range(STEPS)])
    model.fit(local, targets, batch_size=rows, shuffle=False, verbose=0)
    keras.distribution.set_distribution(None)
    return model


# Layer-level runs with shares of different sizes, an empty one among
# them (the last batch of an epoch), on PyTorch and TensorFlow: the rows
# of process 0 and 1 of a batch of 16.
UNEVEN = {"uneven": (10, 6), "empty": (16, 0)}


def uneven_share(rows):
    x = data()[0][:BATCH]
    return x[sum(rows[:INDEX]) : sum(rows[: INDEX + 1])]


def uneven_step(arguments, rows, strategy=None):
    """One training call of a fresh layer on this process's share; returns
    its outputs and moving statistics."""
    import keras_bn

    x = uneven_share(rows)
    if strategy is None:
        import torch

        layer = keras_bn.BatchNormalization(momentum=0.5, **arguments)
        layer.build((None, 6))
        outputs = layer(torch.tensor(x), training=True).detach().numpy()
    else:
        import tensorflow as tf

        with strategy.scope():
            layer = keras_bn.BatchNormalization(momentum=0.5, **arguments)
            layer.build((None, 6))

        @tf.function
        def step(x):
            return strategy.run(lambda x: layer(x, training=True), args=(x,))

        outputs = strategy.experimental_local_results(step(x))[0].numpy()
    return {
        "inputs": x,
        "outputs": outputs,
        "moving_mean": layer.moving_mean.numpy(),
        "moving_variance": layer.moving_variance.numpy(),
    }


def start():
    """Joins the job; returns the training function of the backend."""
    if BACKEND == "torch":
        if not REFERENCE:
            import torch.distributed

            torch.distributed.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{PORTS[0]}",
                rank=INDEX,
                world_size=PROCESSES,
                timeout=datetime.timedelta(seconds=120),
            )
        return train_torch
    if BACKEND == "tensorflow":
        import tensorflow as tf

        if REFERENCE:
            strategy = tf.distribute.get_strategy()
        else:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()

        def train(arguments):
            return train_tensorflow(arguments, strategy)

        train.strategy = strategy
        return train
    import jax

    if not REFERENCE:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{PORTS[0]}",
            num_processes=PROCESSES,
            process_id=INDEX,
            initialization_timeout=120,
        )
    return train_jax


def main():
    train = start()
    import keras

    results = {}
    if BACKEND != "jax" and not REFERENCE:
        strategy = getattr(train, "strategy", None)
        for name, rows in UNEVEN.items():
            for synchronized in (True, False):
                step = uneven_step(
                    {"synchronized": synchronized}, rows, strategy
                )
                for key, value in step.items():
                    results[f"{name}_{synchronized}/{key}"] = value

    runs = REFERENCES if REFERENCE else RUNS
    if REFERENCE and BACKEND != "jax":
        runs = {name: args for name, args in runs.items() if name != "group2"}
    x, _ = data()
    for name, arguments in runs.items():
        keras.utils.set_random_seed(2)
        model = train(arguments)
        results[f"{name}/predictions"] = np.asarray(
            model.predict(x, batch_size=BATCH, verbose=0)
        )
        for index, weight in enumerate(model.get_weights()):
            results[f"{name}/weights/{index}"] = weight
    np.savez(os.path.join(OUT, f"{PROCESS}.npz"), **results)
    print(f"{BACKEND} {PROCESS}: {len(runs)} runs")


if __name__ == "__main__":
    main()
