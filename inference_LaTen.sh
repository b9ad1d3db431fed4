#!/usr/bin/env bash
# Fuse a trained LaTen translator into the student: one HF model per (transfer rate, step), with the
# translated deltas folded into the weights. Extra flags pass through: ./inference_LaTen.sh --dtype fp32
set -euo pipefail

TASK=${TASK:-gsm}                                   # gsm | mmlu | humaneval | mbpp
LR=${LR:-3e-4}                                      # only used to find the translator trained by train_LaTen.sh
TRANSFER_RATE=${TRANSFER_RATE:-0.1}                 # the rate the translator was trained with
TRANSFER_RATES=${TRANSFER_RATES:-[0.1]}             # rates to fuse at, e.g. '[0.1,0.3,0.5]'
STEPS=${STEPS:-[0]}                                 # translator checkpoints to fuse: [0] as the reference script
                                                    # and README (gsm trains checkpoints 0..19)
SOURCE=${SOURCE:-meta-llama/Llama-2-13b-chat-hf}    # teacher
TARGET=${TARGET:-meta-llama/Llama-2-7b-chat-hf}     # student
SEED=${SEED:-42}
DATA_DIR=${DATA_DIR:-data}
TRANSLATOR=${TRANSLATOR:-knowledge_translator/${TASK}-transfer_rate${TRANSFER_RATE}-lr${LR}}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/laten/$TASK}

cd "$(dirname "$0")"
python inference_LaTen.py \
    --source_model "$SOURCE" \
    --target_model "$TARGET" \
    --data_path "$DATA_DIR/$TASK/${TASK}_train_split.jsonl" \
    --translator_checkpoints "$TRANSLATOR" \
    --transfer_rates "$TRANSFER_RATES" \
    --steps "$STEPS" \
    --seed "$SEED" \
    --output_dir "$OUTPUT_DIR" \
    "$@"
