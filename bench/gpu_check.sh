#!/usr/bin/env bash
# The GPU check: the figures BENCHMARKS.md wants from an NVIDIA GPU, in under 8 minutes.
#
#   pip install -e ".[test]" "jax[cuda12]"      # on the GPU machine, with the jax of pyproject.toml
#   bash bench/gpu_check.sh [OUT_DIR]            # default OUT_DIR: $OUT, else gpu_check/
#
# Writes one text file per part to OUT_DIR (and prints them):
#   devices.txt          the devices jax sees, nvidia-smi
#   train_step.txt       base and big, bfloat16, 200 x 128 tokens a side: step time, tokens/s, MFU
#                        against the GPU's bfloat16 peak (transformer_jax.flops), and the hours the
#                        paper's base schedule (100K steps of ~25K target tokens) would take
#   train_step_<impl>.txt  base with attention_impl dot_product (XLA's choice) and cudnn
#   attention.txt, attention.png  one attention layer against length: einsum, dot_product, cudnn
#   decode.txt           decoding sentences/s, greedy and beam 4, the small config's random weights
# Every part has its own time limit and the script goes on past a failed one (its file says why).
# GPU_CHECK_SMOKE=1 runs the same commands at tiny sizes on any backend (the tests do, on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"

if [ "${GPU_CHECK_SMOKE:-0}" = "1" ]; then
  SIZES=small BATCH=2x16 ROUNDS=1 LENGTHS=16,32 SENTENCES=4 LIMIT=240
else
  SIZES=base,big BATCH=200x128 ROUNDS=3 LENGTHS=128,512,2048,8192 SENTENCES=256 LIMIT=150
fi

part() {  # part NAME COMMAND...: run with a time limit, keep its output.
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT_DIR/$name.txt"
  timeout "$LIMIT" "$@" 2>&1 | tee -a "$OUT_DIR/$name.txt"
  local status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || echo "== $name: exit status $status" | tee -a "$OUT_DIR/$name.txt"
}

{ $PY -c "import jax; print(jax.__version__, jax.devices())"; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; } \
  2>&1 | tee "$OUT_DIR/devices.txt"
PLATFORM=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null)

part train_step $PY bench/train_step.py --sizes "$SIZES" --dtype bfloat16 --batch "$BATCH" --no_torch --rounds "$ROUNDS"
IMPLS="dot_product"
[ "$PLATFORM" = gpu ] && IMPLS="dot_product cudnn"
for impl in $IMPLS; do
  part "train_step_$impl" $PY bench/train_step.py --sizes "${SIZES%%,*}" --dtype bfloat16 --batch "$BATCH" \
    --no_torch --rounds "$ROUNDS" --attention_impl "$impl"
done
ATTENTION_IMPLS=einsum,dot_product
[ "$PLATFORM" = gpu ] && ATTENTION_IMPLS=einsum,dot_product,cudnn
part attention $PY bench/attention.py --impls "$ATTENTION_IMPLS" --dtype bfloat16 --lengths "$LENGTHS" \
  --rounds "$ROUNDS" --plot "$OUT_DIR/attention.png"
part decode $PY bench/decode.py --no_hf --sentences "$SENTENCES" --rounds "$ROUNDS"
echo "figures in $OUT_DIR/"
