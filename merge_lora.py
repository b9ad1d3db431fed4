"""PostPKT step 4: student + delta merged + trained LoRA merged -> a standard Hugging Face model
directory (safetensors + tokenizer) that AutoModelForCausalLM.from_pretrained loads.

    python merge_lora.py --base_model meta-llama/Llama-2-7b-chat-hf \
        --delta_path extracted_lora/13b-to-7b-gsm-delta --lora_path trained_lora/7b-gsm-with-13b \
        --output_dir merged/7b-gsm-with-13b
"""
from __future__ import annotations

from pkt.io import run_cli


def main(base_model: str, lora_path: str, output_dir: str, delta_path: str | None = None, dtype: str = "auto",
         device: str = "cpu"):
    """--delta_path is the get_delta.py output used in fine-tuning (leave it out for random/PiSSA LoRA).
    --dtype auto keeps the base model's saved precision."""
    from pkt.lora import merge

    merge(base_model, lora_path, output_dir, delta_path=delta_path, dtype=dtype, device=device)
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    run_cli(main)
