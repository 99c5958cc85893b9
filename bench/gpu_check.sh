#!/usr/bin/env bash
# The checks that need a GPU, as one short script (about 6 minutes on an H200):
#   1. bench/trainer.py: both trainers on CUDA at batch 1024 / 8192 / 65536 (samples tiled to 10^6; MadMiner's
#      trainer on 5*10^4 of them), the fast trainer's validation loss vs batch size and learning rate, then
#      (--compile) its plain loop vs its CUDA-graph loop (training.compile): loop rates, identical losses, and the
#      goal of issue 20 (>= 100 M samples/s at batch 65536)
#   2. a toy run with training.device=cuda, once per trainer and once with training.compile=true: losses and truth
#      metrics side by side; the compiled run's losses must equal the plain fast run's, epoch by epoch
#   3. samples on disk (app.ml.streaming, stream=True) on CUDA: chunked copies to the GPU, the in-memory losses exactly
#   4. one GPU per job: n+1 concurrent jobs on n GPUs (each its own with n >= 2); then, where MLflow and psutil
#      import, a joblib sweep (n_jobs=2) with tracking.system_metrics=true: each child's gpu.* tags and system/*
#      metrics (the GPU ones need pynvml: pip install nvidia-ml-py)
#   5. tests/test_fasttrain.py, test_fasttrain_scale.py and test_gpu_per_job.py on the GPU machine
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
"$PY" -c "import sys, torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s), Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}')"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
date -u

echo "== 1. trainer throughput (CPU rows at batch 1024 only, CUDA at 1024/8192/65536), learning-rate scaling, CUDA graphs"
"$PY" bench/trainer.py --cpu-batches 1024 --repeat 2 --epochs 2 --gpu-samples 1000000 --gpu-epochs 4 --gpu-madminer-samples 50000 \
    --lr-scaling --compile 2>&1 \
    | grep -v "Large statistical uncertainty" | tee "$out/trainer.txt" || failed+=("trainer bench")

echo "== 2. toy run with training.device=cuda: both trainers, and the fast one with training.compile=true"
for trainer in fast madminer compiled; do
    args=(training.trainer="$trainer")
    [[ $trainer == compiled ]] && args=(training.trainer=fast training.compile=true)
    start=$(date +%s.%N)
    if "$PY" -m app training.device=cuda "${args[@]}" tracking=disabled cache.enabled=false \
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
        echo "toy run with ${args[*]} failed:"
        tail -30 "$out/run_$trainer.log"
        failed+=("toy run $trainer")
    fi
done
grep -h "torch device\|stage train\|stage evaluate\|training.compile" "$out"/run_*.log || true
"$PY" bench/gpu_checks.py compile-losses "$out" || failed+=("compile: the losses differ")

echo "== 3. samples on disk (stream=True) on CUDA"
"$PY" bench/gpu_checks.py stream 2>&1 | grep -v "Large statistical uncertainty" || failed+=("samples on disk on CUDA")

echo "== 4. one GPU per job"
"$PY" bench/gpu_checks.py slots "$out/gpu_slots" || failed+=("GPU per job")
if "$PY" -c "import mlflow, psutil" 2>/dev/null; then
    "$PY" -c "import pynvml" 2>/dev/null || echo "pynvml missing: no GPU system metrics (pip install nvidia-ml-py)"
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=2 "$PY" -m app -m training.device=cuda seed=1,2 \
        hydra/launcher=joblib hydra.launcher.n_jobs=2 tracking=local tracking.uri="sqlite:///$out/mlflow.db" \
        tracking.system_metrics=true hydra.sweep.dir="$out/sweep" > "$out/sweep.log" 2>&1 \
        || { tail -20 "$out/sweep.log"; failed+=("joblib sweep"); }
    "$PY" bench/gpu_checks.py sweep-record "$out/mlflow.db" || failed+=("gpu tags / system metrics")
else
    echo "skipped the tracked sweep: mlflow or psutil does not import here"
fi

echo "== 5. tests/test_fasttrain.py, test_fasttrain_scale.py, test_gpu_per_job.py"
"$PY" -m pytest tests/test_fasttrain.py tests/test_fasttrain_scale.py tests/test_gpu_per_job.py -n 0 -q -x \
    -p no:cacheprovider 2>&1 | tail -3 || failed+=("tests")
echo "logs: $out"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks ran"
