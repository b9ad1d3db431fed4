"""PostPKT step 2: the delta adapter (every lora_A / lora_embedding_A negated), so that merging it
into the student gives W - B A and the extracted LoRA on top starts exactly at the student.

    python get_delta.py --lora_path extracted_lora/13b-to-7b-gsm --output_path extracted_lora/13b-to-7b-gsm-delta
"""
from __future__ import annotations

from pkt.io import run_cli


def main(lora_path: str, output_path: str | None = None):
    """--output_path defaults to <lora_path>-delta."""
    from pkt.postpkt import negate_lora_A

    output_path = output_path or str(lora_path).rstrip("/") + "-delta"
    n = negate_lora_A(lora_path, output_path)
    print(f"wrote {output_path} ({n} A matrices negated)")


if __name__ == "__main__":
    run_cli(main)
