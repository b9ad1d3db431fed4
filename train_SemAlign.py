"""SemAlign: cross-scale knowledge transfer through latent semantic alignment (Gu et al., arXiv 2510.24208).

--variant v1 (default), the method as the v1 paper publishes it (docs/semalign.md):
    semantic bases of both models (pinv of the unembedding, unit columns; cached)  -> M = S_S S_Tᵀ
    Layer Gradient x Activation on the teacher -> the --n_critical most important teacher layers
    -> the student layer(s) k† they pair with -> teacher targets M u_T/||u_T|| (u = the layer's update h_out - h_in)
    -> train only layer(s) k†: (1 - cos(u_S, target)) + (1 - cos(logits, one-hot label)), one phase
    -> a standard HF model + semalign_config.json + semalign_log.jsonl + pkt_budget.json
--variant v2: a reading of the v2 abstract (its formulas are not published), NOT the published method:
    shallow-to-deep frontier, one source layer per target layer, relation geometry + output KL.

    python train_SemAlign.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf --data_path data/gsm/gsm_train_split.jsonl \
        --output_dir outputs/semalign/gsm
    python train_SemAlign.py --dry_run True      # memory plans of both variants at 13B -> 7B, nothing loaded
"""
from pkt.io import run_cli
from pkt.semalign import SemAlignConfig, train

if __name__ == "__main__":
    run_cli(train, SemAlignConfig)
