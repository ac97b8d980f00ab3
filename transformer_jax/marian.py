"""Our parameters as Hugging Face `transformers`' MarianMTModel, and back.

MarianMTModel (PyTorch) is the paper's architecture: post-LN encoder and decoder layers, one
embedding shared by both sides and the output projection, scaled by sqrt(d_model), and fixed
sinusoidal positions. Two differences matter when weights move between the two:

- **Position layout.** Ours interleaves sine and cosine (PE(pos, 2i) = sin, PE(pos, 2i+1) = cos,
  the paper's formula); Marian puts every sine first, then every cosine. The frequencies are the
  same, so the two tables differ by a permutation of the d_model axis, and a model maps exactly
  onto the other by permuting that axis in every parameter that touches it (embedding,
  projections, LayerNorms). Marian rebuilds its table when it loads, so copying weights without
  the permutation gives a model that runs and is silently wrong.
- **LayerNorm epsilon**: Marian's is fixed at 1e-5 (ours 1e-6 by default; `model.layer_norm_epsilon`
  sets it), a difference of about 1e-5 in the logits.

Going the other way (`load_params`), a published Marian model (swish activations, a logits
bias, its own special ids) becomes ours with `model.activation`, `model.logits_bias` and
`model.layer_norm_epsilon` set (`model_fields`) and its vocabulary reordered so that our fixed
special ids keep their meaning (`tokenizer.marian_vocabulary_order`).

A mapping only: it reads and writes parameter trees and Hugging Face directories, and knows
nothing of runs (`export` writes a trained run with it).

Shapes: D d_model, N heads, K head size, F d_ff, V vocabulary. Marian stores `nn.Linear` weights
as [out, in]; ours are einsum kernels [in, ..., out].
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from transformer_jax.config import TransformerConfig
from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID
from transformer_jax.errors import CheckpointError, ConfigError, MissingFileError
from transformer_jax.tokenizer import MarianVocabTokenizer

log = logging.getLogger(__name__)

MARIAN_LAYER_NORM_EPSILON = 1e-5


def position_permutation(d_model: int) -> np.ndarray:
  """perm such that Marian's position table equals ours[:, perm]: the even (sine) columns, then
  the odd (cosine) ones."""
  return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def check_exportable(cfg: TransformerConfig) -> None:
  """Raises ConfigError for a model MarianMTModel cannot represent."""
  problems = []
  if cfg.norm_position != "post":
    problems.append(f"model.norm_position={cfg.norm_position!r} (Marian is post-LN)")
  if cfg.positional_encoding != "sinusoidal":
    problems.append(f"model.positional_encoding={cfg.positional_encoding!r} (Marian's are sinusoidal)")
  if cfg.head_dim_k * cfg.num_heads != cfg.d_model or cfg.head_dim_v * cfg.num_heads != cfg.d_model:
    problems.append(f"d_k={cfg.head_dim_k}, d_v={cfg.head_dim_v} (Marian needs d_model / num_heads)")
  if cfg.d_model % 2:
    problems.append(f"model.d_model={cfg.d_model} (the position tables need an even width)")
  if problems:
    raise ConfigError("this model cannot be exported as a MarianMTModel: " + "; ".join(problems))


def config_kwargs(cfg: TransformerConfig, max_positions: int = 1024) -> dict[str, Any]:
  """The `transformers.MarianConfig(**kwargs)` of our model (generation settings excluded)."""
  check_exportable(cfg)
  return dict(
      vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
      encoder_layers=cfg.num_layers, decoder_layers=cfg.num_layers,
      encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
      encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=cfg.activation,
      max_position_embeddings=max_positions, scale_embedding=True,
      dropout=cfg.dropout_rate, attention_dropout=0.0, activation_dropout=0.0,
      share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
      pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
      decoder_start_token_id=BOS_ID, forced_eos_token_id=None)


def to_marian(params: Any, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """Our parameter tree -> a MarianMTModel state dict (float32 numpy arrays, Marian's names).

  The d_model axis of every parameter is permuted (`position_permutation`), so that Marian's own
  position table gives the same model. `model.*.embed_positions.weight` is left out: Marian
  computes it.
  """
  check_exportable(cfg)
  perm = position_permutation(cfg.d_model)
  f32 = lambda x: np.asarray(x, np.float32)
  state: dict[str, np.ndarray] = {}

  def linear_in(prefix: str, p: dict) -> None:  # Ours [D, N, K] -> Marian [N*K, D].
    kernel = f32(p["kernel"])
    state[f"{prefix}.weight"] = kernel.reshape(kernel.shape[0], -1)[perm].T
    state[f"{prefix}.bias"] = f32(p["bias"]).reshape(-1)

  def attention(prefix: str, p: dict) -> None:
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      linear_in(f"{prefix}.{theirs}", p[ours])
    kernel = f32(p["out"]["kernel"])  # [N, K, D] -> [D, N*K]
    state[f"{prefix}.out_proj.weight"] = kernel.reshape(-1, kernel.shape[-1])[:, perm].T
    state[f"{prefix}.out_proj.bias"] = f32(p["out"]["bias"])[perm]

  def norm(prefix: str, p: dict) -> None:
    state[f"{prefix}.weight"] = f32(p["scale"])[perm]
    state[f"{prefix}.bias"] = f32(p["bias"])[perm]

  def feed_forward(prefix: str, p: dict) -> None:
    state[f"{prefix}.fc1.weight"] = f32(p["wi"]["kernel"])[perm].T  # [D, F] -> [F, D]
    state[f"{prefix}.fc1.bias"] = f32(p["wi"]["bias"])
    state[f"{prefix}.fc2.weight"] = f32(p["wo"]["kernel"])[:, perm].T  # [F, D] -> [D, F]
    state[f"{prefix}.fc2.bias"] = f32(p["wo"]["bias"])[perm]

  embedding = f32(params["embed"]["embedding"])[:, perm]
  for name in ("model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens", "lm_head"):
    state[f"{name}.weight"] = embedding
  bias = f32(params["decoder"]["logits_bias"]) if cfg.logits_bias else np.zeros(cfg.vocab_size, np.float32)
  state["final_logits_bias"] = bias[None]
  for i in range(cfg.num_layers):
    p, prefix = params["encoder"][f"layer_{i}"], f"model.encoder.layers.{i}"
    attention(f"{prefix}.self_attn", p["self_attention"])
    norm(f"{prefix}.self_attn_layer_norm", p["self_attention_norm"])
    feed_forward(prefix, p["feed_forward"])
    norm(f"{prefix}.final_layer_norm", p["feed_forward_norm"])
  for i in range(cfg.num_layers):
    p, prefix = params["decoder"][f"layer_{i}"], f"model.decoder.layers.{i}"
    attention(f"{prefix}.self_attn", p["self_attention"])
    norm(f"{prefix}.self_attn_layer_norm", p["self_attention_norm"])
    attention(f"{prefix}.encoder_attn", p["cross_attention"])
    norm(f"{prefix}.encoder_attn_layer_norm", p["cross_attention_norm"])
    feed_forward(prefix, p["feed_forward"])
    norm(f"{prefix}.final_layer_norm", p["feed_forward_norm"])
  return state


def from_marian(state: dict[str, np.ndarray], cfg: TransformerConfig, order: np.ndarray) -> dict:
  """A MarianMTModel state dict -> our parameter tree: `to_marian` inverted, with the vocabulary
  rows taken in `order` (Marian's id of each of ours, `tokenizer.marian_vocabulary_order`)."""
  inverse = np.argsort(position_permutation(cfg.d_model))
  N, K = cfg.num_heads, cfg.head_dim_k
  f32 = lambda name: np.asarray(state[name], np.float32)

  def linear_in(prefix: str) -> dict:  # Marian [N*K, D] -> ours [D, N, K].
    return {"kernel": f32(f"{prefix}.weight").T[inverse].reshape(cfg.d_model, N, K),
            "bias": f32(f"{prefix}.bias").reshape(N, K)}

  def attention(prefix: str) -> dict:
    p = {ours: linear_in(f"{prefix}.{theirs}")
         for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))}
    p["out"] = {"kernel": f32(f"{prefix}.out_proj.weight").T[:, inverse].reshape(N, K, cfg.d_model),
                "bias": f32(f"{prefix}.out_proj.bias")[inverse]}
    return p

  def norm(prefix: str) -> dict:
    return {"scale": f32(f"{prefix}.weight")[inverse], "bias": f32(f"{prefix}.bias")[inverse]}

  def feed_forward(prefix: str) -> dict:
    return {"wi": {"kernel": f32(f"{prefix}.fc1.weight").T[inverse], "bias": f32(f"{prefix}.fc1.bias")},
            "wo": {"kernel": f32(f"{prefix}.fc2.weight").T[:, inverse],
                   "bias": f32(f"{prefix}.fc2.bias")[inverse]}}

  shared = f32("model.shared.weight")
  if "lm_head.weight" in state and not np.array_equal(f32("lm_head.weight"), shared):
    raise ConfigError("this Marian model's output projection is not its embedding "
                      "(tie_word_embeddings=False); ours shares one matrix (section 3.4)")
  params: dict[str, Any] = {"embed": {"embedding": shared[order][:, inverse]}, "encoder": {}, "decoder": {}}
  for i in range(cfg.num_layers):
    prefix = f"model.encoder.layers.{i}"
    params["encoder"][f"layer_{i}"] = {
        "self_attention": attention(f"{prefix}.self_attn"),
        "self_attention_norm": norm(f"{prefix}.self_attn_layer_norm"),
        "feed_forward": feed_forward(prefix), "feed_forward_norm": norm(f"{prefix}.final_layer_norm")}
    prefix = f"model.decoder.layers.{i}"
    params["decoder"][f"layer_{i}"] = {
        "self_attention": attention(f"{prefix}.self_attn"),
        "self_attention_norm": norm(f"{prefix}.self_attn_layer_norm"),
        "cross_attention": attention(f"{prefix}.encoder_attn"),
        "cross_attention_norm": norm(f"{prefix}.encoder_attn_layer_norm"),
        "feed_forward": feed_forward(prefix), "feed_forward_norm": norm(f"{prefix}.final_layer_norm")}
  if cfg.logits_bias:
    params["decoder"]["logits_bias"] = f32("final_logits_bias").reshape(-1)[order]
  return params


_ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu"}
# Model fields a fine-tuning run takes from the Marian model; the others (dropout, dtypes,
# attention implementation, max_len) are the run's choice.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "d_ff", "num_heads", "d_k", "d_v", "num_layers",
                       "positional_encoding", "norm_position", "layer_norm_epsilon", "activation",
                       "logits_bias")


def model_fields(directory: str) -> dict[str, Any]:
  """The `config.model` fields of the Marian model in `directory` (its config.json and tokenizer
  files), as ours represents it.

  Raises:
    MissingFileError: if a file is missing.
    ConfigError: naming what ours cannot represent.
  """
  tokenizer = MarianVocabTokenizer.load(directory)
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
    theirs = json.load(f)
  get = lambda name, default=None: theirs.get(name, default)
  problems = []
  for ours, (enc, dec) in (("num_layers", ("encoder_layers", "decoder_layers")),
                           ("num_heads", ("encoder_attention_heads", "decoder_attention_heads")),
                           ("d_ff", ("encoder_ffn_dim", "decoder_ffn_dim"))):
    if get(enc) != get(dec):
      problems.append(f"{enc}={get(enc)} but {dec}={get(dec)} (ours has one {ours})")
  if not get("share_encoder_decoder_embeddings", True) or get("decoder_vocab_size") not in (
      None, get("vocab_size")):
    problems.append("separate source and target vocabularies (ours shares one, section 3.4)")
  if not get("scale_embedding", False):
    problems.append("scale_embedding=False (ours multiplies embeddings by sqrt(d_model))")
  activation = _ACTIVATIONS.get(get("activation_function", "gelu"))
  if activation is None:
    problems.append(f"activation_function={get('activation_function')!r} (ours: relu, swish, gelu)")
  if problems:
    raise ConfigError(f"{directory}: this Marian model cannot be imported: " + "; ".join(problems))
  if get("attention_dropout", 0.0) or get("activation_dropout", 0.0):
    log.warning("%s: attention and activation dropout (%s, %s) are not applied here; fine-tuning uses "
                "residual dropout only (model.dropout_rate).", directory, get("attention_dropout"),
                get("activation_dropout"))
  return dict(vocab_size=tokenizer.vocab_size, d_model=get("d_model"), d_ff=get("encoder_ffn_dim"),
              num_heads=get("encoder_attention_heads"), d_k=None, d_v=None,
              num_layers=get("encoder_layers"), positional_encoding="sinusoidal",
              norm_position="post", layer_norm_epsilon=MARIAN_LAYER_NORM_EPSILON,
              activation=activation, logits_bias=True, dropout_rate=float(get("dropout", 0.1)))


def check_architecture(directory: str, cfg: TransformerConfig) -> None:
  """Raises ConfigError, naming the fields, unless `cfg` is the architecture of the Marian model
  in `directory`."""
  if not os.path.isdir(directory):
    raise MissingFileError(f"init_from={directory}: no such directory")
  expected = model_fields(directory)
  wrong = [f"model.{k}={getattr(cfg, k)!r} (the model has {expected[k]!r})"
           for k in ARCHITECTURE_FIELDS if getattr(cfg, k) != expected[k]]
  if wrong:
    raise ConfigError(f"init_from={directory} does not fit the model config: {'; '.join(wrong)}; "
                      f"start from its own (--config configs/marian.py:{directory})")


def load_params(directory: str, cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """The weights of the Marian model in `directory` as our float32 parameter tree for `cfg`.

  Raises:
    ConfigError: if `cfg` is not the model's architecture (`model_fields`).
    CheckpointError: if transformers cannot load the weights.
  """
  import torch  # The [hf] extra: transformers reads every weight format Marian models ship in.
  import transformers

  check_architecture(directory, cfg)
  try:
    model = transformers.MarianMTModel.from_pretrained(directory, dtype=torch.float32)
  except (OSError, ValueError, RuntimeError) as e:
    raise CheckpointError(f"{directory}: transformers cannot load its weights: {e}") from e
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return from_marian(state, cfg, MarianVocabTokenizer.load(directory).order)


def marian_model(params: Any, cfg: TransformerConfig, max_positions: int = 1024):
  """A `transformers.MarianMTModel` (PyTorch, eval mode) computing our model's function.

  Needs `transformers` and `torch` (`pip install -e ".[hf]"`).
  """
  import torch
  import transformers

  model = transformers.MarianMTModel(transformers.MarianConfig(**config_kwargs(cfg, max_positions)))
  state = {k: torch.from_numpy(np.array(v)) for k, v in to_marian(params, cfg).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  left = [k for k in missing if not k.endswith("embed_positions.weight")]
  if left or unexpected:
    raise RuntimeError(f"MarianMTModel parameters not matched: missing {left}, unexpected {unexpected}")
  return model.eval()
