#!/usr/bin/env bash
# The GPU check: the figures BENCHMARKS.md wants from an NVIDIA GPU, in about 10 minutes (an H200:
# 2 minutes for each train step beside its PyTorch peer, about 1 for each other part).
#
#   pip install -e ".[test,hf,cuda12]"           # on the GPU machine; ".[test,hf,cuda13]" with a
#                                                # CUDA 13 driver (the H200 run used the machine's
#                                                # jax 0.11.2, cuda13 plugin, torch 2.11: BENCHMARKS.md)
#   bash bench/gpu_check.sh [OUT_DIR]            # default OUT_DIR: $OUT, else gpu_check/
#
# Writes one text file per part to OUT_DIR (and prints them), the most wanted first:
#   devices.txt          the devices jax sees, nvidia-smi
#   train_step_base.txt, train_step_big.txt
#                        bfloat16, 200 x 128 tokens a side (about the paper's 25,000 target tokens
#                        a batch): step time, tokens/s and MFU against the GPU's bfloat16 peak
#                        (transformer_jax.flops), the hours the paper's base schedule (100K steps)
#                        would take, beside the PyTorch peer on the same GPU (bench/torch_peer.py:
#                        eager, autocast bfloat16, fused Adam, in its own process) from our weights
#   profile.txt, base_bfloat16.trace.json.gz
#                        where base's step time goes, by kind of kernel (bench/profile_step.py), and
#                        the raw trace
#   train_step_cudnn.txt, train_step_dot_product.txt
#                        base with attention_impl cudnn and dot_product (XLA's choice), ours only
#   attention.txt, attention.png  one attention layer against length: einsum, dot_product, cudnn
#   decode.txt           decoding sentences/s, greedy and beam 4, the small config's random weights,
#                        against Hugging Face generate on the same GPU and weights
# Every part has its own time limit and the script goes on past a failed one (its file says why).
# Both libraries share the GPU, so jax takes XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.45) of
# its memory instead of 0.75. GPU_CHECK_SMOKE=1 runs the same commands at tiny sizes on any backend
# (the tests do, on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
PY=${PYTHON:-python}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
mkdir -p "$OUT_DIR"

if [ "${GPU_CHECK_SMOKE:-0}" = "1" ]; then
  BATCH=2x16 ROUNDS=1 STEPS=1 LENGTHS=16,32 SENTENCES=4 SINGLE=2 SCALE=0 BASE=small BIG=small
else
  BATCH=200x128 ROUNDS=5 STEPS=10 LENGTHS=128,512,2048,8192 SENTENCES=256 SINGLE=4 SCALE=1 BASE=base BIG=big
fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit (240 s at tiny sizes), keep its output.
  local name=$1 limit=$2; shift 2
  [ "$SCALE" = 1 ] || limit=240
  echo "== $name (limit ${limit} s): $*" | tee "$OUT_DIR/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$name.txt"
  local status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || echo "== $name: exit status $status" | tee -a "$OUT_DIR/$name.txt"
}

{ $PY -c "import jax; print(jax.__version__, jax.devices())"; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; } \
  2>&1 | tee "$OUT_DIR/devices.txt"
PLATFORM=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null)
TORCH=""  # The PyTorch peers where torch is installed (on a CPU too, at tiny sizes).
$PY -c "import torch, transformers" 2>/dev/null || TORCH="--no_torch"

STEP="$PY -m bench.train_step --dtype bfloat16 --batch $BATCH --rounds $ROUNDS --steps $STEPS"
part train_step_base 170 $STEP --sizes "$BASE" $TORCH
part train_step_big 170 $STEP --sizes "$BIG" $TORCH
part profile 100 $PY -m bench.profile_step --size "$BASE" --batch "$BATCH" --dtype bfloat16 --steps 3 \
  --keep_trace "$OUT_DIR"
[ "$PLATFORM" = gpu ] && part train_step_cudnn 80 $STEP --sizes "$BASE" --no_torch --attention_impl cudnn
ATTENTION_IMPLS=einsum,dot_product
[ "$PLATFORM" = gpu ] && ATTENTION_IMPLS=einsum,dot_product,cudnn
part attention 80 $PY -m bench.attention --impls "$ATTENTION_IMPLS" --dtype bfloat16 --lengths "$LENGTHS" \
  --rounds 3 --plot "$OUT_DIR/attention.png"
part decode 120 $PY -m bench.decode --sentences "$SENTENCES" --single "$SINGLE" --rounds 3 ${TORCH:+--no_hf}
part train_step_dot_product 80 $STEP --sizes "$BASE" --no_torch --attention_impl dot_product
echo "figures in $OUT_DIR/"
