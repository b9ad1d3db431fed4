#!/usr/bin/env bash
# SemAlign: transfer through latent semantic alignment of activations (paper setting: Llama-2-13b-chat ->
# Llama-2-7b-chat, which share one vocabulary). Local model directories work as SOURCE/TARGET too.
# Extra flags pass through: ./train_SemAlign.sh --steps_per_layer 4 --interpolate True. See docs/semalign.md.
set -euo pipefail

TASK=${TASK:-gsm}                                   # gsm | mmlu | humaneval | mbpp
SOURCE=${SOURCE:-meta-llama/Llama-2-13b-chat-hf}    # teacher
TARGET=${TARGET:-meta-llama/Llama-2-7b-chat-hf}     # student
SPLIT=${SPLIT:-train}                               # data/$TASK/${TASK}_${SPLIT}_split.jsonl
MAX_EXAMPLES=${MAX_EXAMPLES:-256}
ATTRIBUTION_EXAMPLES=${ATTRIBUTION_EXAMPLES:-32}
EPOCHS_PER_LAYER=${EPOCHS_PER_LAYER:-1}
LR=${LR:-2e-5}
RELATION_WEIGHT=${RELATION_WEIGHT:-1.0}
KL_WEIGHT=${KL_WEIGHT:-1.0}
CUTOFF_LEN=${CUTOFF_LEN:-768}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
DTYPE=${DTYPE:-bf16}
SEED=${SEED:-42}
DATA_DIR=${DATA_DIR:-data}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/semalign/$(basename "$SOURCE")-to-$(basename "$TARGET")-$TASK}

TRAIN_ON_INPUTS=False
if [ "$TASK" = "mmlu" ]; then TRAIN_ON_INPUTS=True; fi   # as the LaTen recipe: MMLU answers are one letter

cd "$(dirname "$0")"
python train_SemAlign.py \
    --source_model "$SOURCE" \
    --target_model "$TARGET" \
    --data_path "$DATA_DIR/$TASK/${TASK}_${SPLIT}_split.jsonl" \
    --output_dir "$OUTPUT_DIR" \
    --max_examples "$MAX_EXAMPLES" \
    --attribution_examples "$ATTRIBUTION_EXAMPLES" \
    --epochs_per_layer "$EPOCHS_PER_LAYER" \
    --learning_rate "$LR" \
    --relation_weight "$RELATION_WEIGHT" \
    --kl_weight "$KL_WEIGHT" \
    --cutoff_len "$CUTOFF_LEN" \
    --micro_batch_size "$MICRO_BATCH_SIZE" \
    --train_on_inputs "$TRAIN_ON_INPUTS" \
    --dtype "$DTYPE" \
    --seed "$SEED" \
    "$@"
