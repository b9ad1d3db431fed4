"""MMLU (test, 14,042; 57 subjects) as Open-Instruct's `eval/mmlu/run_eval.py`: 5-shot (or 0-shot) from the
subject's dev questions, fewer exemplars while the prompt is over 2,048 tokens, argmax of the next-token
logits over " A".." D"."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from pkt.data import load_jsonl
from pkt.eval.common import field_problem, index_problem, select, tulu_chat
from pkt.io import fail

NAME = "mmlu"
HEADLINE = "accuracy"
NEEDS_HF = True
SHOTS = (0, 5)
LETTERS = ["A", "B", "C", "D"]
MAX_PROMPT_TOKENS = 2048
# a prediction names one letter: "C", "C.", "(C)", "C) ...", "Answer: C", "The answer is (C)"
_CHOICE = re.compile(r"^\s*(?i:(?:the\s+)?answer(?:\s+is)?\s*:?\s*)?\(?([ABCD])\)?(?=$|[\s.,:;)])")


def load(data_dir, split="test") -> list[dict]:
    return load_jsonl(Path(data_dir) / "mmlu" / f"{split}.jsonl", require=("question", "subject", "choices", "answer"))


def format_subject(subject: str) -> str:
    """`abstract_algebra` -> ` abstract algebra` (a space before every word: the header has two)."""
    return "".join(" " + w for w in subject.split("_"))


def format_example(ex: dict, with_answer: bool = False) -> str:
    """The question as it is (not stripped), `\\nA. ..` per choice, `\\nAnswer:` (+ ` X\\n\\n` for exemplars)."""
    text = ex["question"] + "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, ex["choices"])) + "\nAnswer:"
    return text + f" {LETTERS[ex['answer']]}\n\n" if with_answer else text


def build_prompt(ex: dict, shots: list[dict], use_chat_format: bool = False) -> str:
    """Header naming the subject, the answered exemplars, the question ending "Answer:".
    Chat format: all of it is the user turn; the assistant turn starts with "The answer is:"."""
    body = (f"The following are multiple choice questions (with answers) about {format_subject(ex['subject'])}.\n\n"
            + "".join(format_example(s, True) for s in shots) + format_example(ex))
    return tulu_chat(body, "The answer is:") if use_chat_format else body


def fitted_prompts(test: list[dict], dev: dict, k: int, use_chat_format: bool, tokenizer,
                   max_tokens: int = MAX_PROMPT_TOKENS) -> list[tuple[str, int]]:
    """(prompt, exemplars used) per question: the first k dev questions of its subject, one fewer while the
    prompt (without special tokens) is over `max_tokens` tokens. Open-instruct loops forever when even the
    0-shot prompt is too long; here 0 exemplars is the floor."""
    out = [(build_prompt(ex, dev[ex["subject"]][:k], use_chat_format), k) for ex in test]
    if not k or tokenizer is None:
        return out
    lengths = [len(ids) for ids in tokenizer([p for p, _ in out], add_special_tokens=False)["input_ids"]]
    for i, ex in enumerate(test):
        p, j = out[i]
        n = lengths[i]
        while n > max_tokens and j > 0:
            j -= 1
            p = build_prompt(ex, dev[ex["subject"]][:j], use_chat_format)
            n = len(tokenizer(p, add_special_tokens=False)["input_ids"])
        out[i] = (p, j)
    return out


def choice_ids(tokenizer) -> list[int]:
    """Token ids of " A".." D" as the tokenizer encodes them; the last token if one splits in two."""
    ids = [tokenizer.encode(" " + l, add_special_tokens=False)[-1] for l in LETTERS]
    if len(set(ids)) != 4:
        fail("mmlu: the tokenizer does not give four distinct tokens for ' A', ' B', ' C', ' D'")
    return ids


def parse_choice(output: str) -> str | None:
    """The letter A-D a prediction names, or None (unparseable: scored wrong)."""
    m = _CHOICE.match(output)
    return m.group(1) if m else None


def per_subject_sample(test: list[dict], k: int, seed: int = 42) -> list[int]:
    """Open-instruct's `--n_instances k`: per subject (sorted), `test_df.sample(k, random_state=42)` when the
    subject has more than k questions. pandas draws `RandomState(seed).permutation(n)[:k]` (legacy
    generator), in that order; the same draw is made here with numpy, without pandas."""
    import numpy as np

    by = defaultdict(list)
    for i, ex in enumerate(test):
        by[ex["subject"]].append(i)
    out = []
    for s in sorted(by):
        idx = by[s]
        out += [idx[j] for j in np.random.RandomState(seed).permutation(len(idx))[:k]] if k < len(idx) else idx
    return out


def round_robin(test: list[dict], limit: int) -> list[int]:
    """`--limit_mode first`: the first question of every subject, then the second, ... (file order kept)."""
    rank, seen = [], defaultdict(int)
    for ex in test:
        rank.append(seen[ex["subject"]])
        seen[ex["subject"]] += 1
    keep = set(sorted(range(len(test)), key=lambda i: (rank[i], i))[:limit])
    return [i for i in range(len(test)) if i in keep]


def chosen_ids(test: list[dict], cfg) -> list[int]:
    limit = cfg.limit_for(NAME)
    if cfg.mmlu_per_subject:
        return per_subject_sample(test, cfg.mmlu_per_subject, cfg.seed)
    if not limit or limit >= len(test):
        return list(range(len(test)))
    if cfg.limit_mode == "first":
        return round_robin(test, limit)
    return select(list(range(len(test))), limit, "sample", cfg.seed)


def settings(cfg) -> dict:
    return {"shots": cfg.mmlu_shots, "use_chat_format": cfg.use_chat_format, "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "limit": cfg.limit_for(NAME), "limit_mode": cfg.limit_mode, "per_subject": cfg.mmlu_per_subject}


def build(cfg, tokenizer) -> list[dict]:
    test = load(cfg.data_root)
    dev = defaultdict(list)
    if cfg.mmlu_shots:
        for ex in load(cfg.data_root, "dev"):
            dev[ex["subject"]].append(ex)
    ids = chosen_ids(test, cfg)
    prompts = fitted_prompts([test[i] for i in ids], dev, cfg.mmlu_shots, cfg.use_chat_format, tokenizer)
    return [{"id": i, "subject": test[i]["subject"], "gold": LETTERS[test[i]["answer"]], "prompt": p, "shots": k}
            for i, (p, k) in zip(ids, prompts)]


def generate(items: list[dict], backend, cfg) -> list[dict]:
    logits = backend.next_token_logits([it["prompt"] for it in items], choice_ids(backend.tokenizer), desc=NAME)
    return [{"output": LETTERS[int(row.argmax())], "logits": [round(float(x), 4) for x in row]} for row in logits]


def score(items: list[dict], outputs: list[dict], cfg=None) -> tuple[list[dict], dict]:
    """Micro accuracy (the headline), macro over subjects, per subject, and how many predictions named no
    letter (`n_unparseable`, scored wrong)."""
    records, per = [], defaultdict(list)
    for it, out in zip(items, outputs):
        pred = parse_choice(out["output"])
        rec = {"id": it["id"], "subject": it["subject"], "prompt": it.get("prompt"), **out, "prediction": pred,
               "gold": it["gold"], "correct": pred == it["gold"]}
        if "shots" in it:
            rec["shots"] = it["shots"]
        records.append(rec)
        per[it["subject"]].append(rec["correct"])
    correct = [r["correct"] for r in records]
    per_subject = {s: sum(v) / len(v) for s, v in sorted(per.items())}
    return records, {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct),
                     "n_unparseable": sum(r["prediction"] is None for r in records),
                     "macro_accuracy": sum(per_subject.values()) / max(len(per_subject), 1),
                     "per_subject": per_subject}


def read(path: str, cfg) -> tuple[list[dict], list[dict]]:
    """Score-only records `{id: index in mmlu/test.jsonl, output: model text naming A-D}`."""
    test = load(cfg.data_root)
    recs = load_jsonl(path, check=lambda r: index_problem(r, len(test), "mmlu/test.jsonl") or field_problem(r, "output"))
    items = [{"id": r["id"], "subject": test[r["id"]]["subject"], "gold": LETTERS[test[r["id"]]["answer"]]} for r in recs]
    return items, [{"output": r["output"]} for r in recs]
