"""Decoding speed against Hugging Face `transformers`' MarianMTModel.generate and CTranslate2 on the
same weights.

  python -m bench.decode --workdir runs/quickstart [--sentences 32] [--rounds 3] [--beam 4]
  python -m bench.decode            # no workdir: the small config, random weights, fixed lengths
  python -m bench.decode --batch 16 # length-sorted batches of 16, as `translate` would make them
  python -m bench.decode --no_hf --no_ct2   # ours only (no torch, transformers or ctranslate2)

The peers are what a user would serve the same model with: our parameters converted to a
MarianMTModel (`transformer_jax.marian`, exact up to LayerNorm epsilon) and decoded by its
`generate` (PyTorch eager, key/value cache, scaled-dot-product attention), and converted to a
CTranslate2 model (`transformer_jax.ctranslate2_export`, exact) run by its C++ decoder with
float32 and with int8 weights (`intra_threads` = --threads). "ours" is the `translate` command's
decoder, which drops finished examples from a batch as it goes; "ours, one loop" is the decoder
that validation runs, one compiled loop per batch. All decode greedily and with beam
search, with no length penalty (alpha 0) so that the searches rank hypotheses alike and must
agree token for token (int8 only nearly); the script counts the translations identical to ours.
The sentences are sorted by length; each is timed on the whole set (in batches of --batch, each
padded to its own longest source, as `translate` buckets) and on one sentence at a time (batch 1),
with medians over interleaved rounds. Ours pads every sentence to its batch's source length (one
compiled program per batch shape); generate and CTranslate2 read each sentence unpadded. Our
decoder without a cache (tests/reference_decode.py, the tests' reference for cached decoding) is
timed too with --uncached, as the cache's baseline.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.cpu import cpu_description
from transformer_jax import decode, runs, steps, translation
from transformer_jax.constants import BOS_ID, EOS_ID, PAD_ID
from transformer_jax.data import sources
from transformer_jax.model import Transformer


def load(args):
  """(model, params, src [B, S] padded, lengths [B]) from a run's test split, or random."""
  if args.workdir:
    run = runs.load_run(args.workdir)
    split = sources.load_split(run.config.data, "test")
    texts = [split.examples[i][split.source_lang] for i in range(args.sentences)]
    ids = run.tokenizer.encode_batch(texts)
    model, params = run.setup.model, run.params
  else:
    from bench.pipeline import CONFIGS
    from transformer_jax.config import load_config_file
    config = load_config_file(os.path.join(CONFIGS, "small.py"))
    setup = steps.make_setup(config)
    model, params = setup.model, setup.init_state(0).params
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(4, config.model.vocab_size, 31)) + [EOS_ID] for _ in range(args.sentences)]
  ids = sorted(ids, key=len)  # As a translation service sorts its input (and `translate` buckets).
  src = np.zeros((len(ids), max(map(len, ids))), np.int32)
  for i, x in enumerate(ids):
    src[i, :len(x)] = x
  return model, params, src, np.array([len(x) for x in ids])


def batches(src: np.ndarray, size: int) -> list[np.ndarray]:
  """Length-sorted `src` in batches of `size` rows (0: one batch), each cut to its longest source."""
  size = size or len(src)
  parts = [src[i:i + size] for i in range(0, len(src), size)]
  return [part[:, :int((part != PAD_ID).sum(1).max())] for part in parts]


def ours(model, beam: int, max_extra_len: int, compact: bool):
  """Our decoder as `translate` serves (compact: finished examples leave the batch between loops,
  `translation.CompactingDecoder`) or as validation runs it (one compiled loop per batch)."""
  if compact:
    fn = translation.CompactingDecoder(model, beam, 0.0, max_extra_len)
    return lambda params, src: fn(params, jnp.asarray(src))
  fn = translation.make_translate_fn(model, beam, 0.0, max_extra_len)
  return lambda params, src: np.asarray(jax.block_until_ready(fn(params, jnp.asarray(src))))


def uncached(model, beam: int, max_len: int):
  # The reference lives with the tests it serves. tests/ has no __init__.py: it imports as a
  # namespace package from the repository root, where `python -m bench.decode` runs; imported
  # here so that the script needs it only with --uncached.
  from tests.reference_decode import greedy_search_uncached, uncached_decoder

  def run(params, src):
    if beam == 1:
      return greedy_search_uncached(model, params, src, max_len)
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    step, cache = uncached_decoder(model, params, encoded, src, max_len)
    return decode.beam_search(step, cache, src.shape[0], beam, max_len, 0.0)[0][:, 0]
  fn = jax.jit(run)
  return lambda params, src: np.asarray(jax.block_until_ready(fn(params, jnp.asarray(src))))


def hugging_face(model, params, beam: int, max_extra_len: int, threads: int):
  """MarianMTModel.generate on our weights, as a `(params, src [B, S]) -> tokens [B, S +
  max_extra_len]` function."""
  import torch
  import transformers
  from transformer_jax import marian
  torch.set_num_threads(threads)
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"  # Where ours runs (no TPU build).
  peer = marian.marian_model(jax.device_get(params), model.config, max_positions=1024).to(device)

  @torch.no_grad()
  def run(params, src):
    del params
    max_len = src.shape[1] + max_extra_len
    generation = transformers.GenerationConfig(
        decoder_start_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, num_beams=beam,
        do_sample=False, length_penalty=0.0, early_stopping=False, max_new_tokens=max_len)
    input_ids = torch.from_numpy(np.asarray(src)).long().to(device)
    lengths = (input_ids != PAD_ID).sum(1)
    if len(input_ids) == 1:  # One sentence: no padding at all, as a user would call it.
      input_ids = input_ids[:, :int(lengths[0])]
    out = peer.generate(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(),
                        generation_config=generation).cpu().numpy()[:, 1:]  # Drop the start token.
    tokens = np.full((len(out), max_len), PAD_ID, np.int32)
    tokens[:, :out.shape[1]] = out[:, :max_len]
    return tokens

  return run


def ctranslate2_peer(model, params, beam: int, max_extra_len: int, threads: int, compute_type: str,
                     directory: str):
  """CTranslate2's translator on our weights (`ctranslate2_export`, written to `directory`), as a
  `(params, src [B, S]) -> tokens [B, S + max_extra_len]` function. Its pieces are our ids as
  strings; it appends EOS to each source itself."""
  import ctranslate2
  from transformer_jax import ctranslate2_export
  pieces = [str(i) for i in range(model.config.vocab_size)]
  ctranslate2_export.save(jax.device_get(params), model.config, pieces, directory)
  translator = ctranslate2.Translator(directory, device="cpu", compute_type=compute_type,
                                      intra_threads=threads, inter_threads=1)

  def run(params, src):
    del params
    max_len = src.shape[1] + max_extra_len
    source = [[pieces[t] for t in row[:list(row).index(EOS_ID)]] for row in np.asarray(src)]
    results = translator.translate_batch(
        source, beam_size=beam, length_penalty=0.0, min_decoding_length=0,
        max_decoding_length=max_len, return_end_token=True)
    tokens = np.full((len(src), max_len), PAD_ID, np.int32)
    for i, result in enumerate(results):
      out = [int(t) for t in result.hypotheses[0]][:max_len]
      tokens[i, :len(out)] = out
    return tokens

  return run


def trim(tokens: np.ndarray) -> tuple[int, ...]:
  """The tokens up to and including the first EOS_ID."""
  end = np.flatnonzero(tokens == EOS_ID)
  return tuple(tokens[:end[0] + 1] if len(end) else tokens[tokens != PAD_ID])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir")
  parser.add_argument("--sentences", type=int, default=32)
  parser.add_argument("--batch", type=int, default=0,
                      help="sentences per batch, in length order (0: all of them in one batch)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--beam", type=int, default=4)
  parser.add_argument("--max_extra_len", type=int, default=50)
  parser.add_argument("--single", type=int, default=8,
                      help="sentences decoded one at a time (batch 1) in each round")
  parser.add_argument("--no_hf", action="store_true", help="skip the Hugging Face peer")
  parser.add_argument("--no_ct2", action="store_true", help="skip the CTranslate2 peers")
  parser.add_argument("--no_one_loop", action="store_true",
                      help="skip our decoder in one compiled loop (validation's, which keeps "
                           "finished examples in the batch)")
  parser.add_argument("--uncached", action="store_true", help="also time our decoder without a cache")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="PyTorch's threads and CTranslate2's intra_threads")
  args = parser.parse_args()
  model, params, src, lengths = load(args)
  parts = batches(src, args.batch)
  searches = {"greedy": 1, f"beam {args.beam}": args.beam}
  variants = {}
  with tempfile.TemporaryDirectory() as ct2_dir:
    for search, beam in searches.items():
      variants[(search, "ours")] = ours(model, beam, args.max_extra_len, compact=True)
      if not args.no_one_loop:
        variants[(search, "ours, one loop")] = ours(model, beam, args.max_extra_len, compact=False)
      if not args.no_hf:
        variants[(search, "HF generate")] = hugging_face(model, params, beam, args.max_extra_len,
                                                         args.threads)
      if not args.no_ct2:
        for compute_type in ("float32", "int8"):
          variants[(search, f"CT2 {compute_type}")] = ctranslate2_peer(
              model, params, beam, args.max_extra_len, args.threads, compute_type,
              os.path.join(ct2_dir, f"{search}-{compute_type}"))
      if args.uncached:
        variants[(search, "ours, no cache")] = uncached(model, beam, src.shape[1] + args.max_extra_len)
    times, outputs = measure(variants, params, parts, src[:args.single], args.rounds)

  print(f"CPU: {cpu_description()}; jax {jax.__version__} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); peers' threads: {args.threads}")
  print(f"{len(src)} sentences sorted by length (source lengths {lengths.min()} to {lengths.max()}) "
        f"in {len(parts)} batch(es) of up to {len(parts[0])}, each padded to its longest; up to "
        f"{args.max_extra_len} output tokens more than the source, alpha 0; batch 1: the "
        f"{min(args.single, len(src))} shortest one at a time; medians of {args.rounds} "
        "interleaved rounds\n")
  print(f"{'search':<10}{'decoder':<18}{'sent/s':>10}{'tokens/s':>10}{'batch-1 sent/s':>16}"
        f"{'tokens':>8}{'  ours / this (batches, batch 1)':>34}")
  for (search, name), out in outputs.items():
    batch_time = statistics.median(times[((search, name), "batch")])
    single_time = statistics.median(times[((search, name), "batch 1")])
    tokens = sum(len(trim(row)) for row in out)
    ratio = ""
    if name != "ours":
      mine = times[((search, "ours"), "batch")], times[((search, "ours"), "batch 1")]
      ratio = (f"{batch_time / statistics.median(mine[0]):.2f}x, "
               f"{single_time / statistics.median(mine[1]):.2f}x")
    print(f"{search:<10}{name:<18}{len(src) / batch_time:>10.1f}{tokens / batch_time:>10.0f}"
          f"{min(args.single, len(src)) / single_time:>16.1f}{tokens:>8}{ratio:>34}")
  for (search, name), theirs in outputs.items():
    if name not in ("ours", "ours, no cache"):
      same = sum(trim(a) == trim(b) for a, b in zip(outputs[(search, "ours")], theirs))
      print(f"{search}: translations identical to {name}'s: {same}/{len(src)}")


def measure(variants: dict, params, parts: list[np.ndarray], single: np.ndarray, rounds: int):
  """Each variant's times over every batch and over `single` one sentence at a time (medians of
  interleaved rounds are taken by the caller), and its outputs of every sentence, in order."""
  single = [row[None, :int((row != PAD_ID).sum())] for row in single]  # Each cut to its length.
  for fn in variants.values():  # Compile (and warm the peers up) on every batch shape.
    for part in parts + single:
      fn(params, part)
  times = {(k, mode): [] for k in variants for mode in ("batch", "batch 1")}
  outputs = {}
  for _ in range(rounds):  # Interleaved, so machine noise hits every variant alike.
    for key, fn in variants.items():
      # Each decoder is timed in its steady state, as a server decoding batch after batch runs:
      # right after the other library, on 2 cores, ours measured 10 to 15% slower (caches and
      # thread pools the other one left behind), so one untimed batch comes first.
      fn(params, parts[0])
      t0 = time.perf_counter()
      out = [fn(params, part) for part in parts]
      times[(key, "batch")].append(time.perf_counter() - t0)
      width = max(o.shape[1] for o in out)
      outputs[key] = np.concatenate([np.pad(o, ((0, 0), (0, width - o.shape[1]))) for o in out])
      fn(params, single[0])
      t0 = time.perf_counter()
      for row in single:
        fn(params, row)
      times[(key, "batch 1")].append(time.perf_counter() - t0)
  return times, outputs


if __name__ == "__main__":
  main()
