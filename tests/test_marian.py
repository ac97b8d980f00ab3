"""Our model as Hugging Face's MarianMTModel: the same logits (up to LayerNorm epsilon) and the
same greedy and beam-search translations, from weights converted by `transformer_jax.marian`.

Needs `transformers` and `torch` (`pip install -e ".[hf]"`); skipped without them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params, random_tokens, tiny_config
from transformer_jax import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Transformer, marian, runs, translation
from transformer_jax.cli import export as export_cli
from transformer_jax.errors import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SRC_LEN, EXTRA = 7, 6


def model_and_sources(scale=2.0, **overrides):
  config = tiny_config(dropout_rate=0.0, layer_norm_epsilon=marian.MARIAN_LAYER_NORM_EPSILON,
                       logits_bias=True, **overrides)
  src = np.array(random_tokens(jax.random.key(1), (6, SRC_LEN), config.vocab_size))
  src[:, -1] = EOS_ID
  src[1, 4:] = [EOS_ID, PAD_ID, PAD_ID]  # A shorter source, padded.
  src[3, 3:] = [EOS_ID, PAD_ID, PAD_ID, PAD_ID]
  params = init_params(config, jnp.asarray(src), jnp.asarray(src), seed=3)
  # scale > 1: sharper, input-dependent predictions than a fresh initialisation gives (and float
  # rounding amplified accordingly).
  params = jax.tree.map(lambda x: x * scale, params)
  # A random logits bias, and none of the probability on PAD_ID and BOS_ID, as after training:
  # our decoding never generates them (decode.never_generated) and generate here is not told to.
  bias = jax.random.normal(jax.random.key(4), (config.vocab_size,))
  params["decoder"]["logits_bias"] = bias.at[jnp.array([PAD_ID, BOS_ID])].set(-100.0)
  return Transformer(config), params, src


def test_the_position_tables_differ_by_the_permutation():
  from transformer_jax.layers import sinusoidal_encoding
  config = tiny_config()
  theirs = transformers.MarianMTModel(transformers.MarianConfig(
      **marian.config_kwargs(config, max_positions=12))).model.encoder.embed_positions.weight
  ours = np.asarray(sinusoidal_encoding(jnp.arange(12)[None], config.d_model))[0]
  np.testing.assert_allclose(ours[:, marian.position_permutation(config.d_model)],
                             theirs.detach().numpy(), atol=1e-5)


def test_converted_weights_give_marians_logits():
  model, params, src = model_and_sources(scale=1.0)
  tgt = np.asarray(random_tokens(jax.random.key(2), (6, 5), model.config.vocab_size))
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt)))
  peer = marian.marian_model(params, model.config)
  decoder_in = np.concatenate([np.full((6, 1), BOS_ID), tgt[:, :-1]], axis=1)
  with torch.no_grad():
    theirs = peer(input_ids=torch.from_numpy(src).long(),
                  attention_mask=torch.from_numpy(src != PAD_ID).long(),
                  decoder_input_ids=torch.from_numpy(decoder_in).long()).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_generate_on_converted_weights_translates_as_we_do(beam_size):
  model, params, src = model_and_sources()
  max_len = SRC_LEN + EXTRA
  ours = np.asarray(translation.translate(model, params, jnp.asarray(src), beam_size=beam_size,
                                          alpha=0.0, max_extra_len=EXTRA))
  peer = marian.marian_model(params, model.config)
  generation = transformers.GenerationConfig(
      decoder_start_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, num_beams=beam_size,
      do_sample=False, length_penalty=0.0, early_stopping=False, max_new_tokens=max_len)
  with torch.no_grad():
    input_ids = torch.from_numpy(src).long()
    theirs = peer.generate(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(),
                           generation_config=generation).numpy()[:, 1:]

  def trim(tokens):
    end = np.flatnonzero(tokens == EOS_ID)
    return list(tokens[:end[0] + 1] if len(end) else tokens[tokens != PAD_ID])

  assert len({tuple(trim(t)) for t in ours}) > 1  # The outputs depend on the input.
  assert [trim(t) for t in ours] == [trim(t) for t in theirs]


@pytest.mark.parametrize("overrides, message", [
    ({"norm_position": "pre"}, "norm_position='pre'"),
    ({"positional_encoding": "learned"}, "positional_encoding='learned'"),
    ({"d_k": 4}, "d_k=4"),
])
def test_models_marian_cannot_represent_are_refused(overrides, message):
  config = dataclasses.replace(tiny_config(), **overrides)
  with pytest.raises(ConfigError, match=message):
    marian.check_exportable(config)


SENTENCES = [f"the {a} {b} went to the {c}" for a in ("red", "old", "big") for b in ("cat", "dog")
             for c in ("market", "river", "house")] * 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A run (tokenizer and one checkpoint of a tiny model with sharpened random weights) and its
  export."""
  import tiny_run
  from transformer_jax import checkpoints, steps
  from transformer_jax.tokenizer import train_tokenizer
  workdir = tmp_path_factory.mktemp("run")
  train_tokenizer(SENTENCES, vocab_size=48).save(workdir / "tokenizer.model")
  config = tiny_run.tiny_run_config(steps=1)
  config.model.update(dict(vocab_size=48, layer_norm_epsilon=marian.MARIAN_LAYER_NORM_EPSILON))
  config.decode.max_extra_len = 6
  setup = steps.make_setup(config, jax.devices()[:1])
  state = setup.init_state(0)
  params = jax.tree.map(lambda x: x * 2.0, state.params)
  params["embed"]["embedding"] = params["embed"]["embedding"].at[EOS_ID].multiply(1.3)
  # transformers' skip_special_tokens drops <unk> where our detokenizer writes " ⁇ ": a logit of 0
  # keeps this random model from emitting it, as a trained one would not.
  params["embed"]["embedding"] = params["embed"]["embedding"].at[UNK_ID].set(0.0)
  manager = checkpoints.make_manager(str(workdir), config.train)
  checkpoints.save(manager, state.replace(step=jnp.int32(1), params=params), {"next_index": 1}, config)
  manager.wait_until_finished()
  manager.close()
  output = tmp_path_factory.mktemp("export") / "marian"
  assert export_cli.main(["--workdir", str(workdir), "--output_dir", str(output)]) == 0
  return workdir, output


@pytest.mark.parametrize("beam_size", [1, 4])
def test_an_exported_run_translates_the_same_text_with_transformers(exported, beam_size):
  workdir, output = exported
  run = runs.load_run(str(workdir))
  model = transformers.MarianMTModel.from_pretrained(output).eval()
  tokenizer = transformers.MarianTokenizer.from_pretrained(output)
  assert model.generation_config.num_beams == run.config.decode.beam_size
  sentences = ["the red cat went to the house", "the old dog", "the big cat went to the river"]
  batch = tokenizer(sentences, return_tensors="pt", padding=True)
  src = batch["input_ids"].numpy()
  for row, sentence in zip(src, sentences):  # The same ids, through either tokenizer.
    ids = run.tokenizer.encode(sentence)
    assert list(row) == ids + [PAD_ID] * (len(row) - len(ids))
  ours = np.asarray(translation.translate(run.setup.model, run.params, jnp.asarray(src),
                                          beam_size=beam_size, alpha=0.0, max_extra_len=6))
  with torch.no_grad():
    theirs = model.generate(**batch, num_beams=beam_size, max_new_tokens=src.shape[1] + 6).numpy()
  texts = [run.tokenizer.decode(t) for t in ours]
  assert tokenizer.batch_decode(theirs, skip_special_tokens=True) == texts
  assert len(set(texts)) > 1  # The outputs depend on the input.
def test_an_exported_run_gives_our_logits(exported):
  workdir, output = exported
  run = runs.load_run(str(workdir))
  model = transformers.MarianMTModel.from_pretrained(output).eval()
  src = np.array([run.tokenizer.encode("the old dog went to the market")])
  tgt = np.array([run.tokenizer.encode("the red cat")])
  ours = np.asarray(run.setup.model.apply({"params": run.params}, jnp.asarray(src), jnp.asarray(tgt)))
  decoder_in = np.concatenate([[[BOS_ID]], tgt[:, :-1]], axis=1)
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(src), decoder_input_ids=torch.from_numpy(decoder_in)).logits
  # This run's weights are doubled (sharper outputs), which amplifies float32 rounding: about 4e-4
  # on logits of magnitude 10; test_converted_weights_give_marians_logits holds 1e-5 at scale 1.
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-3, rtol=1e-4)


def test_importing_an_export_gives_back_the_same_parameters(exported):
  workdir, output = exported
  run = runs.load_run(str(workdir))
  fields = marian.model_fields(str(output))
  assert fields["vocab_size"] == run.setup.model_config.vocab_size  # PAD_ID..UNK_ID in place.
  cfg = dataclasses.replace(run.setup.model_config, logits_bias=True)
  params = marian.load_params(str(output), cfg)
  assert not params["decoder"].pop("logits_bias").any()  # Ours has none: exported as zeros.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), run.params, params)
