"""Exact top-k for decoding: each device on its own rows of the batch, through blocks of values."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.constants import NEG_INF

Array = jax.Array


def per_device_top_k(x: Array, k: int) -> tuple[Array, Array]:
  """`lax.top_k` over the last axis of [B, N], each device on its own rows of the batch.

  Left to itself, XLA gathers the whole batch onto every device for a top-k (its partitioner does
  not split the sort); under a mesh whose logical rules shard "batch", this runs one top-k per
  device on its rows instead. Either way the top-k is `blockwise_top_k`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = nn.logical_to_mesh_axes(("batch", None))[0] if not mesh.empty else None
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return blockwise_top_k(x, k)
  spec = jax.sharding.PartitionSpec(axes)
  return jax.shard_map(lambda rows: blockwise_top_k(rows, k), mesh=mesh, in_specs=spec,
                       out_specs=(spec, spec))(x)


def blockwise_top_k(x: Array, k: int, block: int = 64) -> tuple[Array, Array]:
  """`lax.top_k(x, k)` of [B, N], exactly (ties to the lower index), through blocks of N.

  Split each row into blocks of `block` values: the k best values lie in the k blocks with the
  best maxima (a block holding one of them has a maximum at least as good), so a top-k over the
  block maxima, then over the values of those k blocks in their original order, finds them.
  XLA's CPU top-k sorts every value; over beam search's 4 * 8,000 candidates of 32 sentences
  this takes 0.16 ms instead of 1.2 ms.
  """
  rows, n = x.shape
  if n <= k * block:
    return tuple(jax.lax.top_k(x, k))
  if n % block:  # Padding at the end loses every tie, so it is never chosen over a real value.
    x = jnp.pad(x, ((0, 0), (0, block - n % block)), constant_values=NEG_INF)
  blocks = x.reshape(rows, -1, block)
  _, best = jax.lax.top_k(jnp.max(blocks, axis=-1), k)
  best = jnp.sort(best, axis=-1)  # In index order, so that ties still go to the lower index.
  values = jnp.take_along_axis(blocks, best[:, :, None], axis=1, mode="promise_in_bounds")
  top, position = jax.lax.top_k(values.reshape(rows, k * block), k)
  return top, jnp.take_along_axis(best, position // block, axis=1) * block + position % block
