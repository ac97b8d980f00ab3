"""Properties of the whole Transformer (section 3) on tiny configurations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params, random_tokens, tiny_config
from transformer_jax import PAD_ID, Transformer, TransformerConfig, init_cache
from transformer_jax.losses import compute_metrics
from transformer_jax.steps import batch_metrics
from transformer_jax.model import shift_right

B, S, T = 3, 7, 6
VARIANTS = {
    "paper": {},
    "pre_ln": {"norm_position": "pre"},
    "learned_positions": {"positional_encoding": "learned"},
    "dot_product": {"attention_impl": "dot_product"},
}


def batch(config, key=0, b=B, s=S, t=T):
  k1, k2 = jax.random.split(jax.random.key(key))
  return random_tokens(k1, (b, s), config.vocab_size), random_tokens(k2, (b, t), config.vocab_size)


def test_output_shapes_and_dtypes():
  config = tiny_config()
  src, tgt = batch(config)
  model = Transformer(config)
  params = init_params(config, src, tgt)
  logits = model.apply({"params": params}, src, tgt)
  assert logits.shape == (B, T, config.vocab_size) and logits.dtype == jnp.float32
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  assert encoded.shape == (B, S, config.d_model)


def analytic_param_count(vocab_size, d_model, d_ff, num_layers):
  """Weights and biases of every projection, LayerNorm scales and offsets, one shared embedding."""
  attention = 4 * (d_model * d_model + d_model)
  feed_forward = d_model * d_ff + d_ff + d_ff * d_model + d_model
  norm = 2 * d_model
  encoder_layer = attention + feed_forward + 2 * norm
  decoder_layer = 2 * attention + feed_forward + 3 * norm
  return vocab_size * d_model + num_layers * (encoder_layer + decoder_layer)


@pytest.mark.parametrize("name,d_model,d_ff,num_heads,paper_count", [
    ("base", 512, 2048, 8, 65e6),
    ("big", 1024, 4096, 16, 213e6),
])
def test_parameter_counts_of_base_and_big(name, d_model, d_ff, num_heads, paper_count):
  config = TransformerConfig(vocab_size=37000, d_model=d_model, d_ff=d_ff, num_heads=num_heads)
  src = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(config).init(jax.random.key(0), src, src)))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  assert count == analytic_param_count(37000, d_model, d_ff, 6)
  assert abs(count - paper_count) / paper_count < 0.05, f"{name}: {count / 1e6:.1f}M"
  assert round(count / 1e5) / 10 == {"base": 63.1, "big": 214.2}[name]


def test_every_parameter_carries_logical_axis_names():
  config = tiny_config(positional_encoding="learned")
  src, tgt = batch(config)
  variables = Transformer(config).init(jax.random.key(0), src, tgt)
  specs = nn.get_partition_spec(variables)["params"]
  shapes = nn.meta.unbox(variables)["params"]
  known = {"vocab", "embed", "heads", "kv", "mlp", "length"}
  for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                        jax.tree.leaves(shapes)):
    assert len(spec) == leaf.ndim and set(spec) <= known, spec


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
  """Changing target tokens after position t leaves the logits at positions <= t unchanged."""
  config = tiny_config(**VARIANTS[variant])
  src, tgt = batch(config)
  model = Transformer(config)
  params = init_params(config, src, tgt)
  logits = model.apply({"params": params}, src, tgt)
  for t in range(T - 1):
    changed = tgt.at[:, t + 1:].set(random_tokens(jax.random.key(t), (B, T - t - 1), config.vocab_size))
    assert not np.array_equal(changed, tgt)
    other = model.apply({"params": params}, src, changed)
    # logits[t] predicts tgt[t] from tgt[:t]: positions <= t + 1 cannot see the change at t + 1.
    np.testing.assert_allclose(other[:, :t + 2], logits[:, :t + 2], atol=1e-5)
    assert not np.allclose(other[:, t + 2:], logits[:, t + 2:], atol=1e-5) or t + 2 >= T


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_invariance(variant):
  """Extra padding on the source (and target) leaves the outputs for the real tokens unchanged."""
  config = tiny_config(**VARIANTS[variant])
  src, tgt = batch(config)
  src = src.at[0, 5:].set(PAD_ID).at[1, 3:].set(PAD_ID)
  tgt = tgt.at[1, 4:].set(PAD_ID)
  model = Transformer(config)
  params = init_params(config, src, tgt)
  logits = model.apply({"params": params}, src, tgt)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)

  padded_src = jnp.pad(src, ((0, 0), (0, 9)), constant_values=PAD_ID)
  padded_tgt = jnp.pad(tgt, ((0, 0), (0, 4)), constant_values=PAD_ID)
  padded_logits = model.apply({"params": params}, padded_src, padded_tgt)
  padded_encoded = model.apply({"params": params}, padded_src, method=Transformer.encode)

  real_tgt = np.asarray(tgt != PAD_ID)
  np.testing.assert_allclose(padded_logits[:, :T][real_tgt], logits[real_tgt], atol=1e-5)
  real_src = np.asarray(src != PAD_ID)
  np.testing.assert_allclose(padded_encoded[:, :S][real_src], encoded[real_src], atol=1e-5)


def test_packed_rows_keep_examples_apart():
  """Two examples packed into one row give the logits each gives alone."""
  config = tiny_config()
  (src_a, tgt_a), (src_b, tgt_b) = batch(config, 1, 1, 4, 3), batch(config, 2, 1, 3, 4)
  model = Transformer(config)
  params = init_params(config, src_a, tgt_a)
  alone_a = model.apply({"params": params}, src_a, tgt_a)
  alone_b = model.apply({"params": params}, src_b, tgt_b)

  cat = lambda a, b, pad: jnp.concatenate([a, b, jnp.zeros((1, pad), a.dtype)], axis=1)
  packed = model.apply(
      {"params": params},
      cat(src_a, src_b, 2), cat(tgt_a, tgt_b, 1),
      src_segments=jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0, 0]]),
      src_positions=jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0, 0]]),
      tgt_segments=jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]]),
      tgt_positions=jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0]]))
  np.testing.assert_allclose(packed[:, :3], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed[:, 3:7], alone_b, atol=1e-5)


@pytest.mark.parametrize("logits_bias", [False, True])
def test_metrics_without_the_logits_equal_the_metrics_of_the_logits(logits_bias):
  """`steps.batch_metrics` (the train and eval steps' loss) against `compute_metrics` of the
  logits, on packed rows with padding: the same sums, and the loss's gradients of every
  parameter."""
  config = tiny_config(logits_bias=logits_bias)
  src, tgt = batch(config, 3, 2, 9, 8)
  tgt = tgt.at[1, 6:].set(PAD_ID)
  packing = {"tgt_segments": (tgt != PAD_ID).astype(jnp.int32).at[0, 4:].set(2),
             "tgt_positions": jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3], list(range(8))])}
  model = Transformer(config)
  params = init_params(config, src, tgt)
  if logits_bias:  # Not zero, so that its gradient and its place in the logits both count.
    params["decoder"]["logits_bias"] = jnp.linspace(-1.0, 1.0, config.vocab_size)

  def both(params):
    plain = compute_metrics(model.apply({"params": params}, src, tgt, **packing), tgt, 0.1)
    ours = batch_metrics(model, params, {"src": src, "tgt": tgt, **packing}, 0.1, 3, train=False)
    return plain, ours

  plain, ours = jax.jit(both)(params)
  for key in ("loss", "nll", "correct", "tokens"):
    np.testing.assert_allclose(ours[key], plain[key], rtol=1e-5, err_msg=key)
  mean_loss = lambda i: lambda p: (lambda m: m["loss"] / m["tokens"])(both(p)[i])
  expected, got = (jax.jit(jax.grad(mean_loss(i)))(params) for i in (0, 1))
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    b = dict(jax.tree_util.tree_leaves_with_path(expected))[path]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_shift_right_starts_every_example_with_bos():
  tgt = jnp.asarray([[5, 6, 1, 7, 1, 0]])
  positions = jnp.asarray([[0, 1, 2, 0, 1, 2]])
  np.testing.assert_array_equal(shift_right(tgt, positions), [[2, 5, 6, 2, 7, 1]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_the_full_decoder(variant):
  """Decoding one position at a time against the cache gives the full pass's logits."""
  config = tiny_config(**VARIANTS[variant])
  src, tgt = batch(config)
  src = src.at[1, 4:].set(PAD_ID)
  model = Transformer(config)
  params = init_params(config, src, tgt)
  encoded = model.apply({"params": params}, src, method=Transformer.encode)
  tgt_in = shift_right(tgt, jnp.broadcast_to(jnp.arange(T), tgt.shape))
  full = model.apply({"params": params}, encoded, src, tgt_in, method=Transformer.decode)

  cache = init_cache(model, params, encoded, src, max_len=T + 2)
  step = jax.jit(lambda cache, tokens, i: model.apply(
      {"params": params, "cache": cache}, encoded, src, tokens, decode_index=i,
      method=Transformer.decode, mutable=["cache"]))
  for t in range(T):
    logits, variables = step(cache, tgt_in[:, t:t + 1], jnp.int32(t))
    cache = variables["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")


def test_a_decoding_step_attends_in_plain_products_whatever_the_implementation():
  """attention_impl="cudnn" cannot run on a CPU, yet its cached decoding steps do: they never call
  a fused kernel, and give the plain model's logits (the encoder is the plain model's here)."""
  plain, fused = tiny_config(), tiny_config(attention_impl="cudnn")
  src, tgt = batch(plain)
  params = init_params(plain, src, tgt)
  encoded = Transformer(plain).apply({"params": params}, src, method=Transformer.encode)
  tgt_in = shift_right(tgt, jnp.broadcast_to(jnp.arange(T), tgt.shape))
  full = Transformer(plain).apply({"params": params}, encoded, src, tgt_in, method=Transformer.decode)
  model = Transformer(fused)
  cache = init_cache(model, params, encoded, src, max_len=T)
  for t in range(T):
    logits, variables = model.apply({"params": params, "cache": cache}, encoded, src,
                                    tgt_in[:, t:t + 1], decode_index=jnp.int32(t),
                                    method=Transformer.decode, mutable=["cache"])
    cache = variables["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")


def test_dropout_is_off_at_evaluation_and_keyed_in_training():
  config = tiny_config(dropout_rate=0.3)
  src, tgt = batch(config)
  model = Transformer(config)
  params = init_params(config, src, tgt)
  plain = model.apply({"params": params}, src, tgt)
  with_rng = model.apply({"params": params}, src, tgt, rngs={"dropout": jax.random.key(5)})
  np.testing.assert_array_equal(plain, with_rng)

  train = lambda seed: model.apply({"params": params}, src, tgt, train=True,
                                   rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  assert not np.allclose(train(1), plain)


def test_bfloat16_compute_runs_and_stays_close_to_float32():
  config = tiny_config()
  src, tgt = batch(config)
  params = init_params(config, src, tgt)
  f32 = Transformer(config).apply({"params": params}, src, tgt)
  bf16 = Transformer(tiny_config(dtype="bfloat16")).apply({"params": params}, src, tgt)
  assert bf16.dtype == jnp.float32  # Logits stay in float32.
  p32, p16 = jax.nn.softmax(f32), jax.nn.softmax(bf16)
  assert float(jnp.abs(p32 - p16).max()) < 0.02
  assert float(jnp.mean(jnp.argmax(f32, -1) == jnp.argmax(bf16, -1))) > 0.9


def test_bfloat16_compute_gradients_compile_and_point_where_float32_gradients_do():
  config = tiny_config()
  src, tgt = batch(config)
  params = init_params(config, src, tgt)

  def gradients(dtype):
    model = Transformer(tiny_config(dtype=dtype))
    loss = lambda p: compute_metrics(model.apply({"params": p}, src, tgt), tgt, 0.1)["loss"]
    return jnp.concatenate([g.ravel() for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params))])

  g32, g16 = gradients("float32"), gradients("bfloat16")
  assert g16.dtype == jnp.float32  # Parameters and their gradients stay float32.
  cosine = jnp.dot(g32, g16) / (jnp.linalg.norm(g32) * jnp.linalg.norm(g16))
  assert float(cosine) > 0.99


def test_bfloat16_parameters():
  config = tiny_config(dtype="bfloat16", param_dtype="bfloat16")
  src, tgt = batch(config)
  params = init_params(config, src, tgt)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  logits = Transformer(config).apply({"params": params}, src, tgt)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
