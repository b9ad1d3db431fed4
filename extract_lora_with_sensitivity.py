"""PostPKT step 1: extract task knowledge from a teacher into a LoRA adapter for the student.

    python extract_lora_with_sensitivity.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf --task gsm --output_dir extracted_lora/13b-to-7b-gsm

Sensitivity |theta * grad| of the teacher on the seed examples -> the n_layers(student) most sensitive
layers -> per weight the max-sum block of the student's shape -> rank-r SVD -> PEFT LoRA (fp16) plus
selection.json and pkt_budget.json. Logic in pkt/postpkt.py (`extract`); the adapter is built by pkt/lora.py. See docs/postpkt.md.
"""
from pkt.io import run_cli
from pkt.postpkt import ExtractConfig, extract

if __name__ == "__main__":
    run_cli(extract, ExtractConfig)
