"""Scaled dot-product and multi-head attention (section 3.2), their masks and the decoding cache.

Shapes: B batch, T query length, S key/value length, N heads, K query/key width per head (d_k),
H value width per head (d_v), D d_model.

Masks are boolean, broadcastable to [B, N, T, S], True where a query may attend to a key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from transformer_jax.config import TransformerConfig
from transformer_jax.constants import MASK_VALUE, PAD_ID

# Names of the "cache" collection's variables. Self-attention fills its positions as decoding
# advances (empty at the start); encoder-decoder attention stores its projection of the encoder
# output once. `model.init_cache` tells the kinds apart by these names, whatever the layers are called.
SELF_CACHE = ("cached_key", "cached_value")
ENCODER_CACHE = ("encoded_key", "encoded_value")
# A self-attention cache holds, for each example, L positions of C slots each. C is 1 for a batch
# of B rows; a beam search may give each example one slot per beam (C = K), its rows being
# b * C .. b * C + C - 1. Keys are stored [B, N, K, L * C] and values [B, N, L * C, H], heads-major
# and position-major (slot c of position p at p * C + c): the C slots of a position are written
# together, and the whole cache is read as it is stored, by an example's C rows' queries folded
# side by side (`scaled_dot_product_attention`'s cache layout). The decoder's key slots
# (`slot_mask`), [B, C, L] int32, say where each row's keys are.
KEY_SLOTS = "key_slots"
# The axis that holds a cache's positions (L * C), by variable.
SELF_CACHE_LENGTH_AXIS = {SELF_CACHE[0]: 3, SELF_CACHE[1]: 2}

Array = jax.Array


def segment_mask(q_segments: Array, kv_segments: Array) -> Array:
  """Padding mask, and for packed rows the mask that keeps examples apart.

  A row holds one or more examples, each with its own segment id (1, 2, ...); padding has
  segment id PAD_ID (0). A real query sees the keys of its own segment. A padding query sees every
  real key, so that no row of the softmax is empty (its output is never used).

  Args:
    q_segments: [B, T] segment ids of the queries.
    kv_segments: [B, S] segment ids of the keys.

  Returns:
    [B, 1, T, S] boolean mask.
  """
  q = q_segments[:, :, None]
  kv = kv_segments[:, None, :]
  mask = ((q == kv) | (q == PAD_ID)) & (kv != PAD_ID)
  return mask[:, None, :, :]


def causal_mask(length: int) -> Array:
  """[1, 1, T, T] mask that lets position t attend to positions <= t only (section 3.2.3)."""
  return jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]


def scaled_dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *,
                                 cache_layout: bool = False) -> tuple[Array, Array]:
  """softmax(Q K^T / sqrt(d_k)) V, section 3.2.1, with the logits and the softmax in float32.

  Args:
    q: [B, T, N, K] queries.
    k: [B, S, N, K] keys ([B, N, K, S], heads-major and transposed, with `cache_layout`).
    v: [B, S, N, H] values ([B, N, S, H] with `cache_layout`).
    mask: boolean, broadcastable to [B, N, T, S]; masked logits are set to MASK_VALUE.
    cache_layout: the layout of the decoding caches, which the two products read as they are
      stored, each a batched matrix product with its right operand contracted on its rows. With
      [B, S, N, K] XLA would transpose the whole cache at every decoding step; keys stored
      [B, N, S, K] make XLA:CPU's product Q K^T 2 to 3 times slower for beam search's folded
      queries (T = beam; BENCHMARKS.md, "Against CTranslate2"). The queries are still
      [B, T, N, K] and the output [B, T, N, H].

  Returns:
    The attended values [B, T, N, H] in v's dtype, and the attention weights [B, N, T, S] (float32).
  """
  if cache_layout:
    q = jnp.swapaxes(q, 1, 2)  # [B, N, T, K], T small.
    logits = jnp.einsum("BNTK,BNKS->BNTS", q, k, preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("BTNK,BSNK->BNTS", q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1)
  if cache_layout:
    out = jnp.swapaxes(jnp.einsum("BNTS,BNSH->BNTH", weights.astype(v.dtype), v), 1, 2)
  else:
    out = jnp.einsum("BNTS,BSNH->BTNH", weights.astype(v.dtype), v)
  return out, weights


class Projection(nn.Module):
  """A learned linear map written as an einsum: kernel `shape` whose first `in_dims` axes are
  contracted with the input, plus a bias over the remaining axes. Glorot-uniform initialised with
  the fans of the matrix it stands for (d_model x h*d_k for W^Q, h*d_v x d_model for W^O)."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]  # Logical axis names of the kernel.
  equation: str
  in_dims: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.xavier_uniform(in_axis=tuple(range(self.in_dims)),
                                          out_axis=tuple(range(self.in_dims, len(self.shape))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape,
                        self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims:]),
                      self.shape[self.in_dims:], self.param_dtype)
    y = jnp.einsum(self.equation, x.astype(self.dtype), jnp.asarray(kernel, self.dtype))
    return y + jnp.asarray(bias, self.dtype)


def fold_beams(q: Array, copies: int) -> Array:
  """[B * C, T, N, K] queries -> [B, C * T, N, K]: the C rows of each example side by side."""
  return q.reshape(q.shape[0] // copies, copies * q.shape[1], *q.shape[2:])


def fold_beams_mask(mask: Array, copies: int) -> Array:
  """The mask of `fold_beams`' queries: [B * C, 1, T, S] -> [B, 1, C * T, S]."""
  rows, _, t, s = mask.shape
  return mask.reshape(rows // copies, copies, t, s).reshape(rows // copies, 1, copies * t, s)


def slot_mask(key_slots: Array, index: Array, length: int) -> Array:
  """The mask of cached self-attention, with `length` queries from position `index` on.

  `key_slots` [B, C, L] says, for each of an example's C rows (hypotheses) and each output
  position, which of the example's C cache slots holds that position's keys. A beam search that
  keeps keys where they were written reorders only this small index (`translation.IN_PLACE`),
  never the cache. Query t of row c sees slot c' at position p when p <= index + t (causal) and
  key_slots[b, c, p] == c'.

  Returns:
    [B, 1, C * T, L * C] boolean: the queries folded as `fold_beams` folds rows, the keys as the
    cache stores them.
  """
  B, C, L = key_slots.shape
  query_pos = index + jnp.arange(length)
  causal = jnp.arange(L)[None, :] <= query_pos[:, None]  # [T, L]
  own = key_slots[..., None] == jnp.arange(C)  # [B, C, L, C']
  mask = own[:, :, None] & causal[None, None, :, :, None]  # [B, C, T, L, C']
  return mask.reshape(B, 1, C * length, L * C)


class MultiHeadAttention(nn.Module):
  """Multi-head attention, section 3.2.2: h heads projected from d_model, concatenated, projected.

  The same module serves the encoder's self-attention, the decoder's masked self-attention and the
  decoder's attention over the encoder output (queries from the decoder, keys and values from the
  encoder). With `decode_index` set it runs one decoding step (or a chunk) against a cache in the
  "cache" collection: for self-attention the keys and values of earlier positions, for
  encoder-decoder attention the projected encoder output, computed once.
  """

  config: TransformerConfig
  self_attention: bool = True

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None, *,
               decode_index: Array | None = None) -> Array:
    """Attends from `inputs_q` [B, T, D] to `inputs_kv` [B, S, D]; returns [B, T, D].

    Args:
      inputs_q: [B, T, D] the queries' inputs.
      inputs_kv: [B, S, D] the keys' and values' inputs (the same array for self-attention).
      mask: boolean, broadcastable to [B, N, T, S]. For cached self-attention, the decoder's
        `slot_mask` over the cache instead ([B / C, 1, C * T, L * C], its rows folded).
      decode_index: for incremental decoding, the position of the first query in the output
        sequence (an int32 scalar). The first call creates the cache with the length of its input.
    """
    cfg = self.config
    N, K, H, D = cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v, cfg.d_model
    q = self._project_in(K, "query", inputs_q)  # [B, T, N, K]
    copies = 1
    if decode_index is not None and not self.self_attention:
      k, v = self._cached_encoder_kv(inputs_kv)
      # Beam search keeps the encoder's keys and values once per example, not once per beam: the
      # K beams of an example (rows b * K .. b * K + K - 1) become K times as many queries.
      copies = q.shape[0] // k.shape[0]
      if copies > 1:
        mask = fold_beams_mask(mask, copies)
    else:
      k = self._project_in(K, "key", inputs_kv)  # [B, S, N, K]
      v = self._project_in(H, "value", inputs_kv)  # [B, S, N, H]
      if decode_index is not None:
        # An example's C slots are read together, by its C rows' queries folded side by side;
        # `mask` (`slot_mask`) is already folded.
        k, v = self._update_self_cache(k, v, decode_index)
        copies = q.shape[0] // k.shape[0]
    if copies > 1:
      q = fold_beams(q, copies)

    # A decoding step attends in the plain products whatever `attention_impl` says: its few
    # queries against the cache gain nothing from a fused kernel (which pays off on long blocks of
    # queries and keys, BENCHMARKS.md), and the cache is laid out for these products.
    cache_layout = decode_index is not None
    if cfg.attention_impl == "einsum" or cache_layout:
      out, weights = scaled_dot_product_attention(q, k, v, mask, cache_layout=cache_layout)
      self.sow("intermediates", "attention_weights", weights)
    else:
      # "dot_product" leaves the kernel to jax (on an H200 with jax 0.11.2 it chose XLA's own, not
      # cuDNN's: BENCHMARKS.md); "cudnn" asks for cuDNN's fused kernel.
      implementation = "cudnn" if cfg.attention_impl == "cudnn" else None
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    if copies > 1:
      out = out.reshape(out.shape[0] * copies, -1, *out.shape[2:])  # Unfold: [B*K, T, N, H].

    # W^O: concatenate the heads and project back to d_model.
    return Projection((N, H, D), ("heads", "kv", "embed"), "BTNH,NHD->BTD", 2, cfg.compute_dtype,
                      cfg.weight_dtype, name="out")(out)

  def _update_self_cache(self, k: Array, v: Array, index: Array) -> tuple[Array, Array]:
    """Writes this chunk's keys and values [B * C, T, N, K] at `index`, each row in its own slot;
    returns the whole cache, keys [B, N, K, L * C] and values [B, N, L * C, H] (see KEY_SLOTS).
    The first call creates it with the chunk's length and one slot per row."""
    rows, T, N = k.shape[:3]
    cached_k = self.variable("cache", SELF_CACHE[0], jnp.zeros, (rows, N, k.shape[-1], T), k.dtype)
    cached_v = self.variable("cache", SELF_CACHE[1], jnp.zeros, (rows, N, T, v.shape[-1]), v.dtype)
    B = cached_k.value.shape[0]
    if rows % B:
      raise ValueError(f"{rows} rows against a cache of {B} examples")
    C = rows // B
    # [B * C, T, N, K] -> [B, N, T * C, K], position-major: small arrays (T is 1 but for a chunk).
    k, v = (x.reshape(B, C, T, N, x.shape[-1]).transpose(0, 3, 2, 1, 4).reshape(B, N, T * C, -1)
            for x in (k, v))
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, jnp.swapaxes(k, 2, 3),
                                                  (0, 0, 0, index * C))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, 0, index * C, 0))
    return cached_k.value, cached_v.value

  def _project_in(self, head_dim: int, name: str, x: Array) -> Array:
    """W_i^Q, W_i^K or W_i^V of every head at once: [B, L, D] -> [B, L, N, head_dim]."""
    cfg = self.config
    return Projection((cfg.d_model, cfg.num_heads, head_dim), ("embed", "heads", "kv"),
                      "BLD,DNK->BLNK", 1, cfg.compute_dtype, cfg.weight_dtype, name=name)(x)

  def _cached_encoder_kv(self, encoded: Array) -> tuple[Array, Array]:
    """The projected encoder output in the cache layout of `scaled_dot_product_attention`, keys
    [B, N, K, S] and values [B, N, S, H]: computed on the first call, read from the cache after."""
    if self.has_variable("cache", ENCODER_CACHE[0]):
      return self.get_variable("cache", ENCODER_CACHE[0]), self.get_variable("cache", ENCODER_CACHE[1])
    cfg = self.config
    k = self._project_in(cfg.head_dim_k, "key", encoded).transpose(0, 2, 3, 1)
    v = jnp.swapaxes(self._project_in(cfg.head_dim_v, "value", encoded), 1, 2)
    self.put_variable("cache", ENCODER_CACHE[0], k)
    self.put_variable("cache", ENCODER_CACHE[1], v)
    return k, v
