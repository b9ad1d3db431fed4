"""HumanEval: pass@1 from n=20 samples at temperature 0.1, top_p 0.95 (Open-Instruct / Chen et al.)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from pkt.data import chat_turn
from pkt.eval.passk import pass_at_k
from pkt.eval.sandbox import run_programs
from pkt.io import fail

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
INSTRUCTION = "Complete the following python function.\n\n\n"
ANSWER_PREFIX = "Here is the completed function:\n\n\n"


def load(data_dir) -> list[dict]:
    p = Path(data_dir) / "humaneval" / "HumanEval.jsonl.gz"
    if not p.is_file():
        fail(f"{p}: no such file")
    with gzip.open(p, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_prompt(problem: dict, use_chat_format: bool = False) -> str:
    """The signature + docstring; chat format: an instruction as the user turn and an assistant turn that
    restates the prompt, so the model continues the function body either way."""
    if use_chat_format:
        return chat_turn("user", INSTRUCTION + problem["prompt"]) + "<|assistant|>\n" + ANSWER_PREFIX + problem["prompt"]
    return problem["prompt"]


def program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def evaluate(problems: dict, samples: list[tuple[str, str]], timeout=3.0, ks=(1, 10)) -> tuple[list, dict, list]:
    """samples = [(task_id, completion)] (any number per task) -> (passed per sample, metrics).
    pass@k is the unbiased estimator per task, averaged over the tasks present."""
    results = run_programs([program(problems[t], c) for t, c in samples], timeout=timeout, desc="humaneval exec")
    passed = [r["passed"] for r in results]
    per_task: dict[str, list[bool]] = {}
    for (t, _), ok in zip(samples, passed):
        per_task.setdefault(t, []).append(ok)
    m = {"n_tasks": len(per_task), "n_samples": len(samples)}
    for k in ks:
        if per_task and all(len(v) >= k for v in per_task.values()):
            m[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
    m.setdefault("pass@1", 0.0)
    return passed, m, results


def run(gen, data_dir, limit=None, use_chat_format=False, n=20, temperature=0.1, top_p=0.95,
        max_new_tokens=512, timeout=3.0):
    """Sample n completions per problem, execute them -> (prediction records, metrics)."""
    problems = load(data_dir)
    problems = problems[:limit] if limit else problems
    prompts = [build_prompt(p, use_chat_format) for p in problems]
    stop = STOP + (["```"] if use_chat_format else [])
    temp = temperature if n > 1 else 0.0  # --n 1 is greedy
    outs = gen(prompts, max_new_tokens=max_new_tokens, stop=stop, n=n, temperature=temp, top_p=top_p,
               desc="humaneval")
    samples = [(p["task_id"], c) for p, o in zip(problems, outs) for c in o]
    passed, m, results = evaluate({p["task_id"]: p for p in problems}, samples, timeout)
    prompt_of = {p["task_id"]: q for p, q in zip(problems, prompts)}
    preds = [{"task_id": t, "prompt": prompt_of[t], "completion": c, "output": c, "correct": ok, "result": r["result"]}
             for (t, c), ok, r in zip(samples, passed, results)]
    return preds, m


def score(records: list[dict], data_dir, path="predictions", timeout=3.0) -> dict:
    """Score-only: records `{task_id, completion}`; several lines per task = several samples."""
    problems = {p["task_id"]: p for p in load(data_dir)}
    samples = []
    for n, rec in enumerate(records, 1):
        if rec.get("task_id") not in problems:
            fail(f"{path}:{n}: field 'task_id' {rec.get('task_id')!r} is not a HumanEval task")
        if not isinstance(rec.get("completion"), str):
            fail(f"{path}:{n}: missing string field 'completion'")
        samples.append((rec["task_id"], rec["completion"]))
    return evaluate(problems, samples, timeout)[1]
