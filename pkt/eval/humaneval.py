"""HumanEval (164) as Open-Instruct's `eval/codex_humaneval/run_eval.py`: n = 20 samples at temperature 0.1,
top_p 0.95, the Codex stop strings, unbiased pass@1, 3 s per program."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from pkt.data import load_jsonl
from pkt.eval import code
from pkt.eval.common import field_problem, select, tulu_chat
from pkt.io import fail

NAME = "humaneval"
HEADLINE = "pass@1"
NEEDS_HF = False
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]   # the Codex paper's
CHAT_STOP = STOP + ["\n```"]
INSTRUCTION = "Complete the following python function.\n\n\n"
# open-instruct's answer cue when no HumanEvalPack instructions are at hand (none are shipped here)
ANSWER_PREFIX = "Here is the completed function:\n\n\n```python\n"
TOP_P = 0.95
TIMEOUT = 3.0


def load(data_dir) -> list[dict]:
    p = Path(data_dir) / "humaneval" / "HumanEval.jsonl.gz"
    if not p.is_file():
        fail(f"{p}: no such file")
    with gzip.open(p, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_prompt(problem: dict, use_chat_format: bool = False) -> str:
    """The signature + docstring; chat format: the instruction and that text as the user turn, the assistant
    turn opening a python code block (the model writes the whole function there)."""
    if use_chat_format:
        return tulu_chat(INSTRUCTION + problem["prompt"], ANSWER_PREFIX)
    return problem["prompt"]


def item(problem: dict, prompt: str | None = None) -> dict:
    """Program = prompt + completion + "\\n" + test + "\\n" + check(entry_point), in both formats (in chat
    format the completion is the rewritten function after the prompt's own, as in open-instruct)."""
    return {"task_id": problem["task_id"], "prompt": prompt, "head": problem["prompt"],
            "tail": problem["test"] + "\n" + f"check({problem['entry_point']})"}


def settings(cfg) -> dict:
    return {"use_chat_format": cfg.use_chat_format, "n": cfg.n, "temperature": cfg.temperature,
            "top_p": cfg.top_p if cfg.top_p is not None else TOP_P, "max_new_tokens": cfg.max_new_tokens,
            "stop": CHAT_STOP if cfg.use_chat_format else STOP, "timeout": cfg.timeout or TIMEOUT,
            "limit": cfg.limit_for(NAME), "limit_mode": cfg.limit_mode}


def build(cfg, tokenizer=None) -> list[dict]:
    problems = select(load(cfg.data_root), cfg.limit_for(NAME), cfg.limit_mode, cfg.seed)
    return [item(p, build_prompt(p, cfg.use_chat_format)) for p in problems]


def generate(items: list[dict], backend, cfg) -> list[list[str]]:
    s = settings(cfg)
    return code.generate(items, backend, cfg, NAME, s["stop"], s["top_p"])


def score(items: list[dict], outputs: list[list[str]], cfg) -> tuple[list[dict], dict]:
    return code.score(items, outputs, cfg.timeout or TIMEOUT, cfg.sandbox, NAME)


def read(path: str, cfg) -> tuple[list[dict], list[list[str]]]:
    """Score-only records `{task_id, completion}` (what follows the prompt); several lines per task = samples."""
    problems = {p["task_id"]: p for p in load(cfg.data_root)}

    def problem(r):
        if r.get("task_id") not in problems:
            return f"field 'task_id' {r.get('task_id')!r} is not a HumanEval task"
        return field_problem(r, "completion")

    recs = load_jsonl(path, check=problem)
    return code.group([item(problems[r["task_id"]]) for r in recs], [r["completion"] for r in recs])
