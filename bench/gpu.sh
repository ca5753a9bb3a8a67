#!/usr/bin/env bash
# GPU benchmarks: one prepared script for one CUDA GPU, run from the repo root with cxrsam importable:
#     bash bench/gpu.sh [DATA_ROOT] [DRAFTS]          (GPU_BUDGET_S=570 by default: it stops starting sections then)
# DRAFTS is a train-cnn run folder or a folder of draft masks named by image stem (cxrsam predict's output, or
# drafts written beforehand where the CNN weights cannot travel). SPLIT=all reads every image of DATA_ROOT (a
# folder holding held-out images only); the default, test, reads its test split. Sections, most wanted first, each
# under its own time limit so that one slow or failing section never costs the others:
#   1. encoder precision, LiteMedSAM and ViT-B at 1024: fp32 vs bf16 vs fp16 autocast, ms/image at batch 8 and the
#      masks' Dice / IoU against fp32 (bench/precision.py; ViT-B has random weights unless the official
#      sam_vit_b_01ec64.pth is in the weights folder, so its Dice means nothing but its IoU vs fp32 does);
#   2. `cxrsam predict` end to end (whole processes: steady images/s and start-up), fp32 vs bf16, LiteMedSAM and
#      ViT-B at 1024;
#   3. encoder batch scaling (LiteMedSAM 1-16, ViT-B 256/512/1024) in fp32 and in bf16, and zero-shot throughput
#      (batched engine vs the backends' own loops) and re-prompting;
#   4. LoRA vs full fine-tuning step time and peak memory (LiteMedSAM); CNN training and prediction throughput.
# Paste the printed tables into docs/benchmarks.md with this command line and the GPU name.
set -uo pipefail
DATA="${1:-../shared/data/COVID-19_Radiography_Dataset}"
DRAFTS="${2:-runs/cpu/stages/cnn-unet}"
SPLIT="${SPLIT:-test}"
BUDGET_S="${GPU_BUDGET_S:-570}"
export PYTHONPATH="src:bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
START=$SECONDS

section() {  # section NAME MAX_SECONDS COMMAND...: run it under min(MAX_SECONDS, budget left); report, go on
    local name=$1 limit=$2 left=$((BUDGET_S - (SECONDS - START))) began=$SECONDS rc=0
    shift 2
    if ((left < 20)); then echo "## $name: skipped, the time budget ($BUDGET_S s) is spent"; return; fi
    ((limit > left)) && limit=$left
    echo "## $name (limit $limit s)"
    echo "\$ $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" || rc=$?
    echo "## $name: $((SECONDS - began)) s$( ((rc)) && echo ", FAILED or cut off (rc $rc)")"
}

VITB=runs/vit_b_random.pt  # used when the official ViT-B weights are absent
VITB_ARGS=()
python - "$VITB" <<'PY'
import sys
from pathlib import Path

import torch

from cxrsam.sam.registry import get_backend

spec, path = get_backend("vit_b"), Path(sys.argv[1])
official = spec.default_checkpoint()
if (official is None or not Path(official).is_file()) and not path.is_file():
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(spec.builder().state_dict(), path)
PY
[ -f "$VITB" ] && VITB_ARGS=(--checkpoint "$VITB")
IMAGES="$DATA/images"
[ -d "$IMAGES" ] || IMAGES="$DATA/Viral Pneumonia/images"
mkdir -p runs/gpu-bench

section "precision, LiteMedSAM" 75 python bench/precision.py --device cuda --data "$DATA" --split "$SPLIT" \
    --drafts-from "$DRAFTS" --images 64 --batch-size 8
section "precision, ViT-B 1024" 75 python bench/precision.py --device cuda --data "$DATA" --split "$SPLIT" \
    --drafts-from "$DRAFTS" --images 16 --batch-size 8 --backend vit_b "${VITB_ARGS[@]}"
section "predict end to end, LiteMedSAM" 180 python bench/predict_speed.py --device cuda --images "$IMAGES" \
    --drafts-from "$DRAFTS" --variants new new-bf16 --n 64 --repeats 2 --work runs/gpu-bench/litemedsam
section "predict end to end, ViT-B 1024" 90 python bench/predict_speed.py --device cuda --images "$IMAGES" \
    --drafts-from "$DRAFTS" --variants new new-bf16 --n 32 --repeats 1 --backend vit_b \
    ${VITB_ARGS[@]:+--random-checkpoint "$VITB"} --work runs/gpu-bench/vit_b
section "encoder scaling, fp32" 60 python bench/zero_shot_speed.py --data "$DATA" --split "$SPLIT" --device cuda \
    --sections scaling --backends vit_b --repeats 3 --batches 1 2 4 8 16 --vit-sizes 256 512 1024
section "zero-shot throughput, re-prompting and scaling, bf16" 90 python bench/zero_shot_speed.py --data "$DATA" \
    --split "$SPLIT" --device cuda --bf16 --sections throughput reprompt scaling --backends vit_b litemedsam \
    --images 32 --vit-images 16 --batch-size 8 --repeats 3 --prompt-sets 64 --reencode 8 --batches 1 2 4 8 16 \
    --vit-sizes 1024
section "LoRA vs full fine-tuning, LiteMedSAM" 150 python bench/lora_vs_full.py --device cuda --backend litemedsam \
    --batch-size 4 --steps 10
section "CNN training and prediction" 45 python bench/cnn_speed.py --data "$DATA" --split "$SPLIT" --device cuda \
    --size 256 --batch-size 16 --steps 30 --predict-images 256
echo "## all sections: $((SECONDS - START)) s"
