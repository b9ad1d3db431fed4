"""Train LaTen's knowledge translator (Locate-Then-Align, "Neural Incompatibility", ACL 2025).

One optimizer step per example of the (shuffled) extract split:

    example -> locate(teacher), locate(student) on that example    (layers + ranked neurons)
            -> extract the teacher's located rows/columns
            -> translator -> inject into the frozen student -> LM loss on n_align align examples + the
               example itself (micro-batches) + 1000 * MSE -> backward
            -> optimizer.step(), scheduler.step() -> save checkpoint_<step>/ (+ pkt_budget.json: passes so far)

Only the translator trains; teacher and student are frozen. Logic in pkt/laten.py; see docs/laten.md.

    python train_LaTen.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf \
        --extract_data_path data/gsm/gsm_extract_split.jsonl --align_data_path data/gsm/gsm_align_split.jsonl \
        --translator_save_name gsm --learning_rate 3e-4
"""
from pkt.io import run_cli
from pkt.laten import TrainConfig, train

if __name__ == "__main__":
    run_cli(train, TrainConfig)
