#!/usr/bin/env bash
# The GPU check, one prepared script for a machine with one CUDA device (nothing is downloaded):
#   0. first, a few training steps of config.yaml (ResNet + BiGRU) and of the ViT + BERT preset under
#      torch.cuda.set_sync_debug_mode("error"): a host-device sync or synchronous copy in a step raises
#      (after warm-up steps, which fill the per-device caches);
#   1. training steps of the ViT-B/16 + BERT-base preset (configs/coco_vit_bert.yaml) on synthetic
#      inputs of its shapes with its AMP setting, eager and torch.compile: images/s and peak memory
#      for one GPU's share of the preset's global batch under 8 GPUs (BATCH=25 images x 5 captions);
#   2. the same, eager only, for the ResNet-152 + BiGRU preset;
#   3. the similarity benchmark on CUDA (COCO-5K-scale scoring and the training step).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]     (STEPS=100 by default; PART_TIMEOUT=240 seconds
# per part, so a slow part cannot eat the others' time and every finished table is kept in OUT_DIR)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
steps="${STEPS:-100}"
batch="${BATCH:-25}"
limit="${PART_TIMEOUT:-240}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
for preset in config.yaml configs/coco_vit_bert.yaml; do
    name=$(basename "$preset" .yaml)
    timeout "$limit" python benchmarks/train_step_speed.py --config "$preset" --device cuda --batch-size "$batch" \
        --steps 3 --warmup 2 --modes eager --sync-debug > "$out/sync_debug_$name.md" 2>&1
    status=$?
    verdict="yes"; [ "$status" -eq 0 ] || verdict="NO, exit $status (see $out/sync_debug_$name.md)"
    echo "sync-free training step, $name: $verdict" | tee -a "$out/sync_debug.txt"
done
timeout "$limit" python benchmarks/train_step_speed.py --config configs/coco_vit_bert.yaml --device cuda \
    --batch-size "$batch" --steps "$steps" --warmup 10 | tee "$out/train_step_vit_bert.md"
timeout "$limit" python benchmarks/train_step_speed.py --config configs/coco_resnet152_bigru.yaml --device cuda \
    --batch-size "$batch" --steps "$steps" --warmup 10 --modes eager | tee "$out/train_step_resnet152_bigru.md"
timeout "$limit" python benchmarks/similarity_bench.py --device cuda --parts 23 | tee "$out/similarity_cuda.md"
