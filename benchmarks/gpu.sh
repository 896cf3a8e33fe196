#!/usr/bin/env bash
# The accelerator-attention tables of issue 16 on one NVIDIA GPU, in one command (run from
# anywhere):
#
#     benchmarks/gpu.sh [output directory]      # default: benchmarks/results/gpu-<UTC time>
#
# 1. benchmarks/attention.py for every implementation x case x length (4K, 8K, 16K), one process
#    each, so each JSON's device peak memory is that case's alone; the xla path with the released
#    configs' query chunk (1024);
# 2. benchmarks/train_step_accel.py: one 270M-270M (text) train step at 16K/16K per
#    implementation (step time, tokens/s, MFU against the device's bf16 peak, memory);
# 3. the markdown tables of all of it (benchmarks/gpu_table.py), printed and kept as table.md.
# A run that fails (e.g. out of memory) is reported on stderr and left out of the tables; the
# attention JSON reports an implementation that cannot express a case as `unsupported`.
# Environment: PYTHON (default python), IMPLS, LENGTHS, CASES, QUERY_CHUNK, TRAIN_LENGTH.
set -euo pipefail
if [ $# -ge 1 ]; then  # relative to where the command was run
  mkdir -p "$1"
  OUT=$(cd "$1" && pwd)
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
PYTHON=${PYTHON:-python}
IMPLS=${IMPLS:-xla cudnn gpu_flash}
LENGTHS=${LENGTHS:-4096 8192 16384}
CASES=${CASES:-encoder_local encoder_global decoder_local decoder_global merged_local merged_global}
QUERY_CHUNK=${QUERY_CHUNK:-1024}
TRAIN_LENGTH=${TRAIN_LENGTH:-16384}
mkdir -p "$OUT"

"$PYTHON" -c 'import jax, sys; b = jax.default_backend(); sys.exit(None if b == "gpu" else f"gpu.sh: JAX sees no GPU (backend {b})")'

# run NAME COMMAND...: the command's JSON into $OUT/NAME.json, or a note on stderr.
run() {
  local name=$1
  shift
  echo "== $name" >&2
  if "$@" > "$OUT/$name.json.part"; then
    mv "$OUT/$name.json.part" "$OUT/$name.json"
  else
    echo "gpu.sh: $name failed (exit $?); left out of the tables" >&2
    rm -f "$OUT/$name.json.part"
  fi
}

for impl in $IMPLS; do
  for length in $LENGTHS; do
    for case in $CASES; do
      run "attention-$impl-$case-$length" "$PYTHON" -m benchmarks.attention --impls="$impl" \
        --cases="$case" --lengths="$length" --query_chunk="$QUERY_CHUNK"
    done
  done
done
for impl in $IMPLS; do
  run "train_step-$impl" "$PYTHON" -m benchmarks.train_step_accel \
    --config=configs/t5g2_270m.py:text --config.model.attention_impl="$impl" \
    --encoder_length="$TRAIN_LENGTH" --decoder_length="$TRAIN_LENGTH"
done
shopt -s nullglob
results=("$OUT"/*.json)
if [ ${#results[@]} -eq 0 ]; then
  echo "gpu.sh: no run succeeded; see the errors above" >&2
  exit 1
fi
"$PYTHON" -m benchmarks.gpu_table "${results[@]}" | tee "$OUT/table.md"
