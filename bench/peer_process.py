"""The PyTorch peer of bench/train_step.py in a process of its own.

A user runs one library or the other, never both in one process. In one process the two shared a
heap (our glibc settings included) and each library's thread pools, and bench/decode.py saw the
library timed second run 10 to 15% slower. Here the peer lives in a spawned process that waits on
a pipe (no busy threads) while ours runs, and the parent still alternates the two round by round.
"""

from __future__ import annotations

import multiprocessing
import time


def _serve(conn, spec: dict) -> None:
  """The child: builds the peer from our parameters, then times steps (or matmuls) on request."""
  import numpy as np
  import torch
  from bench.torch_peer import TorchTransformer, adam_trainer, load_flax_params, max_logit_difference

  torch.set_num_threads(spec["threads"])
  device = torch.device(spec.get("device", "cpu"))
  if spec["keep_heap"] and device.type == "cpu":
    from transformer_jax.cpu import keep_heap
    keep_heap()  # What our process gets too (bench/train_step.py --default_memory leaves it out).
  model = TorchTransformer.like(spec["config"], spec["max_len"], stock=spec["stock"]).to(device).train()
  load_flax_params(model, spec["params"])
  dtype = spec.get("dtype", "float32")
  difference = max_logit_difference(model, spec["ours_logits"], spec["src"], spec["tgt"], dtype)
  step = adam_trainer(model, spec["warmup_steps"], dtype=dtype)
  src, tgt = (torch.from_numpy(spec[k]).long().to(device) for k in ("src", "tgt"))
  # A GPU runs asynchronously: a step's time counts once its kernels have finished.
  synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
  del spec
  for _ in range(3 if device.type == "cuda" else 1):  # Allocator, thread pools, cuBLAS's choices.
    step(src, tgt)
  synchronize()
  conn.send((difference, sum(p.numel() for p in model.parameters())))
  while True:
    command, arg = conn.recv()
    if command == "steps":
      synchronize()
      t0 = time.perf_counter()
      for _ in range(arg):
        step(src, tgt)
      synchronize()
      conn.send((time.perf_counter() - t0) / arg)
    elif command == "matmul_peak":
      best = 0.0
      for n in arg:
        a, b = (torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), np.float32))
                for _ in range(2))
        torch.matmul(a, b)
        for _ in range(5):
          t0 = time.perf_counter()
          torch.matmul(a, b)
          best = max(best, 2 * n**3 / (time.perf_counter() - t0))
      conn.send(best)
    else:
      conn.send(None)
      return


class PeerProcess:
  """The PyTorch peer of a benchmark batch, built in a spawned process from our parameters.

  `spec`: config (a TransformerConfig), max_len, stock, params (our tree as numpy), src and tgt
  ([B, L] int32), ours_logits (our teacher-forced logits on them, for the equality check),
  warmup_steps, threads, keep_heap, and optionally device ("cpu" or "cuda"; default "cpu") and
  dtype ("float32" or "bfloat16", PyTorch's autocast; default "float32"). `difference` and
  `num_params` describe the peer built.
  """

  def __init__(self, spec: dict):
    spawn = multiprocessing.get_context("spawn")  # A fresh interpreter: no JAX threads or heap.
    self._conn, child = spawn.Pipe()
    self._process = spawn.Process(target=_serve, args=(child, spec), daemon=True)
    self._process.start()
    child.close()
    self.difference, self.num_params = self._conn.recv()

  def step_seconds(self, steps: int) -> float:
    """Seconds per step, the mean over `steps` consecutive steps."""
    self._conn.send(("steps", steps))
    return self._conn.recv()

  def matmul_peak(self, sizes=(2048, 4096)) -> float:
    """The best torch.matmul float32 FLOP/s on [n, n] x [n, n], over `sizes`."""
    self._conn.send(("matmul_peak", sizes))
    return self._conn.recv()

  def close(self) -> None:
    self._conn.send(("stop", None))
    self._conn.recv()
    self._process.join(timeout=30)
