"""Decoding speed against Hugging Face `transformers`' MarianMTModel.generate on the same weights.

  python -m bench.decode --workdir runs/quickstart [--sentences 32] [--rounds 3] [--beam 4]
  python -m bench.decode            # no workdir: the small config, random weights, fixed lengths
  python -m bench.decode --no_hf    # ours only (no torch/transformers installed)

The peer is what a user would serve the same model with: our parameters converted to a
MarianMTModel (`transformer_jax.marian`, exact up to LayerNorm epsilon) and decoded by its
`generate` (PyTorch eager, key/value cache, scaled-dot-product attention), greedily and with beam
search, both with no length penalty (alpha 0) so that the two searches rank hypotheses alike and
must agree token for token; the script counts the translations that differ. Each is timed on the
whole batch at once and on one sentence at a time (batch 1), with medians over interleaved rounds.
Ours pads every sentence to the batch's source length (one compiled program, as `translate`
buckets); generate reads each sentence unpadded. Our decoder without a cache
(tests/reference_decode.py, the tests' reference for cached decoding) is timed too with
--uncached, as the cache's baseline.
"""

import argparse
import os
import statistics
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
  src = np.zeros((len(ids), max(map(len, ids))), np.int32)
  for i, x in enumerate(ids):
    src[i, :len(x)] = x
  return model, params, src, np.array([len(x) for x in ids])


def ours(model, beam: int, max_extra_len: int):
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


def hugging_face(model, params, beam: int, max_len: int, threads: int):
  """MarianMTModel.generate on our weights, as a `(params, src) -> tokens [B, max_len]` function."""
  import torch
  import transformers
  from transformer_jax import marian
  torch.set_num_threads(threads)
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"  # Where ours runs (no TPU build).
  peer = marian.marian_model(jax.device_get(params), model.config, max_positions=max_len + 8).to(device)
  generation = transformers.GenerationConfig(
      decoder_start_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, num_beams=beam,
      do_sample=False, length_penalty=0.0, early_stopping=False, max_new_tokens=max_len)

  @torch.no_grad()
  def run(params, src):
    del params
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


def trim(tokens: np.ndarray) -> tuple[int, ...]:
  """The tokens up to and including the first EOS_ID."""
  end = np.flatnonzero(tokens == EOS_ID)
  return tuple(tokens[:end[0] + 1] if len(end) else tokens[tokens != PAD_ID])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir")
  parser.add_argument("--sentences", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--beam", type=int, default=4)
  parser.add_argument("--max_extra_len", type=int, default=50)
  parser.add_argument("--single", type=int, default=8,
                      help="sentences decoded one at a time (batch 1) in each round")
  parser.add_argument("--no_hf", action="store_true", help="skip the Hugging Face peer")
  parser.add_argument("--uncached", action="store_true", help="also time our decoder without a cache")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's threads")
  args = parser.parse_args()
  model, params, src, lengths = load(args)
  max_len = src.shape[1] + args.max_extra_len
  searches = {"greedy": 1, f"beam {args.beam}": args.beam}
  variants = {}
  for search, beam in searches.items():
    variants[(search, "ours")] = ours(model, beam, args.max_extra_len)
    if not args.no_hf:
      variants[(search, "HF generate")] = hugging_face(model, params, beam, max_len, args.threads)
    if args.uncached:
      variants[(search, "ours, no cache")] = uncached(model, beam, max_len)
  single = src[:args.single]
  for fn in variants.values():  # Compile (and warm PyTorch up) on both batch shapes.
    fn(params, src)
    fn(params, single[:1])
  times = {(k, mode): [] for k in variants for mode in ("batch", "batch 1")}
  outputs = {}
  for _ in range(args.rounds):  # Interleaved, so machine noise hits every variant alike.
    for key, fn in variants.items():
      # Each decoder is timed in its steady state, as a server decoding batch after batch runs:
      # right after the other library, on 2 cores, ours measured 10 to 15% slower (caches and
      # thread pools the other one left behind), so one untimed batch comes first.
      fn(params, src)
      t0 = time.perf_counter()
      outputs[key] = fn(params, src)
      times[(key, "batch")].append(time.perf_counter() - t0)
      fn(params, single[:1])
      t0 = time.perf_counter()
      for i in range(len(single)):
        fn(params, single[i:i + 1])
      times[(key, "batch 1")].append(time.perf_counter() - t0)

  print(f"CPU: {cpu_description()}; jax {jax.__version__} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)")
  print(f"{len(src)} sentences (source lengths {lengths.min()} to {lengths.max()}, padded to "
        f"{src.shape[1]}), up to {max_len} output tokens, alpha 0; batch 1: {len(single)} sentences "
        f"one at a time; medians of {args.rounds} interleaved rounds\n")
  print(f"{'search':<10}{'decoder':<18}{'batch sent/s':>14}{'batch-1 sent/s':>16}{'tokens':>9}"
        f"{'ours / HF (batch, batch 1)':>30}")
  for (search, name), out in outputs.items():
    rate = len(src) / statistics.median(times[((search, name), "batch")])
    rate1 = len(single) / statistics.median(times[((search, name), "batch 1")])
    tokens = sum(len(trim(row)) for row in out)
    ratio = ""
    if name == "ours" and (search, "HF generate") in outputs:
      hf = times[((search, "HF generate"), "batch")], times[((search, "HF generate"), "batch 1")]
      ratio = (f"{statistics.median(hf[0]) / statistics.median(times[((search, name), 'batch')]):.2f}x, "
               f"{statistics.median(hf[1]) / statistics.median(times[((search, name), 'batch 1')]):.2f}x")
    print(f"{search:<10}{name:<18}{rate:>14.1f}{rate1:>16.1f}{tokens:>9}{ratio:>30}")
  for search in searches:
    if (search, "HF generate") in outputs:
      mine, theirs = outputs[(search, "ours")], outputs[(search, "HF generate")]
      same = sum(trim(a) == trim(b) for a, b in zip(mine, theirs))
      print(f"{search}: translations identical to HF generate's: {same}/{len(src)}")


if __name__ == "__main__":
  main()
