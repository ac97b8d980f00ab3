"""Embeddings, positional encodings, the position-wise feed-forward network (sections 3.3-3.5)
and residual dropout (5.4).

Shapes: B batch, L length, D d_model, F d_ff, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jax import lax

from transformer_jax.config import TransformerConfig

Array = jax.Array
DotGeneral = Callable[..., Array]


def sinusoidal_encoding(positions: Array, d_model: int) -> Array:
  """The fixed positional encoding of section 3.5.

  PE(pos, 2i) = sin(pos / 10000^(2i / d_model)) and PE(pos, 2i + 1) = cos(pos / 10000^(2i / d_model)),
  interleaved as in the paper. Computed from the positions themselves, so it has no length limit
  and serves packed rows (positions restart per example) and cached decoding alike.

  Args:
    positions: [B, L] integer positions.
    d_model: width of the encoding.

  Returns:
    [B, L, D] float32.
  """
  two_i = np.arange(0, d_model, 2, dtype=np.float32)
  inv_freq = jnp.asarray(1.0 / (10000.0 ** (two_i / d_model)))  # [D/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, L, D/2, 2]
  return pe.reshape(*positions.shape, -1)[..., :d_model]


class SharedEmbedding(nn.Module):
  """One matrix for the source embedding, the target embedding and the pre-softmax projection.

  Section 3.4: the embeddings are multiplied by sqrt(d_model). The matrix is initialised with
  standard deviation d_model^-0.5 (as in tensor2tensor), so the scaled embeddings start at unit
  variance, comparable to the positional encodings they are added to.
  """

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.d_model**-0.5), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)

  def __call__(self, tokens: Array) -> Array:
    """[B, L] int tokens -> [B, L, D] embeddings times sqrt(d_model), in the compute dtype."""
    cfg = self.config
    # The table is gathered over its "embed" split (as FSDP gathers every weight before use) and
    # stays split over "vocab": each chip looks up the rows it holds and the partial results are
    # summed. Left to itself, XLA keeps the lookup's output split like the table's embed axis and
    # then rematerialises it in full on every chip to split it by batch.
    table = nn.with_logical_constraint(jnp.asarray(self.embedding), ("vocab", None))
    x = nn.with_logical_constraint(jnp.take(table, tokens, axis=0), ("batch", "length", "embed"))
    return (x * jnp.sqrt(jnp.float32(cfg.d_model)).astype(x.dtype)).astype(cfg.compute_dtype)

  def attend(self, x: Array) -> Array:
    """The pre-softmax linear layer: [B, L, D] -> [B, L, V] logits, accumulated in float32."""
    return jnp.einsum("BLD,VD->BLV", x.astype(self.config.compute_dtype), self.output_table(),
                      preferred_element_type=jnp.float32)

  def output_table(self) -> Array:
    """The matrix as the pre-softmax projection uses it: [V, D], in the compute dtype."""
    return jnp.asarray(self.embedding).astype(self.config.compute_dtype)


class PositionalEncoding(nn.Module):
  """Adds position information to [B, L, D] embeddings: sinusoidal (3.5) or learned (Table 3 E)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array) -> Array:
    cfg = self.config
    if cfg.positional_encoding == "sinusoidal":
      pe = sinusoidal_encoding(positions, cfg.d_model)
    else:
      table = self.param(
          "position_embedding",
          nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("length", "embed")),
          (cfg.max_len, cfg.d_model), cfg.weight_dtype)
      pe = jnp.take(table, positions, axis=0)
    return x + pe.astype(x.dtype)


NONLINEARITIES = {"relu": nn.relu, "swish": nn.swish, "gelu": lambda x: nn.gelu(x, approximate=False)}


class FeedForward(nn.Module):
  """Position-wise feed-forward network, section 3.3: max(0, x W1 + b1) W2 + b2, with ReLU
  (`config.activation` may swap it for swish or GELU).

  `dot_general` is the product of its two `nn.Dense` layers (`lax.dot_general` by default);
  the model may pass one with a faster backward (`kernels.dense_dot_general`).
  """

  config: TransformerConfig
  dot_general: DotGeneral = lax.dot_general

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, L, D] -> [B, L, D] through an inner layer of width d_ff."""
    cfg = self.config
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        dot_general=self.dot_general, name=name)
    h = NONLINEARITIES[cfg.activation](dense(cfg.d_ff, ("embed", "mlp"), "wi")(x))  # [B, L, F]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(cfg.d_model, ("mlp", "embed"), "wo")(h)


class Dropout(nn.Module):
  """Inverted dropout (section 5.4) whose mask takes 16 random bits per unit instead of 32.

  Same contract as `flax.linen.Dropout`: keys from the "dropout" rng stream, the identity when
  `deterministic`, kept units scaled so that the expected output equals the input. flax draws a
  32-bit uniform per unit from threefry, and threefry's cost is per 32-bit word; splitting each
  word into two 16-bit uniforms halves it (the saving on a train step is measured by
  `bench/dropout.py`; figures in BENCHMARKS.md). The keys stay threefry's, so masks are the same
  on every backend and for every sharding of the batch.

  A unit is kept with probability k = round((1 - rate) * 2^16) / 2^16, within 2^-17 of 1 - rate
  (0.8999939 for rate 0.1), and scaled by 1 / k.
  """

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    threshold = max(1, round((1.0 - self.rate) * 2**16))
    key = self.make_rng("dropout")
    *lead, width = x.shape
    if width % 2 == 0:  # Both halves of each word, laid side by side along the last axis.
      bits = jax.random.bits(key, (*lead, width // 2), jnp.uint32)
      uniforms = jnp.stack([bits & 0xFFFF, bits >> 16], axis=-1).reshape(x.shape)
    else:
      uniforms = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    # The scale multiplies in float32: rounded to bfloat16, 1/0.9 would be 1.109375 (-0.16%).
    kept = (x.astype(jnp.float32) * jnp.float32(2**16 / threshold)).astype(x.dtype)
    return lax.select(uniforms < jnp.uint32(threshold), kept, jnp.zeros_like(x))


def layer_norm(config: TransformerConfig, name: str) -> nn.LayerNorm:
  """A LayerNorm whose scale and offset carry the logical axis name "embed"."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype, param_dtype=config.weight_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name)
