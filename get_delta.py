"""PostPKT step 2: the delta adapter (every lora_A / lora_embedding_A negated), so that merging it
into the student gives W - B A and the extracted LoRA on top starts exactly at the student.

    python get_delta.py --lora_path extracted_lora/13b-to-7b-gsm --output_path extracted_lora/13b-to-7b-gsm-delta

Logic in pkt/lora.py (`delta`).
"""
from pkt.io import run_cli
from pkt.lora import DeltaConfig, delta

if __name__ == "__main__":
    run_cli(delta, DeltaConfig)
