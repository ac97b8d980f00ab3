"""Train-step throughput and MFU against PyTorch eager, and on an accelerator against its peak.

  python -m bench.train_step [--sizes small,base] [--rounds 5]          # CPU, float32, vs PyTorch
  python -m bench.train_step --sizes base,big --dtype bfloat16 --batch 200x128 --steps 10  # GPU/TPU
  python -m bench.train_step --sizes base --cpu_kernels on,off --loss_chunks 4,1 --no_torch  # forms

Times our jitted train step (`steps.make_setup(config).train_step`) on a fixed batch of random
tokens and prints medians: step time, target tokens/s, model FLOPs utilisation (MFU), and the time
the paper's base schedule (100,000 steps of about 25,000 target tokens) would take at that rate.
MFU counts the FLOPs of `flops.train_step_flops` (the pre-softmax projection included) against a
peak: on a CPU the machine's float32 matmul peak, measured here as the best of `jnp.dot` and
`torch.matmul` on large square matrices (ours before, between and after the timed rounds,
PyTorch's after them), the highest figure seen (so that noise can only lower the MFU); on a GPU or
TPU the vendor figure for the dtype (`flops.PEAK_FLOPS`).

On a CPU or an NVIDIA GPU the step runs beside an equivalent PyTorch model (bench/torch_peer.py, our model rebuilt
from `torch.nn.Transformer`: post-LN, shared scaled embeddings, sinusoidal positions, dropout 0.1
where ours has it, label-smoothed (0.1) cross-entropy ignoring padding, Adam (0.9, 0.98, 1e-9) with
the paper's schedule), in a process of its own (bench/peer_process.py: in one process the two
shared a heap and thread pools, and our step measured slower), the two alternating round by round
so that machine noise hits both alike, and the script prints the ratio. The peer starts from our
initial parameters; the script prints the largest logit difference between the two models on the benchmark batch (float32 rounding) so
that the comparison is known to be between equal models. `--torch_stock` keeps what stock
`nn.Transformer` has and ours does not (attention and feed-forward dropout, final stack norms).
On a GPU the peer is what a PyTorch user trains with there: eager CUDA, autocast bfloat16 when
`--dtype bfloat16` (float32 parameters, loss and optimizer, as ours), fused Adam; on a CPU it
computes in float32 unless `--torch_dtype bfloat16` (its CPU autocast is far slower). No peer on
a TPU.
"""

import argparse
import os
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bench.pipeline import CONFIGS
from transformer_jax.cpu import cpu_description
from bench.peer_process import PeerProcess
from transformer_jax.config import load_config_file
from transformer_jax import cpu, steps
from transformer_jax.config import TransformerConfig
from transformer_jax.flops import peak_flops_per_device, train_step_flops

# Default batch shapes [rows, length] per side on a CPU: small uses its config's budget (4,096
# tokens, rows of 128); base and big a batch that takes seconds a step on two cores.
CPU_BATCHES = {"small": (32, 128), "base": (8, 128), "big": (4, 128)}
PAPER_STEPS, PAPER_TOKENS = 100_000, 25_000  # Section 5.1 and 5.3: the base model's schedule.


def matmul_peak(sizes=(2048, 4096), repeats: int = 5) -> float:
  """The best float32 FLOP/s of jnp.dot on [n, n] x [n, n], over `sizes`."""
  best = 0.0
  dot = jax.jit(jnp.dot)
  for n in sizes:
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32)) for _ in range(2))
    dot(a, b).block_until_ready()
    for _ in range(repeats):
      t0 = time.perf_counter()
      dot(a, b).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - t0))
  return best


def time_ours(setup, state, batch, key, steps: int):
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = setup.train_step(state, batch, key)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - t0) / steps, state


def make_peer(cfg, config, setup, batch, src, tgt, args) -> PeerProcess:
  """The PyTorch peer, in its own process, from our initial parameters."""
  init_params = setup.init_state(0).params
  # Jitted: op by op, a GPU compiles each of the model's ops alone before it runs it.
  ours_logits = jax.jit(setup.model.apply)({"params": init_params}, batch["src"], batch["tgt"])
  peer = PeerProcess(dict(
      config=cfg, max_len=max(cfg.max_len, src.shape[1]), stock=args.torch_stock,
      params=jax.device_get(init_params), src=src, tgt=tgt, ours_logits=jax.device_get(ours_logits),
      warmup_steps=config.train.warmup_steps, threads=args.threads,
      keep_heap=not args.default_memory, device=args.torch_device, dtype=args.torch_dtype))
  n_ours = sum(x.size for x in jax.tree.leaves(init_params))
  if peer.num_params != n_ours:
    print(f"warning: the PyTorch peer has {peer.num_params:,} parameters, ours {n_ours:,}")
  return peer


class StepInputs(NamedTuple):
  config: Any  # configs/<size>.py, with the overrides
  setup: steps.Setup
  state: steps.TrainState  # initial
  key: jax.Array  # dropout
  src: np.ndarray  # [rows, length] random tokens, no padding
  tgt: np.ndarray
  batch: dict  # src and tgt on the mesh


def step_inputs(size: str, batch_shape=None, loss_chunks: int = 0, **model_overrides) -> StepInputs:
  """What a benchmark of the train step times: the config's setup, its initial state and a random
  batch of `batch_shape` (rows, length) per side (default: CPU_BATCHES[size]); `loss_chunks` > 0
  replaces `train.loss_chunks`."""
  config = load_config_file(os.path.join(CONFIGS, f"{size}.py"))
  config.model.update(model_overrides)
  if loss_chunks:
    config.train.loss_chunks = loss_chunks
  rows, length = batch_shape or CPU_BATCHES[size]
  rng = np.random.default_rng(0)
  src, tgt = (rng.integers(4, config.model.vocab_size, (rows, length)).astype(np.int32)
              for _ in range(2))
  setup = steps.make_setup(config)
  return StepInputs(config, setup, setup.init_state(0), jax.random.key(0), src, tgt,
                    setup.put_batch({"src": src, "tgt": tgt}))


def cpu_kernels_override(choice: str) -> dict:
  """The model override of a `--cpu_kernels` flag: none for "config", else model.cpu_kernels."""
  return {} if choice == "config" else {"cpu_kernels": choice == "on"}


def variants(args) -> list[tuple[str, str, int]]:
  """(size, cpu_kernels, loss_chunks) for every combination the flags list, in their order."""
  return [(size, kernels, int(chunks)) for size in args.sizes.split(",")
          for kernels in args.cpu_kernels.split(",") for chunks in args.loss_chunks.split(",")]


def bench_size(size: str, args, kernels: str = "config", chunks: int = 0) -> dict:
  config, setup, state, key, src, tgt, batch = step_inputs(
      size, args.batch, chunks, attention_impl=args.attention_impl, dtype=args.dtype,
      **cpu_kernels_override(kernels))
  rows, length = src.shape
  cfg = TransformerConfig.from_config(config.model)
  t0 = time.perf_counter()
  _, state = time_ours(setup, state, batch, key, 1)
  compile_s = time.perf_counter() - t0

  peer = None if args.no_torch else make_peer(cfg, config, setup, batch, src, tgt, args)

  num_steps = args.steps or (3 if size == "small" or jax.default_backend() != "cpu" else 1)
  ours, theirs, peaks = [], [], []
  for _ in range(args.rounds):  # Interleaved, so machine noise hits both alike.
    t, state = time_ours(setup, state, batch, key, num_steps)
    ours.append(t)
    if peer:
      theirs.append(peer.step_seconds(num_steps))
    if jax.default_backend() == "cpu":  # The peak too: the clock moves with the machine's load.
      peaks.append(matmul_peak(sizes=(4096,), repeats=2))
  torch_peak = 0.0
  if peer:
    torch_peak = peer.matmul_peak()
    peer.close()
  settings = f"cpu_kernels={config.model.cpu_kernels}, loss_chunks={config.train.loss_chunks}"
  label = size if len(variants(args)) == len(args.sizes.split(",")) else f"{size}, {settings}"
  return {"size": label, "settings": settings, "batch": f"{rows}x{length}",
          "params": sum(x.size for x in jax.tree.leaves(state.params)),
          "flops": train_step_flops(cfg, rows, length, length), "compile_s": compile_s,
          "tokens": rows * length, "ours": statistics.median(ours),
          "theirs": statistics.median(theirs) if peer else None,
          "difference": peer.difference if peer else None, "peaks": peaks, "torch_peak": torch_peak}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="small,base", help="comma-separated: small, base, big")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=0,
                      help="steps per round; 0: 3 for small and on accelerators, 1 for base/big on a CPU")
  parser.add_argument("--batch", default="", help="ROWSxLENGTH per side, for every size (default: per size)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention_impl", default="einsum", choices=("einsum", "dot_product", "cudnn"))
  parser.add_argument("--loss_chunks", default="0",
                      help="slices of the target length for the projection and loss; 0: the config's; "
                           "a comma-separated list times each")
  parser.add_argument("--cpu_kernels", default="config",
                      help="model.cpu_kernels: the loss's and feed-forward layers' backward forms "
                           "of kernels.py (on) or autodiff's (off), or the config's; a comma-separated "
                           "list (on,off) times each")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  parser.add_argument("--torch_stock", action="store_true",
                      help="keep nn.Transformer's attention/feed-forward dropout and final norms")
  parser.add_argument("--torch_dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="the peer's compute dtype (bfloat16: autocast); auto: --dtype on a GPU, "
                           "float32 on a CPU (its bfloat16 autocast ran 19x slower on a Zen 3)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's threads")
  parser.add_argument("--default_memory", action="store_true",
                      help="skip cpu.keep_cpu_step_memory() (which train.py calls)")
  args = parser.parse_args()
  for choice in args.cpu_kernels.split(","):
    if choice not in ("config", "on", "off"):
      parser.error(f"--cpu_kernels={args.cpu_kernels}: each of its values is config, on or off")
  args.batch = tuple(map(int, args.batch.lower().split("x"))) if args.batch else None
  if not args.default_memory:
    cpu.keep_cpu_step_memory()  # As train.py does (the PyTorch peer's process gets keep_heap).
  on_cpu = jax.default_backend() == "cpu"
  # The peer runs where ours does: PyTorch's CPU build on a CPU, CUDA on an NVIDIA GPU; none on a TPU.
  args.torch_device = {"cpu": "cpu", "gpu": "cuda"}.get(jax.default_backend())
  args.no_torch = args.no_torch or args.torch_device is None
  if args.torch_dtype == "auto":
    args.torch_dtype = args.dtype if args.torch_device == "cuda" else "float32"

  # The peak: on a CPU the best of both libraries, measured before and after the runs (the clock
  # moves with the load of the machine's other tenants); elsewhere the vendor's figure.
  peaks = {"jnp.dot": matmul_peak()} if on_cpu else {}
  results = [bench_size(size, args, kernels, chunks) for size, kernels, chunks in variants(args)]
  if on_cpu:
    peaks["jnp.dot"] = max(peaks["jnp.dot"], matmul_peak())
    if not args.no_torch:
      peaks["torch.matmul"] = max(r["torch_peak"] for r in results)
    during = [p for r in results for p in r["peaks"]]
    peak = max(*peaks.values(), *during)  # The highest seen: the MFU below is if anything low.
    print("float32 matmul peak, n^3 for n = 2048 and 4096, best of 5 each: jnp.dot before and after "
          "the runs, torch.matmul in the peer's process after its rounds: " +
          ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()) +
          f"; jnp.dot between rounds: {min(during) / 1e9:.0f} to {max(during) / 1e9:.0f} GFLOP/s"
          f"; peak (the highest) = {peak / 1e9:.0f} GFLOP/s")
  else:
    peak = peak_flops_per_device(args.dtype) * jax.device_count()
    print(f"peak: {peak / 1e12:.0f} TFLOP/s ({jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"{args.dtype}, vendor figure)" if peak else "peak: unknown device, no MFU")

  versions = f"jax {jax.__version__} ({jax.device_count()} {jax.devices()[0].device_kind})"
  if not args.no_torch:
    from importlib.metadata import version
    where = f"{args.threads} threads" if on_cpu else "CUDA, fused Adam"
    autocast = ", autocast bfloat16" if args.torch_dtype == "bfloat16" else ", float32"
    versions += f", torch {version('torch')} ({where}{autocast}, its own process)"
  print(f"\nCPU: {cpu_description()}")
  settings = sorted({r["settings"] for r in results})
  print(f"{versions}, {args.dtype}, attention_impl={args.attention_impl}, "
        f"{settings[0] if len(settings) == 1 else 'cpu_kernels and loss_chunks by row'}, "
        f"{'default allocator' if args.default_memory else 'keep_cpu_step_memory'}, "
        f"medians of {args.rounds} {'interleaved ' if not args.no_torch else ''}rounds\n")
  mfu = lambda r, t: f"{r['flops'] / t / peak:>7.1%}" if peak else f"{'n/a':>7}"
  width = max(6, *(len(r["size"]) + 1 for r in results))
  ms = lambda t: f"{t * 1e3:>9.1f}" if t < 0.1 else f"{t * 1e3:>9.0f}"
  header = f"{'size':<{width}}{'batch':>9}{'params':>9}{'GFLOP':>8}{'':>3}{'ours ms':>9}{'tok/s':>9}{'MFU':>7}"
  if not args.no_torch:
    header += f"{'':>3}{'torch ms':>9}{'tok/s':>9}{'MFU':>7}{'ours/torch':>12}"
  print(header + f"{'paper schedule':>16}")
  for r in results:
    row = (f"{r['size']:<{width}}{r['batch']:>9}{r['params'] / 1e6:>8.1f}M{r['flops'] / 1e9:>8.0f}"
           f"{'':>3}{ms(r['ours'])}{r['tokens'] / r['ours']:>9.0f}{mfu(r, r['ours'])}")
    if r["theirs"] is not None:
      row += (f"{'':>3}{ms(r['theirs'])}{r['tokens'] / r['theirs']:>9.0f}{mfu(r, r['theirs'])}"
              f"{r['theirs'] / r['ours']:>11.2f}x")
    hours = PAPER_STEPS * PAPER_TOKENS / (r["tokens"] / r["ours"]) / 3600
    print(row + f"{hours:>14,.1f} h")
  notes = ["tok/s: target tokens per second",
           f"paper schedule: {PAPER_STEPS:,} steps of {PAPER_TOKENS:,} target tokens at our rate",
           "compile: " + ", ".join(f"{r['size']} {r['compile_s']:.0f} s" for r in results)]
  if not args.no_torch:
    notes[0] += "; ours/torch > 1 means ours is faster"
    notes.append("largest logit difference from the same parameters: " +
                 ", ".join(f"{r['size']} {r['difference']:.1e}" for r in results))
  print("\n(" + "; ".join(notes) + ")")


if __name__ == "__main__":
  main()
