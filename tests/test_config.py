"""Config files, command-line overrides (every Table 3 variation) and hyperparameter validation."""

import dataclasses
import pathlib
import sys
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from transformer_jax import Transformer, TransformerConfig
from transformer_jax.config import base_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
# configs/marian.py reads a Marian model directory (`--config configs/marian.py:DIR`):
# tests/test_marian_import.py parses it with one.
NEEDS_ARGUMENT = {"marian.py"}
CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.py")
                      if not p.name.startswith("_") and p.name not in NEEDS_ARGUMENT)


def parse(config_file: str, *overrides: str):
  """Parses `--config FILE --config.a.b=value ...` exactly as train.py's flags do."""
  argv = ["train.py", f"--config={CONFIGS / config_file}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True)
  with mock.patch.object(sys, "argv", argv):  # config_flags reads overrides from sys.argv.
    flag_values(argv)
  return flag_values.config


def abstract_params(config: TransformerConfig):
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = lambda: nn.meta.unbox(Transformer(config).init(jax.random.key(0), tokens, tokens))
  return jax.eval_shape(init)["params"]


def test_there_are_config_files():
  assert {"base.py", "big.py", "small.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_config_file_loads_and_builds_its_model(config_file):
  config = parse(config_file)
  model_config = TransformerConfig.from_config(config.model)
  if model_config.attention_impl == "cudnn":  # Traced only where cuDNN is; the parameters are the same.
    model_config = dataclasses.replace(model_config, attention_impl="dot_product")
  params = abstract_params(model_config)
  assert params["embed"]["embedding"].shape == (model_config.vocab_size, model_config.d_model)


def test_small_config_runs_a_real_forward_pass():
  model_config = TransformerConfig.from_config(parse("small.py").model)
  src = jnp.full((2, 10), 7, jnp.int32)
  model = Transformer(model_config)
  params = nn.meta.unbox(model.init(jax.random.key(0), src, src))["params"]
  logits = jax.jit(model.apply)({"params": params}, src, src)
  assert logits.shape == (2, 10, model_config.vocab_size) and np.all(np.isfinite(logits))


def test_base_and_big_follow_table_3():
  base, big = parse("base.py"), parse("big.py")
  assert (base.model.num_layers, base.model.d_model, base.model.d_ff, base.model.num_heads) == (6, 512, 2048, 8)
  assert (big.model.num_layers, big.model.d_model, big.model.d_ff, big.model.num_heads) == (6, 1024, 4096, 16)
  assert (base.model.dropout_rate, big.model.dropout_rate) == (0.1, 0.3)
  assert base.train.label_smoothing == big.train.label_smoothing == 0.1
  assert (base.train.num_steps, big.train.num_steps) == (100_000, 300_000)
  assert TransformerConfig.from_config(big.model).head_dim_k == 64
  assert (base.train.adam_b1, base.train.adam_b2, base.train.adam_eps) == (0.9, 0.98, 1e-9)
  assert (base.decode.beam_size, base.decode.length_penalty) == (4, 0.6)


def leaves(config) -> dict:
  """Every field of a ConfigDict by its dotted name: {"model.d_model": 512, ...}."""
  def walk(tree: dict, prefix: str):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value
  return dict(walk(config.to_dict(), ""))


def test_base_shows_the_schema_defaults_and_big_changes_only_table_3s_big_fields():
  # configs/base.py repeats base_config()'s values so that a reader sees them: it must not drift.
  base, big, schema = leaves(parse("base.py")), leaves(parse("big.py")), leaves(base_config())
  assert base.keys() == schema.keys() == big.keys()
  assert {k: (base[k], schema[k]) for k in schema if base[k] != schema[k]} == {}
  changed = {k: big[k] for k in base if big[k] != base[k]}
  assert changed == {"model.d_model": 1024, "model.d_ff": 4096, "model.num_heads": 16,
                     "model.dropout_rate": 0.3, "train.num_steps": 300_000,
                     "train.checkpoints_to_average": 20}


# Every row of Table 3 as command-line overrides of base, with the (d_k, d_v) each implies.
TABLE_3 = {
    "A_h1": (["--config.model.num_heads=1"], 512, 512),
    "A_h4": (["--config.model.num_heads=4"], 128, 128),
    "A_h16": (["--config.model.num_heads=16"], 32, 32),
    "A_h32": (["--config.model.num_heads=32"], 16, 16),
    "B_dk16": (["--config.model.d_k=16"], 16, 64),
    "B_dk32": (["--config.model.d_k=32"], 32, 64),
    "C_N2": (["--config.model.num_layers=2"], 64, 64),
    "C_N4": (["--config.model.num_layers=4"], 64, 64),
    "C_N8": (["--config.model.num_layers=8"], 64, 64),
    "C_d256": (["--config.model.d_model=256"], 32, 32),
    "C_d1024": (["--config.model.d_model=1024"], 128, 128),
    "C_dff1024": (["--config.model.d_ff=1024"], 64, 64),
    "C_dff4096": (["--config.model.d_ff=4096"], 64, 64),
    "D_drop0": (["--config.model.dropout_rate=0.0"], 64, 64),
    "D_drop02": (["--config.model.dropout_rate=0.2"], 64, 64),
    "D_ls0": (["--config.train.label_smoothing=0.0"], 64, 64),
    "D_ls02": (["--config.train.label_smoothing=0.2"], 64, 64),
    "E_learned": (["--config.model.positional_encoding=learned"], 64, 64),
}


@pytest.mark.parametrize("row", TABLE_3)
def test_table_3_variations_are_command_line_overrides(row):
  overrides, d_k, d_v = TABLE_3[row]
  config = parse("base.py", *overrides)
  key, value = overrides[0].removeprefix("--config.").split("=")
  section, field = key.split(".")
  assert str(config[section][field]) == value
  model_config = TransformerConfig.from_config(config.model)
  assert (model_config.head_dim_k, model_config.head_dim_v) == (d_k, d_v)
  params = abstract_params(model_config)
  layer = params["encoder"]["layer_0"]["self_attention"]
  assert layer["key"]["kernel"].shape == (model_config.d_model, model_config.num_heads, d_k)
  assert layer["value"]["kernel"].shape == (model_config.d_model, model_config.num_heads, d_v)


def test_a_misspelled_key_fails_loudly():
  with pytest.raises(Exception, match="num_head"):
    parse("base.py", "--config.model.num_head=16")
  config = parse("base.py")
  with pytest.raises(AttributeError):
    config.model.num_head = 16
  with pytest.raises(ValueError, match="unknown model fields.*num_head"):
    TransformerConfig.from_config({"num_head": 16})


@pytest.mark.parametrize("fields,message", [
    ({"d_model": 510}, "d_model=510 is not divisible by num_heads=8"),
    ({"num_heads": 0}, "num_heads=0 must be a positive integer"),
    ({"d_ff": -1}, "d_ff=-1 must be a positive integer"),
    ({"num_layers": 2.5}, "num_layers=2.5 must be a positive integer"),
    ({"vocab_size": 0}, "vocab_size=0 must be a positive integer"),
    ({"d_k": 0}, "d_k=0 must be a positive integer"),
    ({"dropout_rate": 1.0}, r"dropout_rate=1.0 must lie in \[0, 1\)"),
    ({"positional_encoding": "rotary"}, "positional_encoding='rotary' is not one of 'sinusoidal', 'learned'"),
    ({"norm_position": "middle"}, "norm_position='middle' is not one of 'post', 'pre'"),
    ({"attention_impl": "flash"}, "attention_impl='flash' is not one of 'einsum', 'dot_product'"),
    ({"dtype": "float16"}, "dtype='float16' is not one of 'float32', 'bfloat16'"),
    ({"attention_impl": "dot_product", "d_k": 16}, "needs d_k == d_v"),
])
def test_bad_hyperparameters_raise_value_errors_naming_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    TransformerConfig(**fields)


def test_bad_override_is_caught_before_tracing():
  config = parse("base.py", "--config.model.num_heads=7")
  with pytest.raises(ValueError, match="d_model=512 is not divisible by num_heads=7"):
    TransformerConfig.from_config(config.model)


def test_explicit_d_k_lifts_the_divisibility_requirement():
  config = TransformerConfig(d_model=510, num_heads=8, d_k=64, d_v=64)
  assert config.head_dim_k == 64


def test_the_gpu_quick_start_is_the_quick_start_held_to_steps_in_bfloat16_with_cudnn():
  """configs/gpu.py changes configs/small.py only where its docstring says: the precision, the
  attention kernel, a step count for the time budget, and fewer checkpoints."""
  flatten = lambda config: {f"{section}.{key}": value for section, fields in config.to_dict().items()
                            if isinstance(fields, dict) for key, value in fields.items()}
  small, gpu = flatten(parse("small.py")), flatten(parse("gpu.py"))
  changed = {key: gpu[key] for key in gpu if gpu[key] != small[key]}
  assert changed == {"model.dtype": "bfloat16", "model.attention_impl": "cudnn",
                     "train.time_budget_minutes": 0.0, "train.num_steps": 2000,
                     "train.checkpoint_every": 500}
  # The cooldown then takes the last 20% of the steps, as it took 20% of the 30 minutes.
  assert gpu["train.cooldown_fraction"] == small["train.cooldown_fraction"] == 0.2


def test_cudnn_attention_is_refused_without_a_gpu():
  from transformer_jax import steps
  from transformer_jax.errors import ConfigError
  config = parse("small.py", "--config.model.attention_impl=cudnn")
  with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU.*CPUs"):
    steps.make_setup(config, jax.devices()[:1])
