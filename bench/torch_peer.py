"""The PyTorch peer of the benchmarks: our Transformer rebuilt from `torch.nn.Transformer`.

Used by bench/train_step.py (training step against ours) and bench/decode.py (greedy decoding
without a cache, which is all `nn.Transformer` offers). It matches `transformer_jax.model`:
post-LN, ReLU, h heads, biases on every projection, one embedding matrix shared by source,
target and pre-softmax projection and scaled by sqrt(d_model), interleaved sinusoidal positions,
dropout on sub-layer outputs and on the embedding sums, LayerNorm epsilon 1e-6. Two details of
`nn.Transformer` that neither our model nor the paper has are switched off unless `stock=True`:
dropout on the attention weights and inside the feed-forward network, and the final LayerNorm it
adds to each stack.

`load_flax_params` copies our parameters into the peer, so that both compute the same function;
`max_logit_difference` checks it. Needs torch: `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID

# nn.TransformerEncoder's inference fast path (nested tensors for padded batches) warns that the
# API is a prototype, once per call; the path itself is PyTorch's own and stays on.
warnings.filterwarnings("ignore", message=".*nested tensors.*")


def sinusoids(length: int, d_model: int) -> torch.Tensor:
  """Section 3.5, sin and cos interleaved as in transformer_jax.layers: [L, D]."""
  two_i = torch.arange(0, d_model, 2, dtype=torch.float32)
  angles = torch.arange(length, dtype=torch.float32)[:, None] / 10000.0 ** (two_i / d_model)
  return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(length, d_model)


class TorchTransformer(torch.nn.Module):
  """`torch.nn.Transformer` with the shared, scaled embedding and sinusoidal positions."""

  def __init__(self, vocab_size: int, d_model: int, d_ff: int, num_heads: int, num_layers: int,
               dropout: float, max_len: int, layer_norm_epsilon: float = 1e-6, stock: bool = False):
    super().__init__()
    self.d_model = d_model
    self.embedding = torch.nn.Parameter(torch.randn(vocab_size, d_model) * d_model**-0.5)
    self.register_buffer("positions", sinusoids(max_len, d_model))
    self.dropout = torch.nn.Dropout(dropout)
    self.transformer = torch.nn.Transformer(
        d_model, num_heads, num_layers, num_layers, d_ff, dropout, activation="relu",
        layer_norm_eps=layer_norm_epsilon, batch_first=True, norm_first=False)
    if not stock:
      self.transformer.encoder.norm = None
      self.transformer.decoder.norm = None
      for layer in [*self.transformer.encoder.layers, *self.transformer.decoder.layers]:
        layer.dropout = torch.nn.Identity()  # The one inside the feed-forward network.
        for attention in (getattr(layer, "self_attn", None), getattr(layer, "multihead_attn", None)):
          if attention is not None:
            attention.dropout = 0.0

  @classmethod
  def like(cls, config, max_len: int, stock: bool = False) -> "TorchTransformer":
    """The peer of a `TransformerConfig` (post-LN, sinusoidal positions only)."""
    if config.norm_position != "post" or config.positional_encoding != "sinusoidal":
      raise ValueError("the PyTorch peer is post-LN with sinusoidal positions only")
    return cls(config.vocab_size, config.d_model, config.d_ff, config.num_heads, config.num_layers,
               config.dropout_rate, max_len, config.layer_norm_epsilon, stock)

  def embed(self, tokens: torch.Tensor) -> torch.Tensor:
    x = F.embedding(tokens, self.embedding) * math.sqrt(self.d_model)
    return self.dropout(x + self.positions[:tokens.shape[1]])

  def encode(self, src: torch.Tensor) -> torch.Tensor:
    return self.transformer.encoder(self.embed(src), src_key_padding_mask=src == PAD_ID)

  def decode(self, memory: torch.Tensor, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
    """Decoder inputs [B, T] (BOS first) -> [B, T, V] logits; no cache, as nn.Transformer has none."""
    length = tgt_in.shape[1]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(
        length, device=tgt_in.device, dtype=torch.bool)
    y = self.transformer.decoder(self.embed(tgt_in), memory, tgt_mask=causal, tgt_is_causal=True,
                                 memory_key_padding_mask=src == PAD_ID)
    return y @ self.embedding.T

  def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Teacher-forced pass: [B, S] and [B, T] tokens -> [B, T, V] logits (tgt shifted right)."""
    tgt_in = F.pad(tgt, (1, 0), value=BOS_ID)[:, :-1]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(
        tgt.shape[1], device=tgt.device, dtype=torch.bool)
    y = self.transformer(
        self.embed(src), self.embed(tgt_in), tgt_mask=causal, tgt_is_causal=True,
        src_key_padding_mask=src == PAD_ID, tgt_key_padding_mask=tgt == PAD_ID,
        memory_key_padding_mask=src == PAD_ID)
    return y @ self.embedding.T


def load_flax_params(model: TorchTransformer, params) -> None:
  """Copies our parameter tree (`Transformer.init(...)["params"]`, unboxed) into the peer."""
  tensor = lambda x: torch.from_numpy(np.array(x, np.float32))
  heads_in = lambda p: tensor(p["kernel"]).flatten(1).T  # [D, H, K] -> [H*K, D]

  def attention(module: torch.nn.MultiheadAttention, p):
    module.in_proj_weight.copy_(torch.cat([heads_in(p[n]) for n in ("query", "key", "value")]))
    module.in_proj_bias.copy_(torch.cat([tensor(p[n]["bias"]).flatten() for n in ("query", "key", "value")]))
    module.out_proj.weight.copy_(tensor(p["out"]["kernel"]).flatten(0, 1).T)  # [H, K, D] -> [D, H*K]
    module.out_proj.bias.copy_(tensor(p["out"]["bias"]))

  def norm(module: torch.nn.LayerNorm, p):
    module.weight.copy_(tensor(p["scale"]))
    module.bias.copy_(tensor(p["bias"]))

  def feed_forward(layer, p):
    layer.linear1.weight.copy_(tensor(p["wi"]["kernel"]).T)
    layer.linear1.bias.copy_(tensor(p["wi"]["bias"]))
    layer.linear2.weight.copy_(tensor(p["wo"]["kernel"]).T)
    layer.linear2.bias.copy_(tensor(p["wo"]["bias"]))

  with torch.no_grad():
    model.embedding.copy_(tensor(params["embed"]["embedding"]))
    for i, layer in enumerate(model.transformer.encoder.layers):
      p = params["encoder"][f"layer_{i}"]
      attention(layer.self_attn, p["self_attention"])
      norm(layer.norm1, p["self_attention_norm"])
      feed_forward(layer, p["feed_forward"])
      norm(layer.norm2, p["feed_forward_norm"])
    for i, layer in enumerate(model.transformer.decoder.layers):
      p = params["decoder"][f"layer_{i}"]
      attention(layer.self_attn, p["self_attention"])
      norm(layer.norm1, p["self_attention_norm"])
      attention(layer.multihead_attn, p["cross_attention"])
      norm(layer.norm2, p["cross_attention_norm"])
      feed_forward(layer, p["feed_forward"])
      norm(layer.norm3, p["feed_forward_norm"])


def autocast(device: torch.device, dtype: str = "float32"):
  """The context a user would run the peer's forward pass on `device` in: for "bfloat16", PyTorch's
  automatic mixed precision (bfloat16 products, float32 parameters, softmax, norms and loss), as
  our `model.dtype=bfloat16` computes; for "float32", nothing."""
  return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def max_logit_difference(model: TorchTransformer, ours_logits: np.ndarray, src: np.ndarray,
                         tgt: np.ndarray, dtype: str = "float32") -> float:
  """The largest |ours - peer| over the real target positions of a teacher-forced pass."""
  was_training = model.training
  model.eval()
  device = next(model.parameters()).device
  # nn.Transformer's inference fast path ignores autocast on a CPU (and fails on its bfloat16).
  fast_path = torch.backends.mha.get_fastpath_enabled()
  torch.backends.mha.set_fastpath_enabled(dtype == "float32")
  try:
    with torch.no_grad(), autocast(device, dtype):
      theirs = model(torch.from_numpy(src).long().to(device), torch.from_numpy(tgt).long().to(device))
  finally:
    torch.backends.mha.set_fastpath_enabled(fast_path)
  theirs = theirs.float().cpu().numpy()
  model.train(was_training)
  real = tgt != PAD_ID
  return float(np.max(np.abs(np.asarray(ours_logits) - theirs)[real]))


@torch.no_grad()
def greedy_decode(model: TorchTransformer, src: torch.Tensor, max_len: int) -> torch.Tensor:
  """Greedy decoding without a cache: the whole prefix through the decoder at every step.

  Stops when every sentence has produced EOS_ID. Returns [B, <= max_len] tokens, PAD_ID after EOS.
  """
  memory = model.encode(src)
  tgt_in = torch.full((src.shape[0], 1), BOS_ID, dtype=torch.long)
  done = torch.zeros(src.shape[0], dtype=torch.bool)
  out = []
  for _ in range(max_len):
    token = model.decode(memory, src, tgt_in)[:, -1].argmax(-1)
    token = torch.where(done, torch.full_like(token, PAD_ID), token)
    out.append(token)
    done |= token == EOS_ID
    if bool(done.all()):
      break
    tgt_in = torch.cat([tgt_in, token[:, None]], dim=1)
  return torch.stack(out, dim=1)


def adam_trainer(model: TorchTransformer, warmup_steps: int, label_smoothing: float = 0.1,
                 dtype: str = "float32"):
  """A training step like ours: label-smoothed cross-entropy over real tokens, Adam (0.9, 0.98,
  1e-9) with the paper's schedule, the forward pass under `autocast(device, dtype)`. On a GPU Adam
  is PyTorch's fused kernel (its fastest). Returns `step(src, tgt) -> loss`."""
  device = next(model.parameters()).device
  opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9,
                         fused=device.type == "cuda")
  d = model.d_model
  schedule = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda step: d**-0.5 * min((step + 1) ** -0.5, (step + 1) * warmup_steps**-1.5))

  def step(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    with autocast(device, dtype):  # Autocast runs cross-entropy in float32.
      logits = model(src, tgt)
      loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             ignore_index=PAD_ID, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    schedule.step()
    return loss

  return step
