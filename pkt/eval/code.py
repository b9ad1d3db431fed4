"""What HumanEval and MBPP share: n sampled completions per problem, each run as
`head + completion + "\\n" + tail` in the sandbox, and the unbiased pass@k over problems.

An item of a code task is `{"task_id", "prompt", "head", "tail"}`: `head` is the code the completion
continues (HumanEval: the prompt; MBPP plain format: the signature), `tail` the tests that follow it."""
from __future__ import annotations

from pkt.eval.passk import pass_at_k
from pkt.eval.sandbox import run_programs

KS = (1, 10)


def program(item: dict, completion: str) -> str:
    return item["head"] + completion + "\n" + item["tail"]


def generate(items: list[dict], backend, cfg, name: str, stop: list[str], top_p: float) -> list[list[str]]:
    """`cfg.n` completions per item at `cfg.temperature` (0 = greedy)."""
    return backend.generate([it["prompt"] for it in items], max_new_tokens=cfg.max_new_tokens, stop=stop, n=cfg.n,
                            temperature=cfg.temperature, top_p=top_p, desc=name)


def score(items: list[dict], outputs: list[list[str]], timeout: float, sandbox: str = "auto",
          name: str = "code") -> tuple[list[dict], dict]:
    """Execute every completion -> (one record per sample, metrics). pass@k is the unbiased estimator per
    problem averaged over problems, reported for each k in KS that every problem has samples for."""
    samples = [(it, c) for it, outs in zip(items, outputs) for c in outs]
    results = run_programs([program(it, c) for it, c in samples], timeout=timeout, desc=f"{name} exec",
                           isolation=sandbox)
    per_task: dict = {}
    records = []
    for (it, c), r in zip(samples, results):
        per_task.setdefault(it["task_id"], []).append(r["passed"])
        records.append({"task_id": it["task_id"], "prompt": it.get("prompt"), "completion": c, "output": c,
                        "correct": r["passed"], "result": r["result"]})
    m = {"n_tasks": len(per_task), "n_samples": len(samples)}
    for k in KS:
        if per_task and all(len(v) >= k for v in per_task.values()):
            m[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
    m.setdefault("pass@1", 0.0)
    return records, m


def group(items: list[dict], completions: list[str]) -> tuple[list[dict], list[list[str]]]:
    """Score-only: one record per sample (several lines per task = several samples) -> (items, outputs)
    with the samples of a task together, tasks in order of first appearance."""
    order, outs = {}, {}
    for it, c in zip(items, completions):
        order.setdefault(it["task_id"], it)
        outs.setdefault(it["task_id"], []).append(c)
    return list(order.values()), [outs[t] for t in order]
