"""MBPP (the original test split, task_id 11-510) with Open-Instruct's `eval/mbpp/run_eval.py` protocol: the
task text followed by the reference solution's signature, n = 20 samples at temperature 0.1 (top_p 1),
stop at a code fence, unbiased pass@1, 10 s per program."""
from __future__ import annotations

from pathlib import Path

from pkt.data import load_jsonl
from pkt.eval import code
from pkt.eval.common import field_problem, select, tulu_chat

NAME = "mbpp"
HEADLINE = "pass@1"
NEEDS_HF = False
STOP = ["```"]
INSTRUCTION = "Complete the following python function.\n\n\n"
ANSWER_PREFIX = "Here is the completed function:\n\n\n```python\n"
TOP_P = 1.0
TIMEOUT = 10.0


def load(data_dir) -> list[dict]:
    return load_jsonl(Path(data_dir) / "mbpp" / "test.jsonl", require=("task_id", "text", "code", "test_list"))


def signature(problem: dict) -> str:
    """The reference solution up to its first colon (`def remove_Occ(s,ch)`), as open-instruct cuts it."""
    return problem["code"].split(":")[0]


def build_prompt(problem: dict, use_chat_format: bool = False) -> str:
    """`text + signature` (no separator, as open-instruct); chat format: the instruction and that text as the
    user turn, the assistant turn opening a python code block."""
    text = problem["text"] + signature(problem)
    return tulu_chat(INSTRUCTION + text, ANSWER_PREFIX) if use_chat_format else text


def item(problem: dict, prompt: str | None = None, head: str = "") -> dict:
    """Program = head + completion + "\\n" + test_setup_code + "\\n" + the 3 assertions. The setup follows
    the completion (task 367's builds objects of a class the solution defines)."""
    return {"task_id": problem["task_id"], "prompt": prompt, "head": head,
            "tail": (problem.get("test_setup_code") or "") + "\n" + "\n".join(problem["test_list"])}


def settings(cfg) -> dict:
    return {"use_chat_format": cfg.use_chat_format, "n": cfg.n, "temperature": cfg.temperature,
            "top_p": cfg.top_p if cfg.top_p is not None else TOP_P, "max_new_tokens": cfg.max_new_tokens,
            "stop": STOP, "timeout": cfg.timeout or TIMEOUT, "limit": cfg.limit_for(NAME),
            "limit_mode": cfg.limit_mode}


def build(cfg, tokenizer=None) -> list[dict]:
    """In plain format the completion continues the signature, so the program starts with it (open-instruct
    runs the completion alone there, which never compiles); in chat format the model writes the function."""
    problems = select(load(cfg.data_root), cfg.limit_for(NAME), cfg.limit_mode, cfg.seed)
    return [item(p, build_prompt(p, cfg.use_chat_format), "" if cfg.use_chat_format else signature(p))
            for p in problems]


def generate(items: list[dict], backend, cfg) -> list[list[str]]:
    return code.generate(items, backend, cfg, NAME, STOP, settings(cfg)["top_p"])


def score(items: list[dict], outputs: list[list[str]], cfg) -> tuple[list[dict], dict]:
    return code.score(items, outputs, cfg.timeout or TIMEOUT, cfg.sandbox, NAME)


def read(path: str, cfg) -> tuple[list[dict], list[list[str]]]:
    """Score-only records `{task_id: 11..510, completion: the whole function}` (as open-instruct's prediction
    files hold them); several lines per task = samples."""
    problems = {p["task_id"]: p for p in load(cfg.data_root)}

    def problem(r):
        if task_number(r.get("task_id")) not in problems:
            return f"field 'task_id' {r.get('task_id')!r} is not an MBPP test task (11-510)"
        return field_problem(r, "completion")

    recs = load_jsonl(path, check=problem)
    return code.group([item(problems[task_number(r["task_id"])]) for r in recs], [r["completion"] for r in recs])


def task_number(task_id) -> int | None:
    """11, "11" or evalplus' "Mbpp/11" -> 11; None for anything else."""
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        return task_id
    s = str(task_id).removeprefix("Mbpp/") if isinstance(task_id, str) else ""
    return int(s) if s.isdigit() else None
