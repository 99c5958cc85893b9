#!/usr/bin/env bash
# The checks that need a GPU, as one short script (about 5 minutes on an H100):
#   1. bench/trainer.py: both trainers on CUDA at batch 1024 / 8192 / 65536 (samples tiled to 10^6)
#   2. a toy run with training.device=cuda, once per trainer: both trainers' losses side by side
#   3. tests/test_fasttrain.py on the GPU machine (CPU-pinned comparisons; proves the install works there)
# Without a GPU it prints "no GPU" and exits 0.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR (default: a temporary folder) keeps logs and runs
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no GPU"
    exit 0
fi

out="${1:-$(mktemp -d)}"
mkdir -p "$out"
export MADMINER_SWEEPER_CACHE="$out/cache"
python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
date -u

echo "== 1. trainer throughput (CPU rows at batch 1024 only, CUDA at 1024/8192/65536)"
python bench/trainer.py --cpu-batches 1024 --repeat 3 --epochs 2 --gpu-samples 1000000 --gpu-epochs 2 2>&1 \
    | grep -v "Large statistical uncertainty" | tee "$out/trainer.txt"

echo "== 2. toy run with training.device=cuda, both trainers"
for trainer in fast madminer; do
    start=$(date +%s.%N)
    python -m app training.device=cuda training.trainer="$trainer" tracking=disabled \
        hydra.run.dir="$out/run_$trainer" > "$out/run_$trainer.log" 2>&1 \
        || { echo "toy run with training.trainer=$trainer failed:"; tail -30 "$out/run_$trainer.log"; exit 1; }
    end=$(date +%s.%N)
    python - "$out/run_$trainer" "$trainer" "$start" "$end" <<'EOF'
import json, sys
run, trainer, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
m = json.load(open(f"{run}/results/metrics.json"))
keys = ("train_loss", "val_loss", "n_epochs_trained", "truth_log_r_mse", "truth_limits_ml_iou")
print(f"trainer={trainer:<8} wall {end - start:6.1f} s  " + "  ".join(f"{k}={m.get(k, float('nan')):.4g}" for k in keys))
EOF
done
grep -h "stage train" "$out"/run_*.log || true

echo "== 3. tests/test_fasttrain.py"
python -m pytest tests/test_fasttrain.py -q -x 2>&1 | tail -3
echo "logs: $out"
