"""What the evaluation tasks share: Open-Instruct's evaluation chat text, its seeded sub-sampling, and the
checks of score-only prediction records."""
from __future__ import annotations

import random


def tulu_chat(user: str, answer_prefix: str) -> str:
    """One user turn in Open-Instruct's Tulu evaluation format (`eval/templates.py`,
    `create_prompt_with_tulu_chat_format(..., add_bos=False)`: `<|user|>\\n{user}\\n<|assistant|>\\n`),
    then the start of the answer. The template ends with a newline, so the answer follows directly
    (open-instruct inserts a space only after other characters). The BOS comes from the tokenizer.
    This is the evaluation text; LaTen/PostPKT train on `pkt.data.chat_prompt_response`, theirs."""
    return "<|user|>\n" + user + "\n" + "<|assistant|>\n" + answer_prefix


def select(items: list, limit: int | None, mode: str = "sample", seed: int = 42) -> list:
    """`limit` of `items`, all when `limit` is None or not below `len(items)`. "sample": open-instruct's
    draw (`random.seed(42); random.sample(test_data, max_num_examples)`, GSM8K and HumanEval), in the
    drawn order, seeded with `seed`; "first": the first `limit`."""
    if not limit or limit >= len(items):
        return list(items)
    if mode == "first":
        return list(items[:limit])
    return random.Random(seed).sample(list(items), limit)


def field_problem(rec: dict, field: str, kind=str) -> str | None:
    """What is wrong with `rec[field]` (missing, or not of type `kind`), for `load_jsonl(check=...)`."""
    v = rec.get(field)
    if not isinstance(v, kind) or isinstance(v, bool):
        return f"missing {kind.__name__} field {field!r}"
    return None


def index_problem(rec: dict, size: int, what: str) -> str | None:
    """What is wrong with the record's 0-based `id` into a data file of `size` items (`what`)."""
    i = rec.get("id")
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size:
        return f"field 'id' {i!r} must be an index into {what} (0..{size - 1})"
    return None
