"""Embeddings, positional encodings, the position-wise feed-forward network (sections 3.3-3.5)
and residual dropout (5.4).

Shapes: B batch, L length, D d_model, F d_ff, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jax import lax

from transformer_jax.config import TransformerConfig

Array = jax.Array


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
    return project_to_vocabulary(x.astype(self.config.compute_dtype), self.output_table())

  def output_table(self) -> Array:
    """The matrix as the pre-softmax projection uses it: [V, D], in the compute dtype."""
    return jnp.asarray(self.embedding).astype(self.config.compute_dtype)


def weight_gradient(x: Array, g: Array) -> Array:
  """x^T g for x [M, P] and g [M, Q]: a dense layer's weight gradient, [P, Q].

  XLA:CPU gives a product to its fast kernels (YNNPACK) only when the left operand is contracted
  over its last axis; x^T g as autodiff writes it contracts the first, and XLA then runs it in
  Eigen's kernels, 2 to 3 times slower on one core for the quick start's feed-forward layers
  ([4,096 x 256]^T [4,096 x 1,024]: 45 GFLOP/s against 87 on an AMD Zen 3). On a CPU the narrower
  operand is therefore transposed first (a copy of M x min(P, Q) floats), behind an optimization
  barrier so that XLA does not fold the transpose back into the product; elsewhere the product
  is left to the compiler, which takes transposed operands as they are.
  """

  def on_cpu(x, g):
    if x.shape[1] <= g.shape[1]:
      return lax.optimization_barrier(x.T) @ g
    return lax.optimization_barrier(lax.optimization_barrier(g.T) @ x).T

  return lax.platform_dependent(x, g, cpu=on_cpu, default=lambda x, g: x.T @ g)


@jax.custom_vjp
def project_to_vocabulary(x: Array, w: Array) -> Array:
  """[B, L, D] x [V, D] -> [B, L, V] float32 logits: x w^T.

  Autodiff's backward would compute the weight gradient as g^T x with the [B, L, V] logit gradient
  g as the left operand, and XLA on a CPU then writes g out transposed first: a copy of the largest
  array of the step (V x B x L floats, 131 MB for the quick start). Written as (x^T g)^T, the same
  product leads XLA to transpose x instead (D x B x L floats, 4 MB): the quick start's step is
  1.08x faster on an AMD Zen 4 (BENCHMARKS.md, "Train step"). The weight gradient is
  `weight_gradient`'s, as for the feed-forward layers. The gradients are the same products, with g
  rounded to the compute dtype as in any mixed-precision backward.
  """
  return jnp.einsum("BLD,VD->BLV", x, w, preferred_element_type=jnp.float32)


def _project_forward(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
  return project_to_vocabulary(x, w), (x, w)


def _project_backward(saved: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, w = saved
  g = g.astype(x.dtype)
  # Products in the compute dtype (accumulated in float32 by the backends): XLA:CPU folds the
  # transpose into the product, and has no such product of bfloat16 operands with a float32 result.
  dx = jnp.einsum("BLV,VD->BLD", g, w)
  dw_t = weight_gradient(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))  # [D, V]
  return dx, dw_t.T.astype(w.dtype)


project_to_vocabulary.defvjp(_project_forward, _project_backward)


@jax.custom_vjp
def dense_product(x: Array, w: Array) -> Array:
  """[..., P] x [P, Q] -> [..., Q], whose backward computes the weight gradient with
  `weight_gradient`: the feed-forward layers' product (`FeedForward`, through `dense_dot_general`).
  The small train step is 1.06x to 1.16x faster on an AMD Zen 3, base 1.03x to 1.04x
  (BENCHMARKS.md, "Train step")."""
  return jnp.einsum("...p,pq->...q", x, w)


def _dense_forward(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
  return dense_product(x, w), (x, w)


def _dense_backward(saved: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, w = saved
  dx = jnp.einsum("...q,pq->...p", g, w)
  dw = weight_gradient(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
  return dx, dw.astype(w.dtype)


dense_product.defvjp(_dense_forward, _dense_backward)


def dense_dot_general(x: Array, w: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
  """`nn.Dense`'s `dot_general`: `dense_product` for the product Dense makes (x's last axis with
  the kernel's first), `lax.dot_general` for anything else. The parameters stay Dense's own."""
  if (dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and w.ndim == 2
      and precision is None and preferred_element_type is None):
    return dense_product(x, w)
  return lax.dot_general(x, w, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


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


ACTIVATIONS = {"relu": nn.relu, "swish": nn.swish, "gelu": lambda x: nn.gelu(x, approximate=False)}


class FeedForward(nn.Module):
  """Position-wise feed-forward network, section 3.3: max(0, x W1 + b1) W2 + b2, with ReLU
  (`config.activation` may swap it for swish or GELU)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, L, D] -> [B, L, D] through an inner layer of width d_ff."""
    cfg = self.config
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        dot_general=dense_dot_general, name=name)
    h = ACTIVATIONS[cfg.activation](dense(cfg.d_ff, ("embed", "mlp"), "wi")(x))  # [B, L, F]
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
