"""Starting a multi-process run: explicit flags, or the cluster JAX detects, in each environment JAX
knows (simulated by its variables, and for the GCE metadata server by a patched query), never on
a plain machine; a run of several processes without a coordinator stops at once; and two
processes started by SLURM's variables alone train and checkpoint as the explicit flags do."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from transformer_jax import distributed, hosts
from transformer_jax.distributed import Cluster, DistributedError

SERVICE_HEARTBEAT = distributed.service_heartbeat_timeout(100.0)  # For the default 100 s watch.

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 300  # Hard limit on each training process.
# Every variable a cluster environment of JAX's reads, cleared so that the machine the tests run on
# (a CI job under SLURM, say) does not leak into them.
CLUSTER_VARIABLES = (
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "SLURM_STEP_NUM_NODES", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_VERSION", "PMIX_NAMESPACE", "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES", "TPU_PROCESS_ADDRESSES_PATH", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS",
    "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS", "TPU_SKIP_MDS_QUERY")
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "10.0.0.1,10.0.0.2", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.5,10.148.0.1:34911",
        "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4", "TPU_WORKER_ID": "3",
           "MEGASCALE_NUM_SLICES": "1", "MEGASCALE_SLICE_ID": "0", "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}
# What a Cloud TPU VM's metadata server says to worker 1 of a v5e-16 slice (4 hosts).
GCE_METADATA = {"agent-worker-number": "1", "worker-network-endpoints": "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4",
                "tpu-env": "MEGASCALE_NUM_SLICES: '1'\nACCELERATOR_TYPE: 'v5litepod-16'\n"}


@pytest.fixture
def plain_machine(monkeypatch):
  """No cluster variables, no TPU VM; jax.distributed.initialize records its arguments."""
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
  return calls


def on_tpu_vm(monkeypatch, metadata=None):
  """A host where libtpu found TPU chips; `metadata` answers the GCE metadata server's queries."""
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # As jax sets it where it found no chips.
  if metadata is not None:
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY")
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))


def jax_own_detection():
  """What jax.distributed.initialize() would pass on: (num_processes, process_id)."""
  _, num_processes, process_id, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, 1)
  return num_processes, process_id


@pytest.mark.parametrize("variables, expected", [
    (SLURM, Cluster("slurm", 4, 2)),
    (OMPI, Cluster("ompi", 2, 1)),
    ({**SLURM, **OMPI}, Cluster("ompi", 2, 1)),  # JAX's order: Open MPI before SLURM.
], ids=["slurm", "ompi", "ompi_first"])
def test_slurm_and_open_mpi_are_detected_by_their_variables(plain_machine, monkeypatch, variables, expected):
  for name, value in variables.items():
    monkeypatch.setenv(name, value)
  assert distributed.detect_cluster() == expected
  assert jax_own_detection() == (expected.num_processes, expected.process_id)
  assert distributed.initialize() == expected
  # JAX's own detection, arguments unset but the coordination service's heartbeat (longer than the
  # peers' watch, so that the watch reports a lost process first).
  assert plain_machine == [((), {"heartbeat_timeout_seconds": SERVICE_HEARTBEAT})]


def test_a_gke_tpu_slice_is_detected_by_its_worker_list(plain_machine, monkeypatch):
  on_tpu_vm(monkeypatch)
  for name, value in GKE_TPU.items():
    monkeypatch.setenv(name, value)
  assert distributed.detect_cluster() == Cluster("gketpu", 4, 3)
  assert jax_own_detection() == (4, 3)
  assert distributed.initialize() == Cluster("gketpu", 4, 3)


def test_a_cloud_tpu_vm_slice_is_detected_through_the_metadata_server(plain_machine, monkeypatch):
  on_tpu_vm(monkeypatch, GCE_METADATA)
  assert distributed.detect_cluster() == Cluster("gcetpu", 4, 1)
  assert jax_own_detection() == (4, 1)
  assert distributed.initialize() == Cluster("gcetpu", 4, 1)
  assert plain_machine == [((), {"heartbeat_timeout_seconds": SERVICE_HEARTBEAT})]


def test_a_single_host_tpu_vm_is_left_alone(plain_machine, monkeypatch):
  on_tpu_vm(monkeypatch, {**GCE_METADATA, "agent-worker-number": "0", "worker-network-endpoints": "10.0.0.1"})
  assert distributed.detect_cluster() == Cluster("gcetpu", 1, 0)
  assert distributed.initialize() is None and plain_machine == []


def test_the_metadata_server_is_not_asked_off_a_tpu_vm(plain_machine, monkeypatch):
  def no_query(key):
    raise AssertionError(f"asked the metadata server for {key}")

  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", no_query)
  assert distributed.detect_cluster() is None
  on_tpu_vm(monkeypatch)  # TPU chips, but TPU_SKIP_MDS_QUERY: not a GCE slice.
  assert distributed.detect_cluster() is None


def test_a_kubernetes_indexed_job_is_detected_through_jaxs_class(plain_machine, monkeypatch):
  k8s = next(t for t in clusters.ClusterEnv._cluster_types if t.__name__ == "K8sCluster")
  monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
  monkeypatch.setattr(k8s, "is_env_present", classmethod(lambda cls: True))
  monkeypatch.setattr(k8s, "get_process_count", classmethod(lambda cls: 3))
  monkeypatch.setattr(k8s, "get_process_id", classmethod(lambda cls: 2))
  assert distributed.detect_cluster() == Cluster("K8sCluster", 3, 2)
  assert distributed.initialize() == Cluster("K8sCluster", 3, 2)


def test_a_kubernetes_pod_without_the_kubernetes_package_is_no_cluster(plain_machine, monkeypatch):
  # The package is no dependency of ours; without it JAX warns and detects nothing.
  monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
  monkeypatch.setitem(sys.modules, "kubernetes", None)  # Importing it fails.
  with pytest.warns(UserWarning, match="kubernetes"):
    assert distributed.detect_cluster() is None


def test_mpi4py_stays_opt_in_as_in_jax(plain_machine, monkeypatch):
  mpi4py = next(t for t in clusters.ClusterEnv._cluster_types if t.name == "mpi4py")
  monkeypatch.setattr(mpi4py, "is_env_present", classmethod(lambda cls: True))
  assert distributed.detect_cluster() is None


@pytest.mark.parametrize("variables", [
    {},
    {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"},  # `srun -n 1` or an sbatch script's shell.
    {**OMPI, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"},  # `mpirun -n 1`.
], ids=["plain", "slurm_one_task", "ompi_one_rank"])
def test_a_single_process_starts_no_coordinator(plain_machine, monkeypatch, variables):
  for name, value in variables.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize() is None
  assert plain_machine == []


def test_explicit_flags_win_over_detection(plain_machine, monkeypatch):
  for name, value in SLURM.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize("10.1.1.1:1234", 2, 1) == Cluster("flags", 2, 1)
  assert plain_machine == [(("10.1.1.1:1234", 2, 1), {"heartbeat_timeout_seconds": SERVICE_HEARTBEAT})]


def test_flags_given_in_part_are_refused_naming_the_missing_ones(plain_machine):
  with pytest.raises(DistributedError, match="--num_processes, --process_id missing"):
    distributed.initialize("10.1.1.1:1234")
  with pytest.raises(DistributedError, match="--coordinator_address missing"):
    distributed.initialize(None, 2, 0)
  assert plain_machine == []


def test_an_environment_jax_cannot_read_names_the_flags(plain_machine, monkeypatch):
  for name, value in {**SLURM, "SLURM_NTASKS": "four"}.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(DistributedError, match="slurm cluster.*--coordinator_address=HOST0:PORT"):
    distributed.detect_cluster()


def test_several_processes_without_a_coordinator_stop_at_once(monkeypatch):
  # A TPU slice JAX did not recognise: the TPU runtime counts the hosts, jax.distributed never ran.
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  with pytest.raises(DistributedError, match="process 0 of 4.*--num_processes=4 --process_id=I"):
    distributed.check_started()
  with pytest.raises(DistributedError, match="jax.distributed was not started"):
    distributed.coordination_client()
  # hosts.once stops before its step too, instead of failing on a missing client later.
  with pytest.raises(DistributedError):
    hosts.once("the tokenizer", lambda: pytest.fail("ran the step"), timeout_minutes=1)


def test_a_single_process_needs_no_coordinator():
  distributed.check_started()
  assert distributed.coordination_client() is None


# Two processes on this machine, started by SLURM's variables alone, and by the explicit flags.

ENGLISH = [f"the {a} {b} went to the {c}" for a in ("red", "old", "big") for b in ("cat", "dog")
           for c in ("market", "river", "house")]
GERMAN = [f"die {a} {b} ging zum {c}" for a in ("rote", "alte", "grosse") for b in ("Katze", "Hund")
          for c in ("Markt", "Fluss", "Haus")]


def free_slurm_job_id() -> int:
  """A job id whose coordinator port (SLURM's rule in JAX: 61440 + id % 4096) is free here."""
  for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + job_id % 4096))
      except OSError:
        continue
      return job_id
  raise RuntimeError("no free port in SLURM's coordinator range")


def train_on_two_processes(workdir: pathlib.Path, start: str) -> list[tuple[int, str, str]]:
  """train.py as two processes, started by `start`: "slurm" (its variables) or "flags"."""
  data = workdir.parent / "data"
  data.mkdir(parents=True, exist_ok=True)
  files = {}
  for split, pairs in (("train", list(zip(ENGLISH, GERMAN)) * 3), ("validation", list(zip(ENGLISH, GERMAN))[:6]),
                       ("test", list(zip(ENGLISH, GERMAN))[6:10])):
    files[split] = data / f"{split}.tsv"
    files[split].write_text("".join(f"{en}\t{de}\n" for en, de in pairs))
  flags = [f"--workdir={workdir}", "--config.data.dataset=text",
           *(f"--config.data.text_{split}={path}" for split, path in files.items()),
           f"--config.data.data_dir={data / 'tfds'}", "--config.model.vocab_size=40",
           "--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_heads=4",
           "--config.model.num_layers=1", "--config.model.max_len=32", "--config.data.tokens_per_batch=256",
           "--config.train.num_steps=3", "--config.train.time_budget_minutes=0", "--config.train.log_every=1",
           "--config.train.eval_bleu_sentences=0", "--config.train.samples_to_print=0",
           "--config.train.checkpoint_every=3", "--config.data.prepare_timeout_minutes=3"]
  env = {name: value for name, value in os.environ.items() if name not in CLUSTER_VARIABLES}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  job_id, port = free_slurm_job_id(), None
  commands, envs = [], []
  for i in range(2):
    if start == "slurm":
      commands.append([sys.executable, "train.py", *flags])
      envs.append({**env, "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "127.0.0.1",
                   "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
    else:
      port = port or 61440 + job_id % 4096
      commands.append([sys.executable, "train.py", *flags, f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}"])
      envs.append(env)
  procs = [subprocess.Popen(command, cwd=ROOT, env=e, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE) for command, e in zip(commands, envs)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=TIMEOUT))
  finally:
    for proc in procs:
      proc.kill()
  return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def train_losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_two_processes_started_by_slurm_train_and_checkpoint_as_by_flags(tmp_path):
  results = {}
  for start in ("slurm", "flags"):
    workdir = tmp_path / start / "run"
    (rc0, out0, err0), (rc1, _, err1) = train_on_two_processes(workdir, start)
    assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
    name = "slurm" if start == "slurm" else "flags"
    assert f"jax.distributed started ({name}): process 0 of 2" in err0
    assert f"jax.distributed started ({name}): process 1 of 2" in err1
    assert "Waiting for process 0 to prepare the tokenizer" in err1  # The coordinator's store.
    assert "Test (" in out0
    assert (workdir / "checkpoints" / "3").is_dir()
    results[start] = train_losses(workdir)
  assert sorted(results["slurm"]) == [1, 2, 3]
  assert results["slurm"] == results["flags"]
