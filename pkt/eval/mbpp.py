"""MBPP (test, task_id 11-510): evalplus-style prompt with the first assertion, greedy pass@1."""
from __future__ import annotations

from pathlib import Path

from pkt.data import chat_turn, load_jsonl
from pkt.eval.sandbox import run_programs
from pkt.io import fail

# top-level statements after the function end a completion (the tests are ours to append)
STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"]
INSTRUCTION = "Complete the following python function.\n\n\n"
ANSWER_PREFIX = "Here is the completed function:\n\n\n```python\n"


def load(data_dir) -> list[dict]:
    return load_jsonl(Path(data_dir) / "mbpp" / "test.jsonl", require=("task_id", "text", "code", "test_list"))


def build_prompt(problem: dict, use_chat_format: bool = False) -> str:
    """A docstring holding the problem text and the first test assertion (evalplus style); the model
    writes a self-contained function. Chat format: instruction + docstring as the user turn, the
    assistant turn opens a python code block."""
    doc = f'"""\n{problem["text"].strip()}\n{problem["test_list"][0].strip()}\n"""\n'
    if use_chat_format:
        return chat_turn("user", INSTRUCTION + doc) + "<|assistant|>\n" + ANSWER_PREFIX
    return doc


def program(problem: dict, completion: str) -> str:
    """Completion, then the setup code (task 367's uses a class the solution defines), then all 3 asserts."""
    return (completion + "\n" + (problem.get("test_setup_code") or "") + "\n" + "\n".join(problem["test_list"]))


def evaluate(problems: dict, samples: list[tuple[int, str]], timeout=3.0) -> tuple[list, dict, list]:
    """samples = [(task_id, completion)] -> (passed per sample, metrics, raw results). pass@1 = mean over tasks
    of the fraction of its samples that pass (one greedy sample per task in the protocol)."""
    results = run_programs([program(problems[t], c) for t, c in samples], timeout=timeout, desc="mbpp exec")
    passed = [r["passed"] for r in results]
    per_task: dict[int, list[bool]] = {}
    for (t, _), ok in zip(samples, passed):
        per_task.setdefault(t, []).append(ok)
    m = {"pass@1": sum(sum(v) / len(v) for v in per_task.values()) / max(len(per_task), 1),
         "n_tasks": len(per_task), "n_samples": len(samples)}
    return passed, m, results


def run(gen, data_dir, limit=None, use_chat_format=False, max_new_tokens=512, timeout=3.0):
    """Greedy completion per problem, executed against its 3 tests -> (prediction records, metrics)."""
    problems = load(data_dir)
    problems = problems[:limit] if limit else problems
    prompts = [build_prompt(p, use_chat_format) for p in problems]
    outs = gen(prompts, max_new_tokens=max_new_tokens, stop=STOP + (["```"] if use_chat_format else []), desc="mbpp")
    samples = [(p["task_id"], o[0]) for p, o in zip(problems, outs)]
    passed, m, results = evaluate({p["task_id"]: p for p in problems}, samples, timeout)
    preds = [{"task_id": t, "prompt": q, "completion": c, "output": c, "correct": ok, "result": r["result"]}
             for (t, c), q, ok, r in zip(samples, prompts, passed, results)]
    return preds, m


def score(records: list[dict], data_dir, path="predictions", timeout=3.0) -> dict:
    """Score-only: records `{task_id (11-510), completion}`."""
    problems = {p["task_id"]: p for p in load(data_dir)}
    samples = []
    for n, rec in enumerate(records, 1):
        try:
            t = int(rec.get("task_id"))
        except (TypeError, ValueError):
            t = None
        if t not in problems:
            fail(f"{path}:{n}: field 'task_id' {rec.get('task_id')!r} is not an MBPP test task (11-510)")
        if not isinstance(rec.get("completion"), str):
            fail(f"{path}:{n}: missing string field 'completion'")
        samples.append((t, rec["completion"]))
    return evaluate(problems, samples, timeout)[1]
