"""Write adapter.safetensors/adapter.json of an unfinished fine-tuning run from its best.pt (the best validated
epoch so far), as ``finetune`` does when a run ends; for a run that had to stop before its last epoch (the
run keeps last.pt, so ``cxrsam finetune --resume`` can still continue it).

    python bench/keep_best.py runs/lora-mixed
"""

from __future__ import annotations

import sys
from pathlib import Path

from cxrsam.runs import BEST, load_checkpoint, verify_checksum
from cxrsam.sam.lora import apply_lora, save_adapter
from cxrsam.sam.registry import build_sam
from cxrsam.train.finetune import read_config

run = Path(sys.argv[1])
config = read_config(run)
verify_checksum(run / BEST)
best = load_checkpoint(run / BEST)
loaded = build_sam(config.backend, checkpoint=config.checkpoint, device="cpu")
model = apply_lora(loaded.model, config.lora)
save_adapter(run, model, loaded, config.lora, state=best["model"])
print(f"adapters of epoch {best['epoch']} (val {best['metrics']}) written to {run}")
