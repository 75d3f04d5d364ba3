"""Four `torch.distributed` processes (gloo, 127.0.0.1) train keras_bn
layers on their shards of one global batch; each saves what it computed.

    python tests/torch_processes.py OUT_DIR PORT

Every case (`CASES`) runs two training steps on a fresh layer with
`momentum=0.5` and random `gamma` and `beta`; each process saves, per case
and step, its outputs, its input gradient of `sum(outputs * upstream)`, and
the layer's weights after the step, as `OUT_DIR/rank{R}.npz`; and the
weights of a model trained with `DistributedDataParallel` (`DDP_RUNS`),
and the error of a group setting that does not divide the processes.
"""

import datetime
import os
import sys

import numpy as np

WORLD = 4
FEATURES = 3
# (name, layer arguments, rows of the global batch per process).
CASES = [
    ("synchronized", {"synchronized": True}, (2, 2, 2, 2)),
    ("local", {"synchronized": False}, (2, 2, 2, 2)),
    ("group", {"synchronized": 2}, (2, 2, 2, 2)),
    ("ghost", {"synchronized": True, "virtual_batch_size": 2}, (4, 4, 2, 2)),
    ("synchronized_uneven", {"synchronized": True}, (3, 1, 2, 2)),
    ("local_uneven", {"synchronized": False}, (3, 1, 2, 2)),
    ("group_uneven", {"synchronized": 2}, (3, 1, 2, 0)),
    ("synchronized_empty", {"synchronized": True}, (4, 0, 2, 2)),
    ("local_empty", {"synchronized": False}, (4, 0, 2, 2)),
    ("ghost_uneven", {"virtual_batch_size": 2}, (3, 1, 2, 2)),
    (
        "local_debiased_bessel",
        {"moving_average": "debiased", "bessel_correction": True},
        (3, 1, 2, 0),
    ),
    (
        "synchronized_cumulative",
        {"synchronized": True, "moving_average": "cumulative"},
        (2, 2, 2, 2),
    ),
    # The second process has samples, none of them unmasked (`global_mask`).
    ("synchronized_masked", {"synchronized": True}, (2, 2, 2, 2)),
    ("local_masked", {"synchronized": False}, (3, 2, 0, 3)),
]
STEPS = 2


def case_ids():
    return [name for name, _, _ in CASES]


def global_batch(case_index, step, rows):
    """The global batch of a case's step, and the upstream gradient; each
    process's rows have a scale and mean of their own."""
    rng = np.random.default_rng(100 * case_index + step)
    process = np.repeat(np.arange(len(rows)), rows)[:, None, None]
    x = rng.normal(size=(sum(rows), 2, FEATURES)) * (1.0 + process)
    upstream = rng.normal(size=x.shape)
    return (x + 2.0 * process).astype("float32"), upstream.astype("float32")


def global_mask(case_index, rows):
    """The mask of a case's global batch, `None` for all unmasked: a masked
    case leaves the second process no unmasked element."""
    if not CASES[case_index][0].endswith("_masked"):
        return None
    mask = np.ones((sum(rows), 2), bool)
    mask[rows[0] : rows[0] + rows[1]] = False
    mask[0, 1] = False
    return mask


def parameters(case_index):
    rng = np.random.default_rng(case_index)
    return rng.normal(1.0, 0.2, FEATURES), rng.normal(0.0, 0.2, FEATURES)


# DistributedDataParallel runs: the layer arguments; each process trains on
# its quarter of every global batch of DDP_BATCH.
DDP_RUNS = {
    "synchronized": {"synchronized": True},
    "local": {"synchronized": False},
    "group": {"synchronized": 2},
}
DDP_BATCH = 8
DDP_STEPS = 3


def train(wrap, kwargs, rank=None):
    """Trains a Dense, batch norm, Dense model as Keras's guide to PyTorch
    distributed training does (a torch optimizer over the parameters, the
    model called on each batch), on the global batches, or on the half of
    them of process `rank`; returns the weights at the end."""
    import keras
    import torch

    import keras_bn

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras_bn.BatchNormalization(momentum=0.5, **kwargs),
            keras.layers.Dense(1),
        ]
    )
    wrapped = wrap(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    rng = np.random.default_rng(11)
    for _ in range(DDP_STEPS):
        x = rng.normal(2.0, 1.5, (DDP_BATCH, 4)).astype("float32")
        y = rng.normal(size=(DDP_BATCH, 1)).astype("float32")
        if rank is not None:
            share = DDP_BATCH // WORLD
            mine = slice(rank * share, (rank + 1) * share)
            x, y = x[mine], y[mine]
        optimizer.zero_grad()
        outputs = wrapped(torch.tensor(x), training=True)
        loss = torch.nn.functional.mse_loss(outputs, torch.tensor(y))
        loss.backward()
        optimizer.step()
    return [weight.numpy() for weight in model.weights]


def main(rank, out, port):
    import torch
    import torch.distributed

    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    import keras_bn

    saved = {}
    for index, (name, kwargs, rows) in enumerate(CASES):
        layer = keras_bn.BatchNormalization(momentum=0.5, **kwargs)
        layer.build((None, 2, FEATURES))
        gamma, beta = parameters(index)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        start = sum(rows[:rank])
        mine = slice(start, start + rows[rank])
        mask = global_mask(index, rows)
        mask = None if mask is None else torch.tensor(mask[mine])
        for step in range(STEPS):
            x, upstream = global_batch(index, step, rows)
            inputs = torch.tensor(x[mine], requires_grad=True)
            outputs = layer(inputs, training=True, mask=mask)
            (outputs * torch.tensor(upstream[mine])).sum().backward()
            key = f"{name}/{step}"
            saved[f"{key}/outputs"] = outputs.detach().numpy()
            saved[f"{key}/gradient"] = inputs.grad.numpy()
            for weight in layer.weights:
                saved[f"{key}/{weight.name}"] = weight.numpy()
    # Keras's own layer, as a control: its moving statistics are its
    # process's own.
    import keras

    control = keras.layers.BatchNormalization(momentum=0.0)
    x, _ = global_batch(0, 0, CASES[0][2])
    control(torch.tensor(x[2 * rank : 2 * rank + 2]), training=True)
    saved["keras/moving_mean"] = control.moving_mean.numpy()
    try:
        keras_bn.BatchNormalization(synchronized=3)(
            torch.tensor(x[2 * rank : 2 * rank + 2]), training=True
        )
    except ValueError as error:
        saved["error"] = np.array(str(error))
    for name, kwargs in DDP_RUNS.items():
        trained = train(torch.nn.parallel.DistributedDataParallel, kwargs, rank)
        for i, weight in enumerate(trained):
            saved[f"ddp_{name}/{i}"] = weight
    np.savez(os.path.join(out, f"rank{rank}.npz"), **saved)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ["KERAS_BACKEND"] = "torch"
    import torch.multiprocessing

    out, port = sys.argv[1], int(sys.argv[2])
    torch.multiprocessing.spawn(main, args=(out, port), nprocs=WORLD)
