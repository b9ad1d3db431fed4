"""GSM8K (test, 1,319) as Open-Instruct's `eval/gsm/run_eval.py`: 8-shot chain of thought (or 0-shot),
greedy, stop at the first newline (plain format), answer = the last number of the output."""
from __future__ import annotations

import re
from pathlib import Path

from pkt.data import load_jsonl
from pkt.eval.common import field_problem, index_problem, select, tulu_chat

NAME = "gsm"
HEADLINE = "accuracy"
NEEDS_HF = False
SHOTS = (0, 8)
STOP = ["\n"]   # plain format only; in chat format the model ends its turn (open-instruct)


def load(data_dir) -> tuple[list[dict], list[dict]]:
    """(test problems `{question, answer}`, the 8 CoT exemplars `{question, cot_answer}`)."""
    d = Path(data_dir) / "gsm"
    return (load_jsonl(d / "test.jsonl", require=("question", "answer")),
            load_jsonl(d / "fewshot_cot_8.jsonl", require=("question", "cot_answer")))


def build_prompt(question: str, exemplars: list[dict], use_chat_format: bool = False) -> str:
    """`Answer the following questions.` + exemplars `Question: q\\nAnswer: cot` joined by blank lines (or,
    0-shot, `Answer the following question.`), then `Question: <question stripped>` and `\\nAnswer:`;
    chat format: all but the answer cue is the user turn, the assistant turn starts with `Answer:`.
    The exemplars are used as they are (open-instruct strips only the test question)."""
    if exemplars:
        prefix = "Answer the following questions.\n\n" + "\n\n".join(
            "Question: " + e["question"] + "\n" + "Answer: " + e["cot_answer"] for e in exemplars) + "\n\n"
    else:
        prefix = "Answer the following question.\n\n"
    body = prefix + "Question: " + question.strip()
    return tulu_chat(body, "Answer:") if use_chat_format else body + "\nAnswer:"


def normalize(text: str) -> str:
    """Drop thousands separators: `2,125` -> `2125`."""
    return re.sub(r"(\d),(\d)", r"\1\2", text)


def extract_answer(output: str) -> str:
    """Last number in the output (after removing thousands separators), with its sign; '' when there is
    none. Open-instruct's pattern `[-+]?\\d*\\.\\d+|\\d+` drops the sign of integers ("-3" -> "3")."""
    nums = re.findall(r"[-+]?\d*\.\d+|[-+]?\d+", normalize(output))
    return nums[-1] if nums else ""


def gold_answer(answer: str) -> str:
    return normalize(answer.split("####")[-1].strip())


def is_correct(pred: str, gold: str) -> bool:
    """Exact match of the normalised strings; a leading '+' is ignored."""
    return pred != "" and pred.lstrip("+") == gold.lstrip("+")


def settings(cfg) -> dict:
    return {"shots": cfg.gsm_shots, "use_chat_format": cfg.use_chat_format, "decoding": "greedy",
            "max_new_tokens": cfg.max_new_tokens, "stop": None if cfg.use_chat_format else STOP,
            "limit": cfg.limit_for(NAME), "limit_mode": cfg.limit_mode}


def build(cfg, tokenizer=None) -> list[dict]:
    test, exemplars = load(cfg.data_root)
    shots = exemplars[:cfg.gsm_shots]
    chosen = select(list(enumerate(test)), cfg.limit_for(NAME), cfg.limit_mode, cfg.seed)
    return [{"id": i, "gold": gold_answer(ex["answer"]), "prompt": build_prompt(ex["question"], shots, cfg.use_chat_format)}
            for i, ex in chosen]


def generate(items: list[dict], backend, cfg) -> list[str]:
    outs = backend.generate([it["prompt"] for it in items], max_new_tokens=cfg.max_new_tokens,
                            stop=None if cfg.use_chat_format else STOP, desc=NAME)
    return [o[0] for o in outs]


def score(items: list[dict], outputs: list[str], cfg=None) -> tuple[list[dict], dict]:
    records = []
    for it, out in zip(items, outputs):
        pred = extract_answer(out)
        records.append({"id": it["id"], "prompt": it.get("prompt"), "output": out, "prediction": pred,
                        "gold": it["gold"], "correct": is_correct(pred, it["gold"])})
    correct = [r["correct"] for r in records]
    return records, {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct)}


def read(path: str, cfg) -> tuple[list[dict], list[str]]:
    """Score-only records `{id: index in gsm/test.jsonl, output: model text}`."""
    test, _ = load(cfg.data_root)
    recs = load_jsonl(path, check=lambda r: index_problem(r, len(test), "gsm/test.jsonl") or field_problem(r, "output"))
    return [{"id": r["id"], "gold": gold_answer(test[r["id"]]["answer"])} for r in recs], [r["output"] for r in recs]
