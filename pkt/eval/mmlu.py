"""MMLU: 0-shot (or k-shot from dev), argmax of the next-token logits over " A".." D" (Open-Instruct)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pkt.data import chat_turn, load_jsonl
from pkt.io import fail

LETTERS = ["A", "B", "C", "D"]


def load(data_dir, split="test") -> list[dict]:
    return load_jsonl(Path(data_dir) / "mmlu" / f"{split}.jsonl", require=("question", "subject", "choices", "answer"))


def format_question(ex: dict, with_answer: bool = False) -> str:
    text = ex["question"].strip() + "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, ex["choices"])) + "\nAnswer:"
    return text + f" {LETTERS[ex['answer']]}\n\n" if with_answer else text


def build_prompt(ex: dict, shots: list[dict], use_chat_format: bool = False) -> str:
    """Header naming the subject, k answered dev questions, the question ending "Answer:".
    Chat format: all of it is the user turn; the assistant turn starts with "The answer is:"."""
    subject = ex["subject"].replace("_", " ")
    body = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            + "".join(format_question(s, True) for s in shots) + format_question(ex))
    if use_chat_format:
        return chat_turn("user", body) + "<|assistant|>\nThe answer is:"
    return body


def choice_ids(tokenizer) -> list[int]:
    """Token ids of " A".." D" as the tokenizer encodes them; the last token if one splits in two."""
    ids = [tokenizer.encode(" " + l, add_special_tokens=False)[-1] for l in LETTERS]
    if len(set(ids)) != 4:
        fail("mmlu: the tokenizer does not give four distinct tokens for ' A', ' B', ' C', ' D'")
    return ids


def metrics(subjects: list[str], correct: list[bool]) -> dict:
    """Micro accuracy (the headline), macro over subjects, and per subject."""
    per = defaultdict(list)
    for s, c in zip(subjects, correct):
        per[s].append(c)
    per_subject = {s: sum(v) / len(v) for s, v in sorted(per.items())}
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct),
            "macro_accuracy": sum(per_subject.values()) / max(len(per_subject), 1), "per_subject": per_subject}


def select(test: list[dict], limit=None) -> list[dict]:
    """`limit` questions in all (all when None), taken round-robin over subjects (the first question of
    every subject, then the second, ...) so a small limit still spans the subjects; file order kept."""
    if not limit or limit >= len(test):
        return test
    rank, seen = [], defaultdict(int)
    for ex in test:
        rank.append(seen[ex["subject"]])
        seen[ex["subject"]] += 1
    keep = set(sorted(range(len(test)), key=lambda i: (rank[i], i))[:limit])
    return [ex for i, ex in enumerate(test) if i in keep]


def run(model, tokenizer, data_dir, limit=None, use_chat_format=False, shots=0, batch_size=8):
    """Score the 4 letters after each prompt -> (prediction records, metrics). `limit` counts questions, spread over subjects."""
    from pkt.eval.generate import next_token_logits

    test = select(load(data_dir), limit)
    dev = defaultdict(list)
    if shots:
        for ex in load(data_dir, "dev"):
            dev[ex["subject"]].append(ex)
    prompts = [build_prompt(ex, dev[ex["subject"]][:shots], use_chat_format) for ex in test]
    logits = next_token_logits(model, tokenizer, prompts, choice_ids(tokenizer), batch_size, desc="mmlu")
    preds = []
    for ex, p, row in zip(test, prompts, logits):
        k = int(row.argmax())
        preds.append({"subject": ex["subject"], "prompt": p, "output": LETTERS[k], "prediction": LETTERS[k],
                      "gold": LETTERS[ex["answer"]], "correct": k == ex["answer"],
                      "logits": [round(float(x), 4) for x in row]})
    return preds, metrics([r["subject"] for r in preds], [r["correct"] for r in preds])


def score(records: list[dict], data_dir, path="predictions") -> dict:
    """Score-only: records `{id: index in mmlu/test.jsonl, output: letter A-D}`."""
    test = load(data_dir)
    subjects, correct = [], []
    for n, rec in enumerate(records, 1):
        try:
            i = int(rec.get("id"))
        except (TypeError, ValueError):
            fail(f"{path}:{n}: field 'id' must be an index into mmlu/test.jsonl")
        if not 0 <= i < len(test):
            fail(f"{path}:{n}: field 'id' {i} out of range 0..{len(test) - 1}")
        out = rec.get("output")
        if not isinstance(out, str) or out.strip().upper()[:1] not in LETTERS:
            fail(f"{path}:{n}: field 'output' must be a letter A-D")
        subjects.append(test[i]["subject"])
        correct.append(LETTERS.index(out.strip().upper()[:1]) == test[i]["answer"])
    return metrics(subjects, correct)
