#!/usr/bin/env bash
# The GPU check: the figures BENCHMARKS.md wants from an NVIDIA GPU, part by part.
#
#   pip install -e ".[test,hf,cuda12]"           # on the GPU machine; ".[test,hf,cuda13]" with a
#                                                # CUDA 13 driver (the H200 run used the machine's
#                                                # jax 0.11.2, cuda13 plugin, torch 2.11: BENCHMARKS.md)
#   bash bench/gpu_check.sh [OUT_DIR] [PART ...]  # default OUT_DIR: gpu_check/; default parts: CHECK
#
# On a lent machine without internet, `python -m bench.device_carry prepare` first, here: it puts
# the wheels the machine lacks and the prepared Bible corpus in .carry/, which the device tool
# carries; this script then installs what is missing (into /tmp/site-cpython-3NN) and reads the
# corpus from there. With $OUT set and no OUT_DIR, every file ends up in one archive,
# $OUT/gpu_check_PART+PART.tgz.
#
# Each part writes OUT_DIR/PART.txt (and prints it), under its own time limit; the script goes on
# past a failed part (its file says why). The parts, about as long on an H200 as the limits say:
#   devices          the devices jax sees, nvidia-smi (always first)
#   train_step_base, train_step_big
#                    bfloat16, 200 x 128 tokens a side (about the paper's 25,000 target tokens a
#                    batch): step time, tokens/s and MFU against the GPU's bfloat16 peak
#                    (transformer_jax.flops), the hours of the paper's base schedule (100K steps),
#                    beside the PyTorch peer on the same GPU (bench/torch_peer.py: eager, autocast
#                    bfloat16, fused Adam, in its own process) from our weights
#   profile          where base's step time goes, by kind of kernel (bench/profile_step.py), and the
#                    raw trace (base_bfloat16.trace.json.gz)
#   train_step_cudnn, train_step_dot_product
#                    base with attention_impl cudnn and dot_product (XLA's choice), ours only
#   attention        one attention layer against length: einsum, dot_product, cudnn (attention.png)
#   decode           decoding sentences/s, greedy and beam 4, the small config's random weights,
#                    against Hugging Face generate on the same GPU and weights
#   forms, forms_big the loss's and feed-forward layers' backward forms (model.cpu_kernels on, off)
#                    and the loss over 1 or 4 slices of the targets (train.loss_chunks), base or big
#                    with cuDNN attention: which of kernels.py's forms pay on a GPU
#   profile_forms    base's profile with cuDNN attention, the config's forms (on, 4 slices) and
#                    autodiff's whole (off, 1): the profile before and after
#   xla_flags        base with cuDNN attention under XLA flags that move a GPU step's time: CUDA
#                    graphs off (command buffers), the latency-hiding scheduler, cuBLAS for every
#                    product instead of Triton's (each in its own process: XLA reads them at start)
#   dropout          base's step with our dropout (16 threefry bits a unit), flax's (32), flax's
#                    with the rbg PRNG (XLA's RngBitGenerator) and none (bench/dropout.py)
#   quickstart       python train.py --config configs/gpu.py: the quick start on one GPU, minutes to
#                    validation BLEU 10 / 20 / 25 and the test scores (its metrics, test_metrics.json)
# CHECK (the default) is the first seven, about 10 minutes on an H200. The device tool allows 10
# minutes a call and 15 a session, start included, so a session takes a few parts a call (BENCHMARKS
# says which). Both libraries share the GPU, so jax takes XLA_PYTHON_CLIENT_MEM_FRACTION (default
# here 0.45) of its memory instead of 0.75. GPU_CHECK_SMOKE=1 runs the same commands at tiny sizes
# on any backend (the tests do, on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
CHECK="train_step_base train_step_big profile train_step_cudnn attention decode train_step_dot_product"
KNOWN=" $CHECK forms forms_big profile_forms xla_flags dropout quickstart "
OUT_DIR="" PARTS=""
for arg in "$@"; do
  if [[ "$KNOWN" == *" $arg "* ]]; then PARTS="$PARTS $arg"; else OUT_DIR=$arg; fi
done
PARTS=${PARTS:-$CHECK}
ARCHIVE=""  # With $OUT and no OUT_DIR (the device tool), one archive named after the parts.
if [ -z "$OUT_DIR" ] && [ -n "${OUT:-}" ]; then
  OUT_DIR=$(mktemp -d) ARCHIVE="$OUT/gpu_check_$(echo $PARTS | tr ' ' '+').tgz"
fi
OUT_DIR=${OUT_DIR:-gpu_check}
PY=${PYTHON:-python}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
mkdir -p "$OUT_DIR"

if [ "${GPU_CHECK_SMOKE:-0}" = "1" ]; then
  BATCH=2x16 ROUNDS=1 STEPS=1 LENGTHS=16,32 SENTENCES=4 SINGLE=2 SCALE=0 BASE=small BIG=small
  QUICKSTART_SIZE=(--config.model.vocab_size=64 --config.model.d_model=32 --config.model.d_ff=64
    --config.model.num_heads=2 --config.model.num_layers=1 --config.data.tokens_per_batch=256
    --config.train.num_steps=6 --config.train.eval_every=3 --config.train.checkpoint_every=3
    --config.train.eval_bleu_sentences=4 --config.train.test_sentences=4
    --config.data.tokenizer_max_sentences=2000)
  SMOKE_DATA=$(mktemp -d)  # A made-up corpus (a target is its source reversed), not the Bible's.
  $PY - "$SMOKE_DATA" <<'CORPUS'
import random, sys
rng, words = random.Random(0), "red old big cat dog river house went to the saw a".split()
for split, n in (("train", 300), ("validation", 8), ("test", 8)):
  rows = (rng.choices(words, k=rng.randint(2, 7)) for _ in range(n))
  open(f"{sys.argv[1]}/{split}.tsv", "w").writelines(f"{' '.join(r)}\t{' '.join(r[::-1])}\n" for r in rows)
CORPUS
  QUICKSTART_SIZE+=(--config.data.dataset=text --config.data.text_train="$SMOKE_DATA/train.tsv"
    --config.data.text_validation="$SMOKE_DATA/validation.tsv" --config.data.text_test="$SMOKE_DATA/test.tsv")
else
  BATCH=200x128 ROUNDS=5 STEPS=10 LENGTHS=128,512,2048,8192 SENTENCES=256 SINGLE=4 SCALE=1 BASE=base BIG=big
  QUICKSTART_SIZE=()
fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit (240 s at tiny sizes), keep its output.
  local name=$1 limit=$2; shift 2
  [ "$SCALE" = 1 ] || limit=240
  echo "== $name (limit ${limit} s): $*" | tee "$OUT_DIR/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$name.txt"
  local status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || echo "== $name: exit status $status" | tee -a "$OUT_DIR/$name.txt"
  # Archived after every part: a device call cut short still brings back the parts it finished.
  [ -z "$ARCHIVE" ] || tar -czf "$ARCHIVE" -C "$OUT_DIR" .
}

if [ -d .carry/wheels ]; then  # A lent machine: what it lacks, from the carried wheels.
  SITE=$($PY -c "from bench.device_carry import SITE; print(SITE)")
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  part install 120 $PY -m bench.device_carry install
fi
DATA=()  # Where the quick start's corpus is prepared: the carried Bible, or the smoke run's own.
[ -d .carry/tensorflow_datasets ] && DATA=(--config.data.data_dir="$PWD/.carry/tensorflow_datasets")
[ "${GPU_CHECK_SMOKE:-0}" = "1" ] && DATA=(--config.data.data_dir="$SMOKE_DATA/tfds")

{ $PY -c "import jax; print(jax.__version__, jax.devices())"; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; } \
  2>&1 | tee "$OUT_DIR/devices.txt"
PLATFORM=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null)
TORCH=""  # The PyTorch peers where torch is installed (on a CPU too, at tiny sizes).
$PY -c "import torch, transformers" 2>/dev/null || TORCH="--no_torch"
FUSED=dot_product  # The fused attention the forms are measured with: cuDNN's on a GPU.
[ "$PLATFORM" = gpu ] && FUSED=cudnn

STEP="$PY -m bench.train_step --dtype bfloat16 --batch $BATCH --rounds $ROUNDS --steps $STEPS"
PROFILE="$PY -m bench.profile_step --size $BASE --batch $BATCH --dtype bfloat16 --steps 3"
for name in $PARTS; do
  case $name in
    train_step_base) part train_step_base 170 $STEP --sizes "$BASE" $TORCH ;;
    train_step_big) part train_step_big 170 $STEP --sizes "$BIG" $TORCH ;;
    profile) part profile 100 $PROFILE --keep_trace "$OUT_DIR" ;;
    train_step_cudnn) [ "$PLATFORM" = gpu ] && part train_step_cudnn 80 $STEP --sizes "$BASE" --no_torch \
      --attention_impl cudnn ;;
    attention)
      IMPLS=einsum,dot_product
      [ "$PLATFORM" = gpu ] && IMPLS=einsum,dot_product,cudnn
      part attention 80 $PY -m bench.attention --impls "$IMPLS" --dtype bfloat16 --lengths "$LENGTHS" \
        --rounds 3 --plot "$OUT_DIR/attention.png" ;;
    decode) part decode 120 $PY -m bench.decode --sentences "$SENTENCES" --single "$SINGLE" --rounds 3 \
      ${TORCH:+--no_hf} ;;
    train_step_dot_product) part train_step_dot_product 80 $STEP --sizes "$BASE" --no_torch \
      --attention_impl dot_product ;;
    forms) part forms 200 $STEP --sizes "$BASE" --no_torch --attention_impl $FUSED --cpu_kernels on,off \
      --loss_chunks 4,1 ;;
    forms_big) part forms_big 240 $STEP --sizes "$BIG" --no_torch --attention_impl $FUSED \
      --cpu_kernels on,off --loss_chunks 4,1 ;;
    profile_forms)
      part profile_forms 150 bash -c "$PROFILE --attention_impl $FUSED --cpu_kernels on --loss_chunks 4 \
        && echo && $PROFILE --attention_impl $FUSED --cpu_kernels off --loss_chunks 1" ;;
    xla_flags)
      part xla_flags 300 bash -c "for flags in '' --xla_gpu_enable_command_buffer= \
        --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false; do
        echo \"== XLA_FLAGS=\$flags\"; XLA_FLAGS=\"\$(echo \${XLA_FLAGS:-} \$flags)\" $STEP --sizes $BASE \
          --no_torch --attention_impl $FUSED | grep -A2 '^size'; done" ;;
    dropout) part dropout 240 $PY -m bench.dropout --size "$BASE" --batch "$BATCH" --dtype bfloat16 \
      --attention_impl $FUSED --rounds 10 ;;
    quickstart)
      WORKDIR=$(mktemp -d)
      QUICK=(--config configs/gpu.py --workdir "$WORKDIR" "${DATA[@]}" "${QUICKSTART_SIZE[@]}")
      [ "$PLATFORM" = gpu ] || QUICK+=(--config.model.attention_impl=dot_product)  # cuDNN: GPUs only.
      part quickstart 420 $PY train.py "${QUICK[@]}"
      cp "$WORKDIR"/metrics.jsonl "$WORKDIR"/test_metrics.json "$OUT_DIR"/ 2>/dev/null
      $PY -m bench.bleu_curve --workdir "$WORKDIR" --out "$OUT_DIR/quickstart_bleu.png" 2>&1 \
        | tee -a "$OUT_DIR/quickstart.txt"
      rm -rf "$WORKDIR" ;;
  esac
done
if [ -n "$ARCHIVE" ]; then
  tar -czf "$ARCHIVE" -C "$OUT_DIR" . && echo "figures in $ARCHIVE"
else
  echo "figures in $OUT_DIR/"
fi
