"""The benchmark scripts run and print their tables (tiny shapes; the figures themselves are not
checked: they live in BENCHMARKS.md). The PyTorch and Hugging Face peers run where torch and
transformers are installed (the README's test command installs them) and are skipped elsewhere."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_script(*args: str, timeout: int = 300) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # One device, as the benchmarks are measured.
  done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_train_step_benchmark_prints_step_time_and_mfu():
  out = run_script("-m", "bench.train_step", "--sizes", "small", "--batch", "2x16", "--rounds",
                   "2", "--steps", "1", "--no_torch")
  row = next(line for line in out.splitlines() if line.startswith("small"))
  fields = row.split()
  assert fields[1] == "2x16" and fields[2] == "7.6M", row
  assert float(fields[4]) > 0 and fields[6].endswith("%"), row  # ms/step and MFU.
  assert "peak (the highest)" in out


@pytest.mark.slow  # About 80 s: both libraries' steps, each in its process.
def test_train_step_benchmark_times_the_pytorch_peer_in_its_own_process():
  pytest.importorskip("torch")
  out = run_script("-m", "bench.train_step", "--sizes", "small", "--batch", "2x16", "--rounds",
                   "2", "--steps", "1")
  row = next(line for line in out.splitlines() if line.startswith("small"))
  fields = row.split()
  assert float(fields[7]) > 0 and fields[10].endswith("x"), row  # The peer's ms/step, the ratio.
  difference = float(out.split("largest logit difference from the same parameters: small ")[1][:7])
  assert difference < 1e-4, out  # The peer in its process computes our function.
  assert "its own process" in out and "torch.matmul" in out


def test_the_step_profile_sorts_every_op_into_a_kind():
  out = run_script("-m", "bench.profile_step", "--size", "small", "--batch", "2x16", "--steps", "1",
                   "--top", "3")
  table = out.split("share\n")[1].split("\n\n")[0].splitlines()
  kinds = {kind.strip(): float(ms) for kind, ms, _ in (line.rsplit(None, 2) for line in table)}
  products = lambda name: any(kind.startswith(f"matrix products, {name}") for kind in kinds)
  assert products("other") and "Adam update (and gradient norm)" in kinds, out
  assert products("vocabulary (pre-softmax projection)"), out
  assert len(out.split("largest 3 ops:")[1].strip().splitlines()) == 3


@pytest.mark.slow  # About a minute: it compiles four train steps.
def test_dropout_benchmark_times_the_four_variants():
  out = run_script("-m", "bench.dropout", "--size", "small", "--batch", "2x16", "--rounds", "1")
  rows = {line[:28].strip(): line[28:].split() for line in out.splitlines()[-4:]}
  assert set(rows) == {"ours (16 bits a unit)", "flax nn.Dropout (32 bits)",
                       "flax nn.Dropout, rbg PRNG", "no dropout"}, out
  assert rows["no dropout"] == ["0.00", rows["no dropout"][1], "1.000x"], out
  assert all(float(r[1]) > 0 for r in rows.values()), out


def test_attention_benchmark_prints_both_implementations_and_plots(tmp_path):
  plot = tmp_path / "attention.png"
  out = run_script("-m", "bench.attention", "--lengths", "16,32", "--rounds", "1", "--d_model",
                   "32", "--num_heads", "4", "--plot", str(plot))
  rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("16", "32")]
  assert [r[0] for r in rows] == ["16", "32"]
  assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
  assert plot.stat().st_size > 0


def test_the_pytorch_peer_computes_our_logits():
  torch = pytest.importorskip("torch")
  import jax
  from bench.torch_peer import TorchTransformer, greedy_decode, load_flax_params, max_logit_difference
  from conftest import init_params, tiny_config
  from transformer_jax import Transformer, translation

  config = tiny_config()
  rng = np.random.default_rng(0)
  src = rng.integers(4, config.vocab_size, (3, 9)).astype(np.int32)
  tgt = rng.integers(4, config.vocab_size, (3, 7)).astype(np.int32)
  src[0, 6:] = tgt[1, 5:] = 0  # Some padding.
  params = init_params(config, src, tgt)
  ours = Transformer(config).apply({"params": params}, src, tgt)
  peer = TorchTransformer.like(config, max_len=32)
  load_flax_params(peer, jax.device_get(params))
  assert max_logit_difference(peer, np.asarray(ours), src, tgt) < 1e-4
  theirs = greedy_decode(peer.eval(), torch.from_numpy(src).long(), max_len=10).numpy()
  mine = np.asarray(translation.translate(Transformer(config), params, src, beam_size=1, alpha=0.0,
                                          max_extra_len=1))
  np.testing.assert_array_equal(theirs, mine[:, :theirs.shape[1]])


@pytest.mark.slow  # About 50 s; tests/test_marian.py checks the same translations as Hugging Face's.
def test_decode_benchmark_times_ours_and_hugging_face_on_the_same_weights():
  pytest.importorskip("transformers")
  # --uncached also checks that the script finds tests/reference_decode.py as a package.
  out = run_script("-m", "bench.decode", "--sentences", "2", "--single", "1", "--rounds", "1",
                   "--max_extra_len", "4", "--beam", "2", "--uncached")
  assert out.startswith("CPU: "), out
  lines = out.splitlines()
  for search in ("greedy", "beam 2"):
    for decoder in ("ours", "ours, one loop", "HF generate", "ours, no cache"):
      assert any(line.startswith(f"{search:<10}{decoder} ") for line in lines), out
    # The serving decoder (finished examples leave the batch) against validation's one loop.
    assert f"{search}: translations identical to ours, one loop's: 2/2" in out
  assert "greedy: translations identical to HF generate's: 2/2" in out
  assert "beam 2: translations identical to HF generate's: 2/2" in out


@pytest.mark.slow  # About 25 s; tests/test_ctranslate2.py checks the same translations.
def test_decode_benchmark_times_ctranslate2_on_the_same_weights():
  pytest.importorskip("ctranslate2")
  out = run_script("-m", "bench.decode", "--sentences", "2", "--single", "1", "--rounds", "1",
                   "--max_extra_len", "4", "--beam", "2", "--batch", "1", "--no_hf")
  lines = out.splitlines()
  for search in ("greedy", "beam 2"):
    for decoder in ("ours", "CT2 float32", "CT2 int8"):
      assert any(line.startswith(f"{search:<10}{decoder} ") for line in lines), out
    assert f"{search}: translations identical to CT2 float32's: 2/2" in out


@pytest.mark.slow  # About three minutes: every part of the GPU check, on the CPU.
def test_the_gpu_check_runs_every_part_at_tiny_sizes(tmp_path):
  # On a CPU the cudnn parts are left out; on a GPU the same commands run at full size.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable}
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  parts = {p.name: p.read_text() for p in tmp_path.glob("*.txt")}
  assert set(parts) - {"install.txt"} == {"devices.txt", "train_step_base.txt", "train_step_big.txt", "profile.txt",
                        "train_step_dot_product.txt", "attention.txt", "decode.txt"}
  failed = [name for name, text in parts.items() if "exit status" in text]
  assert not failed, {name: parts[name][-2000:] for name in failed}
  assert "paper schedule" in parts["train_step_base.txt"] and (tmp_path / "attention.png").exists()
  assert "matrix products" in parts["profile.txt"] and (tmp_path / "small_bfloat16.trace.json.gz").exists()
  if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):  # The peers too.
    assert "ours/torch" in parts["train_step_base.txt"] and "HF generate" in parts["decode.txt"]


def test_the_data_scale_benchmark_prepares_tokenizes_and_measures_memory(tmp_path):
  out = run_script("-m", "bench.data_scale", "--sizes", "2000", "--vocab_size", "300", "--dir",
                   str(tmp_path), "--processes", "2")
  row = next(line for line in out.splitlines() if line.startswith("| 2,000 |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert len(cells) == 10 and cells[6].endswith("min"), row
  assert not (tmp_path / "run-2000").exists()  # Removed unless --keep.


def test_the_bleu_curve_plots_a_run(tmp_path):
  import json
  lines = [{"step": 250 * k, "split": "validation", "bleu_greedy": b, "minutes": 4.0 * k}
           for k, b in enumerate([3.0, 11.0, 18.5, 22.0], start=1)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 1')
  out = run_script("-m", "bench.bleu_curve", "--workdir", str(tmp_path), "--out",
                   str(tmp_path / "curve.png"))
  assert "BLEU 10 at 8.0 min, BLEU 20 at 16.0 min, BLEU 25 at -" in out  # A cut line is skipped.
  assert (tmp_path / "curve.png").stat().st_size > 0


def test_the_profile_counts_overlapping_ops_once():
  from bench.profile_step import busy_time
  assert busy_time([]) == 0.0
  # Two threads' ops overlapping (0-4, 2-6), one inside another (7-9 in 7-10), one alone (12-13).
  assert busy_time([(2.0, 6.0), (0.0, 4.0), (7.0, 10.0), (7.0, 9.0), (12.0, 13.0)]) == 10.0


@pytest.mark.slow  # About 75 s on a CPU, most of it the matmul peak measured between rounds.
def test_train_step_benchmark_times_each_form_of_the_loss_in_one_process():
  out = run_script("-m", "bench.train_step", "--sizes", "small", "--batch", "2x16", "--rounds", "1",
                   "--steps", "1", "--no_torch", "--cpu_kernels", "on,off", "--loss_chunks", "2,1")
  rows = [line for line in out.splitlines() if line.startswith("small, cpu_kernels=")]
  assert [row.split("  ")[0] for row in rows] == [
      f"small, cpu_kernels={kernels}, loss_chunks={chunks}"
      for kernels in (True, False) for chunks in (2, 1)], out


def test_the_device_carry_takes_what_the_image_lacks_and_installs_what_is_missing(tmp_path):
  from bench import device_carry
  report = {"install": [
      {"metadata": {"name": name, "version": "1.0"}, "download_info": {"url": f"https://x/{name}.whl"}}
      for name in ("grain", "jax", "jax_cuda12_plugin", "nvidia-cudnn-cu12", "pyarrow", "ML_Collections")]}
  assert [name for name, _, _ in device_carry.to_carry(report)] == ["grain", "ml-collections"]

  wheels = [tmp_path / f"{name}-py3-none-any.whl" for name in
            ("grain-0.2.18", "ml_collections-1.1.0", "etils-1.15.0", "sacrebleu-2.6.0")]
  present = {"ml-collections": "1.1.0", "etils": "1.0", "sacrebleu": "2.1"}  # Too old for us: etils.
  chosen = device_carry.wanted(wheels, ["ml-collections>=1.1,<2", "etils[epath]>=1.5", "sacrebleu>=2"],
                               present.get)
  assert [p.name.split("-")[0] for p in chosen] == ["etils", "grain"]
  # The project's own requirements are what decides.
  assert any(r.startswith("orbax-checkpoint") for r in device_carry.project_requirements())


@pytest.mark.slow  # About four minutes: a dozen train steps, two profiles and a tiny training run.
def test_the_gpu_check_runs_the_forms_and_the_gpu_quick_start_at_tiny_sizes(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable}
  env.pop("XLA_FLAGS", None)
  env["OUT"] = str(tmp_path)  # As the device tool sets it: the parts' files come back archived.
  done = subprocess.run(["bash", "bench/gpu_check.sh", "forms", "profile_forms", "xla_flags",
                         "dropout", "quickstart"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  with tarfile.open(tmp_path / "gpu_check_forms+profile_forms+xla_flags+dropout+quickstart.tgz") as archive:
    archive.extractall(tmp_path / "check", filter="data")
  check = tmp_path / "check"
  parts = {p.name: p.read_text() for p in check.glob("*.txt")}
  assert {"devices.txt", "forms.txt", "profile_forms.txt", "xla_flags.txt", "dropout.txt",
          "quickstart.txt"} <= set(parts)
  failed = [name for name, text in parts.items() if "exit status" in text]
  assert not failed, {name: parts[name][-2000:] for name in failed}
  rows = [line for line in parts["forms.txt"].splitlines() if line.startswith("small, cpu_kernels=")]
  assert len(rows) == 4, parts["forms.txt"]
  assert parts["profile_forms.txt"].count("busy (at least one op running") == 2
  assert parts["xla_flags.txt"].count("\nsmall ") == 4, parts["xla_flags.txt"]  # Each flag set's row.
  assert "flax nn.Dropout, rbg PRNG" in parts["dropout.txt"]
  assert "first reached: BLEU 10 at" in parts["quickstart.txt"]
  assert (check / "test_metrics.json").exists() and (check / "metrics.jsonl").exists()
