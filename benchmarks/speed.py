"""
Title: Speed and memory of one batch-norm layer
Description: A compiled training step and an inference call, side by side
with Keras's layer and with the memory-bound floor.

Times, in one process, a training step (forward, backward, and the
moving-statistics update) and an inference call of a single batch-norm
layer. The training step takes each of the forms it takes in a network:

- `upstream`: the loss `sum(y * upstream)`, an upstream gradient given as a
  tensor; gradients of the input, `gamma` and `beta`;
- `mean_square`: the loss `mean(y ** 2)`, the upstream gradient computed
  from the output, as when the loss follows the layer directly;
- `affine_only`: `sum(y * upstream)` with the gradients of `gamma` and
  `beta` only, as for a batch norm on a model's inputs.

The variants:

- `keras.layers.BatchNormalization`;
- `keras_bn.BatchNormalization` plain, with `virtual_batch_size=32`, with
  a ragged last ghost batch (the batch minus 6: 250 for 256, so the last
  ghost batch has 26 samples), with a mask (10 % of the positions masked),
  and with renorm, beside Keras's layer with renorm;
- the floor: `x * a + b` with per-channel `a` and `b`, the least that any
  layer reading and writing a tensor of that shape can cost.

The cases are image activations `(256, 16, 16, 64)` and dense activations
`(4096, 512)` in float32, each in the three forms, and the image shape
under the `mixed_float16` policy, in the `upstream` form. Each step is
compiled as the backend compiles a `fit` step: `tf.function(
jit_compile=True)` on TensorFlow, `jax.jit` on JAX; PyTorch runs eagerly
and under `torch.compile`. The variants are timed in turns, round after
round, so that a change in the machine's load hits them all alike; the
figures are medians over the rounds, after warm-up.

Peak memory is what a step allocates beyond its inputs, at its highest:
from XLA's buffer assignment on JAX, from the allocator's statistics on
TensorFlow and on PyTorch with CUDA, from the profiler's allocation events
on PyTorch on CPU. Bandwidth is the training step's essential traffic
(reading the input and the upstream gradient, writing the input's
gradient, as the form has them) per second, as a fraction of what a
plain copy of the input achieves on the same device.

The whole measurement runs in `--processes` fresh processes (3 by
default), and every figure is the median over them: a ratio can move by a
quarter from one process to the next, much more than from one round to
the next.

It prints a Markdown table per case and writes `speed_BACKEND.json` and
`speed_BACKEND.md` into `--output-dir`. It runs unchanged on a GPU.

```
KERAS_BACKEND=jax python benchmarks/speed.py
KERAS_BACKEND=tensorflow python benchmarks/speed.py
KERAS_BACKEND=torch python benchmarks/speed.py
KERAS_BACKEND=jax python benchmarks/speed.py --tiny  # a smoke test
KERAS_BACKEND=torch python benchmarks/speed.py --engines compile --cases dense
```
"""

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types

import keras
import numpy as np
from keras import ops

import keras_bn

Case = collections.namedtuple(
    "Case", ["name", "shape", "policy", "variants", "forms"]
)
Variant = collections.namedtuple(
    "Variant", ["make", "batch_change", "masked"], defaults=(0, False)
)

VIRTUAL_BATCH_SIZE = 32
RAGGED = 6  # samples fewer than the batch, for a ragged last ghost batch
MASKED_FRACTION = 0.1


class Floor(keras.layers.Layer):
    """`x * a + b` with per-channel `a` and `b`: the memory-bound floor."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # In a network, a mask passes through it, as through batch norm.
        self.supports_masking = True

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.a = self.add_weight(shape=shape, initializer="ones")
        self.b = self.add_weight(shape=shape, initializer="zeros")

    def call(self, inputs, training=None):
        dtype = inputs.dtype
        return inputs * ops.cast(self.a, dtype) + ops.cast(self.b, dtype)


def variants(policy):
    def keras_bn_layer(**kwargs):
        return lambda: keras_bn.BatchNormalization(dtype=policy, **kwargs)

    ghost = keras_bn_layer(virtual_batch_size=VIRTUAL_BATCH_SIZE)
    return {
        "keras": Variant(lambda: keras.layers.BatchNormalization(dtype=policy)),
        "keras_bn": Variant(keras_bn_layer()),
        "ghost_32": Variant(ghost),
        "ghost_32_ragged": Variant(ghost, batch_change=-RAGGED),
        "masked": Variant(keras_bn_layer(), masked=True),
        "renorm": Variant(keras_bn_layer(renorm=True)),
        # Renorm's own reference: a step that takes three more variables
        # costs more, for Keras's layer too.
        "keras_renorm": Variant(
            lambda: keras.layers.BatchNormalization(dtype=policy, renorm=True)
        ),
        "floor": Variant(lambda: Floor(dtype=policy)),
    }


def cases(tiny):
    image = (64, 4, 4, 8) if tiny else (256, 16, 16, 64)
    dense = (64, 16) if tiny else (4096, 512)
    mixed = {
        name: variant
        for name, variant in variants("mixed_float16").items()
        if name in ("keras", "keras_bn", "ghost_32", "floor")
    }
    return [
        Case("image", image, "float32", variants("float32"), list(FORMS)),
        Case("dense", dense, "float32", variants("float32"), list(FORMS)),
        Case(
            "image, mixed_float16", image, "mixed_float16", mixed, ["upstream"]
        ),
    ]


def chosen_cases(args):
    """The cases and variants `args` asks for, with their references."""
    chosen = []
    for case in cases(args.tiny):
        if args.cases and case.name not in args.cases:
            continue
        if args.variants:
            names = {*args.variants, "keras", "floor"}
            case = case._replace(
                variants={
                    name: variant
                    for name, variant in case.variants.items()
                    if name in names
                }
            )
        chosen.append(case)
    return chosen


def engines():
    return {
        "tensorflow": ["xla"],
        "jax": ["jit"],
        "torch": ["eager", "compile"],
    }[keras.backend.backend()]


"""
## Steps

A step is a function of `(trainable, non_trainable, x, mask, upstream)`
built on `stateless_call`: the training step returns the gradients and the
updated moving statistics, the inference step the outputs.
"""


# The forms a training step takes: the loss and which gradients it needs.
FORMS = {
    # `sum(y * upstream)`: an upstream gradient given as a tensor; the
    # gradients of `gamma`, `beta` and the input.
    "upstream": (False, True),
    # `mean(y ** 2)`: the upstream gradient computed from the output.
    "mean_square": (True, True),
    # `sum(y * upstream)`, the gradients of `gamma` and `beta` only: a batch
    # norm on a model's inputs.
    "affine_only": (False, False),
}


def make_step(layer, training, engine, form="upstream"):
    backend = keras.backend.backend()
    from_output, input_gradient = FORMS[form]

    def objective(y, upstream):
        if from_output:
            return ops.mean(ops.square(y))
        return ops.sum(y * upstream)

    def forward(trainable, non_trainable, x, mask):
        kwargs = {} if mask is None else {"mask": mask}
        return layer.stateless_call(
            trainable, non_trainable, x, training=training, **kwargs
        )

    if backend == "jax":
        import jax

        def train(trainable, non_trainable, x, mask, upstream):
            def loss(trainable, x):
                y, updated = forward(trainable, non_trainable, x, mask)
                return objective(y, upstream), updated

            argnums = (0, 1) if input_gradient else 0
            (_, updated), grads = jax.value_and_grad(
                loss, argnums=argnums, has_aux=True
            )(trainable, x)
            return grads, updated

        def infer(trainable, non_trainable, x, mask, upstream):
            return forward(trainable, non_trainable, x, mask)[0]

        return jax.jit(train if training else infer)

    if backend == "tensorflow":
        import tensorflow as tf

        def train(trainable, non_trainable, x, mask, upstream):
            sources = [trainable, x] if input_gradient else [trainable]
            with tf.GradientTape() as tape:
                tape.watch(sources)
                y, updated = forward(trainable, non_trainable, x, mask)
                loss = objective(y, upstream)
            return tape.gradient(loss, sources), updated

        def infer(trainable, non_trainable, x, mask, upstream):
            return forward(trainable, non_trainable, x, mask)[0]

        return tf.function(train if training else infer, jit_compile=True)

    import torch

    # torch.compile compiles the layer; autograd runs the backward pass it
    # compiled with it, as in a compiled model's training loop. Dynamo keeps
    # its compilations per code object, at most 8 of them, then runs the
    # function eagerly: every step gets a code object of its own.
    compiled = forward
    if engine == "compile":
        own_code = types.FunctionType(
            forward.__code__.replace(),
            forward.__globals__,
            closure=forward.__closure__,
        )
        compiled = torch.compile(own_code)

    def train(trainable, non_trainable, x, mask, upstream):
        trainable = [t.detach().requires_grad_(True) for t in trainable]
        sources = list(trainable)
        if input_gradient:
            x = x.detach().requires_grad_(True)
            sources.append(x)
        y, updated = compiled(trainable, non_trainable, x, mask)
        return torch.autograd.grad(objective(y, upstream), sources), updated

    def infer(trainable, non_trainable, x, mask, upstream):
        with torch.no_grad():
            return compiled(trainable, non_trainable, x, mask)[0]

    return train if training else infer


def make_inputs(case, variant, rng):
    """The layer, built, and the arguments of its steps."""
    shape = (case.shape[0] + variant.batch_change,) + case.shape[1:]
    layer = variant.make()
    layer.build(shape)
    dtype = keras.DTypePolicy(case.policy).compute_dtype

    def tensor(values, dtype=dtype):
        return ops.convert_to_tensor(values.astype(dtype))

    x = tensor(rng.normal(size=shape))
    upstream = tensor(rng.normal(size=shape))
    mask = None
    if variant.masked:
        mask = tensor(rng.random(shape[:-1]) >= MASKED_FRACTION, "bool")
    trainable = [ops.convert_to_tensor(v) for v in layer.trainable_variables]
    non_trainable = [
        ops.convert_to_tensor(v) for v in layer.non_trainable_variables
    ]
    return layer, (trainable, non_trainable, x, mask, upstream)


"""
## Clocks and allocators, per backend
"""


def synchronize(result):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.block_until_ready(result)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.test.experimental.sync_devices()
    else:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return result


def peak_memory(step, args):
    """Bytes a step allocates beyond its inputs, at its highest; `None`
    where the backend cannot tell (TensorFlow's CPU allocator keeps no
    statistics unless oneDNN is on, its default only on some CPUs)."""
    backend = keras.backend.backend()
    if backend == "jax":
        analysis = step.lower(*args).compile().memory_analysis()
        return int(
            analysis.temp_size_in_bytes
            + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes
        )
    if backend == "tensorflow":
        import tensorflow as tf

        device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
        try:
            tf.config.experimental.reset_memory_stats(device)
        except ValueError:  # "Cannot reset memory stats for device"
            return None
        before = tf.config.experimental.get_memory_info(device)["current"]
        synchronize(step(*args))
        peak = tf.config.experimental.get_memory_info(device)["peak"]
        return int(peak - before)
    import torch

    if torch.cuda.is_available():
        synchronize(None)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        synchronize(step(*args))
        return int(torch.cuda.max_memory_allocated() - before)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profile:
        step(*args)
    allocated = peak = 0
    events = profile.profiler.kineto_results.events()
    for event in sorted(events, key=lambda event: event.start_ns()):
        if event.name() == "[memory]":
            allocated += event.nbytes()
            peak = max(peak, allocated)
    return int(peak)


def copy_bandwidth(x, repeats, warmup):
    """Bytes per second that a compiled copy of `x` reads and writes."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        copy = jax.jit(lambda x: x + 0)
    elif backend == "tensorflow":
        import tensorflow as tf

        copy = tf.function(tf.identity, jit_compile=True)
    else:
        import torch

        copy = torch.clone
    times = time_rounds({"copy": lambda: copy(x)}, repeats, warmup)
    return 2 * _bytes(x) / np.median(times["copy"])


def time_rounds(calls, repeats, warmup):
    """Seconds of each call of `calls` (name: function of no argument) in
    each round, the calls timed in turns, one call of each per round."""
    for call in calls.values():
        for _ in range(warmup):
            synchronize(call())
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            synchronize(call())
            times[name].append(time.perf_counter() - start)
    return {name: np.array(values) for name, values in times.items()}


def _bytes(x):
    return (
        int(np.prod(x.shape))
        * np.dtype(keras.backend.standardize_dtype(x.dtype)).itemsize
    )


"""
## One case
"""


def run_case(case, engine, form, repeats, warmup, seed):
    rng = np.random.default_rng(seed)
    steps, arguments, errors = {}, {}, {}
    # Inference does not depend on the step's form: timed with the first.
    modes = ("train", "inference") if form == "upstream" else ("train",)
    for name, variant in case.variants.items():
        layer, args = make_inputs(case, variant, rng)
        for mode in modes:
            step = make_step(layer, mode == "train", engine, form)
            try:
                synchronize(step(*args))
            except Exception as error:  # noqa: BLE001 - reported, not fatal
                errors[name] = f"{type(error).__name__}: {error}"
                break
            steps[name, mode] = step
            arguments[name, mode] = args
    # Training steps and inference calls are timed in rounds of their own,
    # in a fixed order: a call's time depends on the calls before it (which
    # buffers the allocator hands it). Inference calls that followed
    # training steps ran up to 20 % slower, in a random order 4 times.
    times = {}
    for mode in modes:
        calls = {
            key: (lambda step=step, args=arguments[key]: step(*args))
            for key, step in steps.items()
            if key[1] == mode
        }
        times.update(time_rounds(calls, repeats, warmup))
    x = arguments["keras", "train"][2]
    bandwidth = copy_bandwidth(x, repeats, warmup)

    rows = {}
    for name in case.variants:
        if name in errors:
            rows[name] = {"error": errors[name]}
            continue
        row = {}
        for mode in modes:
            row[f"{mode}_seconds"] = float(np.median(times[name, mode]))
            # Ratios are medians of ratios within a round: a change of the
            # machine's load between rounds cancels out.
            for other in ("keras", "floor"):
                if (other, mode) in times:
                    ratios = times[name, mode] / times[other, mode]
                    row[f"{mode}_vs_{other}"] = float(np.median(ratios))
            peak = peak_memory(steps[name, mode], arguments[name, mode])
            if peak is not None:
                row[f"{mode}_peak_bytes"] = peak
        # Read the input and the upstream gradient (unless computed from
        # the output), write the input's gradient (if it is needed).
        from_output, input_gradient = FORMS[form]
        essential = (1 + (not from_output) + input_gradient) * _bytes(
            arguments[name, "train"][2]
        )
        row["train_bandwidth_fraction"] = (
            essential / row["train_seconds"] / bandwidth
        )
        rows[name] = row
    keras_peak = rows.get("keras", {}).get("train_peak_bytes")
    for row in rows.values():
        if keras_peak and "train_peak_bytes" in row:
            row["train_peak_vs_keras"] = row["train_peak_bytes"] / keras_peak
    return {
        "case": case.name,
        "form": form,
        "shape": list(case.shape),
        "policy": case.policy,
        "engine": engine,
        "copy_bandwidth_bytes_per_second": bandwidth,
        "variants": rows,
    }


"""
## Report
"""


def environment():
    backend = keras.backend.backend()
    versions = {"keras": keras.__version__, "numpy": np.__version__}
    module = __import__(backend)
    versions[backend] = module.__version__
    if backend == "jax":
        import jax

        device = str(jax.devices()[0].device_kind)
    elif backend == "tensorflow":
        import tensorflow as tf

        # Every variant's step is a new tf.function: its tracing is expected.
        tf.get_logger().setLevel("ERROR")
        gpus = tf.config.list_physical_devices("GPU")
        device = "GPU" if gpus else "CPU"
    else:
        import torch

        device = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        )
    return {
        "backend": backend,
        "device": device,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def markdown(results):
    lines = []
    for result in results:
        shape = "×".join(map(str, result["shape"]))
        lines += [
            f"{result['case']} {shape}, {result['engine']}, "
            f"step form {result['form']}",
            "",
            "| variant | train ms | × Keras | × floor | inference ms "
            "| × Keras | × floor | train peak MiB | × Keras | bandwidth |",
            "|" + " --- |" * 10,
        ]
        for name, row in result["variants"].items():
            if "error" in row:
                lines.append(f"| {name} | {row['error'][:60]} |")
                continue
            cells = [
                name,
                _milliseconds(row, "train_seconds"),
                _ratio(row, "train_vs_keras"),
                _ratio(row, "train_vs_floor"),
                _milliseconds(row, "inference_seconds"),
                _ratio(row, "inference_vs_keras"),
                _ratio(row, "inference_vs_floor"),
                _mebibytes(row, "train_peak_bytes"),
                _ratio(row, "train_peak_vs_keras"),
                f"{row['train_bandwidth_fraction']:.0%}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _ratio(row, key):
    return f"{row[key]:.2f}" if key in row else "n/a"


def _mebibytes(row, key):
    return f"{row[key] / 2**20:.1f}" if key in row else "n/a"


def _milliseconds(row, key):
    return f"{row[key] * 1e3:.3f}" if key in row else "n/a"


def median_results(runs):
    """Results with every figure the median of its value in `runs` (lists
    of results of the same cases and engines)."""
    merged = []
    for results in zip(*runs, strict=True):
        variants = {}
        for name in results[0]["variants"]:
            rows = [result["variants"][name] for result in results]
            errors = [row["error"] for row in rows if "error" in row]
            variants[name] = (
                {"error": errors[0]}
                if errors
                else {
                    key: float(np.median([row[key] for row in rows]))
                    for key in rows[0]
                }
            )
        bandwidths = [r["copy_bandwidth_bytes_per_second"] for r in results]
        merged.append(
            {
                **results[0],
                "copy_bandwidth_bytes_per_second": float(np.median(bandwidths)),
                "variants": variants,
            }
        )
    return merged


def run_processes(args):
    """Runs the measurement in `args.processes` fresh processes; returns
    the results of each."""
    runs = []
    report = f"speed_{keras.backend.backend()}.json"
    with tempfile.TemporaryDirectory() as directory:
        for index in range(args.processes):
            output = os.path.join(directory, str(index))
            command = [sys.executable, __file__, "--processes", "1"]
            command += ["--repeats", str(args.repeats)]
            command += ["--warmup", str(args.warmup), "--seed", str(args.seed)]
            command += ["--output-dir", output]
            if args.tiny:
                command.append("--tiny")
            for option in ("engines", "cases", "variants"):
                if getattr(args, option):
                    command += [f"--{option}", *getattr(args, option)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(output, report)) as file:
                runs.append(json.load(file)["results"])
            print(f"process {index + 1} of {args.processes} done", flush=True)
    return runs


def main():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processes",
        type=int,
        default=3,
        help="fresh processes to measure in, each figure their median",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes and 2 rounds: checks that the script runs",
    )
    parser.add_argument(
        "--engines", nargs="+", default=None, help="the engines to time"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help='the cases to time, by name: image, dense, "image, mixed_float16"',
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="the variants to time (keras and floor, which the others are "
        "set beside, are timed too)",
    )
    parser.add_argument("--output-dir", default="runs/speed")
    args = parser.parse_args()
    repeats, warmup = (2, 1) if args.tiny else (args.repeats, args.warmup)

    env = environment()
    print(
        f"{env['backend']} on {env['device']}, {env['cpu_count']} CPUs, "
        f"{', '.join(f'{k} {v}' for k, v in env['versions'].items())}"
    )
    if args.processes > 1:
        results = median_results(run_processes(args))
        print(markdown(results))
    else:
        results = []
        for case in chosen_cases(args):
            for engine in engines():
                if args.engines and engine not in args.engines:
                    continue
                for form in case.forms:
                    results.append(
                        run_case(case, engine, form, repeats, warmup, args.seed)
                    )
                    print(markdown(results[-1:]), flush=True)
    env["processes"] = args.processes

    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, f"speed_{env['backend']}")
    with open(stem + ".json", "w") as file:
        json.dump({"environment": env, "results": results}, file, indent=2)
    with open(stem + ".md", "w") as file:
        file.write(markdown(results))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
