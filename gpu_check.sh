#!/usr/bin/env bash
# The GPU check: under 5 minutes on one GPU, everything it writes under OUT_DIR (default runs/gpu_check).
#
#   bash gpu_check.sh [OUT_DIR]
#
# 1. bench.py on the base preset in bf16 (one repeat): MSM vs ITC+ITM, the MoE layer, and MFU in bf16
#    against the bf16 matmul peak measured in the same run (8192^3 matmuls);
# 2. 20 steps of base pre-training in bf16 on the shapes world (generated on first use, ~10 s);
# 3. a 2-process torchrun: on 2+ GPUs with NCCL; on one GPU, two CPU processes with Gloo instead
#    (training.py puts rank r on cuda:r, and NCCL refuses two ranks on one GPU).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/gpu_check}

n_gpu=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$n_gpu" -lt 1 ]; then
    echo "error: gpu_check.sh needs a CUDA GPU; torch $(python -c 'import torch; print(torch.__version__)') sees none" >&2
    exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== 1/3 bench.py --preset base --device cuda --quick (bf16)"
SECONDS=0
python bench.py --preset base --device cuda --quick --json "$OUT/bench_base_gpu.json" | tee "$OUT/bench_base_gpu.txt"
python - "$OUT/bench_base_gpu.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['gpu']}: MSM step {r['msm_step_s']:.3f} s, {r['train_flops_per_s'] / 1e12:.1f} TFLOP/s; bf16 matmul peak "
      f"{r['matmul_peak_flops_bf16'] / 1e12:.0f} TFLOP/s (at {r['matmul_size']}^3): MFU bf16 {r['mfu_bf16']:.3f}; "
      f"MoE/dense {r['moe_vs_dense_ratio']:.2f}x at {r['moe_tokens']} tokens")
EOF
echo "   ($SECONDS s)"

echo "== 2/3 pretrain.py --preset base --dtype bf16 --max-steps 20"
SECONDS=0
python pretrain.py --preset base --dtype bf16 --max-steps 20 --batch-size 32 --log-every 5 --save-every 20 \
    --picture-every 20 --out-dir "$OUT/pretrain_base" 2>&1 | tail -n 5
tail -n 1 "$OUT/pretrain_base/metrics.jsonl"
echo "   ($SECONDS s)"

echo "== 3/3 torchrun --standalone --nproc_per_node=2"
SECONDS=0
if [ "$n_gpu" -ge 2 ]; then
    torchrun --standalone --nproc_per_node=2 pretrain.py --preset base --dtype bf16 --max-steps 10 --batch-size 32 \
        --save-every 10 --picture-every 10 --out-dir "$OUT/ddp_base" 2>&1 | tail -n 5
    tail -n 1 "$OUT/ddp_base/metrics.jsonl"
else
    echo "one GPU: two CPU processes with Gloo (the tiny preset) check the DDP path instead"
    CUDA_VISIBLE_DEVICES="" torchrun --standalone --nproc_per_node=2 pretrain.py --max-steps 5 --batch-size 16 \
        --save-every 5 --picture-every 5 --out-dir "$OUT/ddp_tiny_cpu" 2>&1 | tail -n 5
    tail -n 1 "$OUT/ddp_tiny_cpu/metrics.jsonl"
fi
echo "   ($SECONDS s)"
echo "done: $OUT"
