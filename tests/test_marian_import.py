"""A Marian model from Hugging Face `transformers`, imported: the same logits and greedy
translations as `transformers` gives, and fine-tuning it with our trainer lowers its loss.

Nothing is downloaded: the Marian model is built here the way published opus-mt models are laid
out (swish, Marian's position layout, LayerNorm epsilon 1e-5, a logits bias, padding as the last
id and the decoder's start token, separate source and target SentencePiece models, one shared
vocab.json built as transformers' Marian conversion builds it). Needs the [hf] extra.
"""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from transformer_jax import PAD_ID, Transformer, marian, translation
from transformer_jax.config import TransformerConfig
from transformer_jax.errors import ConfigError, MissingFileError
from transformer_jax.tokenizer import MarianVocabTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ENGLISH = [f"the {a} {b} went to the {c}" for a in ("red", "old", "big") for b in ("cat", "dog")
           for c in ("market", "river", "house")]
GERMAN = [f"die {a} {b} ging zum {c}" for a in ("rote", "alte", "grosse") for b in ("Katze", "Hund")
          for c in ("Markt", "Fluss", "Haus")]
LANGUAGE_CODE = ">>deu<<"


def sentencepiece_model(sentences: list[str], vocab_size: int) -> bytes:
  """SentencePiece with its own default ids (<unk> 0, <s> 1, </s> 2), as Marian's are trained."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 3), model_writer=model,
                                 vocab_size=vocab_size, model_type="unigram", hard_vocab_limit=False,
                                 minloglevel=2)
  return model.getvalue()


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("opus-mt-tiny")
  write_marian_model(directory)
  return str(directory)


def write_marian_model(directory) -> None:
  """A tiny MarianMTModel directory (weights, config, tokenizer files), as transformers saves one."""
  source, target = sentencepiece_model(ENGLISH, 40), sentencepiece_model(GERMAN, 44)
  # transformers' convert_marian_to_pytorch: Marian's vocab.yml ("</s>" 0, "<unk>" 1, then the
  # pieces of both sides), with "<pad>" added as the last id.
  pieces = []
  for proto in (source, target):
    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces += [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
  vocab = {"</s>": 0, "<unk>": 1, LANGUAGE_CODE: 2}
  for piece in pieces:
    vocab.setdefault(piece, len(vocab))
  vocab["<pad>"] = pad = len(vocab)
  (directory / "source.spm").write_bytes(source)
  (directory / "target.spm").write_bytes(target)
  (directory / "vocab.json").write_text(json.dumps(vocab))
  transformers.MarianTokenizer(str(directory / "source.spm"), str(directory / "target.spm"),
                               str(directory / "vocab.json"), source_lang="en",
                               target_lang="de").save_pretrained(directory)
  config = transformers.MarianConfig(
      vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=16, encoder_layers=2,
      decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
      decoder_ffn_dim=32, activation_function="swish", scale_embedding=True, max_position_embeddings=64,
      pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad, forced_eos_token_id=0,
      dropout=0.1, init_std=0.5, share_encoder_decoder_embeddings=True)
  torch.manual_seed(0)
  model = transformers.MarianMTModel(config)
  model.final_logits_bias.normal_()
  model.generation_config = transformers.GenerationConfig(
      decoder_start_token_id=pad, eos_token_id=0, pad_token_id=pad, bad_words_ids=[[pad]],
      num_beams=4, max_length=64)
  model.save_pretrained(directory)


def padded(rows: list[list[int]]) -> np.ndarray:
  width = max(map(len, rows))
  return np.array([row + [PAD_ID] * (width - len(row)) for row in rows])


def imported(directory):
  cfg = TransformerConfig(**{**marian.model_fields(directory), "dropout_rate": 0.0})
  return cfg, marian.load_params(directory, cfg), MarianVocabTokenizer.load(directory)


def test_model_fields_say_what_marian_models_are(marian_dir):
  fields = marian.model_fields(marian_dir)
  assert (fields["activation"], fields["logits_bias"], fields["layer_norm_epsilon"]) == ("swish", True, 1e-5)
  vocab = json.load(open(os.path.join(marian_dir, "vocab.json")))
  assert fields["vocab_size"] == len(vocab) + 1  # Marian's padding id serves as our PAD and BOS.


@pytest.mark.parametrize("text", [ENGLISH[4], f"{LANGUAGE_CODE} {ENGLISH[7]}", "zebra quartz"])
def test_both_tokenizers_give_the_same_ids(marian_dir, text):
  theirs = transformers.MarianTokenizer.from_pretrained(marian_dir)
  ours = MarianVocabTokenizer.load(marian_dir)
  assert list(ours.order[ours.encode(text)]) == theirs(text)["input_ids"]
  german = GERMAN[5]
  assert list(ours.order[ours.encode(german, target=True)]) == theirs(text_target=german)["input_ids"]


def test_imported_weights_give_marians_logits(marian_dir):
  cfg, params, tokenizer = imported(marian_dir)
  src = padded([tokenizer.encode(s) for s in ENGLISH[:3] + ["the dog"]])
  tgt = padded([tokenizer.encode(s, target=True) for s in GERMAN[:4]])
  ours = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt)))
  model = transformers.MarianMTModel.from_pretrained(marian_dir).eval()
  start = model.config.decoder_start_token_id
  decoder_in = np.concatenate([np.full((4, 1), start), tokenizer.order[tgt[:, :-1]]], axis=1)
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(tokenizer.order[src]),
                   attention_mask=torch.from_numpy(src != PAD_ID).long(),
                   decoder_input_ids=torch.from_numpy(decoder_in)).logits.numpy()
  real = tgt != PAD_ID  # Logits at target padding are not compared (ours masks it, theirs not).
  np.testing.assert_allclose(ours[real], theirs[..., tokenizer.order][real], atol=2e-4, rtol=1e-5)


def test_imported_model_translates_as_generate_does(marian_dir):
  cfg, params, tokenizer = imported(marian_dir)
  sentences = [ENGLISH[0], ENGLISH[9], ENGLISH[13], "the dog"]
  theirs_tokenizer = transformers.MarianTokenizer.from_pretrained(marian_dir)
  batch = theirs_tokenizer(sentences, return_tensors="pt", padding=True)
  src = padded([tokenizer.encode(s) for s in sentences])
  assert (tokenizer.order[src] == batch["input_ids"].numpy()).all()
  ours = np.asarray(translation.translate(Transformer(cfg), params, jnp.asarray(src), beam_size=1,
                                          alpha=0.0, max_extra_len=8))
  model = transformers.MarianMTModel.from_pretrained(marian_dir).eval()
  with torch.no_grad():
    theirs = model.generate(**batch, num_beams=1, max_new_tokens=src.shape[1] + 8).numpy()
  texts = [tokenizer.decode(t) for t in ours]
  assert theirs_tokenizer.batch_decode(theirs, skip_special_tokens=True, use_source_tokenizer=False) == texts
  assert len(set(texts)) > 1  # The outputs depend on the input.


def write_corpus(directory, name, pairs):
  path = directory / f"{name}.tsv"
  path.write_text("".join(f"{en}\t{de}\n" for en, de in pairs))
  return str(path)


@pytest.mark.slow  # About a minute of training; the import's equality tests stay in the default run.
def test_fine_tuning_an_imported_model_lowers_its_loss_and_translates(marian_dir, tmp_path):
  from transformer_jax import experiment, runs
  from transformer_jax.cli import export as export_cli
  pairs = list(zip(ENGLISH, GERMAN))
  from test_config import parse  # As train.py's flags read `--config configs/marian.py:DIR`.
  config = parse(f"marian.py:{marian_dir}", "--config.train.num_steps=24")
  assert config.init_from == marian_dir and config.decode.beam_size == 4
  assert config.train.num_steps == 24 and config.model.activation == "swish"
  config.data.update(dict(text_train=write_corpus(tmp_path, "train", pairs * 4),
                          text_validation=write_corpus(tmp_path, "dev", pairs[:6]),
                          text_test=write_corpus(tmp_path, "test", pairs[6:10]),
                          max_len=32, tokens_per_batch=256, packing=True,
                          data_dir=str(tmp_path / "tfds")))
  config.train.update(dict(warmup_steps=1, learning_rate=3e-3, log_every=4,
                           eval_every=10**6, checkpoint_every=12, eval_bleu_sentences=0,
                           samples_to_print=0))
  workdir = tmp_path / "run"
  metrics = experiment.train_and_evaluate(config, str(workdir))
  losses = [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")
            if json.loads(line)["split"] == "train"]
  assert losses[-1] < 0.85 * losses[0]
  assert np.isfinite(metrics["loss"])
  # Resuming needs neither the Marian directory nor its weights: the run has its own copies.
  config.init_from = str(tmp_path / "deleted-download")
  assert experiment.train_and_evaluate(config, str(workdir))["step"] == metrics["step"]
  run = runs.load_run(str(workdir))  # The copied tokenizer, in the workdir.
  assert isinstance(run.tokenizer, MarianVocabTokenizer)
  ours = run.translate(ENGLISH[:6], beam_size=1, max_extra_len=8)

  # Served again with transformers: the fine-tuned model, exported, translates the same.
  output = tmp_path / "exported"
  assert export_cli.main(["--workdir", str(workdir), "--output_dir", str(output)]) == 0
  tokenizer = transformers.MarianTokenizer.from_pretrained(output)
  model = transformers.MarianMTModel.from_pretrained(output).eval()
  batch = tokenizer(ENGLISH[:6], return_tensors="pt", padding=True)
  with torch.no_grad():
    theirs = model.generate(**batch, num_beams=1, max_new_tokens=batch["input_ids"].shape[1] + 8)
  assert tokenizer.batch_decode(theirs, skip_special_tokens=True, use_source_tokenizer=False) == ours


def test_init_from_names_what_does_not_fit(marian_dir, tmp_path):
  cfg = TransformerConfig(**{**marian.model_fields(marian_dir), "d_model": 32})
  with pytest.raises(ConfigError, match=r"model.d_model=32 \(the model has 16\)"):
    marian.check_architecture(marian_dir, cfg)
  partial = tmp_path / "partial"
  partial.mkdir()
  for name in ("config.json", "source.spm", "target.spm"):
    (partial / name).write_bytes(open(os.path.join(marian_dir, name), "rb").read())
  with pytest.raises(MissingFileError, match=f"{partial} has no vocab.json"):
    marian.model_fields(str(partial))
  (partial / "vocab.json").write_bytes(open(os.path.join(marian_dir, "vocab.json"), "rb").read())
  config = json.load(open(os.path.join(marian_dir, "config.json")))
  config.update(share_encoder_decoder_embeddings=False, decoder_vocab_size=7, scale_embedding=False)
  (partial / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="separate source and target vocabularies.*scale_embedding=False"):
    marian.model_fields(str(partial))
