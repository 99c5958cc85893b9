#!/usr/bin/env bash
# The checks that need a GPU, as one short script (about 4 minutes on an H200):
#   1. bench/trainer.py: both trainers on CUDA at batch 1024 / 8192 / 65536 (samples tiled to 10^6; MadMiner's
#      trainer on 5*10^4 of them), then the fast trainer's validation loss vs batch size and learning rate
#   2. a toy run with training.device=cuda, once per trainer: both trainers' losses and truth metrics side by side
#   3. tests/test_fasttrain.py on the GPU machine (CPU-pinned comparisons; proves the install works there)
# Without a GPU it prints "no GPU" and exits 0. Each section runs even when an earlier one fails; the exit
# status says whether all passed.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR (default: a temporary folder) keeps logs and runs
#   PYTHON=python3.11 bash bench/gpu_check.sh   # the interpreter (default: python3)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no GPU"
    exit 0
fi

out="${1:-$(mktemp -d)}"
mkdir -p "$out"
export MADMINER_SWEEPER_CACHE="$out/cache"
failed=()
"$PY" -c "import sys, torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
date -u

echo "== 1. trainer throughput (CPU rows at batch 1024 only, CUDA at 1024/8192/65536) and learning-rate scaling"
"$PY" bench/trainer.py --cpu-batches 1024 --repeat 2 --epochs 2 --gpu-samples 1000000 --gpu-epochs 4 --gpu-madminer-samples 50000 \
    --lr-scaling 2>&1 \
    | grep -v "Large statistical uncertainty" | tee "$out/trainer.txt" || failed+=("trainer bench")

echo "== 2. toy run with training.device=cuda, both trainers"
for trainer in fast madminer; do
    start=$(date +%s.%N)
    if "$PY" -m app training.device=cuda training.trainer="$trainer" tracking=disabled \
        hydra.run.dir="$out/run_$trainer" > "$out/run_$trainer.log" 2>&1; then
        end=$(date +%s.%N)
        "$PY" - "$out/run_$trainer" "$trainer" "$start" "$end" <<'EOF'
import json, sys
run, trainer, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
m = json.load(open(f"{run}/results/metrics.json"))
keys = ("train_loss", "val_loss", "n_epochs_trained", "truth_log_r_mse", "truth_limits_ml_iou")
print(f"trainer={trainer:<8} wall {end - start:6.1f} s  " + "  ".join(f"{k}={m.get(k, float('nan')):.4g}" for k in keys))
EOF
    else
        echo "toy run with training.trainer=$trainer failed:"
        tail -30 "$out/run_$trainer.log"
        failed+=("toy run $trainer")
    fi
done
grep -h "torch device\|stage train\|stage evaluate" "$out"/run_*.log || true

echo "== 3. tests/test_fasttrain.py"
"$PY" -m pytest tests/test_fasttrain.py -q -x -p no:cacheprovider 2>&1 | tail -3 || failed+=("test_fasttrain")
echo "logs: $out"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks ran"
