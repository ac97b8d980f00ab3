"""Our parameters as a CTranslate2 model, to serve with OpenNMT's inference engine.

CTranslate2 (what Argos Translate, LibreTranslate and most opus-mt deployments run) describes a
Transformer by a spec (`ctranslate2.specs.TransformerSpec`) whose weights and settings are filled
here from ours directly, not through the Hugging Face export: its Marian converter assumes
Marian's conventions, padding as the last id (it drops that row) and a decoder that starts from
a zero vector, where our padding is id 0 and our decoder starts from BOS's embedding. Filled
from our parameters, the spec keeps everything that decides a translation:

- **Vocabulary in our order**, one list for both sides, with our special pieces: EOS appended to
  every source (`add_source_eos`), decoding started from BOS's embedding (`decoder_start_token`).
- **Positions as a table**: CTranslate2 adds `position_encodings.encodings[pos]` after scaling the
  embedding by sqrt(d_model), as we do; the table is ours (the paper's interleaved sines and
  cosines, section 3.5, or the learned rows), so no d_model permutation is needed.
- **LayerNorm epsilon** ours (`config.layer_norm_epsilon`), post-LN or pre-LN with a final norm
  on each stack, relu, swish or exact (erf) GELU, the logits bias if the model has one.
- **PAD and BOS never generated**, as in `decode.never_generated`: a bias of `NEVER` on their
  logits leaves them exactly zero probability.

With these, CTranslate2's greedy and beam search (length_penalty=0) give our translations token
for token (tests/test_ctranslate2.py). Its `length_penalty` divides by |Y|^alpha, |Y| without
EOS; ours is GNMT's ((5 + |Y|) / 6)^alpha with EOS counted, so only alpha = 0 ranks alike.
Refused: d_k != d_v (CTranslate2 has one head width for queries, keys and values).

A mapping only: it knows nothing of runs (`export.export_ctranslate2` writes a trained run with
it). Needs the [ct2] extra (`pip install -e ".[ct2]"`).

Shapes: D d_model, N heads, K head size, F d_ff, V vocabulary. CTranslate2 stores linear weights
as [out, in]; ours are einsum kernels [in, ..., out].
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from transformer_jax.config import TransformerConfig
from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer_jax.errors import ConfigError
from transformer_jax.layers import sinusoidal_encoding

# The logits bias of PAD_ID and BOS_ID: exp(-1e4) is 0 in float32, so their probability is exactly
# 0 and every other token's log-probability is unchanged; finite, so that it survives float16.
NEVER = -1e4
# Weight types CTranslate2 can store (its `ACCEPTED_MODEL_TYPES`); None keeps float32. Any of them
# can also be chosen when loading (`ctranslate2.Translator(..., compute_type="int8")`).
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                 "bfloat16", "float32")


def check_exportable(cfg: TransformerConfig) -> None:
  """Raises ConfigError, naming the fields, for a model CTranslate2 cannot compute exactly."""
  if cfg.head_dim_k != cfg.head_dim_v:
    raise ConfigError(f"this model cannot be exported to CTranslate2: d_k={cfg.head_dim_k} != "
                      f"d_v={cfg.head_dim_v} (CTranslate2 has one head width for queries, keys and "
                      "values; set model.d_k and model.d_v alike)")


def _activation(cfg: TransformerConfig) -> int:
  from ctranslate2.specs import common_spec
  return {"relu": common_spec.Activation.RELU, "swish": common_spec.Activation.SWISH,
          "gelu": common_spec.Activation.GELU}[cfg.activation]  # GELU: exact (erf), as ours.


def position_table(params: Any, cfg: TransformerConfig, stack: str,
                   max_positions: int) -> np.ndarray:
  """[P, D] float32: what our `stack` ("encoder" or "decoder") adds at positions 0 .. P - 1.

  Sinusoidal: computed by `layers.sinusoidal_encoding` itself, so the table holds the very values
  our model adds; learned: the stack's own rows (cfg.max_len of them, whatever `max_positions`).
  """
  if cfg.positional_encoding == "learned":
    return np.asarray(params[stack]["positions"]["position_embedding"], np.float32)
  table = sinusoidal_encoding(jnp.arange(max_positions)[None], cfg.d_model)  # [1, P, D]
  return np.asarray(table, np.float32)[0]


def model_spec(params: Any, cfg: TransformerConfig, pieces: Sequence[str], *,
               max_positions: int = 1024):
  """Our parameter tree as a `ctranslate2.specs.TransformerSpec`, vocabulary and config included.

  Args:
    params: our parameters (any float dtype; written as float32).
    cfg: the model's config.
    pieces: the vocabulary by our id (`Tokenizer.pieces()`), distinct strings.
    max_positions: rows of the sinusoidal position table: the longest source (EOS included) or
      output CTranslate2 may see (it raises an error beyond, never reads past the table).

  Raises:
    ConfigError: for a model CTranslate2 cannot compute exactly, or a vocabulary that does not fit.
  """
  from ctranslate2.specs import transformer_spec

  check_exportable(cfg)
  if len(pieces) != cfg.vocab_size:
    raise ConfigError(f"the vocabulary has {len(pieces)} pieces but model.vocab_size={cfg.vocab_size}")
  repeated = sorted(p for p, n in collections.Counter(pieces).items() if n > 1)
  if repeated:
    raise ConfigError("CTranslate2 looks pieces up by their text; these occur more than once: "
                      f"{repeated[:5]}")
  f32 = lambda x: np.asarray(x, np.float32)
  pre_norm = cfg.norm_position == "pre"
  head_dim = None if cfg.head_dim_k * cfg.num_heads == cfg.d_model else cfg.head_dim_k
  common = dict(pre_norm=pre_norm, activation=_activation(cfg), head_dim=head_dim)
  spec = transformer_spec.TransformerSpec(
      transformer_spec.TransformerEncoderSpec(cfg.num_layers, cfg.num_heads, **common),
      transformer_spec.TransformerDecoderSpec(cfg.num_layers, cfg.num_heads, **common))

  def norm(target, p: dict) -> None:
    target.gamma, target.beta = f32(p["scale"]), f32(p["bias"])

  def attention(target, p: dict, norm_params: dict, self_attention: bool) -> None:
    # Ours [D, N, K] -> [N*K, D] each; CTranslate2 fuses q, k, v (self-attention) or k, v
    # (attention over the encoder output) into one [out, D] product.
    names = ("query", "key", "value")
    w = {name: f32(p[name]["kernel"]).reshape(cfg.d_model, -1).T for name in names}
    b = {name: f32(p[name]["bias"]).reshape(-1) for name in names}
    fused = [("query", "key", "value")] if self_attention else [("query",), ("key", "value")]
    for target_linear, names in zip(target.linear, fused):
      target_linear.weight = np.concatenate([w[n] for n in names])
      target_linear.bias = np.concatenate([b[n] for n in names])
    out = f32(p["out"]["kernel"])  # [N, K, D] -> [D, N*K]
    target.linear[-1].weight = out.reshape(-1, cfg.d_model).T
    target.linear[-1].bias = f32(p["out"]["bias"])
    norm(target.layer_norm, norm_params)

  def feed_forward(target, p: dict, norm_params: dict) -> None:
    target.linear_0.weight, target.linear_0.bias = f32(p["wi"]["kernel"]).T, f32(p["wi"]["bias"])
    target.linear_1.weight, target.linear_1.bias = f32(p["wo"]["kernel"]).T, f32(p["wo"]["bias"])
    norm(target.layer_norm, norm_params)

  embedding = f32(params["embed"]["embedding"])
  spec.encoder.embeddings[0].weight = embedding
  spec.decoder.embeddings.weight = embedding
  spec.encoder.scale_embeddings = spec.decoder.scale_embeddings = True  # Times sqrt(d_model), 3.4.
  for stack in ("encoder", "decoder"):
    table = position_table(params, cfg, stack, max_positions)
    getattr(spec, stack).position_encodings.encodings = table
    if pre_norm:
      norm(getattr(spec, stack).layer_norm, params[stack]["final_norm"])
  for i, layer in enumerate(spec.encoder.layer):
    p = params["encoder"][f"layer_{i}"]
    attention(layer.self_attention, p["self_attention"], p["self_attention_norm"], True)
    feed_forward(layer.ffn, p["feed_forward"], p["feed_forward_norm"])
  for i, layer in enumerate(spec.decoder.layer):
    p = params["decoder"][f"layer_{i}"]
    attention(layer.self_attention, p["self_attention"], p["self_attention_norm"], True)
    attention(layer.attention, p["cross_attention"], p["cross_attention_norm"], False)
    feed_forward(layer.ffn, p["feed_forward"], p["feed_forward_norm"])

  bias = np.zeros(cfg.vocab_size, np.float32)
  if cfg.logits_bias:
    bias += f32(params["decoder"]["logits_bias"])
  bias[[PAD_ID, BOS_ID]] = NEVER
  spec.decoder.projection.weight = embedding  # The shared pre-softmax matrix (3.4).
  spec.decoder.projection.bias = bias

  pieces = list(pieces)
  spec.register_source_vocabulary(pieces)
  spec.register_target_vocabulary(pieces)
  config = spec.config
  config.unk_token, config.eos_token = pieces[UNK_ID], pieces[EOS_ID]
  config.bos_token = config.decoder_start_token = pieces[BOS_ID]  # Ours starts from BOS's embedding.
  config.add_source_bos, config.add_source_eos = False, True
  config.layer_norm_epsilon = float(cfg.layer_norm_epsilon)
  return spec


def save(params: Any, cfg: TransformerConfig, pieces: Sequence[str], output_dir: str, *,
         spm_files: Mapping[str, bytes] | None = None, max_positions: int = 1024,
         quantization: str | None = None) -> str:
  """Writes a CTranslate2 model directory that `ctranslate2.Translator(output_dir)` loads:
  model.bin, config.json, shared_vocabulary.json, and `spm_files` beside them (name -> bytes: the
  SentencePiece models that turn text into the pieces it translates).

  Args:
    params: as for `model_spec`.
    cfg: as for `model_spec`.
    pieces: as for `model_spec`.
    max_positions: as for `model_spec`.
    output_dir: where to write (created; files already there are overwritten).
    spm_files: files to copy in, e.g. `Tokenizer.spm_files()`.
    quantization: the stored weight type (one of QUANTIZATIONS); None keeps float32.

  Returns:
    `output_dir`.
  """
  if quantization is not None and quantization not in QUANTIZATIONS:
    raise ConfigError(f"quantization={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
  spec = model_spec(params, cfg, pieces, max_positions=max_positions)
  spec.validate()
  spec.optimize(quantization=quantization)
  os.makedirs(output_dir, exist_ok=True)
  spec.save(output_dir)
  for name, data in (spm_files or {}).items():
    with open(os.path.join(output_dir, name), "wb") as f:
      f.write(data)
  return output_dir
