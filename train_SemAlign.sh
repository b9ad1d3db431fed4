#!/usr/bin/env bash
# SemAlign v1 with the paper's settings (arXiv 2510.24208v1, App. A, Tables 3 and 5): Llama-2-13b-chat ->
# Llama-2-7b-chat, batch 64, 5 epochs at lr 3e-4 (HumanEval: 3 epochs at 3e-5), the task's 1000-example
# train split (MBPP: 300). Local model directories work as SOURCE/TARGET too. Extra flags pass through:
#   TASK=humaneval ./train_SemAlign.sh --critical_pairing critical
#   VARIANT=v2 EPOCHS=1 ./train_SemAlign.sh       # a reading of the v2 abstract, not the published method
# See docs/semalign.md.
set -euo pipefail

TASK=${TASK:-gsm}                                   # gsm | mmlu | humaneval | mbpp
VARIANT=${VARIANT:-v1}
SOURCE=${SOURCE:-meta-llama/Llama-2-13b-chat-hf}    # teacher (the paper also uses CodeLlama-13B-Python and
TARGET=${TARGET:-meta-llama/Llama-2-7b-chat-hf}     #   WizardCoder-13B-Python, 32,001 tokens); student
case "$TASK" in                                     # App. A, Table 5
  humaneval) DEF_EPOCHS=3; DEF_LR=3e-5 ;;
  gsm|mmlu|mbpp) DEF_EPOCHS=5; DEF_LR=3e-4 ;;
  *) echo "error: TASK=$TASK: expected gsm, mmlu, humaneval or mbpp" >&2; exit 2 ;;
esac
EPOCHS=${EPOCHS:-$DEF_EPOCHS}
LR=${LR:-$DEF_LR}
BATCH_SIZE=${BATCH_SIZE:-64}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}             # gradient accumulation up to BATCH_SIZE
N_CRITICAL=${N_CRITICAL:-1}
CRITICAL_PAIRING=${CRITICAL_PAIRING:-literal}       # literal: (l_T(k†), k†) as printed | critical: (l*, k†)
ATTRIBUTION_EXAMPLES=${ATTRIBUTION_EXAMPLES:-64}
CUTOFF_LEN=${CUTOFF_LEN:-768}
DTYPE=${DTYPE:-bf16}
SEED=${SEED:-42}
DATA_DIR=${DATA_DIR:-data}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/semalign/$VARIANT-$(basename "$SOURCE")-to-$(basename "$TARGET")-$TASK}

TRAIN_ON_INPUTS=False
if [ "$TASK" = "mmlu" ]; then TRAIN_ON_INPUTS=True; fi   # as the LaTen recipe: MMLU answers are one letter

cd "$(dirname "$0")"
python train_SemAlign.py \
    --variant "$VARIANT" \
    --source_model "$SOURCE" \
    --target_model "$TARGET" \
    --data_path "$DATA_DIR/$TASK/${TASK}_train_split.jsonl" \
    --output_dir "$OUTPUT_DIR" \
    --epochs "$EPOCHS" \
    --learning_rate "$LR" \
    --batch_size "$BATCH_SIZE" \
    --micro_batch_size "$MICRO_BATCH_SIZE" \
    --n_critical "$N_CRITICAL" \
    --critical_pairing "$CRITICAL_PAIRING" \
    --attribution_examples "$ATTRIBUTION_EXAMPLES" \
    --cutoff_len "$CUTOFF_LEN" \
    --train_on_inputs "$TRAIN_ON_INPUTS" \
    --dtype "$DTYPE" \
    --seed "$SEED" \
    "$@"
