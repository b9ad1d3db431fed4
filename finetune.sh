#!/usr/bin/env bash
# PostPKT knowledge injection: LoRA fine-tuning of student + delta from the extracted adapter,
# then the merged model. Run extract_lora.sh first (same TASK/SOURCE/TARGET). See docs/postpkt.md.
set -euo pipefail

TASK=${TASK:-gsm}
SOURCE=${SOURCE:-meta-llama/Llama-2-13b-chat-hf}
TARGET=${TARGET:-meta-llama/Llama-2-7b-chat-hf}
LORA_INIT=${LORA_INIT:-extracted}                   # extracted | random | pissa (the paper's baselines)
NUM_GPUS=${NUM_GPUS:-1}
NUM_EPOCHS=${NUM_EPOCHS:-3}
LR=${LR:-3e-4}
BATCH_SIZE=${BATCH_SIZE:-64}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}             # per GPU; BATCH_SIZE % (MICRO x GPUs) == 0
CUTOFF_LEN=${CUTOFF_LEN:-2048}
LORA_R=${LORA_R:-16}                                # random / pissa only (extracted: from the adapter)
LORA_ALPHA=${LORA_ALPHA:-16}
MODULES=${MODULES:-q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj,embed_tokens,lm_head}
SEED=${SEED:-1}
TRAIN_ON_INPUTS=${TRAIN_ON_INPUTS:-False}           # the reference's train.sh
ADD_EOS_TOKEN=${ADD_EOS_TOKEN:-False}               # the reference's default (it only changes the prompt mask)
DTYPE=${DTYPE:-bf16}                                # the reference: an fp16 student with fp16 AMP
MERGE_DTYPE=${MERGE_DTYPE:-fp32}                    # the reference merges and saves in fp32
NAME=${NAME:-$(basename "$SOURCE")-to-$(basename "$TARGET")-$TASK}
EXTRACTED=${EXTRACTED:-extracted_lora/$NAME}
OUT=${OUT:-trained_lora/$NAME-$LORA_INIT}
MERGED=${MERGED:-merged/$NAME-$LORA_INIT}
RESUME=${RESUME:-False}                             # True: continue from the last checkpoint in OUT
MAX_STEPS=${MAX_STEPS:-}                            # optional cap on optimizer steps (demos)

cd "$(dirname "$0")"

if [ "$LORA_INIT" = extracted ]; then
    INIT_ARGS=(--lora_init extracted --lora_init_path "$EXTRACTED" --delta_path "$EXTRACTED-delta")
    MERGE_ARGS=(--delta_path "$EXTRACTED-delta")
else
    INIT_ARGS=(--lora_init "$LORA_INIT" --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_target_modules "$MODULES")
    MERGE_ARGS=()
fi

EXTRA=()
if [ -n "$MAX_STEPS" ]; then EXTRA=(--max_steps "$MAX_STEPS"); fi

if [ "$NUM_GPUS" -gt 1 ]; then LAUNCH=(torchrun --nproc_per_node "$NUM_GPUS"); else LAUNCH=(python); fi

"${LAUNCH[@]}" finetune.py \
    --base_model "$TARGET" \
    --data_path "data/$TASK/${TASK}_train_split.jsonl" \
    "${INIT_ARGS[@]}" \
    --num_epochs "$NUM_EPOCHS" \
    --learning_rate "$LR" \
    --batch_size "$BATCH_SIZE" \
    --micro_batch_size "$MICRO_BATCH_SIZE" \
    --cutoff_len "$CUTOFF_LEN" \
    --seed "$SEED" \
    --train_on_inputs "$TRAIN_ON_INPUTS" \
    --add_eos_token "$ADD_EOS_TOKEN" \
    --dtype "$DTYPE" \
    --resume "$RESUME" \
    "${EXTRA[@]}" \
    --output_dir "$OUT"

python merge_lora.py --base_model "$TARGET" --lora_path "$OUT" "${MERGE_ARGS[@]}" --dtype "$MERGE_DTYPE" \
    --output_dir "$MERGED"
