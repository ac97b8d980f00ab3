"""Starting a multi-process run: jax.distributed from explicit flags, or from the cluster that JAX
itself detects, as MaxText does.

`jax.distributed.initialize()` without arguments asks each cluster environment JAX knows, in its
order, whether this process runs in it: Open MPI (`mpirun`), SLURM (`srun`), a GKE TPU slice
(`TPU_WORKER_HOSTNAMES`), a Cloud TPU VM slice made with `gcloud compute tpus tpu-vm create` (the
GCE metadata server, asked only when libtpu found TPU chips on the host, so a plain machine never
waits for it), and a Kubernetes indexed Job (with the `kubernetes` package). `detect_cluster` asks
the same question of the same classes, so this module initialises exactly when JAX would find a
cluster, but only one of more than one process: SLURM and Open MPI also describe a single task,
which needs no coordinator, and a plain machine is no cluster at all.

A process that the backend counts as one of several but that has no coordination service (a TPU
slice JAX did not recognise: the TPU runtime knows the slice, jax.distributed does not) would
fail later, at its first wait on process 0 (`hosts.once`); `check_started` stops it at once with
the flags to pass.

Private JAX: the cluster classes (`jax._src.clusters`) and the coordination service's client
(`jax._src.distributed.global_state.client`, whose key-value store `hosts.once` uses) have no
public accessor in jax 0.10 or 0.11 (`jax.distributed` offers `initialize`, `is_initialized` and
`shutdown`; `jax.experimental.multihost_utils` only collectives). This module is their one user.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax

from transformer_jax.errors import UserError

log = logging.getLogger(__name__)

FLAGS = "--coordinator_address=HOST0:PORT --num_processes=N --process_id=I"


class DistributedError(UserError, RuntimeError):
  """A multi-process start that cannot go on; the message says which flags to pass."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process's run is started from.

  Attributes:
    name: JAX's name for the environment ("ompi", "slurm", "gketpu", "gcetpu", "K8sCluster"), or
      "flags" for --coordinator_address and the others.
    num_processes: how many processes the run has.
    process_id: this process's index among them.
  """

  name: str
  num_processes: int
  process_id: int


def _cluster_types() -> list[Any]:
  """JAX's cluster environments in the order `jax.distributed.initialize()` tries them."""
  from jax._src import clusters  # Private: no public list of the environments JAX detects.

  return list(clusters.ClusterEnv._cluster_types)


def detect_cluster() -> Cluster | None:
  """The cluster environment `jax.distributed.initialize()` would use, and its process count.

  Opt-in environments (mpi4py) are skipped, as JAX skips them without `cluster_detection_method`.

  Returns:
    The first environment present, or None on a machine that is in none.

  Raises:
    DistributedError: JAX sees an environment but cannot tell how many processes it has.
  """
  for env in _cluster_types():
    if env.opt_in_only_method or not env.is_env_present():
      continue
    name = env.name or env.__name__
    try:
      num_processes = int(env.get_process_count())
      # A single process is left alone, so its index is not asked for (Kubernetes has none
      # outside an indexed Job).
      process_id = int(env.get_process_id()) if num_processes > 1 else 0
    except Exception as e:  # A half-set environment: SLURM_NTASKS="", metadata that fails...
      raise DistributedError(f"JAX detected a {name} cluster but could not read its number of "
                             f"processes or this process's index ({type(e).__name__}: {e}); start "
                             f"each process with {FLAGS}") from e
    return Cluster(name, num_processes, process_id)
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: float = 100.0) -> Cluster | None:
  """Starts jax.distributed for a run of several processes; before anything starts a backend.

  Args:
    coordinator_address: host:port of process 0; with it, `num_processes` and `process_id` are
      required and no detection happens.
    num_processes: the number of processes (explicit start only).
    process_id: this process's index (explicit start only).
    heartbeat_timeout_s: how long a process may be silent before the others stop the run
      (`train.heartbeat_timeout_seconds`, watched by `peers.Watch`); the coordination service
      gets a longer one (`service_heartbeat_timeout`), so that the watch acts first.

  Returns:
    How the run was started, or None for a single process (nothing initialised).

  Raises:
    DistributedError: flags given in part, or a detected cluster that cannot be joined.
  """
  flags = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  timeouts = dict(heartbeat_timeout_seconds=service_heartbeat_timeout(heartbeat_timeout_s))
  if any(value is not None for value in flags.values()):
    missing = [name for name, value in flags.items() if value is None]
    if missing:
      raise DistributedError(f"{', '.join(missing)} missing: a multi-process start by flags needs "
                             f"all three, {FLAGS}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
    cluster = Cluster("flags", num_processes, process_id)
  else:
    cluster = detect_cluster()
    if cluster is None or cluster.num_processes < 2:
      return None
    try:
      jax.distributed.initialize(**timeouts)
    except (RuntimeError, ValueError) as e:
      raise DistributedError(f"JAX detected a {cluster.name} cluster of {cluster.num_processes} "
                             f"processes but could not start jax.distributed on it: {e}; to start "
                             f"otherwise, pass {FLAGS}") from e
  # Not jax.process_index(): that would start the backends, which cpu.keep_cpu_step_memory must
  # still be able to configure.
  log.info("jax.distributed started (%s): process %d of %d.", cluster.name, cluster.process_id,
           cluster.num_processes)
  return cluster


def service_heartbeat_timeout(timeout_s: float) -> int:
  """The coordination service's heartbeat timeout for a `peers.Watch` of `timeout_s`: long enough
  that the watch stops the run (one line) before the service aborts it (a C++ stack dump)."""
  return int(timeout_s + max(10.0, timeout_s / 2))


def _missing_service_message() -> str:
  known = ", ".join(t.name or t.__name__ for t in _cluster_types())
  flags = FLAGS.replace("=N", f"={jax.process_count()}")
  return (f"this is process {jax.process_index()} of {jax.process_count()}, but jax.distributed was "
          f"not started: JAX detected no cluster here ({known} are the ones it knows); start every "
          f"process with {flags} (HOST0 the address of process 0, I each process's index)")


def check_started() -> None:
  """Stops a process that is one of several without the coordination service, which every wait
  on process 0 needs; call it once the backends are up.

  Raises:
    DistributedError: naming the flags to pass.
  """
  if jax.process_count() > 1 and not jax.distributed.is_initialized():
    raise DistributedError(_missing_service_message())


def coordination_client() -> Any:
  """The coordination service's client, whose key-value store carries process 0's word.

  Returns:
    The client; None in a single-process run.

  Raises:
    DistributedError: in a run of several processes without jax.distributed.
  """
  from jax._src import distributed as jax_distributed  # Private: no public accessor (module docstring).

  client = jax_distributed.global_state.client
  if client is None and jax.process_count() > 1:
    raise DistributedError(_missing_service_message())
  return client
