#!/usr/bin/env bash
# PostPKT knowledge extraction: teacher sensitivity -> LoRA for the student -> delta adapter.
# Hub names or local model directories both work. See docs/postpkt.md.
set -euo pipefail

TASK=${TASK:-gsm}                                   # gsm | mmlu | mbpp | humaneval (data/<task>/)
SOURCE=${SOURCE:-meta-llama/Llama-2-13b-chat-hf}    # teacher (larger)
TARGET=${TARGET:-meta-llama/Llama-2-7b-chat-hf}     # student (smaller); only its config is read here
NUM_EXAMPLES=${NUM_EXAMPLES:-32}                    # seed examples (the extract split has 20-32)
LORA_R=${LORA_R:-16}
LORA_ALPHA=${LORA_ALPHA:-16}
INCLUDE_EMBEDDINGS=${INCLUDE_EMBEDDINGS:-True}      # embed_tokens + lm_head (equal vocabularies needed)
DTYPE=${DTYPE:-fp32}                                # teacher precision for the sensitivity pass
DEVICE=${DEVICE:-cuda}
ACCUM_DEVICE=${ACCUM_DEVICE:-cpu}                   # fp32 accumulators off the GPU (13B: 52 GB)
CUTOFF_LEN=${CUTOFF_LEN:-2048}
NAME=${NAME:-$(basename "$SOURCE")-to-$(basename "$TARGET")-$TASK}
OUT=${OUT:-extracted_lora/$NAME}

cd "$(dirname "$0")"

python extract_lora_with_sensitivity.py \
    --source_model "$SOURCE" \
    --target_model "$TARGET" \
    --task "$TASK" \
    --num_examples "$NUM_EXAMPLES" \
    --lora_r "$LORA_R" \
    --lora_alpha "$LORA_ALPHA" \
    --include_embeddings "$INCLUDE_EMBEDDINGS" \
    --dtype "$DTYPE" \
    --device "$DEVICE" \
    --accum_device "$ACCUM_DEVICE" \
    --cutoff_len "$CUTOFF_LEN" \
    --output_dir "$OUT"

python get_delta.py --lora_path "$OUT" --output_path "$OUT-delta"
