"""Replicas and devices: the one place where backends differ.

The layer needs two facts about how a training step is spread over devices,
and each backend exposes them differently:

- **How the batch it sees is split over devices** (`batch_shards`). Under
  `keras.distribution` on JAX, the step runs on global arrays whose batch
  axis is split into equal consecutive shards, one per device along the
  distribution's batch mesh axis; the layer groups statistics per shard
  itself. Elsewhere the layer sees one device's batch: 1.
- **How to add a statistic up over replicas** (`replica_sum_fn`). Inside a
  `tf.distribute` replica context on TensorFlow, each replica runs the step
  on its own slice of the batch; an all-reduce adds the sums up. Elsewhere
  there is nothing to add: JAX already sees the global batch, and PyTorch
  has no Keras data-parallel path (a single process sees the whole batch).
"""

import keras


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
    current `tf.distribute` replica context, or `None` when there is one
    replica or none to sum over."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None

    def replica_sum(value):
        return context.all_reduce(tf.distribute.ReduceOp.SUM, value)

    return replica_sum


def check_synchronized(synchronized):
    """Refuses `synchronized=True` where it would silently mean less than
    documented: a `torch.distributed` job with several processes, where each
    process would normalize with its own statistics."""
    if not synchronized or keras.backend.backend() != "torch":
        return
    import torch.distributed

    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise ValueError(
            "`synchronized=True` is not supported in a torch.distributed job "
            "with several processes on the PyTorch backend: each process "
            "would normalize with its own statistics. Received: "
            f"synchronized=True, world_size="
            f"{torch.distributed.get_world_size()}"
        )
