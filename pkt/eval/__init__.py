"""Evaluation harness with the Open-Instruct protocols: GSM8K, MMLU, HumanEval, MBPP, plus response NLL.

`evaluate()` runs a model on a list of tasks and writes `<output_dir>/<task>/{predictions.jsonl,
metrics.json}` and `<output_dir>/summary.{json,md}`; `score_file()` scores a predictions file alone.
"""
from __future__ import annotations

import time
from pathlib import Path

from pkt.io import check_model_path, fail, write_json, write_jsonl, write_text

TASKS = ("gsm", "mmlu", "humaneval", "mbpp", "nll")
HEADLINE = {"gsm": "accuracy", "mmlu": "accuracy", "humaneval": "pass@1", "mbpp": "pass@1", "nll": "nll"}
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "eval"


def parse_tasks(tasks) -> list[str]:
    """'gsm,mmlu' or a tuple/list from fire -> validated task names, order kept, duplicates dropped."""
    if isinstance(tasks, (list, tuple)):
        items = [str(t) for t in tasks]
    else:
        items = str(tasks).split(",")
    names = []
    for t in (s.strip().lower() for s in items):
        if not t:
            continue
        if t not in TASKS:
            fail(f"--tasks: unknown task {t!r} (choose from {', '.join(TASKS)})")
        if t not in names:
            names.append(t)
    if not names:
        fail("--tasks: no task given")
    return names


def summary_markdown(summary: dict) -> str:
    """One table: task, headline metric, value, number of items."""
    lines = [f"# Evaluation: {summary['model_path']}" + (f" + {summary['adapter_path']}" if summary.get("adapter_path") else ""),
             "", "| task | metric | value | n |", "|---|---|---:|---:|"]
    for task, m in summary["tasks"].items():
        key = HEADLINE[task]
        n = m.get("n", m.get("n_tasks", m.get("n_tokens", "")))
        val = f"{m[key]:.4f}" if key == "nll" else f"{100 * m[key]:.2f}%"
        lines.append(f"| {task} | {key} | {val} | {n} |")
    return "\n".join(lines) + "\n"


def load_models(model_path, adapter_path=None, backend="hf", seed=42):
    """(vLLM engine or None, tokenizer). vLLM only when importable with CUDA and without an adapter."""
    from pkt.eval.generate import load_vllm, vllm_available
    from pkt.io import load_tokenizer

    if backend not in ("hf", "vllm"):
        fail(f"--backend {backend!r}: expected hf or vllm")
    llm = None
    if backend == "vllm":
        if adapter_path:
            print("note: --backend vllm with --adapter_path is not supported; using the HF backend")
        elif not vllm_available():
            print("note: vLLM not importable or no CUDA device; using the HF backend")
        else:
            llm = load_vllm(model_path, seed=seed)
    tokenizer = load_tokenizer(adapter_path if adapter_path and (Path(adapter_path) / "tokenizer_config.json").exists()
                               else model_path)
    return llm, tokenizer


def load_hf(model_path, adapter_path=None, dtype="auto", device=None):
    """The HF model (with a PEFT adapter on top when given), eval mode."""
    from pkt.io import load_model

    model = load_model(model_path, dtype=dtype, device=device, flag="--model_path")
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).eval()
    return model


def evaluate(model_path, tasks="gsm,mmlu,humaneval,mbpp", output_dir="results", data_dir=None, limit=None,
             task_limits: dict | None = None, batch_size=8, backend="hf", use_chat_format=False, mmlu_shots=0,
             n=20, temperature=0.1, top_p=0.95, max_new_tokens=512, seed=42, adapter_path=None, nll_data=None,
             dtype="auto", device=None, timeout=3.0) -> dict:
    """Run `tasks` on one model; write per-task predictions/metrics and the summary. Returns the summary."""
    import torch

    from pkt.eval import gsm, humaneval, mbpp, mmlu, nll
    from pkt.eval.generate import Generator

    names = parse_tasks(tasks)
    data_dir = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    if not data_dir.is_dir():
        fail(f"--data_dir {data_dir}: no such directory")
    if mmlu_shots not in (0, 5):
        fail(f"--mmlu_shots {mmlu_shots}: expected 0 or 5")
    if int(n) < 1:
        fail(f"--n {n}: expected at least 1")
    if "nll" in names:
        nll.parse_nll_data(nll_data)  # fail early, before loading models
    check_model_path(model_path, "--model_path")
    if adapter_path and not (Path(adapter_path) / "adapter_config.json").exists():
        fail(f"--adapter_path {adapter_path}: no adapter_config.json there")
    torch.manual_seed(seed)
    llm, tokenizer = load_models(model_path, adapter_path, backend, seed=seed)
    model = None
    needs_hf = llm is None or any(t in ("mmlu", "nll") for t in names)
    if needs_hf:
        model = load_hf(model_path, adapter_path, dtype, device)
    gen = Generator(model, tokenizer, llm, batch_size=batch_size, seed=seed)
    out = Path(output_dir)
    summary = {"model_path": str(model_path), "adapter_path": adapter_path, "backend": "vllm" if llm else "hf",
               "use_chat_format": bool(use_chat_format), "seed": seed, "tasks": {}}
    for task in names:
        lim = (task_limits or {}).get(task) or limit
        t0 = time.time()
        torch.manual_seed(seed)
        if task == "gsm":
            preds, m = gsm.run(gen, data_dir, lim, use_chat_format, max_new_tokens)
        elif task == "mmlu":
            preds, m = mmlu.run(model, tokenizer, data_dir, lim, use_chat_format, mmlu_shots, batch_size)
        elif task == "humaneval":
            preds, m = humaneval.run(gen, data_dir, lim, use_chat_format, int(n), temperature, top_p,
                                     max_new_tokens, timeout)
        elif task == "mbpp":
            preds, m = mbpp.run(gen, data_dir, lim, use_chat_format, max_new_tokens, timeout)
        else:
            preds, m = nll.run(model, tokenizer, nll_data, lim, batch_size)
        m["seconds"] = round(time.time() - t0, 2)
        write_jsonl(out / task / "predictions.jsonl", preds)
        write_json(out / task / "metrics.json", m)
        summary["tasks"][task] = m
        key = HEADLINE[task]
        print(f"{task} {key} = {m[key]:.4f}")
    # the summary keeps the headline numbers; per-subject / per-dataset details live in metrics.json
    summary["tasks"] = {t: {k: v for k, v in m.items() if k != "per_subject"} for t, m in summary["tasks"].items()}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    return summary


def score_file(task: str, predictions, data_dir=None, timeout=3.0) -> tuple[str, float, dict]:
    """Score a predictions JSONL alone -> (metric name, value, metrics)."""
    from pkt.data import load_jsonl
    from pkt.eval import gsm, humaneval, mbpp, mmlu

    if task not in ("gsm", "mmlu", "humaneval", "mbpp"):
        fail(f"--task {task!r}: expected gsm, mmlu, humaneval or mbpp")
    if not predictions:
        fail("--predictions FILE is required")
    data_dir = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    records = load_jsonl(predictions)
    mod = {"gsm": gsm, "mmlu": mmlu, "humaneval": humaneval, "mbpp": mbpp}[task]
    kw = {"timeout": timeout} if task in ("humaneval", "mbpp") else {}
    m = mod.score(records, data_dir, path=str(predictions), **kw)
    return HEADLINE[task], m[HEADLINE[task]], m
