"""Our model served by CTranslate2 (`transformer_jax.ctranslate2_export`): the same log-probabilities
for every architecture switch it can express, and, on a tiny trained model, the same greedy and
beam-4 translations token for token in float32 (int8 close); a trained run exported by
`transformer-export --format ctranslate2` translates text as `translate` does, tokenized by the
SentencePiece model shipped beside it; an imported Marian model too; the rest refused by name.

Needs the [ct2] extra (`pip install -e ".[ct2]"`); skipped without it.
"""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

import tiny_run
from conftest import init_params, random_tokens, tiny_config
from transformer_jax import BOS_ID, EOS_ID, PAD_ID, Transformer, checkpoints, runs, translation
from transformer_jax import ctranslate2_export
from transformer_jax.cli import export as export_cli
from transformer_jax.decode import never_generated
from transformer_jax.errors import ConfigError
from transformer_jax.tokenizer import train_tokenizer

ctranslate2 = pytest.importorskip("ctranslate2")

PIECES = ["<pad>", "</s>", "<s>", "<unk>"] + [f"t{i}" for i in range(4, 40)]  # The tiny vocabulary.
MARIAN_SHAPED = {"activation": "swish", "logits_bias": True, "layer_norm_epsilon": 1e-5}  # configs/marian.py
EXTRA = 8  # max_extra_len
# Our search's settings in CTranslate2's terms: no length penalty (its |Y|^alpha and our GNMT
# penalty agree only at alpha 0) and an empty output allowed (its default minimum is 1 token).
OURS = {"length_penalty": 0.0, "min_decoding_length": 0}


def as_pieces(ids, pieces=PIECES) -> list[str]:
  """Our output (or source) ids as the pieces CTranslate2 reads and writes: up to EOS, no padding."""
  ids = [int(i) for i in ids]
  ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
  return [pieces[i] for i in ids if i != PAD_ID]


def translator(params, cfg, directory, compute_type="float32"):
  ctranslate2_export.save(params, cfg, PIECES[:cfg.vocab_size], str(directory), max_positions=64)
  return ctranslate2.Translator(str(directory), device="cpu", compute_type=compute_type,
                                intra_threads=1)


@pytest.mark.parametrize("overrides", [
    {}, MARIAN_SHAPED, {"activation": "gelu"}, {"layer_norm_epsilon": 0.5},
    {"norm_position": "pre"}, {"positional_encoding": "learned"}, {"d_k": 4, "d_v": 4}],
    ids=["paper", "marian", "gelu", "epsilon", "pre-LN", "learned", "d_k"])
def test_ctranslate2_gives_our_log_probabilities(overrides, tmp_path):
  """Teacher-forced log-probabilities of every target token (CTranslate2's `score_batch`) equal
  ours, for each switch it expresses; epsilon 0.5 shows that ours is the one used."""
  cfg = tiny_config(dropout_rate=0.0, **overrides)
  src = np.array(random_tokens(jax.random.key(1), (4, 7), cfg.vocab_size))
  src[:, -1], src[1, 4:] = EOS_ID, [EOS_ID, PAD_ID, PAD_ID]
  tgt = np.array(random_tokens(jax.random.key(2), (4, 6), cfg.vocab_size))
  tgt[:, -1] = EOS_ID
  params = jax.tree.map(lambda x: 2.0 * x, init_params(cfg, jnp.asarray(src), jnp.asarray(tgt), seed=3))
  if cfg.logits_bias:
    params["decoder"]["logits_bias"] = jax.random.normal(jax.random.key(4), (cfg.vocab_size,))
  logits = Transformer(cfg).apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt))
  ours = np.take_along_axis(np.asarray(jax.nn.log_softmax(never_generated(logits))), tgt[..., None], -1)[..., 0]
  scored = translator(params, cfg, tmp_path).score_batch([as_pieces(r) for r in src],
                                                         [as_pieces(r) for r in tgt])
  assert [r.tokens for r in scored] == [as_pieces(r) + ["</s>"] for r in tgt]
  np.testing.assert_allclose(np.array([r.log_probs for r in scored]), ours, rtol=1e-4, atol=1e-4)


# The Marian-shaped model's switches are checked above and on an imported Marian model below.
@pytest.fixture(scope="module", params=["paper", pytest.param("marian", marks=pytest.mark.slow)])
def trained(request):
  """A tiny model trained for 300 steps to reverse made-up sequences (tests/tiny_run.py): sharp,
  input-dependent predictions, right or wrong. Returns (config, setup, state)."""
  from transformer_jax import steps
  config, _ = tiny_run.tiny_setup(label_smoothing=0.0, schedule="constant", learning_rate=3e-3,
                                  warmup_steps=30)
  config.model.dropout_rate = 0.0
  if request.param == "marian":
    config.model.update(MARIAN_SHAPED)
  setup = steps.make_setup(config, jax.devices()[:1])
  batches = tiny_run.tiny_batches(config, setup)
  state, key = setup.init_state(0), jax.random.key(0)
  for k in range(300):
    state, _ = setup.train_step(state, setup.put_batch(batches[k]), key)
  return config, setup, jax.device_get(state)


def held_out_sources(n=48):
  corpus = tiny_run.fake_corpus(n, seed=1)
  src = np.zeros((n, 20), np.int32)
  for i in range(n):
    src[i, :len(corpus.source(i))] = corpus.source(i)
  return src


@pytest.mark.parametrize("beam_size", [1, 4])
def test_ctranslate2_translates_token_for_token_as_we_do(trained, beam_size, tmp_path):
  """float32: every translation identical; int8 weights: most of them (one flipped token changes
  the rest of a translation)."""
  _, setup, state = trained
  src = held_out_sources()
  ours = np.asarray(translation.make_translate_fn(setup.model, beam_size, 0.0, EXTRA)(
      state.params, jnp.asarray(src)))
  ours = [as_pieces(row) for row in ours]
  source = [as_pieces(row) for row in src]
  results = {}
  for compute_type in ("float32", "int8"):
    peer = translator(state.params, setup.model_config, tmp_path / compute_type, compute_type)
    out = peer.translate_batch(source, **OURS, beam_size=beam_size,
                               max_decoding_length=src.shape[1] + EXTRA)
    results[compute_type] = [r.hypotheses[0] for r in out]
  reversals = sum(o == s[::-1] for o, s in zip(ours, source))
  assert 0 < reversals < len(src) and len({tuple(o) for o in ours}) > len(src) // 2  # Not trivial.
  assert results["float32"] == ours
  same = sum(a == b for a, b in zip(results["int8"], ours))
  # 35 of 48 greedy on a Zen 3: the tiny, barely trained model has small margins to flip.
  assert same > len(src) // 2, f"int8: {same}/{len(src)} identical"


SENTENCES = [f"the {a} {b} went to the {c}" for a in ("red", "old", "big") for b in ("cat", "dog")
             for c in ("market", "river", "house")] * 5


@pytest.mark.parametrize("trained", ["paper"], indirect=True)
def test_an_exported_run_translates_text_as_the_translate_command_does(trained, tmp_path):
  """`transformer-export --format ctranslate2` on a run; CTranslate2 fed the pieces of the
  SentencePiece model written beside it gives our text, beam 4."""
  config, _, state = trained
  workdir = tmp_path / "run"
  train_tokenizer(SENTENCES, vocab_size=config.model.vocab_size).save(workdir / "tokenizer.model")
  manager = checkpoints.make_manager(str(workdir), config.train)
  checkpoints.save(manager, state, {"next_index": 0}, config)
  manager.wait_until_finished()
  manager.close()
  output = tmp_path / "ct2"
  assert export_cli.main(["--workdir", str(workdir), "--output_dir", str(output),
                          "--format", "ctranslate2"]) == 0
  sentences = ["the red cat went to the river", "the dog", "the big dog went to the market",
               "went to the house"]
  ours = runs.load_run(str(workdir)).translate(sentences, beam_size=4, alpha=0.0)
  # The README's recipe: source.spm makes the pieces (CTranslate2 appends </s>), target.spm joins them.
  source, target = (spm.SentencePieceProcessor(model_file=str(output / n)) for n in ("source.spm", "target.spm"))
  peer = ctranslate2.Translator(str(output), device="cpu")
  results = peer.translate_batch(source.encode(sentences, out_type=str), **OURS, beam_size=4)
  assert [target.decode(r.hypotheses[0]) for r in results] == ours
  assert len(set(ours)) > 1


HF = importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")
if HF:
  from test_marian_import import ENGLISH, LANGUAGE_CODE, imported, marian_dir  # noqa: F401 (a fixture)


def test_an_imported_marian_model_translates_as_we_do(request, tmp_path):
  """A Marian model laid out as opus-mt's are (tests/test_marian_import.py: its own special ids,
  two SentencePiece models, a language code), imported as configs/marian.py starts a fine-tuning
  run, then exported: the same greedy translations."""
  if not HF:
    pytest.skip("needs the [hf] extra to build the Marian model")
  cfg, params, tokenizer = imported(request.getfixturevalue("marian_dir"))
  pieces = tokenizer.pieces()
  ctranslate2_export.save(params, cfg, pieces, str(tmp_path), spm_files=tokenizer.spm_files())
  sentences = [ENGLISH[0], ENGLISH[9], f"{LANGUAGE_CODE} {ENGLISH[13]}", "the dog"]
  ids = [tokenizer.encode(s) for s in sentences]
  src = np.zeros((len(ids), max(map(len, ids))), np.int32)
  for i, row in enumerate(ids):
    src[i, :len(row)] = row
  ours = np.asarray(translation.translate(Transformer(cfg), params, jnp.asarray(src), beam_size=1,
                                          alpha=0.0, max_extra_len=EXTRA))
  source_spm = spm.SentencePieceProcessor(model_file=str(tmp_path / "source.spm"))
  # A leading language code is one piece, as MarianTokenizer (and ours) split it.
  source = [[s.split()[0]] + source_spm.encode(s.split(" ", 1)[1], out_type=str)
            if s.startswith(">>") else source_spm.encode(s, out_type=str) for s in sentences]
  assert source == [as_pieces(row, pieces) for row in ids]
  peer = ctranslate2.Translator(str(tmp_path), device="cpu")
  out = peer.translate_batch(source, **OURS, beam_size=1, max_decoding_length=src.shape[1] + EXTRA)
  ours = [as_pieces(row, pieces) for row in ours]
  assert [r.hypotheses[0] for r in out] == ours and len({tuple(o) for o in ours}) > 1


@pytest.mark.parametrize("overrides, message", [
    ({"d_k": 4}, "d_k=4 != d_v=8"),
    ({"d_v": 4}, "d_k=8 != d_v=4"),
])
def test_what_ctranslate2_cannot_compute_is_refused_by_name(overrides, message):
  with pytest.raises(ConfigError, match=message):
    ctranslate2_export.check_exportable(dataclasses.replace(tiny_config(), **overrides))


def test_a_vocabulary_that_does_not_fit_is_refused(tmp_path):
  cfg = tiny_config()
  params = init_params(cfg, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ConfigError, match="39 pieces but model.vocab_size=40"):
    ctranslate2_export.model_spec(params, cfg, PIECES[:-1])
  with pytest.raises(ConfigError, match=r"more than once: \['t4'\]"):
    ctranslate2_export.model_spec(params, cfg, PIECES[:-1] + ["t4"])
  with pytest.raises(ConfigError, match="quantization='int3'"):
    ctranslate2_export.save(params, cfg, PIECES, str(tmp_path), quantization="int3")


def test_pad_and_bos_are_never_generated(tmp_path):
  """As in our decoding (decode.never_generated): their logits are pushed to NEVER."""
  cfg = tiny_config()
  params = init_params(cfg, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32))
  spec = ctranslate2_export.model_spec(params, cfg, PIECES)
  bias = np.asarray(spec.decoder.projection.bias)
  assert bias[PAD_ID] == bias[BOS_ID] == ctranslate2_export.NEVER and not bias[4:].any()
  assert (spec.config.decoder_start_token, spec.config.add_source_eos) == ("<s>", True)
