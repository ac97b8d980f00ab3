"""Validation BLEU against training minutes: the quick start's time-to-quality curve.

  python -m bench.bleu_curve --workdir runs/quickstart [--out bench/plots/quickstart_bleu.png]
  python -m bench.bleu_curve --workdir runs/a --label float32 --workdir runs/b --label bfloat16

Reads each run's `metrics.jsonl` (every validation pass's greedy BLEU on the validation sample and
the run's wall-clock minutes when it was logged), prints the minutes at which BLEU first reached
10, 20 and 25 (as the run's test metrics do) and draws the curves on one plot with those
thresholds; `test_metrics.json`, where present, adds the final test sacreBLEU (beam search) and
the machine the run was measured on.
"""

import argparse
import json
import os
import sys

from transformer_jax.evaluate import minutes_to_bleu
from transformer_jax.metrics import read_metrics


def describe(workdir: str, label: str) -> tuple[list[dict], str]:
  passes = [r for r in read_metrics(workdir, "validation") if "minutes" in r and "bleu_greedy" in r]
  if not passes:
    sys.exit(f"{workdir}/metrics.jsonl has no validation passes with minutes and BLEU")
  reached = minutes_to_bleu(passes)
  print(f"{label or workdir}:")
  for r in passes:
    print(f"  step {r['step']:>6}  {r['minutes']:6.1f} min  validation greedy BLEU {r['bleu_greedy']:5.1f}")
  print("  first reached: " + ", ".join(f"BLEU {b} at {'-' if m is None else f'{m:.1f} min'}"
                                        for b, m in reached.items()))
  name = label or os.path.basename(os.path.normpath(workdir))
  test_path = os.path.join(workdir, "test_metrics.json")
  if os.path.exists(test_path):
    with open(test_path) as f:
      test = json.load(f)
    print(f"  test sacreBLEU {test['bleu']:.2f} (beam {test['beam_size']}, {test['test_params']})")
    # The run's own machine (runs before 2026-12-02 did not record it): the minutes are its.
    print(f"  machine: {test.get('machine', 'not recorded')}")
    name += f": test sacreBLEU {test['bleu']:.1f}"
  return passes, name


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", action="append", help="a run directory (repeat for several)")
  parser.add_argument("--label", action="append", default=[], help="a name for each --workdir, in order")
  parser.add_argument("--out", default="bench/plots/quickstart_bleu.png")
  parser.add_argument("--title", default="Quick start: validation BLEU against training time")
  args = parser.parse_args()
  workdirs = args.workdir or ["runs/quickstart"]
  labels = args.label + [""] * (len(workdirs) - len(args.label))
  runs = [describe(w, label) for w, label in zip(workdirs, labels)]

  try:
    import matplotlib
  except ModuleNotFoundError:  # A lent GPU machine may lack it; the figures above are the result.
    print(f"no matplotlib here: {args.out} not drawn (the metrics.jsonl can be plotted elsewhere)")
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for passes, name in runs:
    ax.plot([r["minutes"] for r in passes], [r["bleu_greedy"] for r in passes], marker="o", label=name)
  for threshold in (10, 20, 25):
    ax.axhline(threshold, color="grey", lw=0.6, ls=":")
  if len(runs) == 1:
    for threshold, minutes in minutes_to_bleu(runs[0][0]).items():
      if minutes is not None:
        ax.annotate(f"{threshold} at {minutes:.1f} min", (minutes, float(threshold)),
                    textcoords="offset points", xytext=(6, -12), fontsize=8)
  ax.set(xlabel="minutes of training (compilation and validation included)",
         ylabel="validation sacreBLEU (greedy, 128 verses)", title=args.title)
  ax.set_xlim(left=0)
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
