"""SentencePiece: fixed special ids, round trips, saving and reuse."""

import pickle

import pytest

from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer_jax.errors import ConfigError
from transformer_jax.tokenizer import load_or_train_tokenizer, train_tokenizer

SENTENCES = [
    "In the beginning God created the heavens and the earth.",
    "Im Anfang schuf Gott die Himmel und die Erde.",
    "Au commencement, Dieu créa les cieux et la terre.",
    "And the earth was waste and void; and darkness was on the face of the deep.",
    "Und die Erde war wüst und leer, und Finsternis war über der Tiefe.",
] * 40


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer(SENTENCES, vocab_size=120)


def test_special_ids_are_fixed(tokenizer):
  pieces = [tokenizer._sp.id_to_piece(i) for i in (PAD_ID, EOS_ID, BOS_ID, UNK_ID)]
  assert pieces == ["<pad>", "</s>", "<s>", "<unk>"]
  assert tokenizer.vocab_size == 120


def test_encode_appends_eos_and_decode_round_trips(tokenizer):
  for text in SENTENCES[:5]:
    ids = tokenizer.encode(text)
    assert ids[-1] == EOS_ID and PAD_ID not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([BOS_ID, *ids, PAD_ID, PAD_ID, 57]) == text  # Stops at EOS.
  assert tokenizer.encode_batch(SENTENCES[:2]) == [tokenizer.encode(s) for s in SENTENCES[:2]]


def test_unigram_option():
  assert train_tokenizer(SENTENCES, vocab_size=60, model_type="unigram").vocab_size == 60
  with pytest.raises(ValueError, match="model_type='wordpiece'"):
    train_tokenizer(SENTENCES, vocab_size=100, model_type="wordpiece")


def test_saved_with_the_run_and_reused(tmp_path, tokenizer):
  path = tmp_path / "tokenizer.model"
  first = load_or_train_tokenizer(path, SENTENCES, 120)
  assert path.exists()
  second = load_or_train_tokenizer(path, iter(()), 120)  # Nothing to train on: must be reused.
  assert second.model_proto == first.model_proto
  with pytest.raises(ValueError, match="has 120 pieces but model.vocab_size=200"):
    load_or_train_tokenizer(path, SENTENCES, 200)
  clone = pickle.loads(pickle.dumps(tokenizer))
  assert clone.encode(SENTENCES[0]) == tokenizer.encode(SENTENCES[0])


@pytest.mark.parametrize("vocab_size, message", [(5, "Vocabulary size is smaller than required_chars"),
                                                 (5000, "Vocabulary size too high")])
def test_a_vocabulary_sentencepiece_cannot_train_names_the_field(vocab_size, message):
  with pytest.raises(ConfigError, match=rf"{vocab_size}-piece bpe vocabulary .*model.vocab_size.*{message}"):
    train_tokenizer(["the red cat went home"] * 20, vocab_size=vocab_size)
