"""Evaluate a model with the Open-Instruct protocols (GSM8K, MMLU, HumanEval, MBPP) and response NLL.

    python evaluate.py --model_path DIR [--adapter_path LORA] --tasks gsm,mmlu,humaneval,mbpp \
        --output_dir results/DIR [--protocol open-instruct|paper] [--limit N] [--use_chat_format True]
    python evaluate.py score --task humaneval --predictions FILE

Flags: `python evaluate.py --help`; protocols and options: docs/evaluation.md.
"""
from __future__ import annotations

import sys

from pkt.eval.harness import REGISTRY, EvalConfig, ScoreConfig, evaluate, headline, score_predictions
from pkt.io import run_cli


def main(cfg: EvalConfig) -> None:
    """Evaluate --model_path on --tasks; writes <output_dir>/<task>/{predictions.jsonl,metrics.json} and
    <output_dir>/summary.{json,md}."""
    evaluate(cfg)


def score(cfg: ScoreConfig) -> None:
    """Score a predictions JSONL alone; the last printed line is e.g. `humaneval pass@1 = 0.1463`."""
    m = score_predictions(cfg)
    key = REGISTRY[cfg.task].HEADLINE
    extra = {k: v for k, v in m.items() if k not in (key, "per_subject")}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    print(headline(cfg.task, m))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "score":
        del sys.argv[1]
        run_cli(score, ScoreConfig)
    else:
        run_cli(main, EvalConfig)
