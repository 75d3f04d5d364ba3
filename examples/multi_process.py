"""
Title: Batch norm in a training job of several processes
Description: One model trained by several processes, a share of every batch
each, with statistics synchronized over all of them, on PyTorch,
TensorFlow or JAX.

A job of several processes (a process per GPU, or per machine) is how a
training outgrows one device. Each process sees its own share of every
batch. A `keras_bn.BatchNormalization(synchronized=True)` layer normalizes
with the statistics of the whole batch, summed over the processes by an
all-reduce that gradients flow through; with `synchronized=False` each
process normalizes with its own share. Either way the moving statistics
are averaged over the processes at every step, so every process holds the
same model, and any of them can save it.

Each backend launches its job as its users do:

- **PyTorch**: `torch.distributed.init_process_group` (`gloo` on CPUs,
  `nccl` on GPUs), the Keras model wrapped in
  `torch.nn.parallel.DistributedDataParallel` and trained with a torch
  optimizer, as in Keras's guide to distributed training with PyTorch.
- **TensorFlow**: `TF_CONFIG` names every worker, and
  `tf.distribute.MultiWorkerMirroredStrategy` runs a training step in each.
  (With Keras 3.15.1 and TensorFlow 2.21, `fit` fails under that strategy
  for any model, so the step here is a `tf.GradientTape` under
  `strategy.run`, with Keras's optimizer, which sums the gradients.)
- **JAX**: `jax.distributed.initialize` in every process, then
  `keras.distribution.DataParallel` over every process's devices, and
  `fit`.

By default the script launches `--processes` (2) processes of itself on
this machine, talking over 127.0.0.1; each trains a small convolutional
network on scikit-learn's bundled digits, its share of every batch. At the
end the first process evaluates the model on the test split and every
process saves its weights: the launcher prints the largest difference
between the processes' weights (moving statistics included) and the
median time of a training step. It takes about a minute on a 2-core CPU.

```
KERAS_BACKEND=torch python examples/multi_process.py
KERAS_BACKEND=tensorflow python examples/multi_process.py
KERAS_BACKEND=jax python examples/multi_process.py --synchronized false
```

On PyTorch, `torchrun` can launch the processes instead (one per GPU of a
machine here, `nccl` chosen when there are GPUs):

```
KERAS_BACKEND=torch torchrun --nproc-per-node=2 examples/multi_process.py
```

The script imports `common.py` from its folder only in the training
processes, after each has joined the job: JAX and TensorFlow must join
before they compute anything.
"""

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_arguments():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--processes",
        type=int,
        # Under torchrun, the number of processes it started.
        default=int(os.environ.get("WORLD_SIZE", 2)),
    )
    parser.add_argument(
        "--synchronized",
        default="true",
        help="true (statistics of the whole batch), false (of each "
        "process's share), or k (of groups of k consecutive processes) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--dataset",
        default="digits",
        help="digits (bundled with scikit-learn) or a tensorflow-datasets "
        "image dataset: mnist, cifar10, ... (default: %(default)s)",
    )
    parser.add_argument("--data-dir", help="tensorflow-datasets directory")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="the global batch, split evenly over the processes "
        "(default: %(default)s)",
    )
    parser.add_argument("--limit", type=int, help="examples per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="multi_process_output")
    parser.add_argument("--timeout", type=float, default=600)
    # Set by the launcher in each process it starts.
    parser.add_argument("--process", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", help=argparse.SUPPRESS)
    args = parser.parse_args()
    value = args.synchronized.lower()
    if value in ("true", "false"):
        args.synchronized = value == "true"
    else:
        args.synchronized = int(value)
    if args.batch_size % args.processes:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of "
            f"--processes ({args.processes})"
        )
    return args


"""
## Launching

Run without `--process`, the script is the launcher: it finds a free port
on 127.0.0.1, starts the processes, waits for them (at most `--timeout`
seconds, after which it stops them), and compares what they saved.
`torchrun` sets `RANK` and `WORLD_SIZE` instead, and then every process is
a training process.
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args):
    os.makedirs(args.output_dir, exist_ok=True)
    port = free_port()
    # MultiWorkerMirroredStrategy needs an address per worker.
    ports = [port] + [free_port() for _ in range(args.processes - 1)]
    processes = [
        subprocess.Popen(
            [sys.executable, *sys.argv, "--process", str(index)]
            + ["--port", ",".join(map(str, ports))]
        )
        for index in range(args.processes)
    ]
    deadline = time.monotonic() + args.timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        raise SystemExit(
            f"the job ran past --timeout {args.timeout} s"
        ) from None
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    if any(process.returncode for process in processes):
        raise SystemExit("a training process failed")
    compare(args)


def compare(args):
    saved = [
        np.load(os.path.join(args.output_dir, f"weights_{index}.npz"))
        for index in range(args.processes)
    ]
    difference = max(
        float(np.max(np.abs(weights[name] - saved[0][name]), initial=0.0))
        for weights in saved[1:]
        for name in saved[0].files
    )
    with open(os.path.join(args.output_dir, "metrics.json")) as file:
        metrics = json.load(file)
    metrics["largest_weight_difference"] = difference
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)
    print(
        f"\n{BACKEND}, {args.processes} processes, "
        f"synchronized={args.synchronized}\n"
        f"test accuracy {metrics['test_accuracy']:.4f}, "
        f"test loss {metrics['test_loss']:.4f}\n"
        f"median training step {1000 * metrics['seconds_per_step']:.1f} ms\n"
        "largest difference between the processes' weights: "
        f"{difference:.3g}"
    )


"""
## Joining the job

Each backend joins in its own way, before anything else computes. The
function returns this process's index and the number of processes.
"""


def join(args):
    if "RANK" in os.environ and args.process is None:
        # Launched by torchrun, which sets the address and the rank.
        import torch
        import torch.distributed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    ports = [int(port) for port in args.port.split(",")]
    if BACKEND == "torch":
        import torch.distributed

        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{ports[0]}",
            rank=args.process,
            world_size=args.processes,
            timeout=datetime.timedelta(seconds=args.timeout),
        )
    elif BACKEND == "tensorflow":
        os.environ["TF_CONFIG"] = json.dumps(
            {
                "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                "task": {"type": "worker", "index": args.process},
            }
        )
    else:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{ports[0]}",
            num_processes=args.processes,
            process_id=args.process,
            initialization_timeout=int(args.timeout),
        )
    return args.process, args.processes


"""
## Model

Two convolutions, each followed by a synchronized batch norm, on the 8×8
digits. The same seed in every process gives every process the same
initial weights.
"""


def build_model(args, input_shape, num_classes):
    import keras

    import keras_bn

    keras.utils.set_random_seed(args.seed)
    inputs = keras.Input(input_shape)
    x = inputs
    for filters, strides in ((16, 1), (32, 2)):
        x = keras.layers.Conv2D(filters, 3, strides, padding="same")(x)
        x = keras_bn.BatchNormalization(
            momentum=0.9, synchronized=args.synchronized
        )(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


"""
## Data

Every process draws the same order of the training examples each epoch
and takes its own consecutive share of every batch (the last, incomplete
batch of an epoch is left out, so that every share has the same size on
every backend).
"""


def shares(x, y, args, index, processes, epoch):
    order = np.random.default_rng([args.seed, epoch]).permutation(len(x))
    rows = args.batch_size // processes
    for start in range(0, len(x) - args.batch_size + 1, args.batch_size):
        batch = order[start : start + args.batch_size]
        mine = batch[index * rows : (index + 1) * rows]
        yield x[mine], y[mine]


"""
## Training

A training step per backend, on this process's share.
"""


def train_torch(model, data, args, index, processes):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for epoch in range(args.epochs):
        for x, y in shares(
            *data.splits["train"], args, index, processes, epoch
        ):
            start = time.perf_counter()
            optimizer.zero_grad()
            logits = wrapped(torch.tensor(x, device=device), training=True)
            # DistributedDataParallel averages the processes' gradients:
            # with equal shares, those of the whole batch's mean loss.
            loss = loss_fn(logits, torch.tensor(y, device=device).long())
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return times


def train_tensorflow(model, data, args, index, processes, strategy):
    import keras
    import tensorflow as tf

    with strategy.scope():
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            losses = keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True
            )
            # The mean over the whole batch: the optimizer sums the
            # replicas' gradients.
            loss = tf.reduce_sum(losses) / args.batch_size
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))

    @tf.function
    def step(x, y):
        strategy.run(replica_step, args=(x, y))

    times = []
    for epoch in range(args.epochs):
        for x, y in shares(
            *data.splits["train"], args, index, processes, epoch
        ):
            start = time.perf_counter()
            step(x, y)
            times.append(time.perf_counter() - start)
    return times


def train_jax(model, data, args, index, processes):
    import keras

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    times = []
    for epoch in range(args.epochs):
        x, y = zip(
            *shares(*data.splits["train"], args, index, processes, epoch),
            strict=True,
        )
        # Each process gives `fit` its own shares, in order.
        model.fit(
            np.concatenate(x),
            np.concatenate(y),
            batch_size=args.batch_size // processes,
            shuffle=False,
            verbose=0,
            callbacks=[StepTimes()],
        )
    return times


def train(args):
    index, processes = join(args)
    strategy = None
    if BACKEND == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if BACKEND == "jax":
        import jax
        import keras

        distribution = keras.distribution.DataParallel(devices=jax.devices())
        # Every process feeds its own share of each batch.
        distribution.auto_shard_dataset = False
        keras.distribution.set_distribution(distribution)

    import common

    data = common.load(args)
    if strategy is not None:
        with strategy.scope():
            model = build_model(args, data.input_shape, data.num_classes)
        times = train_tensorflow(model, data, args, index, processes, strategy)
    else:
        model = build_model(args, data.input_shape, data.num_classes)
        trainer = train_torch if BACKEND == "torch" else train_jax
        times = trainer(model, data, args, index, processes)
    finish(model, data, args, index, times)
    if args.process is None:
        # Under torchrun: the first process compares, once all have saved.
        import torch.distributed

        torch.distributed.barrier()
        if index == 0:
            compare(args)


"""
## Results

Inference uses the moving statistics, the same in every process. Every
process saves its weights for the launcher to compare, and evaluates the
model (on JAX and TensorFlow a computation all the processes take part
in); the first writes the metrics.
"""


def finish(model, data, args, index, times):
    import keras

    os.makedirs(args.output_dir, exist_ok=True)
    weights = dict(
        zip(
            [weight.path for weight in model.weights],
            model.get_weights(),
            strict=True,
        )
    )
    np.savez(os.path.join(args.output_dir, f"weights_{index}.npz"), **weights)
    if BACKEND == "jax":
        keras.distribution.set_distribution(None)
    x, y = data.splits["test"]
    logits = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    if index != 0:
        return
    shifted = logits - logits.max(1, keepdims=True)
    log_probabilities = shifted - np.log(
        np.sum(np.exp(shifted), 1, keepdims=True)
    )
    metrics = {
        "backend": BACKEND,
        "processes": args.processes,
        "synchronized": args.synchronized,
        "test_accuracy": float(np.mean(np.argmax(logits, 1) == y)),
        "test_loss": float(-np.mean(log_probabilities[np.arange(len(y)), y])),
        # The first steps compile the step.
        "seconds_per_step": float(np.median(times[len(times) // 4 :])),
    }
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)


def main():
    args = parse_arguments()
    if args.process is None and "RANK" not in os.environ:
        launch(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
