"""A tiny training run on made-up data, as a script, for the tests that need fresh processes
(resume, multi-process, kill -9, SIGTERM, restoring onto other device counts).

python tests/tiny_run.py --workdir DIR --steps N [--devices D] [--fsdp F]
    [--process_id I --num_processes P --coordinator 127.0.0.1:PORT] [--dump FILE.npz]
    [--translate FILE.json] [--cooldown FRACTION] [--budget_minutes M] [--sigterm_at N]
    [--heartbeat SECONDS]

--translate, after training (or restoring a run already at N steps), translates 64 sources of the
made-up corpus greedily and with beam 4 and writes the outputs (token ids) from process 0.
"""

import argparse
import os
import pathlib
import socket
import subprocess
import sys


def parse():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--checkpoint_every", type=int, default=4)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--dump", default="")
  parser.add_argument("--step_sleep", type=float, default=0.0)
  parser.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp (the rest is data)")
  parser.add_argument("--translate", default="")
  parser.add_argument("--cooldown", type=float, default=0.0, help="train.cooldown_fraction")
  parser.add_argument("--budget_minutes", type=float, default=0.0, help="train.time_budget_minutes")
  parser.add_argument("--sigterm_at", type=int, default=0,
                      help="send this process SIGTERM during step N (a preemption; N even)")
  parser.add_argument("--heartbeat", type=float, default=10.0,
                      help="train.heartbeat_timeout_seconds: a process silent this long stops the run")
  parser.add_argument("--learn", action="store_true",
                      help="settings under which the tiny model learns quickly (its outputs vary)")
  return parser.parse_args()


def tiny_run_config(steps: int, checkpoint_every: int = 4):
  from transformer_jax.config import base_config
  config = base_config()
  config.model.update(dict(vocab_size=40, d_model=32, d_ff=64, num_heads=4, num_layers=2, max_len=32))
  config.train.update(dict(num_steps=steps, warmup_steps=10, log_every=2, checkpoint_every=checkpoint_every,
                           eval_every=10**9, checkpoints_to_keep=3, checkpoints_to_average=3))
  config.data.tokens_per_batch = 256
  config.data.packing = True  # One batch shape: one compilation.
  return config


def fake_corpus(n=300, seed=0):
  import numpy as np
  from transformer_jax.constants import EOS_ID
  from transformer_jax.data.pipeline import TokenizedCorpus
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 20, n)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = rng.integers(4, 40, offsets[-1]).astype(np.uint16)
  tokens[offsets[1:] - 1] = EOS_ID
  # The target is the reversed source (EOS kept last): a task a tiny model can learn.
  target = tokens.copy()
  for i in range(n):
    target[offsets[i]:offsets[i + 1] - 1] = tokens[offsets[i]:offsets[i + 1] - 1][::-1]
  return TokenizedCorpus(tokens, offsets, target, offsets.copy())


def tiny_setup(devices=None, steps: int = 10, **train):
  """The tiny run's config (with `train` overrides) and its Setup, in this process."""
  from transformer_jax import steps as steps_module
  config = tiny_run_config(steps)
  config.train.update(train)
  return config, steps_module.make_setup(config, devices)


def tiny_batches(config, setup, **kwargs):
  """The tiny run's endless, packed, shuffled batches of the fake corpus."""
  from transformer_jax import sharding
  from transformer_jax.data import pipeline
  corpus = fake_corpus()
  indices, _ = pipeline.keep_indices(corpus, config.model.max_len)
  kwargs = {"packing": True, "seed": 0, "shuffle": True, "num_epochs": None,
            "multiple_of": max(4, sharding.batch_multiple(setup.mesh)), **kwargs}
  return pipeline.EpochBatches(corpus, indices, tokens_per_batch=config.data.tokens_per_batch,
                               max_len=config.model.max_len, **kwargs)


# Driving this script from the tests: as a subprocess, alone or as two processes.
ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_RUN = str(ROOT / "tests" / "tiny_run.py")
TIMEOUT = 240  # Hard limit on every subprocess.


def run_tiny(workdir, steps, *extra, devices=1, check=True):
  """This script as a subprocess (`steps` steps on `devices` CPU devices), under a hard timeout."""
  cmd = [sys.executable, TINY_RUN, "--workdir", str(workdir), "--steps", str(steps),
         "--devices", str(devices), *extra]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
  if check and result.returncode != 0:
    raise AssertionError(f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  return result


def load_dump(path):
  """The leaves of a state `--dump`ed by a run, in order."""
  import numpy as np
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_bitwise_equal(a, b):
  import numpy as np
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def free_port():
  """A free TCP port on 127.0.0.1, for a coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two_processes(workdir, steps, *extra, devices=2,
                        outputs=(subprocess.PIPE, subprocess.PIPE)):
  """tests/tiny_run.py as two processes of `devices` devices each under jax.distributed, started;
  each writes its stdout and stderr to its own of `outputs` (files, or pipes by default)."""
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, TINY_RUN, "--workdir", str(workdir), "--steps", str(steps), "--devices", str(devices),
       "--num_processes", "2", "--process_id", str(i), "--coordinator", f"127.0.0.1:{port}", *extra],
      cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True) for i, output in enumerate(outputs)]


def run_two_processes(workdir, steps, *extra, devices=2):
  """tests/tiny_run.py as two processes of `devices` devices each under jax.distributed; their
  outputs."""
  procs = start_two_processes(workdir, steps, *extra, devices=devices)
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
  return outputs


def main():
  args = parse()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from transformer_jax import errors
  # As train.py: a lost process is one line and exit status 75, not a traceback.
  sys.exit(errors.run_command("tiny_run.py", lambda: run(args)))


def run(args):
  import jax
  from transformer_jax import cpu, distributed, steps, trainer
  from transformer_jax.optim import find_cooldown
  if args.coordinator:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           heartbeat_timeout_s=args.heartbeat)
  cpu.keep_cpu_step_memory()  # As train.py does, after jax.distributed and before anything else.
  import numpy as np

  config = tiny_run_config(args.steps, args.checkpoint_every)
  config.mesh.fsdp = args.fsdp
  config.train.cooldown_fraction = args.cooldown
  config.train.time_budget_minutes = args.budget_minutes
  config.train.heartbeat_timeout_seconds = args.heartbeat
  if args.learn:
    config.train.update(dict(label_smoothing=0.0, schedule="constant", learning_rate=2e-3,
                             warmup_steps=50))
    config.model.dropout_rate = 0.0
  setup = steps.make_setup(config)
  batches = tiny_batches(config, setup, process_index=jax.process_index(),
                         process_count=jax.process_count())
  if args.step_sleep:  # Slow each step down, so a test can signal the run mid-way.
    step_fn = setup.train_step
    def slow(*a):
      import time
      time.sleep(args.step_sleep)
      return step_fn(*a)
    setup.train_step = slow
  if args.sigterm_at:  # Preempted during step N: the run saves and stops at step N.
    import signal
    step_fn, calls = setup.train_step, []
    def preempted(*a):
      calls.append(1)
      if len(calls) == args.sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(*a)
    setup.train_step = preempted
  state = trainer.train(config, args.workdir, setup, batches)
  if args.dump and jax.process_index() == 0:
    from jax.experimental import multihost_utils
    leaves = jax.tree.leaves(jax.device_get(multihost_utils.process_allgather(state, tiled=True))
                             if jax.process_count() > 1 else jax.device_get(state))
    np.savez(args.dump, *[np.asarray(x) for x in leaves])
  elif args.dump and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.process_allgather(state, tiled=True)
  if args.translate:
    translate(args.translate, setup, state.params)
  cooldown = find_cooldown(state.opt_state)
  plan = "" if cooldown is None else f" cooldown {np.asarray(cooldown.plan.addressable_data(0))}"
  print("finished at step", int(jax.device_get(state.step)), plan, flush=True)


def translate(path: str, setup, params) -> None:
  import itertools
  import json
  import jax
  import numpy as np
  from transformer_jax import evaluate
  from transformer_jax.constants import EOS_ID

  class TokenIds:  # A "tokenizer" whose text is the token ids, up to EOS.
    @staticmethod
    def decode(ids):
      return " ".join(str(int(i)) for i in itertools.takewhile(lambda t: t != EOS_ID, ids))

  outputs = {beam: evaluate.translate_corpus(
      setup, params, fake_corpus(), np.arange(64), TokenIds(), tokens_per_batch=256, max_len=32,
      beam_size=beam, alpha=0.6, max_extra_len=8) for beam in (1, 4)}
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(outputs, f)


if __name__ == "__main__":
  main()
