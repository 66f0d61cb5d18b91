#!/usr/bin/env bash
# The GPU benchmark end to end, within 10 minutes: our round against the PyTorch baseline (transformers +
# PEFT, clients one after another) on a ~1.1B-parameter Llama (TinyLlama's shape) in bfloat16, at 16 and
# 32 clients, with the reference's LoRA dropout 0.05 on both sides (LORA_DROPOUT=0 for none); writes the
# table, the JSON and the device's name to $OUT.
#
#   bash tools/gpu_benchmark.sh                      # on a machine whose python3 has jax[cuda], torch, peft
#   PRESET=tiny CLIENTS=2 PYTHON=.venv/bin/python OUT=/tmp/gpub bash tools/gpu_benchmark.sh   # dry run on a CPU
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
BUDGET_S=${BUDGET_S:-540}  # the benchmark's own limit, under the device's 10-minute command limit
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

timeout "$BUDGET_S" "$PYTHON" tools/benchmark.py --preset "$PRESET" --clients "$CLIENTS" --ks "" --reps 3 \
  --lora_dropout "$LORA_DROPOUT" \
  --out "$OUT/gpu_benchmark.json" --table "$OUT/gpu_benchmark.md" 2>&1 | tee "$OUT/gpu_benchmark.log"
echo "wrote $OUT/gpu_benchmark.md and $OUT/gpu_benchmark.json"
