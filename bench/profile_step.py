"""Where a train step's time goes, op by op, on the machine at hand.

  python -m bench.profile_step --size small          # 32 x 128, configs/small.py
  python -m bench.profile_step --size base --steps 2  # 8 x 128
  python -m bench.profile_step --size base --batch 200x128 --dtype bfloat16 --keep_trace DIR  # GPU

Runs the train step of bench/train_step.py (same batch, same settings) a few times under
`jax.profiler`, sums the time of each compiled op (XLA:CPU's thunks, named after the HLO
instructions of the step's compiled program) over the traced steps, and sorts the ops into kinds by
what the compiled HLO says they compute: matrix products (split into those with the vocabulary
dimension, i.e. the pre-softmax projection and its gradients, attention's batched products of
queries and keys and of weights and values, and the rest; each marked when XLA left it to Eigen
instead of a YNNPACK fusion), dropout's random bits
and masks, the Adam update, vocabulary-sized elementwise work (softmax, loss and their gradients),
layer norms, layout copies and other elementwise work. Ops run on two threads and overlap, so the
shares are of the summed op time, and the step's wall time is printed beside it. The largest ops
are listed with their JAX source (`op_name`) so that a kind can be checked by eye.

On a GPU the same table counts the kernels on the device's streams (a product is a cuBLAS call or
a fusion around a `dot`, attention's fused kernel a cuDNN call); written before a GPU was at hand
to try it, so the script also prints how many traced events it read per process of the trace,
and `--keep_trace DIR` keeps the raw trace (Perfetto or TensorBoard read it) for a second look.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time

from transformer_jax import cpu

import flax.linen as nn
import jax

from bench.train_step import cpu_kernels_override, step_inputs
from transformer_jax.cpu import cpu_description

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (\([^()]*\)|\S+) (\w[\w-]*)\(")  # Tuple shapes too.
_CALLS = re.compile(r"calls=%?([\w.-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTAINERS = ("while", "conditional", "call")  # E.g. the loss's loop over slices of the targets.
_TOP_LEVEL = re.compile(r"^jit\([\w]+\)/[a-z_]+$")  # e.g. "jit(train_step)/mul": no model scope.


def hlo_instructions(hlo_text: str) -> tuple[dict, dict]:
  """Parses compiled HLO text: {instruction: (shape, opcode, calls, op_name)} for every
  instruction, and {computation: [its instructions' opcodes and shapes]}."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      current = current.lstrip("%")
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    calls = _CALLS.search(line)
    op_name = _OP_NAME.search(line)
    if opcode == "dot" and "lhs_batch_dims" in line:
      opcode = "batched-dot"  # Attention's scores and weighted values (batch and heads).
    target = _TARGET.search(line)
    if opcode == "custom-call" and target:  # A GPU's library calls.
      if "fmha" in target.group(1).lower():
        opcode = "batched-dot"  # cuDNN's fused attention.
      elif re.search(r"gemm|matmul", target.group(1), re.IGNORECASE):
        opcode = "library-dot"  # cuBLAS.
    instructions[name] = (shape, opcode, calls.group(1) if calls else None,
                          op_name.group(1) if op_name else "")
    computations[current].append((opcode, shape, op_name.group(1) if op_name else ""))
  return instructions, computations


def kind_of(name: str, instructions: dict, computations: dict, vocab_size: int) -> str:
  """The kind of work a compiled op does (see the module docstring)."""
  shape, opcode, calls, op_name = instructions.get(name, ("", "?", None, ""))
  inner = computations.get(calls, []) if calls else []
  opcodes = {opcode, *(o for o, _, _ in inner)}
  names = " ".join([op_name, *(n for _, _, n in inner)]).lower()
  shapes = " ".join([shape, *(s for _, s, _ in inner)])
  vocab = re.search(rf"[\[,]{vocab_size}[\],]", shapes) is not None
  # A product outside a fusion is one XLA:CPU left to Eigen rather than to YNNPACK's fusions, which
  # ran the same product 2x to 3x faster on one core of a Zen 3 (kernels.weight_gradient).
  eigen = ", left to Eigen" if opcode in ("dot", "batched-dot") and jax.default_backend() == "cpu" else ""
  if "batched-dot" in opcodes:
    return "matrix products, attention (scores, values)" + eigen
  if opcodes & {"dot", "convolution", "library-dot"}:
    return ("matrix products, vocabulary (pre-softmax projection)" if vocab
            else "matrix products, other") + eigen
  if "dropout" in names or "random_bits" in names or "threefry" in names:
    return "dropout (random bits, masks)"
  if _TOP_LEVEL.match(op_name):  # Outside the differentiated model: optax's update, grad norm.
    return "Adam update (and gradient norm)"
  if vocab:
    return "vocabulary-sized elementwise (softmax, loss)"
  if "_norm/" in op_name.lower():  # The model's norm modules: self_attention_norm, ...
    return "layer norms"
  if opcodes <= {"copy", "transpose", "bitcast", "fusion", "parameter", "tuple",
                 "get-tuple-element", "reshape", "broadcast", "slice", "concatenate",
                 "dynamic-slice", "dynamic-update-slice"}:
    return "layout copies, slices"
  return "other elementwise"


def busy_time(intervals: list[tuple[float, float]]) -> float:
  """The length of the union of (start, end) intervals: the time at least one op ran."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="small", help="a config of configs/: small, base, big, gpu")
  parser.add_argument("--batch", default="", help="ROWSxLENGTH per side (default: bench/train_step.py's)")
  parser.add_argument("--steps", type=int, default=3, help="traced steps (after 2 untraced)")
  parser.add_argument("--top", type=int, default=15, help="largest ops to list")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention_impl", default="einsum", choices=("einsum", "dot_product", "cudnn"))
  parser.add_argument("--loss_chunks", type=int, default=0,
                      help="slices of the target length for the projection and loss; 0: the config's")
  parser.add_argument("--cpu_kernels", default="config", choices=("config", "on", "off"),
                      help="model.cpu_kernels: kernels.py's backward forms (on), autodiff's (off)")
  parser.add_argument("--keep_trace", default="", help="a directory to copy the raw trace into")
  args = parser.parse_args()
  cpu.keep_cpu_step_memory()  # As train.py and bench/train_step.py do.

  batch_shape = tuple(map(int, args.batch.lower().split("x"))) if args.batch else None
  config, setup, state, key, src, _, batch = step_inputs(
      args.size, batch_shape, args.loss_chunks, dtype=args.dtype, attention_impl=args.attention_impl,
      **cpu_kernels_override(args.cpu_kernels))
  rows, length = src.shape
  vocab_size = config.model.vocab_size
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    train_step = setup.jit_train_step.lower(state, batch, key).compile()  # Runs, and names its ops.
  instructions, computations = hlo_instructions(train_step.as_text())
  for _ in range(2):
    state, metrics = train_step(state, batch, key)
  jax.block_until_ready(state)

  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        state, metrics = train_step(state, batch, key)
      jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / args.steps
    (trace_file,) = glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.trace.json.gz"))
    if args.keep_trace:
      os.makedirs(args.keep_trace, exist_ok=True)
      shutil.copy(trace_file, os.path.join(args.keep_trace, f"{args.size}_{args.dtype}.trace.json.gz"))
    events = json.load(gzip.open(trace_file))["traceEvents"]

  # On a CPU the compiled ops run on the host's threads; on an accelerator count only the kernels
  # on its streams (the host's events for the same ops are launches).
  processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  on_host = jax.default_backend() == "cpu"
  counted = lambda event: on_host or "/device:" in processes.get(event.get("pid"), "")
  seen = collections.Counter(processes.get(e.get("pid"), "?") for e in events
                             if e.get("args", {}).get("hlo_op"))
  per_op, intervals = collections.Counter(), []
  for event in events:
    op = event.get("args", {}).get("hlo_op")
    if (op and event.get("args", {}).get("hlo_module") == "jit_train_step" and "dur" in event
        and counted(event)):
      if instructions.get(op, ("", ""))[1] in _CONTAINERS:
        continue  # Its body's ops are timed (and counted) on their own.
      per_op[op] += event["dur"] / 1e3 / args.steps  # ms per step
      intervals.append((float(event["ts"]), float(event["ts"]) + float(event["dur"])))
  busy = busy_time(intervals) / 1e3 / args.steps  # ms per step with at least one op running
  per_kind = collections.Counter()
  for op, ms in per_op.items():
    per_kind[kind_of(op, instructions, computations, vocab_size)] += ms
  total = sum(per_op.values())

  print(f"CPU: {cpu_description()}")
  threads = "two threads, so op time can exceed wall time" if on_host else "on the device's streams"
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}); {args.size} {rows}x{length}, "
        f"{args.dtype}, attention_impl={args.attention_impl}, loss_chunks={config.train.loss_chunks}, "
        f"cpu_kernels={config.model.cpu_kernels}; {args.steps} traced steps: "
        f"{wall * 1e3:.0f} ms a step under the profiler, {total:.0f} ms of op time a step "
        f"({len(per_op)} ops; {threads})")
  where = "the CPU's threads" if on_host else "the device"
  print(f"busy (at least one op running on {where}): {busy:.1f} ms a step; idle: "
        f"{max(0.0, wall * 1e3 - busy):.1f} ms ({max(0.0, 1 - busy / (wall * 1e3)):.0%} of the wall "
        "time: launches, gaps between kernels, host work, the profiler's own cost)")
  print("traced events naming an HLO op, by process: " +
        ", ".join(f"{name or '?'} {n}" for name, n in seen.most_common()) + "\n")
  width = max(len(kind) for kind in per_kind) + 2
  print(f"{'kind':<{width}}{'ms/step':>9}{'share':>8}")
  for kind, ms in per_kind.most_common():
    print(f"{kind:<{width}}{ms:>9.1f}{ms / total:>8.1%}")
  print(f"\nlargest {args.top} ops:")
  for op, ms in per_op.most_common(args.top):
    shape, opcode, _, op_name = instructions.get(op, ("", "?", None, ""))
    print(f"{ms:8.1f} ms  {op:<30} {kind_of(op, instructions, computations, vocab_size)[:28]:<29}"
          f"{shape[:40]:<41}{op_name[-90:]}")


if __name__ == "__main__":
  main()
