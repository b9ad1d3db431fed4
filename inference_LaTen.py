"""Fuse a trained LaTen translator into the student: one saved HF model per (transfer rate, step).

    seed example (as the reference: set_seed(seed), the train split shuffled by datasets, random.sample)
        -> locate layers once (teacher and student), on BOS + text as the reference's inference tokenizer
    for each transfer rate: locate neurons at that rate in the fixed layers, extract the teacher's slices
        for each translator step: translate (no grad) -> fold the deltas into a fresh student -> save
            (with pkt_budget.json: the step's training compute + this transfer's forwards)

Unlike the reference (which keeps the deltas as module attributes, so `save_pretrained` wrote the unchanged
student), the deltas are folded into the saved weights: the saved model is the transferred model.
Logic in pkt/laten.py (`transfer`); see docs/laten.md.

    python inference_LaTen.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf --data_path data/gsm/gsm_train_split.jsonl \
        --translator_checkpoints knowledge_translator/gsm --transfer_rates '[0.1]' --steps '[0]'
"""
from pkt.io import run_cli
from pkt.laten import TransferConfig, transfer

if __name__ == "__main__":
    run_cli(transfer, TransferConfig)
