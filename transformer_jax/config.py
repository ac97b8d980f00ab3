"""Configuration: the model's validated hyperparameters and the run's `ConfigDict`.

`TransformerConfig` is the frozen, validated view of `config.model` that the Flax modules take.
`base_config()` is the whole run configuration with the paper's base values (Table 3); the files in
`configs/` start from it and change only what differs, so every field has one definition and a
misspelled override (`--config.model.num_head=16`) fails because the dict is locked.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Literal

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from transformer_jax.errors import ConfigError

POSITIONAL_ENCODINGS = ("sinusoidal", "learned")
NORM_POSITIONS = ("post", "pre")
ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn")
DTYPES = ("float32", "bfloat16")
ACTIVATIONS = ("relu", "swish", "gelu")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of the Transformer (section 3), checked when built.

  Attributes:
    vocab_size: V, size of the vocabulary shared by source and target (section 3.4).
    d_model: width of every sub-layer output and of the embeddings.
    d_ff: inner width of the position-wise feed-forward network (section 3.3).
    num_heads: h, the number of attention heads (section 3.2.2).
    d_k: query/key width per head; None means d_model // num_heads (Table 3 row B sets it alone).
    d_v: value width per head; None means d_model // num_heads.
    num_layers: N, the number of layers in the encoder and in the decoder.
    dropout_rate: P_drop, residual dropout on every sub-layer output and on the embedding sums;
      in [0, 1).
    max_len: the longest position the model is built for (the size of learned positions).
    positional_encoding: "sinusoidal" (section 3.5) or "learned" (Table 3 row E).
    norm_position: "post", LayerNorm(x + Dropout(Sublayer(x))) as in the paper, or "pre",
      x + Dropout(Sublayer(LayerNorm(x))) with a final LayerNorm on each stack.
    attention_impl: "einsum" (plain, returns attention weights for inspection), "dot_product"
      (`jax.nn.dot_product_attention`, jax's choice of kernel) or "cudnn" (the same, asking for
      cuDNN's fused attention explicitly: NVIDIA GPUs only, bfloat16; the faster on a GPU). Any of
      them for training and the encoder; a cached decoding step always attends with the plain
      products.
    dtype: compute dtype of activations and matmuls ("float32" or "bfloat16"). Logits, softmax
      and loss stay in float32 whatever this is.
    param_dtype: storage dtype of the parameters.
    layer_norm_epsilon: epsilon of every LayerNorm; > 0.
    activation: the feed-forward network's non-linearity: "relu" (section 3.3), or "swish" and
      "gelu" (exact, erf-based), which published Marian translation models use.
    logits_bias: a learned bias on the output logits (Marian has one; the paper does not).
    cpu_kernels: speed only, no change of values: the feed-forward layers' and the loss's
      products with the backward forms of `kernels.py`, which XLA:CPU runs faster (elsewhere they
      are autodiff's products). False: flax's and autodiff's own.
  """

  vocab_size: int = 37000
  d_model: int = 512
  d_ff: int = 2048
  num_heads: int = 8
  d_k: int | None = None
  d_v: int | None = None
  num_layers: int = 6
  dropout_rate: float = 0.1
  max_len: int = 256
  positional_encoding: Literal["sinusoidal", "learned"] = "sinusoidal"
  norm_position: Literal["post", "pre"] = "post"
  attention_impl: Literal["einsum", "dot_product", "cudnn"] = "einsum"
  dtype: Literal["float32", "bfloat16"] = "float32"
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  layer_norm_epsilon: float = 1e-6
  activation: Literal["relu", "swish", "gelu"] = "relu"
  logits_bias: bool = False
  cpu_kernels: bool = True

  def __post_init__(self):
    for name in _POSITIVE_MODEL_FIELDS:
      _check_positive_int(name, getattr(self, name))
    for name in ("d_k", "d_v"):
      value = getattr(self, name)
      if value is None:
        if self.d_model % self.num_heads:
          raise ConfigError(
              f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; choose "
              f"num_heads among the divisors of d_model, or set {name} explicitly")
      else:
        _check_positive_int(name, value)
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f"dropout_rate={self.dropout_rate!r} must lie in [0, 1)")
    if not self.layer_norm_epsilon > 0:
      raise ConfigError(f"layer_norm_epsilon={self.layer_norm_epsilon!r} must be positive")
    check_choice("positional_encoding", self.positional_encoding, POSITIONAL_ENCODINGS)
    check_choice("norm_position", self.norm_position, NORM_POSITIONS)
    check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    check_choice("dtype", self.dtype, DTYPES)
    check_choice("param_dtype", self.param_dtype, DTYPES)
    check_choice("activation", self.activation, ACTIVATIONS)
    for name in ("logits_bias", "cpu_kernels"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
    if self.attention_impl != "einsum" and self.head_dim_k != self.head_dim_v:
      raise ConfigError(
          f"attention_impl={self.attention_impl!r} needs d_k == d_v, got d_k={self.head_dim_k} and "
          f"d_v={self.head_dim_v}; use attention_impl='einsum' for Table 3 row B")

  @property
  def head_dim_k(self) -> int:
    """d_k, the query and key width of one head."""
    return self.d_k if self.d_k is not None else self.d_model // self.num_heads

  @property
  def head_dim_v(self) -> int:
    """d_v, the value width of one head."""
    return self.d_v if self.d_v is not None else self.d_model // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict | dict[str, Any]) -> TransformerConfig:
    """Builds the validated config from `config.model` (a ConfigDict or a plain dict)."""
    values = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown model fields {unknown}; accepted fields: {sorted(known)}")
    return cls(**values)


_POSITIVE_MODEL_FIELDS = ("vocab_size", "d_model", "d_ff", "num_heads", "num_layers", "max_len")


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConfigError(f"{name}={value!r} must be a positive integer")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def base_config() -> ml_collections.ConfigDict:
  """The run configuration with the paper's values for the base model (Table 3, section 5).

  Sections: `model` (the fields of `TransformerConfig`), `train` (optimiser, schedule,
  regularisation) and `decode` (section 6.1). The dict is locked: reading or overriding a key that
  does not exist raises an error that names it.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0  # Initialisation, dropout and data order all follow from it.
  # A Hugging Face Marian model directory whose weights start training (fine-tuning); its
  # architecture must be the one config.model describes (configs/marian.py reads it from there).
  config.init_from = ""

  model = TransformerConfig()
  config.model = ml_collections.ConfigDict({
      f.name: getattr(model, f.name) for f in dataclasses.fields(model)
  })
  # None-valued fields need a typed placeholder so that `--config.model.d_k=32` parses as int.
  config.model.d_k = config_dict.placeholder(int)
  config.model.d_v = config_dict.placeholder(int)

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 100_000  # Base: 100K steps (section 5.2).
  config.train.warmup_steps = 4000  # Section 5.3.
  config.train.adam_b1 = 0.9  # Adam's beta_1 (section 5.3).
  config.train.adam_b2 = 0.98  # Adam's beta_2.
  config.train.adam_eps = 1e-9  # Adam's epsilon.
  config.train.label_smoothing = 0.1  # epsilon_ls, section 5.4.
  # The loss's pre-softmax projection and softmax run over this many slices of the target length,
  # never holding all the [B, T, V] logits (kernels.vocabulary_metrics); the same arithmetic.
  config.train.loss_chunks = 4
  config.train.checkpoints_to_average = 5  # Section 6.1: 5 for base, 20 for big.
  # Keep the best parameters by validation ("bleu": the greedy BLEU of the validation sample,
  # "loss": the validation loss; "": none) as a candidate for the test (validation.py).
  config.train.best_metric = ""
  # > 0: stop when this many validation passes in a row have not improved on the best.
  config.train.early_stopping_passes = 0
  config.train.schedule = "paper"  # "paper" (5.3), "cosine" or "constant" (after warm-up).
  config.train.learning_rate_scale = 1.0  # Multiplies the paper's schedule.
  config.train.learning_rate = 1e-3  # Peak rate of the "cosine" and "constant" schedules.
  config.train.grad_clip_norm = 0.0  # 0: no clipping (the paper).
  config.train.weight_decay = 0.0  # > 0: AdamW.
  config.train.grad_accum_steps = 1  # Batches per update, to reach 25K-token batches on small hardware.
  config.train.time_budget_minutes = 0.0  # > 0: stop (and checkpoint) after this much training.
  # > 0 (a departure): the learning rate falls linearly to 0 over this last fraction of the run,
  # of the time budget when there is one, else of num_steps (optim.cooldown_factor).
  config.train.cooldown_fraction = 0.0
  config.train.log_every = 50  # Steps between train metrics (metrics.jsonl, TensorBoard).
  config.train.eval_every = 1000  # Validation loss and BLEU.
  config.train.eval_bleu_sentences = 256  # Validation sentences decoded (greedily) for BLEU.
  config.train.samples_to_print = 5  # Test translations printed at the end.
  config.train.test_sentences = 0  # Test sentences translated at the end; 0: all of them.
  config.train.checkpoint_every = 1000  # Steps between checkpoints (and one at the end).
  config.train.checkpoints_to_keep = 5  # The newest kept (at least checkpoints_to_average).
  config.train.peak_flops = 0.0  # Per-device peak FLOP/s for MFU when the device is not known.
  # Multi-process runs: a process silent this long (dead, stopped, hung) stops the run on every
  # other process with one line and exit status 75 (peers.py); jax.distributed's coordination
  # service is given a longer heartbeat timeout. JAX's own default, sized for pods.
  config.train.heartbeat_timeout_seconds = 100.0

  # Logical axis names -> mesh axes. Default: pure data parallelism over every device.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel ways; -1: the devices the other axes leave.
  config.mesh.fsdp = 1  # Ways the parameters and Adam's moments are split (FSDP).
  config.mesh.tensor = 1  # Tensor parallelism: heads, d_ff and the vocabulary split.
  config.mesh.rules = (  # Logical axis -> mesh axes.
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("embed", "fsdp"),
      ("kv", None),
      ("length", None),
  )

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "bible"  # "bible" (offline, the default), "wmt14" or "text".
  config.data.source_lang = "en"  # The paper's direction: English to German.
  config.data.target_lang = "de"  # Language codes name the dataset and the tokenized BLEU.
  config.data.data_dir = config_dict.placeholder(str)  # tfds data_dir; None: tfds' default.
  config.data.manual_dir = config_dict.placeholder(str)  # WMT archives downloaded by hand.
  # dataset="text": each split is a tab-separated file or "SOURCE_FILE,TARGET_FILE".
  config.data.text_train = ""
  config.data.text_validation = ""  # The same, for validation.
  config.data.text_test = ""  # The same, for the test at the end.
  config.data.skip_bad_lines = False  # Skip and count malformed lines instead of failing.
  config.data.tokenizer = "bpe"  # SentencePiece model type: "bpe" (the paper) or "unigram".
  config.data.tokenizer_max_sentences = 2_000_000  # Sentences sampled to train it.
  config.data.max_len = config.model.get_ref("max_len")  # Longer examples are dropped (counted).
  config.data.tokens_per_batch = 25_000  # Source tokens, and as many target tokens (5.1).
  config.data.packing = False  # Pack several examples into one row instead of padding.
  config.data.num_workers = 0  # grain worker processes; 0 reads in the training process.
  config.data.tokenize_processes = 0  # Processes that tokenize a corpus side by side; 0: one per core.
  # A workdir on an object store (gs://...): each host copies the token caches here to map them.
  config.data.local_cache_dir = config_dict.placeholder(str)  # None: the temporary directory.
  # Multi-process runs: process 0 prepares and tokenizes each split; the others wait this long.
  config.data.prepare_timeout_minutes = 240.0

  config.decode = ml_collections.ConfigDict()
  config.decode.beam_size = 4  # Section 6.1.
  config.decode.length_penalty = 0.6  # alpha in ((5 + |Y|) / 6) ** alpha.
  config.decode.max_extra_len = 50  # Maximum output length = input length + 50.
  # Source tokens in a decoding batch (each source decodes beam_size hypotheses); 0: the
  # training batch's data.tokens_per_batch. Lower it if beam search runs out of memory.
  config.decode.tokens_per_batch = 0

  config.lock()
  return config


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of a file such as `configs/small.py`: its `get_config()` (or `get_config(arg)`),
  as `--config path[:arg]` gives it to train.py, for notebooks and scripts without flags."""
  spec = importlib.util.spec_from_file_location("transformer_jax_config_file", os.fspath(path))
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


SCHEDULES = ("paper", "cosine", "constant")
BEST_METRICS = ("", "bleu", "loss")  # train.best_metric; "" keeps no best parameters.
TOKENIZERS = ("bpe", "unigram")
DATASETS = ("bible", "wmt14", "text")
RESERVED_IDS = 4  # PAD, EOS, BOS and UNK (constants.py).

_INT, _FLOAT = "int", "float"
# field -> (type, lowest accepted, whether the lowest itself is excluded).
_RUN_FIELDS = {
    "seed": (_INT, 0, False),
    "train.num_steps": (_INT, 0, False),
    "train.warmup_steps": (_INT, 1, False),
    "train.adam_b1": (_FLOAT, 0.0, False),  # These three must also be below 1 (below).
    "train.adam_b2": (_FLOAT, 0.0, False),
    "train.adam_eps": (_FLOAT, 0.0, True),
    "train.label_smoothing": (_FLOAT, 0.0, False),
    "train.loss_chunks": (_INT, 1, False),
    "train.checkpoints_to_average": (_INT, 1, False),
    "train.early_stopping_passes": (_INT, 0, False),
    "train.learning_rate_scale": (_FLOAT, 0.0, True),
    "train.learning_rate": (_FLOAT, 0.0, True),
    "train.grad_clip_norm": (_FLOAT, 0.0, False),
    "train.weight_decay": (_FLOAT, 0.0, False),
    "train.grad_accum_steps": (_INT, 1, False),
    "train.time_budget_minutes": (_FLOAT, 0.0, False),
    "train.cooldown_fraction": (_FLOAT, 0.0, False),  # Also below 1 (below).
    "train.log_every": (_INT, 1, False),
    "train.eval_every": (_INT, 1, False),
    "train.eval_bleu_sentences": (_INT, 0, False),
    "train.samples_to_print": (_INT, 0, False),
    "train.test_sentences": (_INT, 0, False),
    "train.checkpoint_every": (_INT, 1, False),
    "train.checkpoints_to_keep": (_INT, 1, False),
    "train.peak_flops": (_FLOAT, 0.0, False),
    "train.heartbeat_timeout_seconds": (_FLOAT, 0.0, True),
    "data.tokenizer_max_sentences": (_INT, 1, False),
    "data.max_len": (_INT, 2, False),
    "data.tokens_per_batch": (_INT, 1, False),
    "data.num_workers": (_INT, 0, False),
    "data.tokenize_processes": (_INT, 0, False),
    "data.prepare_timeout_minutes": (_FLOAT, 0.0, True),
    "decode.beam_size": (_INT, 1, False),
    "decode.length_penalty": (_FLOAT, 0.0, False),
    "decode.max_extra_len": (_INT, 0, False),
    "decode.tokens_per_batch": (_INT, 0, False),
}
_BELOW_ONE = ("train.adam_b1", "train.adam_b2", "train.label_smoothing", "train.cooldown_fraction")

# field -> the section of the paper it follows, for the generated configuration reference (docs/).
PAPER_SECTIONS = {
    "model.vocab_size": "3.4, 5.1", "model.d_model": "3, Table 3", "model.d_ff": "3.3, Table 3",
    "model.num_heads": "3.2.2, Table 3", "model.d_k": "3.2.2, Table 3 (B)", "model.d_v": "3.2.2, Table 3",
    "model.num_layers": "3.1, Table 3", "model.dropout_rate": "5.4, Table 3",
    "model.positional_encoding": "3.5, Table 3 (E)", "model.norm_position": "3.1",
    "model.attention_impl": "3.2.1", "model.activation": "3.3",
    "train.num_steps": "5.2", "train.warmup_steps": "5.3", "train.adam_b1": "5.3", "train.adam_b2": "5.3",
    "train.adam_eps": "5.3", "train.label_smoothing": "5.4, Table 3 (D)", "train.schedule": "5.3",
    "train.learning_rate_scale": "5.3", "train.checkpoints_to_average": "6.1",
    "data.dataset": "5.1", "data.source_lang": "5.1", "data.target_lang": "5.1", "data.tokenizer": "5.1",
    "data.tokens_per_batch": "5.1", "decode.beam_size": "6.1", "decode.length_penalty": "6.1",
    "decode.max_extra_len": "6.1",
}


def decode_tokens_per_batch(config: ml_collections.ConfigDict) -> int:
  """Source tokens per decoding batch: `decode.tokens_per_batch`, or `data.tokens_per_batch` when
  it is 0 (or absent, in the config of a run saved before it existed)."""
  return int(config.decode.get("tokens_per_batch", 0) or config.data.tokens_per_batch)


def validate_run_config(config: ml_collections.ConfigDict) -> TransformerConfig:
  """Checks the whole run config before any work starts (data, tokenizer, compilation).

  Returns:
    The validated model config.

  Raises:
    ConfigError: naming the first field that is not accepted, its value and what is.
  """
  model = TransformerConfig.from_config(config.model)
  for field, (kind, low, open_low) in _RUN_FIELDS.items():
    section, _, name = field.rpartition(".")
    value = (config[section] if section else config)[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _INT and not (number and float(value).is_integer()):
      raise ConfigError(f"{field}={value!r} must be an integer")
    if not number or value < low or (open_low and value == low):
      accepted = f"> {low}" if open_low else f">= {low}"
      raise ConfigError(f"{field}={value!r} is not accepted; it must be a number {accepted}")
  for field in _BELOW_ONE:
    section, _, name = field.partition(".")
    if config[section][name] >= 1.0:
      raise ConfigError(f"{field}={config[section][name]!r} must be below 1")
  if not isinstance(config.init_from, str):
    raise ConfigError(f"init_from={config.init_from!r} must be a directory path or empty")
  check_choice("train.schedule", config.train.schedule, SCHEDULES)
  check_choice("data.tokenizer", config.data.tokenizer, TOKENIZERS)
  check_choice("train.best_metric", config.train.best_metric, BEST_METRICS)
  if config.train.early_stopping_passes and not config.train.best_metric:
    raise ConfigError("train.early_stopping_passes needs train.best_metric ('bleu' or 'loss'): "
                      "early stopping counts the passes since the best one")
  if config.train.best_metric == "bleu" and not config.train.eval_bleu_sentences:
    raise ConfigError("train.best_metric='bleu' needs train.eval_bleu_sentences > 0 (the validation "
                      "sample it is measured on); or use train.best_metric='loss'")
  check_choice("data.dataset", config.data.dataset, DATASETS)
  if model.vocab_size < 2 * RESERVED_IDS:
    raise ConfigError(
        f"model.vocab_size={model.vocab_size} is too small: {RESERVED_IDS} ids are reserved (PAD, "
        f"EOS, BOS, UNK) and SentencePiece needs room for the text's characters; use at least "
        f"{2 * RESERVED_IDS}, typically thousands")
  if config.data.max_len > model.max_len and model.positional_encoding == "learned":
    raise ConfigError(f"data.max_len={config.data.max_len} exceeds model.max_len={model.max_len}, "
                      "the number of learned positions")
  if config.data.tokens_per_batch < config.data.max_len:
    raise ConfigError(
        f"data.tokens_per_batch={config.data.tokens_per_batch} is smaller than data.max_len="
        f"{config.data.max_len}: the longest examples would not fit in a batch")
  for axis in ("data", "fsdp", "tensor"):
    size = config.mesh[axis]
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{axis}={size!r} must be a positive integer or -1 (the rest)")
  return model
