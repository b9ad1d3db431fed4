"""PostPKT step 3: LoRA fine-tuning of the student, starting from the extracted adapter on
student + delta (so the model starts exactly at the student), or from a random / PiSSA LoRA (baselines).

    python finetune.py --base_model meta-llama/Llama-2-7b-chat-hf --data_path data/gsm/gsm_train_split.jsonl \
        --delta_path extracted_lora/13b-to-7b-gsm-delta --lora_init_path extracted_lora/13b-to-7b-gsm \
        --output_dir trained_lora/7b-gsm-with-13b
    accelerate launch finetune.py ...   # or: torchrun --nproc_per_node 2 finetune.py ...

Writes the trained adapter (adapter_config.json + adapter_model.safetensors), train_log.jsonl
(step, epoch, loss, lr), pkt_budget.json (the extraction's compute + the fine-tune's) and checkpoint-<step>/
(for --resume) in --output_dir. Logic in pkt/lora.py.
"""
from pkt.io import run_cli
from pkt.lora import FinetuneConfig, finetune

if __name__ == "__main__":
    run_cli(finetune, FinetuneConfig)
