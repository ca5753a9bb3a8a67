#!/usr/bin/env bash
# GPU benchmarks (prepared; NOT run on the project's CPU-only machine). Run from the repo root on a machine with a
# CUDA GPU and the venv active:  bash bench/gpu.sh [DATA_ROOT] [CNN_RUN]  (aimed at under 10 minutes on one GPU).
#   1. Encoder precision, LiteMedSAM and ViT-B at 1024: fp32 vs bf16 vs fp16 autocast, ms/image at batch 8 and the
#      masks' Dice / IoU against fp32 (bench/precision.py; ViT-B has random weights unless the official
#      sam_vit_b_01ec64.pth is in the weights folder, so its Dice means nothing but its IoU vs fp32 does);
#   2. encoder batch scaling (LiteMedSAM 1-16, ViT-B 256/512/1024) in fp32 and in bf16, and ViT-B zero-shot
#      throughput (batched engine vs SamPredictor) and re-prompting;
#   3. `cxrsam predict` end to end (whole processes: steady images/s and start-up), fp32 vs bf16, LiteMedSAM
#      and ViT-B at 1024 (needs CNN_RUN, a train-cnn run folder, for the drafts);
#   4. LoRA vs full fine-tuning step time and peak memory; CNN training and prediction throughput.
# Paste the printed tables into docs/benchmarks.md with this command line and the GPU name.
set -euo pipefail
DATA="${1:-../shared/data/COVID-19_Radiography_Dataset}"
CNN="${2:-runs/cpu/stages/cnn-unet}"
export PYTHONPATH="src:bench${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
VITB=runs/vit_b_random.pt  # used when the official ViT-B weights are absent
VITB_ARGS=()
python - "$VITB" <<'EOF'
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
EOF
[ -f "$VITB" ] && VITB_ARGS=(--checkpoint "$VITB")
set -x
if [ -d "$CNN" ]; then
    python bench/precision.py --device cuda --data "$DATA" --drafts-from "$CNN" --images 64 --batch-size 8
    python bench/precision.py --device cuda --data "$DATA" --drafts-from "$CNN" --images 16 --batch-size 8 \
        --backend vit_b "${VITB_ARGS[@]}"
fi
python bench/zero_shot_speed.py --data "$DATA" --device cuda --sections scaling --backends vit_b --repeats 3 \
    --batches 1 2 4 8 16 --vit-sizes 256 512 1024
python bench/zero_shot_speed.py --data "$DATA" --device cuda --bf16 --sections throughput reprompt scaling \
    --backends vit_b litemedsam --images 32 --vit-images 16 --batch-size 8 --repeats 3 --prompt-sets 64 --reencode 8 \
    --batches 1 2 4 8 16 --vit-sizes 1024
if [ -d "$CNN" ]; then
    mkdir -p runs/gpu-bench
    python bench/predict_speed.py --device cuda --images "$DATA/Viral Pneumonia/images" --drafts-from "$CNN" \
        --variants new new-bf16 --n 64 --repeats 2 --work runs/gpu-bench/litemedsam
    python bench/predict_speed.py --device cuda --images "$DATA/Viral Pneumonia/images" --drafts-from "$CNN" \
        --variants new new-bf16 --n 32 --repeats 1 --backend vit_b \
        ${VITB_ARGS[@]:+--random-checkpoint "$VITB"} --work runs/gpu-bench/vit_b
else
    echo "no CNN run at $CNN: skipped the precision and predict sections (bash bench/gpu.sh DATA CNN_RUN)"
fi
python bench/lora_vs_full.py --device cuda --backend litemedsam --batch-size 4 --steps 10
python bench/lora_vs_full.py --device cuda --backend vit_b --batch-size 2 --steps 10 \
    || echo "vit_b LoRA bench needs the official checkpoint: cxrsam weights download vit_b"
set +x
python bench/cnn_speed.py --data "$DATA" --device cuda --size 256 --batch-size 16 --steps 30 --predict-images 256
