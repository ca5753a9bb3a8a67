#!/usr/bin/env bash
# GPU benchmarks (prepared; NOT run on the project's CPU-only machine). Run from the repo root on a
# machine with a CUDA GPU and the venv active:  bash bench/gpu.sh [DATA_ROOT]  (about 5-10 minutes).
#   1. ViT-B at 1024 zero-shot throughput, batched engine vs SamPredictor, bf16 autocast and float32
#      (random ViT-B weights unless the official sam_vit_b_01ec64.pth is in the weights folder),
#      re-prompting, and encoder scaling (LiteMedSAM batch 1-8, ViT-B 256/512/1024);
#   2. LoRA vs full fine-tuning step time and peak CUDA memory (LiteMedSAM, then ViT-B at 1024);
#   3. CNN training and prediction throughput at 256 px.
# Paste the printed tables into docs/benchmarks.md with this command line and the GPU name.
set -euo pipefail
DATA="${1:-../shared/data/COVID-19_Radiography_Dataset}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
set -x
python bench/zero_shot_speed.py --data "$DATA" --device cuda --bf16 --sections throughput reprompt \
    --backends vit_b litemedsam --images 32 --vit-images 16 --batch-size 8 --repeats 3 --prompt-sets 64 --reencode 8
python bench/zero_shot_speed.py --data "$DATA" --device cuda --sections throughput scaling \
    --backends vit_b --vit-images 16 --batch-size 8 --repeats 3 --batches 1 2 4 8 16 --vit-sizes 256 512 1024
python bench/lora_vs_full.py --device cuda --backend litemedsam --batch-size 4 --steps 10
python bench/lora_vs_full.py --device cuda --backend vit_b --batch-size 2 --steps 10 \
    || echo "vit_b LoRA bench needs the official checkpoint: cxrsam weights download vit_b"
set +x
python bench/cnn_speed.py --data "$DATA" --device cuda --size 256 --batch-size 16 --steps 30 --predict-images 256
