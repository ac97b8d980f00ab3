"""Analytic FLOP counts of the Transformer and the peak FLOP/s of common accelerators, for MFU.

Model FLOPs utilisation = (FLOPs the model needs per step / step time) / (devices * peak FLOP/s).
A multiply-add counts as 2 FLOPs; the backward pass costs twice the forward one.
"""

from __future__ import annotations

import jax

from transformer_jax.config import TransformerConfig

# Dense peak FLOP/s per chip, by dtype of the matmul inputs (vendor figures, no sparsity).
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 494e12},  # float32 runs as TF32 on the tensor cores.
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v6": {"bfloat16": 918e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5": {"bfloat16": 197e12},  # v5e ("TPU v5 lite").
    "TPU v4": {"bfloat16": 275e12},
}


def forward_flops(config: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
  """FLOPs of one forward pass over a [batch, src_len] source and a [batch, tgt_len] target,
  padding included, with the pre-softmax projection counted."""
  D, F, N, L, V = config.d_model, config.d_ff, config.num_heads, config.num_layers, config.vocab_size
  K, H = config.head_dim_k, config.head_dim_v

  def attention(q_len, kv_len):
    projections = 2 * q_len * D * N * K + 2 * kv_len * D * N * (K + H) + 2 * q_len * N * H * D
    scores = 2 * q_len * kv_len * N * (K + H)
    return projections + scores

  feed_forward = lambda length: 4 * length * D * F
  encoder = L * (attention(src_len, src_len) + feed_forward(src_len))
  decoder = L * (attention(tgt_len, tgt_len) + attention(tgt_len, src_len) + feed_forward(tgt_len))
  output = 2 * tgt_len * D * V
  return float(batch * (encoder + decoder + output))


def train_step_flops(config: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
  return 3.0 * forward_flops(config, batch, src_len, tgt_len)


def peak_flops_per_device(dtype: str, fallback: float = 0.0) -> float:
  """The peak of the first local device if its kind is known, else `fallback` (0: unknown)."""
  kind = jax.local_devices()[0].device_kind
  for name, peaks in PEAK_FLOPS.items():
    if name.lower() in kind.lower() and dtype in peaks:
      return peaks[dtype]
  return fallback
