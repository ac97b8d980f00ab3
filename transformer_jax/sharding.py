"""Device mesh, logical axis rules, and the shardings of the train state and of batches.

The model names every parameter axis (`vocab`, `embed`, `heads`, `kv`, `mlp`, `length`) and every
activation axis (`batch`, `length`, `embed`, ...). One table, `config.mesh.rules`, maps those
names onto the mesh axes `data`, `fsdp` and `tensor`, so data parallelism, fully sharded data
parallelism and tensor parallelism are settings, not code. A single device is a one-device mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transformer_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # The batch is split over both; `tensor` holds replicas of it.


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """A mesh of shape (data, fsdp, tensor) from the config; one size may be -1 (the rest).

  Raises:
    ConfigError: if the sizes do not multiply to the number of devices.
  """
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % known:
      raise ConfigError(f"{len(devices)} devices do not split into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"there are {len(devices)}")
  # Auto axes: XLA propagates shardings from the ones we constrain (parameters, batch, activations).
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def axis_rules(mesh_config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The logical-to-mesh axis table from the config, as flax expects it."""
  return tuple((name, None if axes is None else tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_config.rules)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves carry logical names (flax `LogicallyPartitioned`);
  leaves without names (step counters, optimiser scalars) are replicated."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a batch split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_multiple(mesh: Mesh) -> int:
  """The number of shards a batch's rows are split into; batch sizes must be a multiple of it."""
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def row_split(mesh: Mesh) -> dict[str, int]:
  """How this process takes its rows of a global batch: the `multiple_of`, `process_index` and
  `process_count` arguments of `data.pipeline.EpochBatches`."""
  return {"multiple_of": batch_multiple(mesh), "process_index": jax.process_index(),
          "process_count": jax.process_count()}


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows of every array into one global array sharded over the mesh."""
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in local.items():
    if np.ndim(value) == 0:
      continue  # Scalars (such as the epoch number) are bookkeeping, not model inputs.
    global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
