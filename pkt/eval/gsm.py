"""GSM8K: 8-shot chain of thought, greedy, answer = last number of the output (Open-Instruct)."""
from __future__ import annotations

import re
from pathlib import Path

from pkt.data import chat_turn, load_jsonl
from pkt.io import fail

INSTRUCTION = "Answer the following questions."
STOP = ["\n\n"]


def load(data_dir) -> tuple[list[dict], list[dict]]:
    """(test problems `{question, answer}`, the 8 CoT exemplars `{question, cot_answer}`)."""
    d = Path(data_dir) / "gsm"
    return (load_jsonl(d / "test.jsonl", require=("question", "answer")),
            load_jsonl(d / "fewshot_cot_8.jsonl", require=("question", "cot_answer")))


def build_prompt(question: str, exemplars: list[dict], use_chat_format: bool = False) -> str:
    """Instruction, exemplars `Question: ..\\nAnswer: <cot>` separated by blank lines, then the question.
    Chat format: all of it is the user turn and the assistant turn starts with "Answer:"."""
    shots = "\n\n".join(f"Question: {e['question'].strip()}\nAnswer: {e['cot_answer'].strip()}" for e in exemplars)
    body = f"{INSTRUCTION}\n\n" + (shots + "\n\n" if shots else "") + f"Question: {question.strip()}"
    if use_chat_format:
        return chat_turn("user", body) + "<|assistant|>\nAnswer:"
    return body + "\nAnswer:"


def normalize(text: str) -> str:
    """Drop thousands separators: `2,125` -> `2125`."""
    return re.sub(r"(\d),(\d)", r"\1\2", text)


def extract_answer(output: str) -> str:
    """Last number in the output (after removing thousands separators); '' when there is none."""
    nums = re.findall(r"[-+]?\d*\.\d+|[-+]?\d+", normalize(output))
    return nums[-1] if nums else ""


def gold_answer(answer: str) -> str:
    return normalize(answer.split("####")[-1].strip())


def is_correct(pred: str, gold: str) -> bool:
    """Exact match of the normalised strings; a leading '+' is ignored."""
    return pred != "" and pred.lstrip("+") == gold.lstrip("+")


def metrics(correct: list[bool]) -> dict:
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct)}


def run(gen, data_dir, limit=None, use_chat_format=False, max_new_tokens=512) -> tuple[list[dict], dict]:
    """Generate and score -> (prediction records, metrics)."""
    test, exemplars = load(data_dir)
    test = test[:limit] if limit else test
    prompts = [build_prompt(ex["question"], exemplars, use_chat_format) for ex in test]
    outs = gen(prompts, max_new_tokens=max_new_tokens, stop=None if use_chat_format else STOP, desc="gsm")
    preds = []
    for i, (ex, p, o) in enumerate(zip(test, prompts, outs)):
        pred, gold = extract_answer(o[0]), gold_answer(ex["answer"])
        preds.append({"id": i, "prompt": p, "output": o[0], "prediction": pred, "gold": gold,
                      "correct": is_correct(pred, gold)})
    return preds, metrics([r["correct"] for r in preds])


def score(records: list[dict], data_dir, path="predictions") -> dict:
    """Score-only: records `{id: index in test.jsonl, output: model text}` (the last number is taken)."""
    test, _ = load(data_dir)
    correct = []
    for n, rec in enumerate(records, 1):
        i = rec.get("id")
        try:
            i = int(i)
        except (TypeError, ValueError):
            fail(f"{path}:{n}: field 'id' must be an index into gsm/test.jsonl (0..{len(test) - 1})")
        if not 0 <= i < len(test):
            fail(f"{path}:{n}: field 'id' {i} out of range 0..{len(test) - 1}")
        if not isinstance(rec.get("output"), str):
            fail(f"{path}:{n}: missing string field 'output'")
        correct.append(is_correct(extract_answer(rec["output"]), gold_answer(test[i]["answer"])))
    return metrics(correct)
