"""PostPKT step 1: extract task knowledge from a teacher into a LoRA adapter for the student.

    python extract_lora_with_sensitivity.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf --task gsm --output_dir extracted_lora/13b-to-7b-gsm

Sensitivity |theta * grad| of the teacher on the seed examples -> the n_layers(student) most sensitive
layers -> per weight the max-sum block of the student's shape -> rank-r SVD -> PEFT LoRA (fp16) plus
selection.json. Logic in pkt/postpkt.py; see docs/postpkt.md.
"""
from __future__ import annotations

from pkt.io import fail, run_cli


def main(source_model: str, output_dir: str, target_model: str | None = None, target_config: str | None = None,
         task: str = "gsm", data_path: str | None = None, num_examples: int | None = None, lora_r: int = 16,
         lora_alpha: int = 16, include_embeddings: bool = False,
         target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
         dtype: str = "fp32", device: str | None = None, accum_device: str | None = None, cutoff_len: int = 2048,
         add_bos: bool = True, gradient_checkpointing: bool = False, data_dir: str = "data"):
    """--target_model (or --target_config: only the student's shapes are read); --data_path defaults to
    <data_dir>/<task>/<task>_extract_split.jsonl. --accum_device cpu keeps the fp32 accumulators off the
    GPU. --include_embeddings adds embed_tokens and lm_head (equal vocabularies needed)."""
    from pkt.data import task_split
    from pkt.postpkt import extract

    if (target_model is None) == (target_config is None):
        fail("give exactly one of --target_model or --target_config")
    target = target_model or target_config
    data_path = data_path or str(task_split(task, "extract", data_dir))
    sel = extract(source_model, target, data_path, output_dir, num_examples=num_examples, lora_r=lora_r,
                  lora_alpha=lora_alpha, include_embeddings=include_embeddings, target_modules=target_modules,
                  dtype=dtype, device=device, accum_device=accum_device, cutoff_len=cutoff_len, add_bos=add_bos,
                  gradient_checkpointing=gradient_checkpointing,
                  target_flag="--target_model" if target_model else "--target_config")
    print(f"wrote {output_dir} ({len(sel['blocks'])} LoRA modules from {sel['num_examples']} examples; "
          f"teacher layers {sel['selected_layers']})")


if __name__ == "__main__":
    run_cli(main)
