"""Ahead-of-time compilation (`transformer-compile`): the train step and beam search compiled from
shapes for 8 CPU devices and for a TPU slice (with libtpu), per-device memory, FLOPs, and the
largest batch that fits."""

import importlib.util
import io
import pathlib
import subprocess
import sys

import jax
import pytest

from tiny_run import tiny_run_config
from transformer_jax import aot
from transformer_jax.cli import compile as compile_cli
from transformer_jax.steps import make_setup
from transformer_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIB = 2**30


def tiny(**mesh):
  config = tiny_run_config(steps=1)
  config.mesh.update(mesh)
  return config


@pytest.mark.slow  # About 40 s; the command tests below compile for CPU devices and a TPU slice.
def test_the_train_step_and_decoding_compile_for_eight_devices_with_their_figures():
  config = tiny(fsdp=2)
  out = io.StringIO()
  assert compile_cli.compile_and_report(config, "cpu:8", out=out) == 0
  text = out.getvalue()
  assert "mesh {'data': 4, 'fsdp': 2, 'tensor': 1}" in text
  assert "train step (8 x 32 tokens a side)" in text and "decode (beam 4, 8 sources of 32 tokens)" in text
  train, decode = aot.compile_run(config, jax.devices()[:8])
  assert train.temporaries > 0 and train.total >= train.arguments > train.state > 0
  # Parameters and Adam's two moments, split over fsdp=2 where the rules split them.
  params = sum(x.size for x in jax.tree.leaves(make_setup(tiny(), jax.devices()[:1]).abstract_state().params))
  assert 3 * params * 4 / 2 <= train.state <= 3 * params * 4
  # The compiler's FLOPs, per device, against the analytic count (the backward pass counted as 2x).
  assert 0.9 < train.flops / train.model_flops < 1.2
  assert decode.state < train.state  # Decoding holds the parameters alone.


def test_a_step_that_does_not_fit_says_so_and_exits_1():
  out = io.StringIO()
  assert compile_cli.compile_and_report(tiny(), "cpu:8", memory_gib=0.001, decode=False, out=out) == 1
  assert "DOES NOT FIT" in out.getvalue()


@pytest.mark.slow  # About 90 s: a search over batch sizes, each a TPU compile.
def test_the_largest_batch_fits_and_one_more_row_per_shard_does_not():
  config, devices = tiny(), jax.devices()[:8]
  memory = int(0.05 * GIB)
  tokens, report = aot.largest_batch(config, devices, memory, log=lambda s: None)
  unit = 8 * config.data.max_len  # One row on each of the 8 data-parallel shards.
  assert tokens > 0 and tokens % unit == 0 and report.total <= memory
  for value, fits in ((tokens, True), (tokens + unit, False)):
    config.data.tokens_per_batch = value
    assert aot.train_step_fits(config, devices, memory)[0] is fits


def test_bad_topologies_and_batches_are_named():
  with pytest.raises(ConfigError, match="XLA_FLAGS=--xla_force_host_platform_device_count=64"):
    aot.topology_devices("cpu:64")
  config = tiny()
  config.data.tokens_per_batch = 100  # Three rows of 32 for 8 shards.
  with pytest.raises(ConfigError, match="fewer than the mesh's 8 data-parallel shards; use at least 256"):
    aot.compile_run(config, jax.devices()[:8])


def compile_command(*args):
  cmd = [sys.executable, "-m", "transformer_jax.cli.compile", "--config", str(ROOT / "configs" / "small.py"),
         "--config.model.num_layers=1", "--config.model.vocab_size=512", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_the_command_compiles_for_cpu_devices():
  result = compile_command("--topology", "cpu:4", "--config.mesh.fsdp=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "cpu:4: 4 x cpu; mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in result.stdout
  result = compile_command("--topology", "cpu:4", "--config.mesh.tensor=3")
  assert result.returncode == 2 and "transformer-compile: error:" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='needs libtpu: pip install -e ".[tpu]"')
def test_the_command_compiles_for_a_tpu_slice_without_a_tpu():
  result = compile_command("--topology", "v5e:2x2", "--config.model.dtype=bfloat16", "--config.mesh.fsdp=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "v5e:2x2: 4 x TPU v5 lite, 16 GiB each; mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in result.stdout
  assert result.stdout.count("of 16 GiB: fits") == 2  # The train step and beam search.
  result = compile_command("--topology", "v9z:1x1")
  assert result.returncode == 2 and "libtpu cannot describe it" in result.stderr


def test_decoding_has_its_own_batch_budget():
  config = tiny()
  config.decode.tokens_per_batch = 512  # Two rows of 32 a shard, where training has one.
  train, decode = aot.compile_run(config, jax.devices()[:8])
  assert train.name.startswith("train step (8 x 32") and decode.name.startswith("decode (beam 4, 16 sources")
