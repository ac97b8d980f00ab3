"""The data path at WMT scale: a synthetic parallel corpus of N pairs through the user-text path.

  python -m bench.data_scale [--sizes 100000,1000000,4500000] [--dir /tmp/data_scale]

For each N it writes a tab-separated corpus (generated here, never kept in the repository: words
drawn from a Zipf distribution over a 60,000-word vocabulary per language, sentence lengths
log-normal with a median of about 22 words and a long tail, as WMT's are, the target about 1.1 times
the source), then runs what `train.py --config.data.dataset=text` runs before its first step, timed
stage by stage with the base config (37,000 pieces, 25,000 tokens a batch, max_len 256):
  prepare   tfds writes the split as array_record (`sources.load_split`);
  tokenizer SentencePiece BPE trained on a sample (`experiment.load_tokenizer`; at most
            `data.tokenizer_max_sentences` sentences);
  tokenize  the whole split, in `data.tokenize_processes` processes, into the .npy cache
            (`experiment.load_split`);
  plan      one epoch's batch plan (`EpochBatches.plan`).
Then a fresh process opens the cache as a training process does and reads 300 batches; the growth
of its resident memory over what it held after its imports is the host memory the data costs: its
own (anonymous) memory, and the cache's pages it has touched (file pages, which the kernel can
drop and read again). Once with the cache memory-mapped (what the pipeline does), once with the
arrays read into memory (what it did before the cache was mapped).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

WORDS = 60_000


def word_list(rng: np.random.Generator, n: int) -> np.ndarray:
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  lengths = np.clip(rng.poisson(6, n), 2, 14)
  return np.array(["".join(rng.choice(letters, k)) for k in lengths])


def write_corpus(path: str, n: int, seed: int = 0, chunk: int = 100_000) -> None:
  """n lines "source<TAB>target" of Zipf-distributed words (written in chunks)."""
  rng = np.random.default_rng(seed)
  vocab = [word_list(rng, WORDS), word_list(rng, WORDS)]
  ranks = np.arange(1, WORDS + 1)
  probs = 1.0 / ranks ** 1.1
  probs /= probs.sum()
  with open(path + ".tmp", "w") as f:
    for start in range(0, n, chunk):
      m = min(chunk, n - start)
      src_len = np.clip(np.round(rng.lognormal(np.log(22), 0.55, m)), 1, 200).astype(int)
      tgt_len = np.clip(np.round(src_len * rng.normal(1.1, 0.12, m)), 1, 220).astype(int)
      sides = []
      for lengths, words in ((src_len, vocab[0]), (tgt_len, vocab[1])):
        ids = rng.choice(WORDS, int(lengths.sum()), p=probs)
        flat = words[ids]
        cuts = np.cumsum(lengths)[:-1]
        sides.append([" ".join(s) for s in np.split(flat, cuts)])
      f.writelines(f"{s}\t{t}\n" for s, t in zip(*sides))
  os.replace(path + ".tmp", path)


def run_config(tsv: str, data_dir: str, processes: int, vocab_size: int = 37000):
  from transformer_jax.config import base_config
  config = base_config()
  config.model.vocab_size = vocab_size
  config.data.update(dataset="text", text_train=tsv, data_dir=data_dir, tokenize_processes=processes)
  return config


def prepare(n: int, directory: str, processes: int, vocab_size: int) -> dict:
  """Times each stage for a corpus of n pairs; returns the figures."""
  from transformer_jax import experiment
  from transformer_jax.data import pipeline, sources, token_cache
  os.makedirs(directory, exist_ok=True)
  tsv = os.path.join(directory, f"corpus-{n}.tsv")
  figures = {"pairs": n}
  start = time.perf_counter()
  if not os.path.exists(tsv):
    write_corpus(tsv, n)
  figures["generate_s"] = time.perf_counter() - start
  work = os.path.join(directory, f"run-{n}")
  shutil.rmtree(work, ignore_errors=True)
  config = run_config(tsv, os.path.join(work, "tfds"), processes, vocab_size)
  stages = {}
  start = time.perf_counter()
  raw = sources.load_split(config.data, "train")
  stages["prepare_s"] = time.perf_counter() - start
  start = time.perf_counter()
  tokenizer = experiment.load_tokenizer(config, work, raw)
  stages["tokenizer_s"] = time.perf_counter() - start
  start = time.perf_counter()
  split = experiment.load_split(config, work, "train", tokenizer)
  stages["tokenize_s"] = time.perf_counter() - start
  start = time.perf_counter()
  batches = pipeline.EpochBatches(split.corpus, split.indices, tokens_per_batch=config.data.tokens_per_batch,
                                  max_len=config.data.max_len, packing=False, seed=0, shuffle=True,
                                  num_epochs=None, multiple_of=8)
  figures["batches_per_epoch"] = len(batches.plan(0))
  stages["plan_s"] = time.perf_counter() - start
  figures.update(stages, total_s=sum(stages.values()), tokens=int(len(split.corpus.src) + len(split.corpus.tgt)),
                 cache_mb=sum(getattr(split.corpus, k).nbytes for k in token_cache.CORPUS_ARRAYS) / 2**20)
  figures["workdir"] = work
  return figures


def training_process_memory(tsv_dir: str, n: int, processes: int, vocab_size: int, in_memory: bool) -> dict:
  """Peak RSS growth of a process that opens the cache and reads 300 batches (run in a fresh process)."""
  # The child runs in the repository root, where `python -c` finds the bench package, so its paths
  # are made absolute first.
  tsv_dir = os.path.abspath(tsv_dir)
  code = f"""
import json, resource
from bench.data_scale import run_config
from transformer_jax import experiment
from transformer_jax.data import pipeline, sources, token_cache
from transformer_jax.tokenizer import load_run_tokenizer
import numpy as np
def rss():
  fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
  return {{k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}}
work = {os.path.join(tsv_dir, f"run-{n}")!r}
config = run_config({os.path.join(tsv_dir, f"corpus-{n}.tsv")!r}, work + "/tfds", {processes}, {vocab_size})
base = rss()
split = experiment.load_split(config, work, "train", load_run_tokenizer(work))
corpus = split.corpus
if {in_memory}:
  corpus = token_cache.TokenizedCorpus(*(np.array(getattr(corpus, k)) for k in token_cache.CORPUS_ARRAYS))
batches = pipeline.EpochBatches(corpus, split.indices, tokens_per_batch=25000, max_len=256, packing=False,
                                seed=0, shuffle=True, num_epochs=None, multiple_of=8)
for k in range(300):
  batches[k]
now = rss()
print(json.dumps({{"anon_mb": now["RssAnon"] - base["RssAnon"], "file_mb": now["RssFile"] - base["RssFile"]}}))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600,
                       cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="100000,1000000,4500000")
  parser.add_argument("--dir", default="/tmp/data_scale", help="where corpora and runs are written")
  parser.add_argument("--processes", type=int, default=0, help="tokenizing processes (0: one per core)")
  parser.add_argument("--vocab_size", type=int, default=37000)
  parser.add_argument("--keep", action="store_true", help="keep the generated corpora and runs")
  args = parser.parse_args()
  from transformer_jax.cpu import cpu_description
  print(f"CPU: {cpu_description()}; {os.cpu_count()} cores; tokenize_processes={args.processes or os.cpu_count()}")
  rows = []
  for n in map(int, args.sizes.split(",")):
    figures = prepare(n, args.dir, args.processes, args.vocab_size)
    for in_memory in (False, True):
      memory = training_process_memory(args.dir, n, args.processes, args.vocab_size, in_memory)
      key = "in_memory" if in_memory else "mapped"
      figures[f"anon_{key}_mb"], figures[f"file_{key}_mb"] = memory["anon_mb"], memory["file_mb"]
    rows.append(figures)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}), flush=True)
    if not args.keep:
      shutil.rmtree(figures["workdir"], ignore_errors=True)
  print("\n| pairs | tokens | prepare (tfds) | tokenizer | tokenize | plan | total | cache "
        "| data memory, mapped: own + file pages | data memory, arrays in RAM |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['pairs']:,} | {r['tokens'] / 1e6:.0f}M | {r['prepare_s']:.0f} s | {r['tokenizer_s']:.0f} s | "
          f"{r['tokenize_s']:.0f} s | {r['plan_s']:.1f} s | {r['total_s'] / 60:.1f} min | {r['cache_mb']:,.0f} MB | "
          f"{r['anon_mapped_mb']:,.0f} + {r['file_mapped_mb']:,.0f} MB | "
          f"{r['anon_in_memory_mb'] + r['file_in_memory_mb']:,.0f} MB |")
  print(f"(peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB in this process)")


if __name__ == "__main__":
  main()
