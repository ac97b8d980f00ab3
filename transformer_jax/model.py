"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), section 3, top-down.

Shape legend, used in einsum strings and docstrings throughout the package:
  B batch, S source length, T target length, D d_model, H heads, K head size, F d_ff, V vocabulary.

The file reads in the order of the paper: the encoder-decoder `Transformer` (section 3.1 and the
shared embedding of 3.4), then its `Encoder` and `Decoder` stacks, then their layers, then the
residual connection around every sub-layer (5.4). Attention (3.2) lives in `attention.py`;
embeddings, positions and the feed-forward network (3.3-3.5) in `layers.py`.

Inputs are int32 token arrays with PAD_ID = 0 for padding. Optional segment ids and positions
describe packed rows (several examples in one row); by default they follow from the padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util
from jax import lax

from transformer_jax import kernels
from transformer_jax.attention import (KEY_SLOTS, SELF_CACHE, MultiHeadAttention, causal_mask,
                                      segment_mask, slot_mask)
from transformer_jax.config import TransformerConfig
from transformer_jax.constants import BOS_ID, PAD_ID
from transformer_jax.layers import Dropout, FeedForward, PositionalEncoding, SharedEmbedding, layer_norm

Array = jax.Array


class Transformer(nn.Module):
  """The encoder-decoder Transformer, with one embedding matrix shared three ways (section 3.4).

  `__call__(src, tgt)` is the training pass: the decoder reads the targets shifted right by one
  position, so the logits at t predict tgt[t]. `encode` and `decode` are the two halves, for
  decoding; `decode` with `decode_index` runs incrementally against a key/value cache.
  """

  config: TransformerConfig

  def setup(self):
    self.embed = SharedEmbedding(self.config)
    self.encoder = Encoder(self.config, self.embed)
    self.decoder = Decoder(self.config, self.embed)

  def __call__(self, src: Array, tgt: Array, *, src_segments: Array | None = None,
               src_positions: Array | None = None, tgt_segments: Array | None = None,
               tgt_positions: Array | None = None, train: bool = False) -> Array:
    """Teacher-forced pass: [B, S] sources and [B, T] targets -> [B, T, V] float32 logits.

    logits[:, t] is the prediction of tgt[:, t] from the source and tgt[:, :t].
    """
    return self._teacher_forced(src, tgt, None, src_segments=src_segments,
                                src_positions=src_positions, tgt_segments=tgt_segments,
                                tgt_positions=tgt_positions, train=train)

  def features(self, src: Array, tgt: Array, *, src_segments: Array | None = None,
               src_positions: Array | None = None, tgt_segments: Array | None = None,
               tgt_positions: Array | None = None, train: bool = False
               ) -> tuple[Array, Array, Array | None]:
    """The teacher-forced pass up to the pre-softmax projection, for a loss that projects the
    decoder's output itself (`steps.batch_metrics`): `self(src, tgt)` is y table^T + bias.

    Returns:
      y [B, T, D] (the last decoder layer's output, in the compute dtype), table [V, D] (the shared
      embedding in the compute dtype) and bias [V] (the logits bias, or None).
    """
    return self._teacher_forced(src, tgt, lambda y, table, bias: (y, table, bias),
                                src_segments=src_segments, src_positions=src_positions,
                                tgt_segments=tgt_segments, tgt_positions=tgt_positions, train=train)

  def _teacher_forced(self, src, tgt, head, *, src_segments, src_positions, tgt_segments,
                      tgt_positions, train):
    tgt_segments = _default_segments(tgt, tgt_segments)
    tgt_positions = _default_positions(tgt, tgt_positions)
    encoded = self.encode(src, src_segments=src_segments, src_positions=src_positions, train=train)
    tgt_in = shift_right(tgt, tgt_positions)
    src_segments = _default_segments(src, src_segments)
    return self.decoder(encoded, src_segments, tgt_in, tgt_segments, tgt_positions, train=train,
                        head=head)

  def encode(self, src: Array, *, src_segments: Array | None = None,
             src_positions: Array | None = None, train: bool = False) -> Array:
    """[B, S] source tokens -> [B, S, D] encoder output.

    Args:
      src: [B, S] int32 tokens, PAD_ID after the end.
      src_segments: [B, S] segment ids of packed rows; default 1 on tokens and 0 on padding.
      src_positions: [B, S] positions (restarting per segment in packed rows); default 0..S-1.
      train: enables dropout (from the "dropout" rng stream).
    """
    src_segments = _default_segments(src, src_segments)
    src_positions = _default_positions(src, src_positions)
    return self.encoder(src, src_segments, src_positions, train=train)

  def decode(self, encoded: Array, src: Array, tgt_in: Array, *, src_segments: Array | None = None,
             tgt_segments: Array | None = None, tgt_positions: Array | None = None,
             train: bool = False, decode_index: Array | None = None) -> Array:
    """Decoder inputs [B, T] -> [B, T, V] float32 logits of the next tokens.

    Args:
      encoded: [B, S, D] the encoder output.
      src: [B, S] the source tokens (their padding masks encoder-decoder attention).
      tgt_in: [B, T] decoder inputs: BOS_ID, then the target tokens so far.
      src_segments: as in `encode`.
      tgt_segments: as in `encode`; defaults to the padding of `tgt_in`.
      tgt_positions: as in `encode`.
      train: enables dropout.
      decode_index: incremental decoding: `tgt_in` holds the tokens at positions
        decode_index .. decode_index + T - 1, and the "cache" collection (mutable) holds the keys
        and values of the positions before. The first call creates the cache, sized by its input;
        see `init_cache`.
    """
    src_segments = _default_segments(src, src_segments)
    if decode_index is not None:
      tgt_positions = decode_index + jnp.broadcast_to(jnp.arange(tgt_in.shape[1]), tgt_in.shape)
      tgt_segments = jnp.ones_like(tgt_in)
    tgt_segments = _default_segments(tgt_in, tgt_segments)
    tgt_positions = _default_positions(tgt_in, tgt_positions)
    return self.decoder(encoded, src_segments, tgt_in, tgt_segments, tgt_positions, train=train,
                        decode_index=decode_index)


class Encoder(nn.Module):
  """Embeddings plus positions, dropout, then N encoder layers (section 3.1)."""

  config: TransformerConfig
  embed: SharedEmbedding

  @nn.compact
  def __call__(self, src: Array, segments: Array, positions: Array, *, train: bool) -> Array:
    """[B, S] tokens -> [B, S, D] encoder output."""
    cfg = self.config
    x = PositionalEncoding(cfg, name="positions")(self.embed(src), positions)
    x = Dropout(cfg.dropout_rate)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    mask = segment_mask(segments, segments)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask, train=train)
    if cfg.norm_position == "pre":
      x = layer_norm(cfg, "final_norm")(x)
    return x


class Decoder(nn.Module):
  """Embeddings plus positions, dropout, N decoder layers, and the shared pre-softmax projection."""

  config: TransformerConfig
  embed: SharedEmbedding

  @nn.compact
  def __call__(self, encoded: Array, src_segments: Array, tgt_in: Array, tgt_segments: Array,
               positions: Array, *, train: bool, decode_index: Array | None = None,
               head: Callable[[Array, Array, Array | None], Any] | None = None) -> Any:
    """[B, T] decoder inputs -> [B, T, V] float32 logits of the next tokens.

    With `head`, returns `head(y, table, bias)` instead: the last layer's output y [B, T, D] and
    the pre-softmax projection's weights (the embedding matrix [V, D] in the compute dtype, and the
    logits bias [V] or None), for a loss that never holds all the logits (`Transformer.features`).
    """
    cfg = self.config
    y = PositionalEncoding(cfg, name="positions")(self.embed(tgt_in), positions)
    y = Dropout(cfg.dropout_rate)(y, deterministic=not train)
    y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
    # Padding and packing mask, and the causal mask that keeps the decoder auto-regressive (3.2.3).
    # With a cache, self-attention's mask comes from the decode position and the key slots instead.
    if decode_index is None:
      self_mask = segment_mask(tgt_segments, tgt_segments) & causal_mask(tgt_in.shape[1])
    else:
      self_mask = self._cached_self_mask(tgt_in, decode_index)
    cross_mask = segment_mask(tgt_segments, src_segments)
    for i in range(cfg.num_layers):
      y = DecoderLayer(cfg, name=f"layer_{i}")(
          y, encoded, self_mask, cross_mask, train=train, decode_index=decode_index)
    if cfg.norm_position == "pre":
      y = layer_norm(cfg, "final_norm")(y)
    bias = None
    if cfg.logits_bias:
      bias = self.param("logits_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                        (cfg.vocab_size,), cfg.weight_dtype)
    if head is not None:
      return head(y.astype(cfg.compute_dtype), self.embed.output_table(), bias)
    logits = self.embed.attend(y)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def _cached_self_mask(self, tgt_in: Array, index: Array) -> Array:
    """Self-attention's mask over the cache (`attention.slot_mask`), after recording that each
    row's keys at positions index .. index + T - 1 are in its own slot. The key slots are created
    with the cache: one slot per row, the first call's length (see attention.KEY_SLOTS)."""
    rows, T = tgt_in.shape
    slots = self.variable("cache", KEY_SLOTS, jnp.zeros, (rows, 1, T), jnp.int32)
    B, C, _ = slots.value.shape
    own = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[:, None], (B, C, T))
    slots.value = lax.dynamic_update_slice(slots.value, own, (0, 0, index))
    return slot_mask(slots.value, index, T)


class EncoderLayer(nn.Module):
  """Section 3.1: multi-head self-attention, then the position-wise feed-forward network."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, train: bool) -> Array:
    """[B, S, D] -> [B, S, D]; `mask` [B, 1, S, S] says which source positions may be attended."""
    cfg = self.config
    x = residual(cfg, x, lambda y: MultiHeadAttention(cfg, name="self_attention")(y, y, mask),
                 "self_attention", train)
    x = residual(cfg, x, feed_forward(cfg), "feed_forward", train)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Section 3.1: masked self-attention, attention over the encoder output, feed-forward."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array, *,
               train: bool, decode_index: Array | None = None) -> Array:
    """[B, T, D] -> [B, T, D], attending to `encoded` [B, S, D] through `cross_mask` [B, 1, T, S]."""
    cfg = self.config
    self_attn = MultiHeadAttention(cfg, name="self_attention")
    cross_attn = MultiHeadAttention(cfg, self_attention=False, name="cross_attention")
    y = residual(cfg, y, lambda z: self_attn(z, z, self_mask, decode_index=decode_index),
                 "self_attention", train)
    y = residual(cfg, y, lambda z: cross_attn(z, encoded, cross_mask, decode_index=decode_index),
                 "cross_attention", train)
    y = residual(cfg, y, feed_forward(cfg), "feed_forward", train)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


def feed_forward(cfg: TransformerConfig) -> FeedForward:
  """The position-wise feed-forward network (section 3.3) of a layer.

  The model's one switch to a speed kernel: with `config.cpu_kernels` (the default) its two
  products take `kernels.dense_dot_general`, whose backward XLA:CPU runs faster; the parameters,
  values and gradients are those of plain `nn.Dense` layers.
  """
  dot_general = kernels.dense_dot_general if cfg.cpu_kernels else lax.dot_general
  return FeedForward(cfg, dot_general=dot_general, name="feed_forward")


def residual(cfg: TransformerConfig, x: Array, sublayer: Callable[[Array], Array], name: str,
             train: bool) -> Array:
  """Section 5.4: LayerNorm(x + Dropout(Sublayer(x))) (post-LN), or the pre-LN variant
  x + Dropout(Sublayer(LayerNorm(x))).

  Called inside a layer's `__call__`, so its LayerNorm (`{name}_norm`) belongs to that layer.
  """
  dropout = Dropout(cfg.dropout_rate)
  if cfg.norm_position == "pre":
    return x + dropout(sublayer(layer_norm(cfg, f"{name}_norm")(x)), deterministic=not train)
  return layer_norm(cfg, f"{name}_norm")(x + dropout(sublayer(x), deterministic=not train))


def shift_right(tgt: Array, positions: Array) -> Array:
  """Decoder inputs from targets (section 3.1): shifted right by one, BOS_ID at every start.

  A position 0 marks the start of an example, which in packed rows is not only the first column.
  """
  shifted = jnp.pad(tgt, ((0, 0), (1, 0)), constant_values=BOS_ID)[:, :-1]
  return jnp.where(positions == 0, BOS_ID, shifted)


def init_cache(model: Transformer, params: Any, encoded: Array, src: Array, max_len: int) -> Any:
  """A decoding cache for `max_len` output positions of a batch of sources.

  The encoder-decoder attention layers store their projection of `encoded` here once, so decoding
  steps do not recompute it; the self-attention slots start empty and fill as decoding advances.

  Returns:
    The "cache" collection to pass (mutable) to `decode` with `decode_index`.
  """
  batch = src.shape[0]
  decode = lambda tgt_in, cache: model.apply(
      {"params": params, **cache}, encoded, src, tgt_in, decode_index=jnp.int32(0),
      method=Transformer.decode, mutable=["cache"])[1]["cache"]
  # The self-attention caches take their length from the first call's input: get their shapes from
  # a full-length call without running it, and start them at zero. They are told apart from the
  # encoder-decoder entries by their variable names (attention.SELF_CACHE and KEY_SLOTS).
  shapes = jax.eval_shape(decode, jnp.zeros((batch, max_len), jnp.int32), {})
  self_only = traverse_util.unflatten_dict({
      path: jnp.zeros(s.shape, s.dtype)
      for path, s in traverse_util.flatten_dict(shapes).items()
      if path[-1] in (*SELF_CACHE, KEY_SLOTS)
  })
  # One real step on a placeholder token then fills the encoder-decoder entries; the placeholder's
  # keys and values at position 0 are overwritten by the first decoding step.
  return decode(jnp.zeros((batch, 1), jnp.int32), {"cache": self_only})


def _default_segments(tokens: Array, segments: Array | None) -> Array:
  return (tokens != PAD_ID).astype(jnp.int32) if segments is None else segments


def _default_positions(tokens: Array, positions: Array | None) -> Array:
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
