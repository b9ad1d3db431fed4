"""PostPKT step 3: LoRA fine-tuning of the student, starting from the extracted adapter on
student + delta (so the model starts exactly at the student), or from a random / PiSSA LoRA (baselines).

    python finetune.py --base_model meta-llama/Llama-2-7b-chat-hf --data_path data/gsm/gsm_train_split.jsonl \
        --delta_path extracted_lora/13b-to-7b-gsm-delta --lora_init_path extracted_lora/13b-to-7b-gsm \
        --output_dir trained_lora/7b-gsm-with-13b
    accelerate launch finetune.py ...   # or: torchrun --nproc_per_node 2 finetune.py ...

Writes the trained adapter (adapter_config.json + adapter_model.safetensors), train_log.jsonl
(step, epoch, loss, lr) and checkpoint-<step>/ (for --resume) in --output_dir. Logic in pkt/lora.py.
"""
from __future__ import annotations

import os

from pkt.io import run_cli


def main(base_model: str, output_dir: str, data_path: str | None = None, task: str = "gsm",
         delta_path: str | None = None, lora_init_path: str | None = None, lora_init: str | None = None,
         num_epochs: int = 3, learning_rate: float = 3e-4, batch_size: int = 64, micro_batch_size: int = 8,
         cutoff_len: int = 2048, lora_target_modules=None, lora_r: int | None = None,
         lora_alpha: int | None = None, lora_dropout: float = 0.05, warmup_ratio: float = 0.03, seed: int = 1,
         max_steps: int | None = None, resume: bool = False, save_steps: int = 0, save_total_limit: int = 2,
         dtype: str | None = None, gradient_checkpointing: bool = False, add_bos: bool = True,
         data_dir: str = "data"):
    """--lora_init random|pissa|extracted (default: extracted when --lora_init_path is given, else random).
    With an extracted adapter, r / alpha / target modules come from it. --data_path defaults to
    <data_dir>/<task>/<task>_train_split.jsonl. --dtype defaults to bf16 on GPU, fp32 on CPU."""
    from pkt.data import task_split
    from pkt.lora import finetune

    data_path = data_path or str(task_split(task, "train", data_dir))
    logs = finetune(base_model, data_path, output_dir, delta_path=delta_path, lora_init_path=lora_init_path,
                    lora_init=lora_init, num_epochs=num_epochs, learning_rate=learning_rate, batch_size=batch_size,
                    micro_batch_size=micro_batch_size, cutoff_len=cutoff_len,
                    lora_target_modules=lora_target_modules, lora_r=lora_r, lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout, warmup_ratio=warmup_ratio, seed=seed, max_steps=max_steps,
                    resume=resume, save_steps=save_steps, save_total_limit=save_total_limit, dtype=dtype,
                    gradient_checkpointing=gradient_checkpointing, add_bos=add_bos)
    if logs and int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {output_dir} (step {logs[-1]['step']}, loss {logs[-1]['loss']:.4f})")


if __name__ == "__main__":
    run_cli(main)
