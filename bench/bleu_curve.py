"""Validation BLEU against training minutes for a run: the quick start's time-to-quality curve.

  python bench/bleu_curve.py --workdir runs/quickstart [--out bench/plots/quickstart_bleu.png]

Reads `metrics.jsonl` (each validation pass's greedy BLEU on the validation sample and the run's
wall-clock minutes when it was logged), prints the minutes at which BLEU first reached 10, 20 and
25 (as the run's test metrics do) and draws the curve with those thresholds; `test_metrics.json`,
if present, adds the final test sacreBLEU (beam search) to the title.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformer_jax.experiment import minutes_to_bleu  # noqa: E402
from transformer_jax.trainer import read_metrics  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/quickstart")
  parser.add_argument("--out", default="bench/plots/quickstart_bleu.png")
  parser.add_argument("--label", default="", help="what the plot's title says about the machine")
  args = parser.parse_args()
  passes = [r for r in read_metrics(args.workdir, "validation") if "minutes" in r and "bleu_greedy" in r]
  if not passes:
    sys.exit(f"{args.workdir}/metrics.jsonl has no validation passes with minutes and BLEU")
  reached = minutes_to_bleu(passes)
  for r in passes:
    print(f"step {r['step']:>6}  {r['minutes']:6.1f} min  validation greedy BLEU {r['bleu_greedy']:5.1f}")
  print("first reached: " + ", ".join(f"BLEU {b} at {'-' if m is None else f'{m:.1f} min'}" for b, m in reached.items()))
  test_path = os.path.join(args.workdir, "test_metrics.json")
  test = json.load(open(test_path)) if os.path.exists(test_path) else None

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.plot([r["minutes"] for r in passes], [r["bleu_greedy"] for r in passes], marker="o", label="validation (greedy, sample)")
  for threshold, minutes in reached.items():
    ax.axhline(float(threshold), color="grey", lw=0.6, ls=":")
    if minutes is not None:
      ax.annotate(f"{threshold} at {minutes:.1f} min", (minutes, float(threshold)), textcoords="offset points",
                  xytext=(6, -12), fontsize=8)
  title = "Quick start: validation BLEU against training time"
  if test:
    title += f"\ntest sacreBLEU {test['bleu']:.1f} (beam {test['beam_size']}, {test['test_params']})"
  if args.label:
    title += f"\n{args.label}"
  ax.set(xlabel="minutes of training (compilation and validation included)", ylabel="sacreBLEU", title=title)
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
