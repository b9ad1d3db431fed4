"""Knowledge distillation baseline: on-policy GKD (TRL's GKDTrainer) of the teacher into a LoRA on the student,
with the rebuttal's settings (Neural Incompatibility, rebuttal/Distillation). Logic in pkt/distill.py;
recipe in distill.sh; docs/distill.md.

    python distill.py --teacher Qwen/Qwen2.5-3B-Instruct --student Qwen/Qwen2.5-1.5B-Instruct \
        --task gsm --output_dir outputs/distill/gsm
    python distill.py --teacher ... --student ... --output_dir ... --max_steps 4     # a few steps
    python distill.py --teacher ... --student ... --output_dir ... --dry_run         # memory plan only

Writes the merged student (AutoModelForCausalLM loads it) with pkt_budget.json and distill_config.json,
and the LoRA adapter in <output_dir>/adapter (PeftModel.from_pretrained loads it).
"""
from __future__ import annotations

from pkt.distill import DistillConfig, distill
from pkt.io import run_cli

if __name__ == "__main__":
    run_cli(distill, DistillConfig)
