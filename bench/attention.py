"""Attention step time and memory against sequence length: einsum against jax.nn.dot_product_attention.

  python -m bench.attention [--lengths 128,256,512,1024,2048,4096] [--rounds 3]
  python -m bench.attention --impls einsum,dot_product,cudnn --dtype bfloat16    # on a GPU

One `MultiHeadAttention` layer (section 3.2.2: d_model 512, 8 heads, batch 1) as self-attention
with the padding mask the encoder passes, forward and backward (gradients of the parameters and of
the input). For each length it compiles each implementation (`model.attention_impl` "einsum",
"dot_product" and, on a GPU, "cudnn"), then times them alternately and prints the medians, the
ratio to einsum, and the temporary
memory XLA plans for the compiled step (`compiled.memory_analysis().temp_size_in_bytes`). Both
curves go to bench/plots/attention.png. On a CPU both implementations materialise the [N, T, S]
scores, so memory grows with the square of the length for either; cuDNN's fused kernel, which
does not, is only reachable on a GPU.
"""

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.cpu import cpu_description
from transformer_jax.attention import MultiHeadAttention, segment_mask
from transformer_jax.config import TransformerConfig

IMPLS = ("einsum", "dot_product")
PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


def compiled_step(impl: str, length: int, d_model: int, num_heads: int, dtype: str = "float32"):
  """The jitted forward+backward of one attention layer, compiled, with its inputs."""
  config = TransformerConfig(d_model=d_model, num_heads=num_heads, attention_impl=impl, dtype=dtype)
  layer = MultiHeadAttention(config)
  x = jax.random.normal(jax.random.key(0), (1, length, d_model), jnp.float32).astype(dtype)
  mask = segment_mask(jnp.ones((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))
  params = nn.meta.unbox(layer.init(jax.random.key(1), x, x, mask))["params"]

  def loss(params, x):
    y = layer.apply({"params": params}, x, x, mask)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  return compiled, (params, x), temp


def run(compiled, args, repeats: int) -> float:
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def plot(results: list[dict], impls: list[str], dtype: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
  lengths = [r["length"] for r in results]
  for impl, marker in zip(impls, ("o", "s", "^")):
    ax_t.plot(lengths, [r[impl]["time"] * 1e3 for r in results], marker=marker, label=impl)
    if all(r[impl]["temp"] is not None for r in results):
      ax_m.plot(lengths, [r[impl]["temp"] / 2**20 for r in results], marker=marker, label=impl)
  for ax, label in ((ax_t, "forward + backward (ms)"), (ax_m, "XLA temporary memory (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(f"one attention layer, batch 1, d_model 512, 8 heads, {jax.devices()[0].platform}, {dtype}")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="128,256,512,1024,2048,4096")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--plot", default=os.path.join(PLOTS, "attention.png"))
  parser.add_argument("--impls", default=",".join(IMPLS), help="einsum first; cudnn needs a GPU")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args()
  impls = args.impls.split(",")

  results = []
  for length in map(int, args.lengths.split(",")):
    steps = {impl: compiled_step(impl, length, args.d_model, args.num_heads, args.dtype) for impl in impls}
    # Enough calls per round to take about a quarter of a second, from one warm-up call.
    warm = max(run(compiled, inputs, 1) for compiled, inputs, _ in steps.values())
    repeats = max(1, int(0.25 / max(warm, 1e-4)))
    times = {impl: [] for impl in impls}
    for _ in range(args.rounds):  # Interleaved.
      for impl, (compiled, inputs, _) in steps.items():
        times[impl].append(run(compiled, inputs, repeats))
    results.append({"length": length, **{impl: {"time": statistics.median(times[impl]),
                                                "temp": steps[impl][2]} for impl in impls}})
    del steps

  print(f"CPU: {cpu_description()}")
  print(f"one attention layer, forward + backward, batch 1, d_model {args.d_model}, "
        f"{args.num_heads} heads, {args.dtype}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"medians of {args.rounds} interleaved rounds\n")
  mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f}"
  header = f"{'length':>7}" + "".join(f"{impl + ' ms':>16}" for impl in impls)
  header += "".join(f"{impls[0] + '/' + impl:>22}" for impl in impls[1:])
  header += "".join(f"{impl + ' temp MiB':>22}" for impl in impls)
  print(header)
  for r in results:
    line = f"{r['length']:>7}" + "".join(f"{r[impl]['time'] * 1e3:>16.2f}" for impl in impls)
    line += "".join(f"{r[impls[0]]['time'] / r[impl]['time']:>21.2f}x" for impl in impls[1:])
    line += "".join(f"{mib(r[impl]['temp']):>22}" for impl in impls)
    print(line)
  print(f"\n({impls[0]}/X > 1 means X is faster)")
  if args.plot:
    plot(results, impls, args.dtype, args.plot)
    print(f"plot: {os.path.relpath(args.plot)}")


if __name__ == "__main__":
  main()
