"""PostPKT step 4: student + delta merged + trained LoRA merged -> a standard Hugging Face model
directory (safetensors + tokenizer + the trained adapter's pkt_budget.json) that
AutoModelForCausalLM.from_pretrained loads.

    python merge_lora.py --base_model meta-llama/Llama-2-7b-chat-hf \
        --delta_path extracted_lora/13b-to-7b-gsm-delta --lora_path trained_lora/7b-gsm-with-13b \
        --output_dir merged/7b-gsm-with-13b

Logic in pkt/lora.py (`merge`).
"""
from pkt.io import run_cli
from pkt.lora import MergeConfig, merge

if __name__ == "__main__":
    run_cli(merge, MergeConfig)
