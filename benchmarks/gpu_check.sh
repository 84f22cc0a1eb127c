#!/usr/bin/env bash
# The GPU check: one prepared script for a lent machine with one CUDA device (nothing is downloaded;
# every model has random weights of the real size). Parts, most valuable first:
#   0. the machine: GPU, memory, Python and torch / torchvision / transformers versions;
#   1. sync-free training steps: train.py's training_step of config.yaml (ResNet + BiGRU) and of the
#      ViT-B/16 + BERT-base preset with their AMP (bf16), 2 warm-up steps then 3 steps under
#      torch.cuda.set_sync_debug_mode("error"), where a host-device sync or synchronous copy raises;
#   2. throughput, eager: images/s and peak GPU memory of the ViT + BERT and ResNet-152 + BiGRU
#      presets for one GPU's share of their 8-GPU batch (25 images x 5 captions), 5 + 50 steps;
#   3. COCO-5K-scale exact evaluation on CUDA (5,000 x 25,000 sets, D = 1024, K = 4 and 8):
#      similarity_bench.py part 4, exact ranks and every pair exact against the bare cosine product;
#   4. torch.compile(dynamic=True) against eager for the ViT + BERT preset.
# Time: at most 7 minutes (420 s) wall on one H200. Budgets in seconds, adding up to 420:
#   part 0: 30, part 1: 100, part 2: 100, part 3: 90, part 4: 100.
# Part N must end by the sum of the budgets of parts 0..N after the start (time an earlier part did
# not use carries over), else it is stopped there; its table rows printed so far are kept.
# Output: each part prints a compact table to stdout when it ends (with the last lines of its stderr
# if it failed) and writes one file into ${OUT:-runs/gpu_check}: its table, then its whole stderr
# (5 files in all). Exit code: 0 when every part passed, 1 otherwise, 2 for a bad flag or no CUDA.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--parts 01234]
#   --dry-run   every part on the CPU with tiny sizes (well under a minute); the sync-debug mode
#               and the inductor compiler are skipped (torch.compile uses its eager backend), each
#               with a line saying so. tests/test_benchmarks.py runs it.
#   --parts     the parts to run, e.g. --parts 3 to repeat one (its deadline is then its own budget).
# Environment: PYTHON (default python3), OUT (default runs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
parts="01234"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --parts) parts="${2:-}"; shift ;;
        *) echo "gpu_check.sh: unknown argument '$1'; use --dry-run and/or --parts 01234" >&2; exit 2 ;;
    esac
    shift
done
if [[ ! "$parts" =~ ^[0-4]+$ ]]; then
    echo "gpu_check.sh: --parts takes digits 0-4, e.g. --parts 13" >&2
    exit 2
fi

python="${PYTHON:-python3}"
out="${OUT:-runs/gpu_check}"
mkdir -p "$out" || { echo "gpu_check.sh: cannot create OUT=$out" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
started=$(date +%s)                  # the CUDA check below counts against part 0's budget
budgets=(30 100 100 90 100)          # seconds for parts 0..4: 420 in all
titles=("machine" "sync-free training steps" "throughput, eager" "COCO-5K-scale evaluation" "torch.compile vs eager")
files=(0_machine.txt 1_sync_debug.md 2_throughput.md 3_evaluation.md 4_compile.md)

if [ "$dry_run" -eq 1 ]; then
    device=cpu
    sizes=(--threads 1 --batch-size 2 --caption-length 8 model.embed_dim=16 model.set_head.depth=1
          data.image_size=32 model.image.stop_after=layer1 model.text.word_dim=8
          "model.image.vit_config={image_size: 32, patch_size: 16, num_layers: 1, num_heads: 2, hidden_dim: 16, mlp_dim: 32}"
          "model.text.bert_config={vocab_size: 64, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}")
    sync_steps=(--steps 1 --warmup 1)
    speed_steps=(--steps 1 --warmup 1)
    compile_args=(--steps 1 --warmup 1 --compile-backend eager)
    evaluation=(--device cpu --threads 1 --scale 0.002 --rank-repeats 1)
    export OMP_NUM_THREADS=1
else
    device=cuda
    sizes=(--batch-size 25)
    sync_steps=(--steps 3 --warmup 2)
    speed_steps=(--steps 50 --warmup 5)
    compile_args=(--steps 50 --warmup 5)
    evaluation=(--device cuda --threads 16 --rank-repeats 2)
    if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check.sh: $python finds no CUDA device; run 'bash benchmarks/gpu_check.sh --dry-run' for the CPU rehearsal" >&2
        exit 2
    fi
fi
speed=("$python" benchmarks/train_step_speed.py --device "$device")
vit_bert=(--config configs/coco_vit_bert.yaml)
resnet=(--config configs/coco_resnet152_bigru.yaml)

part_command() {    # the command of part $1 (into the array `cmd`)
    case "$1" in
        0) cmd=("$python" -c 'import platform, torch
from importlib.metadata import version
cuda = torch.cuda.is_available()
gpu = torch.cuda.get_device_properties(0) if cuda else None
print("| GPU | memory GiB | CUDA | cuDNN | bf16 | Python | torch | torchvision | transformers |")
print("|---|---|---|---|---|---|---|---|---|")
print("| " + " | ".join([gpu.name if cuda else "none (CPU)", f"{gpu.total_memory / 2**30:.0f}" if cuda else "-",
      str(torch.version.cuda), str(torch.backends.cudnn.version()), str(cuda and torch.cuda.is_bf16_supported()),
      platform.python_version(), torch.__version__, version("torchvision"), version("transformers")]) + " |")') ;;
        1) cmd=("${speed[@]}" --config config.yaml "${vit_bert[@]}" --modes eager "${sync_steps[@]}" "${sizes[@]}")
           [ "$dry_run" -eq 1 ] || cmd+=(--sync-debug) ;;
        2) cmd=("${speed[@]}" "${vit_bert[@]}" "${resnet[@]}" --modes eager "${speed_steps[@]}" "${sizes[@]}") ;;
        3) cmd=("$python" benchmarks/similarity_bench.py --parts 4 "${evaluation[@]}") ;;
        4) cmd=("${speed[@]}" "${vit_bert[@]}" --modes eager compiled "${compile_args[@]}" "${sizes[@]}") ;;
    esac
}

total=0
for part in 0 1 2 3 4; do [[ "$parts" == *"$part"* ]] && total=$((total + budgets[part])); done
deadline=$started
failed=""
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "# gpu_check: parts $parts, device $device$([ "$dry_run" -eq 1 ] && echo ' (dry run, tiny sizes)'), OUT=$out, budget $total s"
for part in 0 1 2 3 4; do
    [[ "$parts" == *"$part"* ]] || continue
    deadline=$((deadline + budgets[part]))
    now=$(date +%s)
    limit=$((deadline - now))
    echo "## part $part: ${titles[part]} (budget ${budgets[part]} s, ends by ${limit} s from now)"
    if [ "$part" -eq 1 ] && [ "$dry_run" -eq 1 ]; then
        echo "sync-debug mode skipped: it needs CUDA (dry run); the same steps run without it"
    fi
    if [ "$part" -eq 4 ] && [ "$dry_run" -eq 1 ]; then
        echo "inductor skipped (dry run): torch.compile with its eager backend traces the same step"
    fi
    if [ "$limit" -lt 5 ]; then
        echo "part $part: skipped, no time left"
        failed="$failed $part"
        continue
    fi
    part_command "$part"
    timeout --kill-after=3 "$((limit > 3 ? limit - 3 : 1))" "${cmd[@]}" > "$scratch/stdout" 2> "$scratch/stderr"
    status=$?
    seconds=$(($(date +%s) - now))
    cat "$scratch/stdout"
    { cat "$scratch/stdout"; echo; echo "## stderr (last 2000 lines)"; tail -n 2000 "$scratch/stderr"; } > "$out/${files[part]}"
    if [ "$status" -eq 0 ]; then
        echo "part $part: passed in $seconds s"
    else
        reason="exit $status"
        [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && reason="stopped at its deadline (exit $status)"
        echo "part $part: FAILED, $reason after $seconds s; last stderr lines (all in $out/${files[part]}):"
        grep -v '^\s*$' "$scratch/stderr" | tail -n 5 | cut -c 1-200
        failed="$failed $part"
    fi
done
echo "# gpu_check: $(($(date +%s) - started)) s in all; $([ -z "$failed" ] && echo "every part passed" || echo "FAILED parts:$failed")"
[ -z "$failed" ]
