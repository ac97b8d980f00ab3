"""Train a Transformer, then evaluate it on the test split.

  python train.py                                    # offline quick start (configs/small.py)
  python train.py --config configs/base.py --workdir runs/base --config.data.dataset=wmt14
  python train.py --config configs/base.py --config.model.num_heads=16    # any field, any Table 3 row

Starting again with the same --workdir resumes from its last checkpoint. On several hosts, run the
same command on each; jax.distributed is initialised from --coordinator_address/--num_processes/
--process_id when given, and otherwise wherever JAX detects a cluster of several processes (Cloud
TPU and GKE slices, SLURM, Open MPI, Kubernetes: transformer_jax/distributed.py).
"""

import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from transformer_jax import accelerators, cpu, distributed, errors, experiment

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "small.py"),
    "Config file; override any field with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Run directory: checkpoints, logs, tokenizer.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds are chatty at INFO.
  logging.getLogger("transformer_jax").setLevel(logging.INFO)

  def run() -> None:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           heartbeat_timeout_s=_CONFIG.value.train.heartbeat_timeout_seconds)
    cpu.keep_cpu_step_memory()  # CPU backends only; before anything else starts JAX's backends.
    distributed.check_started()  # Several processes without a coordinator: stop now, naming the flags.
    accelerators.check_backend(strict=False)  # A GPU or TPU that JAX does not use: say so first.
    hint = accelerators.quick_start_hint(jax.default_backend(), config_flags.get_config_filename(
        flags.FLAGS["config"]))
    if hint:
      logging.getLogger("transformer_jax").warning(hint)
    experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)

  # A bad value, file or checkpoint is one line naming it (exit 2), not a traceback; so is a lost
  # process (exit 75: rerun to resume).
  sys.exit(errors.run_command("train.py", run))


if __name__ == "__main__":
  app.run(main)
