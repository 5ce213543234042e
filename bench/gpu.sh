#!/usr/bin/env bash
# The GPU checks of issue 4 as one prepared script, for a machine with a CUDA device:
#   pip install -e ".[test,hf]" && bash bench/gpu.sh     (from the repository root)
# 1. the tests marked gpu (skipped on CPU-only machines);
# 2. the dynamic benchmark on a ~1B parameter Llama built from a config: 3 settings,
#    8 steps, 64 p_t samples, wall time and peak GPU memory against one plain step;
# 3. the torchrun sweep on every visible GPU against one process (bench/distributed_sweep.py);
# and the 20m audit with p_t's moves batched (8 per forward) and not (HALLWAY_AUDIT_PT_BATCH=0).
# Output lands in bench/out/ (and $OUT when set, for the device runner).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider -m gpu 2>&1 | tail -20 | tee "$out/gpu_tests.txt"
python bench/dynamic_cost.py --models 20m,1b --device cuda --settings 3 --steps 8 --samples 64 2>&1 \
  | grep -v "Loading weights\|Writing model" | tee "$out/gpu_dynamic.txt"
# p_t's moves 8 per vmapped forward (the CUDA default) against one per forward, on the 20m model: audit s/setting
for k in 8 0; do echo "HALLWAY_AUDIT_PT_BATCH=$k"; HALLWAY_AUDIT_PT_BATCH=$k python bench/dynamic_cost.py --models 20m --device cuda --settings 3 --steps 8 --samples 64 2>&1 | grep -v "Loading weights\|Writing model"; done | tee "$out/gpu_pt_batch.txt"
# 3. the torchrun sweep on every visible GPU against one process (same JSON; wall-time ratio)
python bench/distributed_sweep.py --model 5m --settings 8 --device cuda --procs "$(nvidia-smi -L | wc -l)" 2>&1 \
  | tee "$out/gpu_distributed.txt"
