"""One comparison table (markdown) and one bar chart for all methods' evaluation results, with 95 % intervals,
marks for differences inside the noise, each transfer row's no-transfer control and each method's compute.

    python compare.py --runs student=out/eval/student,laten=out/eval/laten,teacher=out/eval/teacher \
        --out figures/demo_results.md --png figures/demo_scores.png [--controls laten=student] \
        [--reference student] [--paper_rows True] [--overwrite True]

Each run directory is an evaluate.py output (summary.json, <task>/predictions.jsonl). Logic and the table's
reading: pkt/eval/compare.py; flags: `python compare.py --help`.
"""
from __future__ import annotations

from pkt.eval.compare import CompareConfig, main
from pkt.io import run_cli

if __name__ == "__main__":
    run_cli(main, CompareConfig)
