"""Decoding speed: cached greedy and beam search against decoding without a cache and against
a PyTorch `nn.Transformer` greedy decoder, same model, same run.

  python bench/decode.py --workdir runs/quickstart [--sentences 64] [--rounds 3] [--no_torch]
  python bench/decode.py            # no workdir: the small config, random weights, fixed lengths

Prints sentences/s and generated tokens/s (medians over interleaved rounds) and each variant's
speed against our cached greedy decoder. With a trained run it translates the first test
sentences of the run's dataset; without one, a random model that rarely emits EOS decodes every
sentence to the maximum length (the worst case for all). Our uncached decoder reruns the whole
decoder over all output positions at every step (static shapes, as JAX needs), including the
pre-softmax projection. The PyTorch peer (bench/torch_peer.py, loaded with the same parameters)
runs the decoder over the prefix so far at every step, which is what `nn.Transformer` offers (it
has no key/value cache), eagerly, and stops when every sentence has ended; the script reports how
many of its translations equal ours token for token.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from transformer_jax import decode, evaluate, steps  # noqa: E402
from transformer_jax.data import sources  # noqa: E402
from transformer_jax.constants import EOS_ID, PAD_ID  # noqa: E402
from transformer_jax.model import Transformer  # noqa: E402
from bench.uncached_decode import greedy_search_uncached, uncached_decoder  # noqa: E402


def load(args):
  if args.workdir:
    run = evaluate.load_run(args.workdir)
    split = sources.load_split(run.config.data, "test")
    texts = [split.examples[i][split.source_lang] for i in range(args.sentences)]
    ids = run.tokenizer.encode_batch(texts)
    src = np.zeros((args.sentences, max(map(len, ids))), np.int32)
    for i, x in enumerate(ids):
      src[i, :len(x)] = x
    return run.setup.model, run.params, jnp.asarray(src), run.config
  from bench.pipeline import CONFIGS
  from transformer_jax.config import load_config_file
  config = load_config_file(os.path.join(CONFIGS, "small.py"))
  setup = steps.make_setup(config)
  params = setup.init_state(0).params
  rng = np.random.default_rng(0)
  src = rng.integers(4, config.model.vocab_size, (args.sentences, 32)).astype(np.int32)
  src[:, -1] = EOS_ID
  return setup.model, params, jnp.asarray(src), config


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir")
  parser.add_argument("--sentences", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--max_extra_len", type=int, default=50)
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's threads")
  args = parser.parse_args()
  model, params, src, config = load(args)
  max_len = src.shape[1] + args.max_extra_len
  beam, alpha = config.decode.beam_size, config.decode.length_penalty

  def uncached_beam(params, src):
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    step, cache = uncached_decoder(model, params, encoded, src, max_len)
    return decode.beam_search(step, cache, src.shape[0], beam, max_len, alpha)[0][:, 0]

  variants = {
      "greedy, cached": decode.make_translate_fn(model, 1, 0.0, args.max_extra_len),
      "greedy, no cache": jax.jit(lambda p, s: greedy_search_uncached(model, p, s, max_len)),
      f"beam {beam}, cached": decode.make_translate_fn(model, beam, alpha, args.max_extra_len),
      f"beam {beam}, no cache": jax.jit(uncached_beam),
  }
  if not args.no_torch:
    variants["greedy, PyTorch (no cache)"] = torch_greedy(model, params, src, max_len, args.threads)
  for fn in variants.values():
    jax.block_until_ready(fn(params, src))  # Compile.
  times = {name: [] for name in variants}
  tokens, outputs = {}, {}
  for _ in range(args.rounds):  # Interleaved, so machine noise hits every variant alike.
    for name, fn in variants.items():
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(params, src))
      times[name].append(time.perf_counter() - t0)
      out = np.asarray(out)
      tokens[name] = int(np.sum((out != PAD_ID)))
      outputs[name] = out
  print(f"{src.shape[0]} sentences, source length {src.shape[1]}, up to {max_len} output tokens, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), medians of {args.rounds} rounds\n")
  reference = statistics.median(times["greedy, cached"])
  print(f"{'':<28}{'sentences/s':>12}{'tokens/s':>12}{'x greedy cached':>17}")
  for name, ts in times.items():
    t = statistics.median(ts)
    print(f"{name:<28}{src.shape[0] / t:>12.1f}{tokens[name] / t:>12.0f}{reference / t:>16.3f}x")
  for name, ts in times.items():
    if "cached" in name and "no cache" not in name:
      base = statistics.median(times[name.replace("cached", "no cache")])
      print(f"cache speed-up, {name.split(',')[0]}: {base / statistics.median(ts):.1f}x")
  if "greedy, PyTorch (no cache)" in outputs:
    ours, theirs = outputs["greedy, cached"], outputs["greedy, PyTorch (no cache)"]
    same = sum(np.array_equal(trim(a), trim(b)) for a, b in zip(ours, theirs))
    print(f"PyTorch greedy translations equal to ours: {same}/{len(ours)}; our cached greedy against "
          f"PyTorch: {statistics.median(times['greedy, PyTorch (no cache)']) / reference:.1f}x faster")


def trim(tokens: np.ndarray) -> np.ndarray:
  """The tokens up to and including the first EOS_ID."""
  end = np.flatnonzero(tokens == EOS_ID)
  return tokens[:end[0] + 1] if len(end) else tokens[tokens != PAD_ID]


def torch_greedy(model, params, src, max_len: int, threads: int):
  """The PyTorch peer with our parameters, as a `(params, src) -> tokens` function like the others."""
  import torch
  from bench.torch_peer import TorchTransformer, greedy_decode, load_flax_params
  torch.set_num_threads(threads)
  peer = TorchTransformer.like(model.config, max_len=max(max_len, src.shape[1])).eval()
  load_flax_params(peer, jax.device_get(params))
  src_torch = torch.from_numpy(np.array(src)).long()
  return lambda params, src: greedy_decode(peer, src_torch, max_len).numpy()


if __name__ == "__main__":
  main()
