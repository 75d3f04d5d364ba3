"""Replicas and devices: the one place where backends differ.

The layer needs three facts about how a training step is spread over
devices, and each backend exposes them differently:

- **How the batch it sees is split over devices** (`batch_shards`). Under
  `keras.distribution` on JAX, the step runs on global arrays whose batch
  axis is split into equal consecutive shards, one per device along the
  distribution's batch mesh axis; the layer groups statistics per shard
  (or group of shards) itself. Elsewhere the layer sees one device's
  batch: 1.
- **How to add a statistic up over replicas** (`replica_sum_fn`). Inside a
  `tf.distribute` replica context on TensorFlow, each replica runs the step
  on its own slice of the batch; an all-reduce adds the sums up. In a
  `torch.distributed` job on PyTorch (`DistributedDataParallel`, a process
  per device), each process sees its own batch likewise, and a
  differentiable all-reduce over the default process group adds them up.
  Elsewhere there is nothing to add: JAX already sees the global batch.
- **Which replica this is** (`_replica`), for sums over a group of them.

`moments_arguments` turns them, with the layer's `synchronized`, into the
arguments of `_moments.moments`.
"""

import functools

import keras
from keras import ops


def moments_arguments(synchronized, virtual_batch_size):
    """The keyword arguments of `_moments.moments` that spread statistics
    over devices, for the layer's `synchronized` (`False`, `True`, or the
    number of consecutive devices of a group) and `virtual_batch_size`
    (ghost batches never cross a device)."""
    if keras.backend.backend() == "jax":
        devices, replica_sum = batch_shards(), None
    else:
        replica_sum = replica_sum_fn()
        devices = 1 if replica_sum is None else _replica()[1]
    if devices == 1:
        return {}
    if synchronized is True:
        group = devices
    elif synchronized is False:
        group = 1
    else:
        group = synchronized
        if devices % group:
            raise ValueError(
                "`synchronized` must divide the number of devices the "
                f"training step runs on. Received: synchronized={group} on "
                f"{devices} devices"
            )
    if virtual_batch_size is not None:
        group = 1
    if replica_sum is None:
        return {"num_shards": devices // group}
    if group == 1:
        return {"total_sum": replica_sum}
    if group == devices:
        return {"group_sum": replica_sum}

    def group_sum(value):
        # The sum over this replica's group, as one all-reduce of a slot
        # per group, only this replica's own filled.
        index, replicas = _replica()
        index = index // group
        groups = replicas // group
        slots = ops.reshape(
            ops.one_hot(index, groups, dtype=value.dtype),
            (groups,) + (1,) * len(value.shape),
        )
        summed = replica_sum(slots * ops.expand_dims(value, 0))
        return ops.take(summed, index, axis=0)

    def total_sum(value):
        # Every group's totals, once per replica of it.
        return replica_sum(value) / group

    return {"group_sum": group_sum, "total_sum": total_sum}


def batch_shards():
    """The number of devices the batch axis of the layer's inputs is split
    over: the size of the batch mesh axis of the current JAX
    `keras.distribution`, else 1."""
    if keras.backend.backend() != "jax":
        return 1
    distribution = keras.distribution.distribution()
    if distribution is None or distribution.batch_dim_name is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def replica_sum_fn():
    """Returns the function that sums a tensor over the replicas of the
    current `tf.distribute` replica context or `torch.distributed` job, or
    `None` when there is one replica or none to sum over."""
    backend = keras.backend.backend()
    if backend == "torch":
        return _torch_replica_sum()
    if backend != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None

    def replica_sum(value):
        return context.all_reduce(tf.distribute.ReduceOp.SUM, value)

    return replica_sum


def _replica():
    """This replica's index and the number of replicas, under
    `tf.distribute` or `torch.distributed`."""
    if keras.backend.backend() == "torch":
        import torch.distributed

        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


def _torch_replica_sum():
    import torch.distributed

    if not (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return None
    return _torch_all_reduce().apply


@functools.cache
def _torch_all_reduce():
    """An all-reduce sum over the default process group that gradients go
    through: the gradient of each process's input is the sum of every
    process's gradient of the total, an all-reduce too."""
    import torch
    import torch.distributed

    class AllReduceSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            value = value.clone(memory_format=torch.contiguous_format)
            torch.distributed.all_reduce(value)
            return value

        @staticmethod
        def backward(ctx, gradient):
            return AllReduceSum.apply(gradient)

    return AllReduceSum
