"""The compiled train and eval steps (steps.py): a tiny model overfits a batch and learns a task
exactly, and eight devices compute what one does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_run import tiny_batches, tiny_setup
from transformer_jax import steps
from transformer_jax.data import pipeline, token_cache


def test_a_tiny_model_overfits_one_batch():
  config, _ = tiny_setup(label_smoothing=0.0, schedule="constant", learning_rate=3e-3, warmup_steps=1)
  config.model.dropout_rate = 0.0
  setup = steps.make_setup(config, jax.devices()[:1])
  batch = setup.put_batch(tiny_batches(config, setup)[0])
  state = setup.init_state(0)
  key = jax.random.key(0)
  for _ in range(300):
    state, metrics = setup.train_step(state, batch, key)
  loss = float(metrics["loss"]) / float(metrics["tokens"])
  assert loss < 0.05, loss
  assert float(metrics["correct"]) == float(metrics["tokens"])


@pytest.mark.slow  # About 45 s; tests/test_sharding.py trains on four meshes against one device.
def test_loss_on_eight_devices_equals_loss_on_one():
  config, one = tiny_setup(devices=jax.devices()[:1])
  _, eight = tiny_setup(devices=jax.devices()[:8])
  assert eight.mesh.shape["data"] == 8
  local = tiny_batches(config, eight)[0]
  results = []
  for setup in (one, eight):
    state = setup.init_state(0)
    evaluated = setup.eval_step(state.params, setup.put_batch(local))
    _, trained = setup.train_step(state, setup.put_batch(local), jax.random.key(1))
    results.append([float(evaluated["loss"]), float(trained["loss"]), float(trained["grad_norm"])])
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_a_tiny_model_learns_to_reverse_sequences_exactly(dtype):
  """Trained on made-up pairs whose target is the reversed source, greedy decoding of held-out
  sources gives their exact reversals; computing in bfloat16 (parameters, softmax, loss and the
  optimiser in float32) learns it as well."""
  from transformer_jax import translation
  config, _ = tiny_setup(label_smoothing=0.0, schedule="constant", learning_rate=2e-3, warmup_steps=50)
  config.model.update(dict(dropout_rate=0.0, d_model=64, d_ff=128, vocab_size=16, max_len=16, dtype=dtype))
  config.data.tokens_per_batch = 512
  setup = steps.make_setup(config, jax.devices()[:1])
  rng = np.random.default_rng(0)
  def reversal_corpus(n):
    lengths = rng.integers(2, 8, n)  # EOS included.
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    src = rng.integers(4, 16, offsets[-1]).astype(np.uint16)
    src[offsets[1:] - 1] = 1
    tgt = src.copy()
    for i in range(n):
      tgt[offsets[i]:offsets[i + 1] - 1] = src[offsets[i]:offsets[i + 1] - 1][::-1]
    return token_cache.TokenizedCorpus(src, offsets, tgt, offsets.copy())
  corpus = reversal_corpus(4000)
  batches = pipeline.EpochBatches(corpus, np.arange(len(corpus)), tokens_per_batch=512, max_len=16,
                                  packing=True, seed=0, shuffle=True, num_epochs=None)
  state, key = setup.init_state(0), jax.random.key(0)
  for k in range(900):
    state, metrics = setup.train_step(state, setup.put_batch(batches[k]), key)
  held_out = reversal_corpus(32)
  src = np.zeros((32, 8), np.int32)
  for i in range(32):
    src[i, :len(held_out.source(i))] = held_out.source(i)
  out = np.asarray(translation.translate(setup.model, state.params, jnp.asarray(src), beam_size=1,
                                         alpha=0.0, max_extra_len=2))
  exact = sum(np.array_equal(out[i, :len(held_out.target(i))], held_out.target(i)) for i in range(32))
  assert exact == 32, f"{exact}/32 exact reversals"
