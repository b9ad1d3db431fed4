"""Evaluate a model with the Open-Instruct protocols (GSM8K, MMLU, HumanEval, MBPP) and response NLL.

    python evaluate.py --model_path DIR [--adapter_path LORA] --tasks gsm,mmlu,humaneval,mbpp \
        --output_dir results/DIR [--limit N] [--batch_size 8] [--backend hf|vllm] [--use_chat_format]
    python evaluate.py score --task humaneval --predictions FILE

Protocols and options: docs/evaluation.md.
"""
from __future__ import annotations

import sys

from pkt.io import fail, run_cli


def main(model_path=None, tasks="gsm,mmlu,humaneval,mbpp", output_dir="results", data_dir=None, limit=None,
         gsm_limit=None, mmlu_limit=None, humaneval_limit=None, mbpp_limit=None, nll_limit=None,
         batch_size: int = 8, backend="hf", use_chat_format: bool = False, mmlu_shots: int = 0, n: int = 20,
         temperature: float = 0.1, top_p: float = 0.95, max_new_tokens: int = 512, seed: int = 42,
         adapter_path=None, nll_data=None, dtype="auto", device=None, timeout: float = 3.0):
    """Evaluate --model_path on --tasks; writes <output_dir>/<task>/{predictions.jsonl,metrics.json} and
    <output_dir>/summary.{json,md}. --limit caps every task; --<task>_limit overrides it for one task."""
    from pkt.eval import evaluate

    if not model_path:
        fail("--model_path is required (or use `evaluate.py score --task T --predictions FILE`)")
    for flag, v in (("--limit", limit), ("--batch_size", batch_size), ("--max_new_tokens", max_new_tokens)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            fail(f"{flag} {v!r}: expected a positive integer")
    limits = {"gsm": gsm_limit, "mmlu": mmlu_limit, "humaneval": humaneval_limit, "mbpp": mbpp_limit,
              "nll": nll_limit}
    evaluate(model_path, tasks, output_dir, data_dir, limit, limits, batch_size, backend, use_chat_format,
             mmlu_shots, n, temperature, top_p, max_new_tokens, seed, adapter_path, nll_data, dtype, device, timeout)
    return None


def score(task=None, predictions=None, data_dir=None, timeout: float = 3.0):
    """Score a predictions JSONL alone; the last printed line is e.g. `humaneval pass@1 = 0.1463`."""
    from pkt.eval import score_file

    if not task:
        fail("--task is required (gsm, mmlu, humaneval or mbpp)")
    key, value, m = score_file(str(task).lower(), predictions, data_dir, timeout)
    extra = {k: v for k, v in m.items() if k not in (key, "per_subject")}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    print(f"{task} {key} = {value:.4f}")
    return None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "score":
        del sys.argv[1]
        run_cli(score)
    else:
        run_cli(main)
