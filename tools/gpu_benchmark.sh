#!/usr/bin/env bash
# The GPU benchmark end to end, within 10 minutes, in three timed parts (each with its own limit, so that
# one slow part cannot take the others' time):
#   1. training: our round against the PyTorch baseline (transformers + PEFT, clients one after another) on a
#      ~1.1B-parameter Llama (TinyLlama's shape) in bfloat16, at 16 and 32 clients, with the reference's
#      LoRA dropout 0.05 on both sides (LORA_DROPOUT=0 for none): gpu_benchmark.md / .json;
#   2. evaluation: tools/bench_ranking.py --quick --warm (generation + grounding, and likelihood ranking of
#      1,000 items for 32 prompts; compiled and warm seconds): bench_ranking.log. Its PyTorch side runs on
#      the CPU only, so it is not run here (on a CPU: bench_ranking.py --quick --torch);
#   3. many clients: tools/client_scaling.py, SCALING_CLIENTS (1,000) clients of one user each with
#      SCALING_PER_ROUND (100) taking part per round: seconds per trained sample, peak memory: scaling.json.
# Writes the device's name and the library versions to $OUT/environment.txt.
#
#   bash tools/gpu_benchmark.sh                      # on a machine whose python3 has jax[cuda], torch, peft
#   PRESET=tiny CLIENTS=2 SCALING_CLIENTS=40 SCALING_PER_ROUND=8 PYTHON=.venv/bin/python OUT=/tmp/gpub \
#     bash tools/gpu_benchmark.sh                    # dry run on a CPU
#
# A machine without network access and without ml-collections: put its wheel (pure Python, imported from
# the zip) in .gpu_wheels/ at the top of the checkout first:
#   pip download ml-collections --no-deps -d .gpu_wheels
# Without the Games records (tools/benchmark.py --data) the benchmark trains on the synthetic dataset (it
# says so).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/gpu_benchmark}
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gpu1b}
CLIENTS=${CLIENTS:-16,32}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
SCALING_CLIENTS=${SCALING_CLIENTS:-1000}
SCALING_PER_ROUND=${SCALING_PER_ROUND:-100}
# Each part's limit; together 560 s, under a 10-minute command limit with the start-up around them.
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-360}
EVAL_BUDGET_S=${EVAL_BUDGET_S:-100}
SCALING_BUDGET_S=${SCALING_BUDGET_S:-100}
mkdir -p "$OUT"

for wheel in .gpu_wheels/*.whl; do
  [[ -e "$wheel" ]] && export PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"
done
"$PYTHON" - <<'EOF' | tee "$OUT/environment.txt"
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "ml_collections"):
  try:
    print(name, importlib.import_module(name).__version__)
  except Exception as error:  # the benchmark will fail on it; say which
    print(name, "MISSING:", error)
import jax
print("jax devices", jax.devices())
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/environment.txt" 2>&1 || true

failed=()
part() {  # part NAME LIMIT_S COMMAND...: run it under its time limit, its output also in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  set +e
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local code=${PIPESTATUS[0]}
  set -e
  if [[ $code -eq 124 ]]; then
    failed+=("$name (over its ${limit} s)")
  elif [[ $code -ne 0 ]]; then
    failed+=("$name (exit $code)")
  fi
}
part gpu_benchmark "$TRAIN_BUDGET_S" "$PYTHON" tools/benchmark.py --preset "$PRESET" --clients "$CLIENTS" --ks "" \
  --reps 3 --lora_dropout "$LORA_DROPOUT" --out "$OUT/gpu_benchmark.json" --table "$OUT/gpu_benchmark.md"
part bench_ranking "$EVAL_BUDGET_S" "$PYTHON" tools/bench_ranking.py --quick --warm
part scaling "$SCALING_BUDGET_S" "$PYTHON" tools/client_scaling.py --clients "$SCALING_CLIENTS" \
  --per_round "$SCALING_PER_ROUND" --rounds 3 --workdir "$OUT/scaling"
tail -n 1 "$OUT/scaling.log" >"$OUT/scaling.json" || true
echo "wrote $OUT/gpu_benchmark.md, gpu_benchmark.json, bench_ranking.log and scaling.json"
if (( ${#failed[@]} )); then
  echo "failed: ${failed[*]}"
  exit 1
fi
