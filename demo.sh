#!/usr/bin/env bash
# The whole transfer pipeline, offline, on real weights, on the CPU, with the comparisons that say whether
# transfer helps: every transfer row next to a no-transfer control trained on the same data, steps, batch and
# learning rate, a knowledge-distillation row, 95 % intervals and marks for differences inside the noise.
#
#   bash demo.sh                    # SmolLM2-135M-Instruct -> its 15-layer sibling (<= 15 minutes on 2 CPU cores)
#   bash demo.sh --pair qwen        # Qwen2.5-Coder-1.5B-Instruct -> Qwen2.5-Coder-0.5B-Instruct (<= 90 minutes)
#   bash demo.sh --quick            # tiny random models built in code, seconds: checks the wiring (CI)
#   bash demo.sh --refresh_figures  # copy the last run's table and figures into figures/ (the README's);
#                                   # with --pair qwen: the Qwen run's (figures/demo_results_qwen.md, qwen_*.png)
#
# A run writes only under outputs/ (OUT): models, evaluations, outputs/.../figures/{demo_results.md,*.png}.
# Rows: student (untouched), laten, postpkt (extracted LoRA init), lora_random and lora_pissa (the same
# fine-tune from peft's random / PiSSA init: PostPKT's controls), semalign (v1), kd (TRL GKD), teacher.
# Every stage is the real script with small settings; edit the variables below. docs/demo.md explains each.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

QUICK=0; PAIR=smollm2; REFRESH=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --pair) PAIR=${2:?--pair needs smollm2 or qwen}; shift ;;
    --pair=*) PAIR=${1#--pair=} ;;
    --refresh_figures) REFRESH=1 ;;
    *) echo "error: unknown argument $1 (expected --quick, --pair smollm2|qwen, --refresh_figures)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $PAIR != smollm2 && $PAIR != qwen ]]; then
  echo "error: --pair $PAIR: expected smollm2 or qwen" >&2; exit 2
fi

if [[ $QUICK == 1 ]]; then
  OUT=${OUT:-outputs/demo_quick}
elif [[ $PAIR == qwen ]]; then
  OUT=${OUT:-outputs/demo_qwen}
else
  OUT=${OUT:-outputs/demo}
fi
FIGURES=$OUT/figures
PAIR_FLAG=$([[ $PAIR == qwen ]] && echo " --pair qwen" || true)

if [[ $REFRESH == 1 ]]; then   # the README's figures come from a finished run, on request only
  [[ -f $FIGURES/demo_results.md ]] || { echo "error: $FIGURES/demo_results.md not found: run bash demo.sh$PAIR_FLAG first" >&2; exit 2; }
  PREFIX=$([[ $PAIR == qwen ]] && echo qwen_ || echo "")
  SUFFIX=$([[ $PAIR == qwen ]] && echo _qwen || echo "")
  DEST=${README_FIGURES:-figures}
  mkdir -p "$DEST"
  cp "$FIGURES/demo_results.md" "$DEST/demo_results$SUFFIX.md"
  for png in "$FIGURES"/*.png; do cp "$png" "$DEST/$PREFIX$(basename "$png")"; done
  echo "copied $FIGURES/{demo_results.md,*.png} into $DEST/ (prefix '${PREFIX}')"; exit 0
fi

# Threads: one per core on a quiet machine; one when other jobs already load every core (torch's threads then
# wait for each other at every small op: decoding measured 9x slower with 2 threads than with 1 at load 6 on
# 2 cores). Set OMP_NUM_THREADS to choose.
CORES=$(OMP_NUM_THREADS='' nproc)     # (nproc itself obeys OMP_NUM_THREADS)
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  LOAD=$(cut -d' ' -f1 /proc/loadavg)
  if awk "BEGIN{exit !($LOAD >= $CORES)}"; then export OMP_NUM_THREADS=1; else export OMP_NUM_THREADS=$CORES; fi
fi

TASK=gsm
SEED=42
LR=3e-4
TRANSFER_RATE=0.1
PROTOCOL=paper            # 0-shot MMLU and GSM8K, as the LaTen / SemAlign papers' tables
CODE_EVAL=""              # extra evaluate.py tasks (code, for the coder pair)
if [[ $QUICK == 1 ]]; then
  LATEN_STEPS=2; N_ALIGN=1; CUTOFF=512
  POSTPKT_EXAMPLES=2; FT_STEPS=2; FT_BATCH=2
  SEMALIGN_EXAMPLES=2; SEMALIGN_BATCH=1; SEMALIGN_STEPS=2
  KD_STEPS=1; KD_BATCH=2
  EVAL_FLAGS="--limit 2 --max_new_tokens 8"; N_HELDOUT=4; EVAL_BATCH=8; SIM_EXAMPLES=4
elif [[ $PAIR == qwen ]]; then
  # sized to ~60 minutes on 2 shared CPU cores (90 at most); docs/demo.md gives each stage's measured cost
  LATEN_STEPS=0            # 0: LaTen is the GPU recipe here (docs/demo.md: one step's measured cost)
  N_ALIGN=1; CUTOFF=256
  POSTPKT_EXAMPLES=4; FT_STEPS=2; FT_BATCH=4
  SEMALIGN_EXAMPLES=8; SEMALIGN_BATCH=4; SEMALIGN_STEPS=2
  KD_STEPS=2; KD_BATCH=4
  EVAL_FLAGS="--mmlu_limit 20 --gsm_limit 5 --humaneval_limit 5 --mbpp_limit 5 --n 1 --temperature 0 --max_new_tokens 128"
  CODE_EVAL=",humaneval,mbpp"; N_HELDOUT=8; EVAL_BATCH=8; SIM_EXAMPLES=8
else
  # sized to ~15 minutes on 2 shared CPU cores (docs/demo.md: each stage's measured cost)
  LATEN_STEPS=1; N_ALIGN=3; CUTOFF=256   # one LaTen step 54 s quiet, 110-185 s with the cores shared
  POSTPKT_EXAMPLES=4; FT_STEPS=4; FT_BATCH=4
  SEMALIGN_EXAMPLES=16; SEMALIGN_BATCH=8; SEMALIGN_STEPS=2
  KD_STEPS=4; KD_BATCH=4
  EVAL_FLAGS="--mmlu_limit 40 --gsm_limit 5 --max_new_tokens 160"; N_HELDOUT=16; EVAL_BATCH=8; SIM_EXAMPLES=8
fi
START=$(date +%s); STAGE_START=$START; STAGE_NAME=""; STAGE_CPU=0
cpu_now() {   # CPU=seconds (user + sys) of every finished child process so far (`times` must run in this shell)
  times > "$OUT/.times"
  CPU=$(awk 'NR == 2 {for (i = 1; i <= 2; i++) {split($i, t, "m"); s += t[1] * 60 + t[2]}} END {printf "%d", s}' \
    "$OUT/.times")
}
stage() {   # starts a stage; prints the previous one's wall-clock and CPU time
  local now cpu; now=$(date +%s); cpu_now; cpu=$CPU
  # Read the pair's weight files once, in order: loaded models are mmapped safetensors, and pages the kernel
  # has dropped come back one fault at a time (measured ~3 MB/s on a shared VM disk for the 5.8 GB Qwen
  # teacher, against ~1 GB/s for a sequential read; a no-op when they are cached).
  [[ -n ${TEACHER:-} && $QUICK == 0 ]] && cat "$TEACHER"/*.safetensors "$STUDENT"/*.safetensors > /dev/null
  if [[ -n $STAGE_NAME ]]; then echo "   (${STAGE_NAME%%:*}: $((now - STAGE_START)) s wall, $((cpu - STAGE_CPU)) s CPU)"; fi
  STAGE_START=$now; STAGE_CPU=$cpu; STAGE_NAME=$1; echo "== $1"
}
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) on $CORES cores; torch threads: $OMP_NUM_THREADS"
# a re-run starts over (the prepared models in .cache/ are kept)
rm -rf "$OUT"/{knowledge_translator,laten,postpkt,baselines,semalign,kd,eval,similarity,figures}
mkdir -p "$OUT" "$FIGURES"

stage "1/8 models"
if [[ $QUICK == 1 ]]; then
  MODELS=$OUT/models
  python scripts/prepare_demo_models.py --quick --cache_dir "$MODELS"
elif [[ $PAIR == qwen ]]; then
  MODELS=.cache/demo_models_qwen
  python scripts/prepare_demo_models.py --pair qwen --cache_dir "$MODELS" --nocheck
else
  MODELS=.cache/demo_models
  python scripts/prepare_demo_models.py --cache_dir "$MODELS" --nocheck
fi
TEACHER=$MODELS/teacher
STUDENT=$MODELS/student

stage "2/8 data: held-out examples are the train split's tail, never used for transfer"
TRAIN=data/$TASK/${TASK}_train_split.jsonl
head -n 200 "$TRAIN" > "$OUT/transfer_pool.jsonl"
tail -n "$N_HELDOUT" "$TRAIN" > "$OUT/heldout_$TASK.jsonl"
tail -n "$N_HELDOUT" data/mbpp/mbpp_train_split.jsonl > "$OUT/heldout_mbpp.jsonl"

RUNS="student=$STUDENT"
if [[ $LATEN_STEPS -gt 0 ]]; then
  stage "3/8 LaTen: train the knowledge translator, then transfer"
  python train_LaTen.py --source_model "$TEACHER" --target_model "$STUDENT" \
    --extract_data_path data/$TASK/${TASK}_extract_split.jsonl --align_data_path data/$TASK/${TASK}_align_split.jsonl \
    --translator_save_name demo --output_dir "$OUT/knowledge_translator" --learning_rate $LR \
    --transfer_rate $TRANSFER_RATE --cutoff_len $CUTOFF --n_align $N_ALIGN --max_steps $LATEN_STEPS --seed $SEED
  python inference_LaTen.py --source_model "$TEACHER" --target_model "$STUDENT" --data_path "$OUT/transfer_pool.jsonl" \
    --translator_checkpoints "$OUT/knowledge_translator/demo" --transfer_rates "[$TRANSFER_RATE]" \
    --steps "[$((LATEN_STEPS - 1))]" --seed $SEED --output_dir "$OUT/laten"   # checkpoints count from 0
  LATEN_MODEL=$(ls -d "$OUT"/laten/*step$((LATEN_STEPS - 1)) | head -n 1)
  RUNS="$RUNS,laten=$LATEN_MODEL"
else
  stage "3/8 LaTen: skipped on this pair (one step does not fit the CPU budget; GPU recipe in docs/demo.md)"
fi

stage "4/8 PostPKT: extract -> delta -> fine-tune -> merge"
python extract_lora_with_sensitivity.py --source_model "$TEACHER" --target_model "$STUDENT" \
  --data_path data/$TASK/${TASK}_extract_split.jsonl --num_examples $POSTPKT_EXAMPLES --cutoff_len $CUTOFF \
  --output_dir "$OUT/postpkt/extracted"
python get_delta.py --lora_path "$OUT/postpkt/extracted" --output_path "$OUT/postpkt/delta"
FT_FLAGS="--data_path $OUT/transfer_pool.jsonl --num_epochs 1 --max_steps $FT_STEPS --batch_size $FT_BATCH \
  --micro_batch_size $FT_BATCH --cutoff_len $CUTOFF --learning_rate $LR --seed $SEED"
# shellcheck disable=SC2086
python finetune.py --base_model "$STUDENT" --delta_path "$OUT/postpkt/delta" --lora_init_path "$OUT/postpkt/extracted" \
  $FT_FLAGS --output_dir "$OUT/postpkt/lora"
python merge_lora.py --base_model "$STUDENT" --delta_path "$OUT/postpkt/delta" --lora_path "$OUT/postpkt/lora" \
  --output_dir "$OUT/postpkt/merged"
RUNS="$RUNS,postpkt=$OUT/postpkt/merged"

stage "5/8 equal-budget controls: the same LoRA fine-tune (data, steps, batch, LR, rank, alpha, modules) from peft's random and PiSSA inits"
# the extracted adapter fixes rank, alpha and target modules; the controls take the same
read -r LORA_R LORA_ALPHA LORA_MODULES < <(python -c "
import json, sys; c = json.load(open(sys.argv[1]))
print(c['r'], c['lora_alpha'], ','.join(sorted(c['target_modules'])))" "$OUT/postpkt/extracted/adapter_config.json")
for init in random pissa; do
  # shellcheck disable=SC2086
  python finetune.py --base_model "$STUDENT" --lora_init $init --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" \
    --lora_target_modules "$LORA_MODULES" $FT_FLAGS --output_dir "$OUT/baselines/lora_$init"
  python merge_lora.py --base_model "$STUDENT" --lora_path "$OUT/baselines/lora_$init" \
    --output_dir "$OUT/baselines/lora_${init}_merged"
  RUNS="$RUNS,lora_$init=$OUT/baselines/lora_${init}_merged"
done

stage "6/8 SemAlign v1 and knowledge distillation (GKD)"
python train_SemAlign.py --source_model "$TEACHER" --target_model "$STUDENT" --data_path "$OUT/transfer_pool.jsonl" \
  --output_dir "$OUT/semalign" --max_examples $SEMALIGN_EXAMPLES --attribution_examples $((SEMALIGN_EXAMPLES / 2)) \
  --batch_size $SEMALIGN_BATCH --micro_batch_size 4 --epochs 2 --max_steps $SEMALIGN_STEPS --cutoff_len $CUTOFF \
  --learning_rate $LR --seed $SEED --overwrite True
RUNS="$RUNS,semalign=$OUT/semalign"
# The rebuttal's GKD (lmbda 1, beta 0, LoRA r 16 / alpha 16, 32 new tokens, prompts cut to 64 tokens) at the
# demo's learning rate and without warm-up (a few steps); no gradient checkpointing (it only saves memory, and
# without it the student's samples are decoded with a KV cache).
python distill.py --teacher "$TEACHER" --student "$STUDENT" --data_path "$OUT/transfer_pool.jsonl" \
  --max_steps $KD_STEPS --per_device_train_batch_size $KD_BATCH --gradient_accumulation_steps 1 \
  --learning_rate $LR --warmup_steps 0 --gradient_checkpointing False --seed $SEED --output_dir "$OUT/kd"
RUNS="$RUNS,kd=$OUT/kd,teacher=$TEACHER"

stage "7/8 evaluation of every row: held-out NLL and KL to the teacher (per example), MMLU, GSM8K${CODE_EVAL:+, HumanEval, MBPP}"
EVALS=""
for pair in ${RUNS//,/ }; do
  name=${pair%%=*}; model=${pair#*=}
  [[ $QUICK == 1 ]] || cat "$model"/*.safetensors > /dev/null    # as in stage(): one sequential read
  # shellcheck disable=SC2086
  python evaluate.py --model_path "$model" --tasks "nll,kl,mmlu,gsm$CODE_EVAL" --protocol $PROTOCOL \
    --teacher "$TEACHER" --teacher_cache "$OUT/eval/teacher_cache" \
    --nll_data "gsm=$OUT/heldout_$TASK.jsonl,mbpp=$OUT/heldout_mbpp.jsonl" $EVAL_FLAGS \
    --batch_size $EVAL_BATCH --seed $SEED --output_dir "$OUT/eval/$name"
  EVALS="$EVALS${EVALS:+,}$name=$OUT/eval/$name"
done
rm -rf "$OUT/eval/teacher_cache"

stage "8/8 table, figures and the similarity analyses"
CONTROLS="postpkt=lora_random+lora_pissa,semalign=student,kd=student"
[[ $LATEN_STEPS -gt 0 ]] && CONTROLS="laten=student,$CONTROLS"
python compare.py --runs "$EVALS" --reference student --controls "$CONTROLS" \
  --out "$FIGURES/demo_results.md" --png "$FIGURES/demo_scores.png" --overwrite True
if [[ $LATEN_STEPS -gt 0 ]]; then
  python analysis/plot_training.py --log "$OUT/knowledge_translator/demo/train_log.jsonl" --out_dir "$FIGURES" \
    --overwrite True
  python analysis/plot_neurons.py --transfer_json "$LATEN_MODEL/laten_transfer.json" --out "$FIGURES/laten_neurons.png" \
    --overwrite True
fi
python analysis/similarity.py --teacher "$TEACHER" --student "$STUDENT" --data data/$TASK/${TASK}_extract_split.jsonl \
  --n_examples $SIM_EXAMPLES --out_dir "$OUT/similarity"
cp "$OUT/similarity/representation_similarity.png" "$FIGURES/similarity_representation.png"
cp "$OUT/similarity/parametric_similarity.png" "$FIGURES/similarity_parametric.png"
stage "done"
echo "table: $FIGURES/demo_results.md (bash demo.sh$PAIR_FLAG --refresh_figures copies it and the figures into figures/)"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
cpu_now; rm -f "$OUT/.times"
echo "total wall-clock: $(( $(date +%s) - START )) s (CPU: $CPU s)"
