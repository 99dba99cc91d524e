#!/usr/bin/env bash
# The accelerator check: the 140m and 370m Parcae train step at seq 2048 in bfloat16 on one
# GPU or TPU chip, in under 5 minutes. One JSON line per model (tokens/s, mfu and mfu_executed
# against the chip's published bf16 peak, peak_bytes_in_use, compile_s, temp_bytes), appended
# to $OUT (default bench_accelerator.jsonl) and printed. Record the numbers in the README.
#
#   bash launch/bench_accelerator.sh                  # on the accelerator machine, from the checkout
#   BATCH_140M=32 BATCH_370M=16 bash launch/bench_accelerator.sh
#   bash launch/bench_accelerator.sh --smoke          # the same commands at toy shapes (CPU, CI)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_accelerator.jsonl}
PYTHON=${PYTHON:-python}
COMMON=(--mode=bench --config.model.dtype=bfloat16 --config.model.attention_impl=auto
        --config.model.loss_chunk=512 --config.bench.warmup=2 --config.bench.steps=5)
SIZES=("140m ${BATCH_140M:-16}" "370m ${BATCH_370M:-8}")
if [[ "${1:-}" == "--smoke" ]]; then  # every flag above, at shapes a CPU compiles in seconds
  COMMON+=(--config.model.seq_len=64 --config.model.block_size=64 --config.model.vocab_size=256
           --config.model.d_model=64 --config.model.n_heads=2 --config.model.n_kv_heads=2 --config.model.d_mlp=128
           --config.model.d_rec=64 --config.model.d_rec_mlp=128 --config.model.n_rec_heads=2
           --config.model.n_prelude=1 --config.model.n_core=1 --config.model.n_coda=1
           --config.model.loss_chunk=32 --config.bench.warmup=1 --config.bench.steps=1)
  SIZES=("140m 2" "370m 2")
elif [[ $# -gt 0 ]]; then
  echo "usage: bash launch/bench_accelerator.sh [--smoke]" >&2; exit 2
fi
for entry in "${SIZES[@]}"; do
  read -r name batch <<< "$entry"
  line=$("$PYTHON" -m parcae_jax.main --config="configs/$name.py" "${COMMON[@]}" --config.train.batch_size="$batch" | tail -n 1)
  "$PYTHON" - "$name" "$line" <<'PY' | tee -a "$OUT"
import json, sys
name, result = sys.argv[1], json.loads(sys.argv[2])
print(json.dumps({"config": name, **result}))
PY
done
