"""
Title: Synchronized statistics over processes: what they send and cost
Description: All-reduces per training step, read from the compiled program
or the profiler, and step times, in a job of 2 processes on this machine.

Launches `--processes` (2) processes of itself on 127.0.0.1 as each
backend's users launch a job (`torch.distributed` with gloo and
`DistributedDataParallel`; `MultiWorkerMirroredStrategy`;
`jax.distributed` with gloo and `keras.distribution.DataParallel`). Every
process builds the same network in four variants: keras-bn with
`synchronized=True` and `False`, Keras's own layer, and the network without
batch norm. For each variant it counts the all-reduces of one training
step and the floats they carry:

- PyTorch: the `torch.profiler` events of a step whose name is an
  all-reduce, with their recorded input shapes (`DistributedDataParallel`
  sends the gradients in buckets; the layer's own all-reduces are its
  statistics and, in the backward pass, their gradients);
- TensorFlow: the collective all-reduce operations of the step's graph,
  with their shapes;
- JAX: the `all-reduce` instructions of the compiled (optimized) step, with
  their shapes (XLA may merge several into one).

Then it times the training step of every variant in turns, `--rounds`
rounds of `--steps` steps each, and reports the median time and the median
of the per-round ratios to `synchronized=False`. The first process prints a
Markdown table and writes `multiprocess_BACKEND.json`.

```
KERAS_BACKEND=torch python benchmarks/multiprocess.py
KERAS_BACKEND=tensorflow python benchmarks/multiprocess.py
KERAS_BACKEND=jax python benchmarks/multiprocess.py
```
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import multi_process  # noqa: E402

BACKEND = os.environ.get("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
LAYERS = 4
VARIANTS = {
    "keras_bn synchronized=True": ("keras_bn", True),
    "keras_bn synchronized=False": ("keras_bn", False),
    "keras synchronized=False": ("keras", False),
    "no batch norm": (None, False),
}
BASE = "keras_bn synchronized=False"


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[2])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--process", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", help=argparse.SUPPRESS)
    return parser.parse_args()


def launch(args):
    ports = ",".join(
        str(multi_process.free_port()) for _ in range(args.processes)
    )
    processes = [
        subprocess.Popen(
            [sys.executable, *sys.argv]
            + ["--process", str(index), "--port", ports]
        )
        for index in range(args.processes)
    ]
    deadline = time.monotonic() + args.timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    if any(process.returncode for process in processes):
        raise SystemExit("a benchmark process failed")


def build_model(variant, channels):
    import keras

    import keras_bn

    module, synchronized = VARIANTS[variant]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, channels))
    hidden = inputs
    for _ in range(LAYERS):
        hidden = keras.layers.Conv2D(channels, 3, padding="same")(hidden)
        if module == "keras_bn":
            hidden = keras_bn.BatchNormalization(synchronized=synchronized)(
                hidden
            )
        elif module == "keras":
            hidden = keras.layers.BatchNormalization()(hidden)
        hidden = keras.layers.Activation("relu")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(10)(hidden))


def local_batch(args):
    rng = np.random.default_rng(args.process)
    rows = args.batch // args.processes
    x = rng.normal(size=(rows, 16, 16, args.channels)).astype("float32")
    return x, rng.integers(0, 10, rows).astype("int32")


"""
## A training step per backend

Each returns the step (a function of nothing, which returns once the step
has run) and the sizes of the all-reduces in it.
"""


def torch_step(model, args):
    import torch
    import torch.profiler

    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    x, y = (torch.tensor(value) for value in local_batch(args))

    def step():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            wrapped(x, training=True), y.long()
        )
        loss.backward()
        optimizer.step()

    step()
    with torch.profiler.profile(record_shapes=True) as profile:
        step()
    sizes = [
        sum(int(np.prod(shape)) for shape in event.input_shapes if shape)
        for event in profile.events()
        # The process group's own event, which records the tensor.
        if re.fullmatch("(gloo|nccl):all_reduce", event.name)
    ]
    return step, sizes


def tensorflow_step(model, args, strategy):
    import keras
    import tensorflow as tf

    with strategy.scope():
        optimizer = keras.optimizers.SGD(1e-3)
        optimizer.build(model.trainable_variables)
    x, y = local_batch(args)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            losses = keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True
            )
            loss = tf.reduce_sum(losses) / args.batch
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))

    @tf.function
    def compiled(x, y):
        strategy.run(replica_step, args=(x, y))

    graph = compiled.get_concrete_function(x, y).graph
    sizes = []
    for graph_or_function in [graph, *graph._functions.values()]:
        operations = getattr(graph_or_function, "graph", graph_or_function)
        for operation in operations.get_operations():
            if operation.type.startswith("CollectiveReduce"):
                sizes.append(operation.inputs[0].shape.num_elements())

    def step():
        compiled(x, y)

    return step, sizes


def jax_step(model, args):
    import jax
    import keras

    distribution = keras.distribution.distribution()
    mesh = distribution.device_mesh.backend_mesh
    batch = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(distribution.batch_dim_name)
    )
    x, y = (
        jax.make_array_from_process_local_data(batch, value)
        for value in local_batch(args)
    )
    state = (
        [variable.value for variable in model.trainable_variables],
        [variable.value for variable in model.non_trainable_variables],
    )

    def loss(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        losses = keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True
        )
        return jax.numpy.mean(losses), non_trainable

    @jax.jit
    def compiled(state, x, y):
        trainable, non_trainable = state
        gradients, non_trainable = jax.grad(loss, has_aux=True)(
            trainable, non_trainable, x, y
        )
        trainable = jax.tree.map(
            lambda w, g: w - 1e-3 * g, trainable, gradients
        )
        return trainable, non_trainable

    text = compiled.lower(state, x, y).compile().as_text()
    sizes = []
    for line in text.splitlines():
        # `%name = SHAPE all-reduce(...)`; a merged one has a tuple SHAPE.
        match = re.search(r" = (.*?) all-reduce(-start)?\(", line)
        if match:
            sizes.append(
                sum(
                    int(np.prod([int(d) for d in dims.split(",") if d]))
                    for dims in re.findall(r"\[([\d,]*)\]", match.group(1))
                )
            )

    def step():
        nonlocal state
        state = compiled(state, x, y)
        jax.block_until_ready(state)

    return step, sizes


def main():
    args = parse_arguments()
    if args.process is None:
        launch(args)
        return
    # Joins the job as the example does.
    multi_process.join(args)
    if BACKEND == "torch":
        import torch

        # Two processes share the cores.
        torch.set_num_threads(1)
    import keras

    strategy = None
    if BACKEND == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if BACKEND == "jax":
        import jax

        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices())
        )
    steps, communication = {}, {}
    for variant in VARIANTS:
        if strategy is not None:
            with strategy.scope():
                model = build_model(variant, args.channels)
            steps[variant], sizes = tensorflow_step(model, args, strategy)
        else:
            model = build_model(variant, args.channels)
            make = torch_step if BACKEND == "torch" else jax_step
            steps[variant], sizes = make(model, args)
        communication[variant] = sizes
        for _ in range(2):
            steps[variant]()
    times = {variant: [] for variant in VARIANTS}
    ratios = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        medians = {}
        for variant, step in steps.items():
            durations = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                durations.append(time.perf_counter() - start)
            medians[variant] = statistics.median(durations)
            times[variant].extend(durations)
        for variant in VARIANTS:
            ratios[variant].append(medians[variant] / medians[BASE])
    if args.process == 0:
        report(args, communication, times, ratios)


def report(args, communication, times, ratios):
    import keras

    results = {
        "backend": BACKEND,
        "processes": args.processes,
        "batch": args.batch,
        "channels": args.channels,
        "batch_norm_layers": LAYERS,
        "keras": keras.__version__,
        "variants": {
            variant: {
                "all_reduces": len(communication[variant]),
                "all_reduce_floats": communication[variant],
                "step_ms": 1e3 * statistics.median(times[variant]),
                "ratio": statistics.median(ratios[variant]),
            }
            for variant in VARIANTS
        },
    }
    print(
        f"\n{BACKEND}, {args.processes} processes on 127.0.0.1, global batch "
        f"{args.batch}, {LAYERS} batch norms of {args.channels} channels"
    )
    print(
        "\n| variant | all-reduces per step | floats sent | step | "
        f"ratio to {BASE} |\n| --- | --- | --- | --- | --- |"
    )
    for variant, row in results["variants"].items():
        print(
            f"| {variant} | {row['all_reduces']} | "
            f"{sum(row['all_reduce_floats'])} | {row['step_ms']:.1f} ms | "
            f"{row['ratio']:.2f}× |"
        )
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"multiprocess_{BACKEND}.json")
    with open(path, "w") as file:
        json.dump(results, file, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
