#!/usr/bin/env bash
# Knowledge-distillation baseline: on-policy GKD (TRL's GKDTrainer) of TEACHER into a LoRA on STUDENT, with the
# settings of the Neural Incompatibility rebuttal (rebuttal/Distillation/gkd_run.sh). Teacher and student must
# share one tokenizer. Writes the merged student to OUTPUT_DIR (adapter in OUTPUT_DIR/adapter, compute in
# pkt_budget.json). Extra flags pass through: ./distill.sh --max_steps 4. See docs/distill.md.
set -euo pipefail

TASK=${TASK:-gsm}                                   # gsm | mmlu | humaneval | mbpp (data/$TASK/*_train_split.jsonl)
TEACHER=${TEACHER:-Qwen/Qwen2.5-3B-Instruct}        # the rebuttal's pair
STUDENT=${STUDENT:-Qwen/Qwen2.5-1.5B-Instruct}
LMBDA=${LMBDA:-1}                                   # 1: every step on-policy (student samples); 0: supervised KD
BETA=${BETA:-0}                                     # 0: forward KL(teacher || student); 1: reverse KL; between: JSD
TEMPERATURE=${TEMPERATURE:-0.9}                     # sampling temperature (GKDConfig's default; the rebuttal kept it)
LORA_R=${LORA_R:-16}
LORA_ALPHA=${LORA_ALPHA:-16}
LR=${LR:-1e-5}
EPOCHS=${EPOCHS:-5}
BATCH_SIZE=${BATCH_SIZE:-1}                         # per device
GRAD_ACCUM=${GRAD_ACCUM:-16}                        # the rebuttal ran 6 GPUs: 6 x 1 x 16 = 96 sequences per step
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-64}                # prompts are cut to their first 64 tokens (TRUNCATE_PROMPT)
TRUNCATE_PROMPT=${TRUNCATE_PROMPT:-True}            # the rebuttal's TRL did; False keeps whole prompts
USE_CHAT_TEMPLATE=${USE_CHAT_TEMPLATE:-False}       # True: the tokenizer's template, as the rebuttal (see docs)
WARMUP_STEPS=${WARMUP_STEPS:-10}
SCHEDULER=${SCHEDULER:-cosine}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-True}
DTYPE=${DTYPE:-}                                    # default: fp16 weights + fp16 mixed precision on CUDA, fp32 on CPU
SEED=${SEED:-42}
NUM_GPUS=${NUM_GPUS:-1}                             # > 1: accelerate launch (data parallel)
OUTPUT_DIR=${OUTPUT_DIR:-outputs/distill/$(basename "$TEACHER")-to-$(basename "$STUDENT")-$TASK}

cd "$(dirname "$0")"
EXTRA=()
if [ -n "$DTYPE" ]; then EXTRA=(--dtype "$DTYPE"); fi
if [ "$NUM_GPUS" -gt 1 ]; then LAUNCH=(accelerate launch --num_processes "$NUM_GPUS"); else LAUNCH=(python); fi

"${LAUNCH[@]}" distill.py \
    --teacher "$TEACHER" \
    --student "$STUDENT" \
    --task "$TASK" \
    --lmbda "$LMBDA" \
    --beta "$BETA" \
    --temperature "$TEMPERATURE" \
    --lora_r "$LORA_R" \
    --lora_alpha "$LORA_ALPHA" \
    --learning_rate "$LR" \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --max_new_tokens "$MAX_NEW_TOKENS" \
    --max_seq_length "$MAX_SEQ_LENGTH" \
    --truncate_prompt "$TRUNCATE_PROMPT" \
    --use_chat_template "$USE_CHAT_TEMPLATE" \
    --warmup_steps "$WARMUP_STEPS" \
    --lr_scheduler_type "$SCHEDULER" \
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
    "${EXTRA[@]}" \
    --seed "$SEED" \
    --output_dir "$OUTPUT_DIR" \
    "$@"
