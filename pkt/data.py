"""JSONL loading with validation, the chat text of the papers, tokenisation and label masking.

The chat format is the Tulu/Open-Instruct one the LaTen and PostPKT code uses
(`<|user|>\\n...\\n\\n<|assistant|>\\n...`), not the tokenizer's own template, unless a caller asks
for `use_chat_template`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pkt.io import fail

IGNORE = -100
ROLES = ("system", "user", "assistant")
LOCATE_STRIP = '. ")\n,]'  # trailing characters the reference strips before locating


def load_jsonl(path, require: tuple[str, ...] = (), allow_empty: bool = False, check=None) -> list[dict]:
    """Read a JSONL file. A line that is not UTF-8 or not a JSON object, a missing `require`d field, or a record
    for which `check(record)` returns a message is a one-line error naming file:line (blank lines count)."""
    p = Path(path)
    if not p.is_file():
        fail(f"{path}: no such file")
    records = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                fail(f"{path}:{n}: not UTF-8 text")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not valid JSON ({e.msg})")
            if not isinstance(rec, dict):
                fail(f"{path}:{n}: expected a JSON object")
            for field in require:
                if field not in rec:
                    fail(f"{path}:{n}: missing field '{field}'")
            problem = check(rec) if check else None
            if problem:
                fail(f"{path}:{n}: {problem}")
            records.append(rec)
    if not records and not allow_empty:
        fail(f"{path}: no records")
    return records


def _chat_problem(rec: dict) -> str | None:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        return "field 'messages' needs at least a user and an assistant turn"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "field 'messages' has an entry without a valid role/content"
    if msgs[-1]["role"] != "assistant":
        return "field 'messages' must end with an assistant turn"
    return None


def load_chat_jsonl(path) -> list[dict]:
    """Chat records `{"messages": [{"role", "content"}, ...]}` ending with an assistant turn."""
    return load_jsonl(path, require=("messages",), check=_chat_problem)


def chat_turn(role: str, content: str) -> str:
    return f"<|{role}|>\n{content.strip()}\n\n"


def chat_prompt_response(messages: list[dict], eos: str | None = None) -> tuple[str, str]:
    """(prompt, response) text. The prompt ends with `<|assistant|>\\n`; the response is the last turn
    followed by "\\n\\n" (LaTen) or by `eos` (PostPKT ends the assistant turn with the EOS string)."""
    prompt = "".join(chat_turn(m["role"], m["content"]) for m in messages[:-1]) + "<|assistant|>\n"
    last = messages[-1]["content"].strip()
    return prompt, last + (eos if eos is not None else "\n\n")


def template_prompt_response(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """Same split using the tokenizer's own chat template (`--use_chat_template`)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        fail("the tokenizer's chat template does not extend the prompt with the reply; drop --use_chat_template")
    return prompt, full[len(prompt):]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def locate_ids(tokenizer, messages: list[dict], use_chat_template: bool = False, add_bos: bool = False) -> list[int]:
    """Token ids the attribution reads: prompt + response stripped of trailing punctuation, no EOS; BOS only
    with `add_bos` (the reference's inference tokenizer keeps it, its training tokenizer does not).
    The model reads ids[:-1]; ids[-1] is the scored target."""
    if use_chat_template:
        prompt, _ = template_prompt_response(tokenizer, messages)
    else:
        prompt, _ = chat_prompt_response(messages)
    ids = encode(tokenizer, prompt + messages[-1]["content"].strip().rstrip(LOCATE_STRIP))
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    if len(ids) < 2:
        fail("example has fewer than 2 tokens: nothing to score")
    return ids


def reference_length(ids: list[int], cutoff_len: int, eos_id: int, add_eos: bool = True) -> int:
    """Length of the reference codes' `tokenize(text)` given the ids of `text`: truncated to cutoff_len, then
    EOS appended when `add_eos`, the result is shorter than cutoff_len and does not end with EOS already."""
    n = min(len(ids), cutoff_len)
    return n + int(add_eos and n < cutoff_len and (n == 0 or ids[n - 1] != eos_id))


def tokenize_example(tokenizer, messages: list[dict], cutoff_len: int = 768, train_on_inputs: bool = False,
                     eos_response: bool = False, use_chat_template: bool = False,
                     mask_first_response_token: bool = False) -> dict:
    """input_ids/labels (unpadded lists) as the reference: no BOS, truncate at cutoff_len, EOS appended
    when shorter, labels -100 over the prompt unless train_on_inputs. `mask_first_response_token`: LaTen's
    reference measures the prompt tokenised *with* its EOS appended, so one more label (the first response
    token) is -100."""
    if use_chat_template:
        prompt, response = template_prompt_response(tokenizer, messages)
    else:
        prompt, response = chat_prompt_response(messages, eos=tokenizer.eos_token if eos_response else None)
    ids = encode(tokenizer, prompt + response)[:cutoff_len]
    eos = tokenizer.eos_token_id
    if len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids.append(eos)
    labels = list(ids)
    if not train_on_inputs:
        prompt_ids = encode(tokenizer, prompt)
        n_prompt = reference_length(prompt_ids, cutoff_len, eos) if mask_first_response_token else len(prompt_ids)
        n_prompt = min(n_prompt, len(ids))
        labels[:n_prompt] = [IGNORE] * n_prompt
    return {"input_ids": ids, "labels": labels}


def encode_chat(tokenizer, messages: list[dict], cutoff_len: int, add_bos: bool = True) -> dict:
    """input_ids/labels lists for PostPKT: the assistant turn ends with the EOS string, loss on the
    response only. The reference's Llama tokenizer also prepends BOS (add_special_tokens defaults
    to True); `add_bos` does the same when the tokenizer has a BOS token."""
    bos = tokenizer.bos_token_id if add_bos else None
    ex = tokenize_example(tokenizer, messages, cutoff_len=cutoff_len - (bos is not None), eos_response=True)
    if bos is not None:
        ex = {"input_ids": [bos] + ex["input_ids"], "labels": [IGNORE] + ex["labels"]}
    return ex


def encode_finetune(tokenizer, messages: list[dict], cutoff_len: int, train_on_inputs: bool = False,
                    add_eos_token: bool = False, add_bos: bool = True) -> dict:
    """input_ids/labels lists as PostPKT's fine-tuning code builds them: the chat text of `chat_prompt_response`
    with the assistant turn ending "\\n\\n" (its Prompter), BOS prepended (Llama's tokenizer default; `add_bos`),
    truncated to cutoff_len, EOS appended when shorter. Unless `train_on_inputs`, the labels are -100 over the
    prompt as that code measures it: `tokenize(prompt)` with EOS appended when `add_eos_token`, minus one
    then (so the mask differs from the prompt length only when the prompt reaches cutoff_len)."""
    prompt, response = chat_prompt_response(messages)
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    ids = (bos + encode(tokenizer, prompt + response))[:cutoff_len]
    if reference_length(ids, cutoff_len, eos) > len(ids):
        ids.append(eos)
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = reference_length(bos + encode(tokenizer, prompt), cutoff_len, eos, add_eos_token) - add_eos_token
        n_prompt = min(n_prompt, len(ids))
        labels[:n_prompt] = [IGNORE] * n_prompt
    return {"input_ids": ids, "labels": labels}


def left_pad(rows: list[list[int]], pad_id: int, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> `(ids, mask)` `[B, T]` (long), each row left-padded with `pad_id` to the longest,
    mask 1 on tokens and 0 on pads. With `prefix = P`, every row's first P ids (a prefix the rows share,
    e.g. one prefilled into a KV cache) stay in front and the pads go between them and the rest.
    The one left-padding batcher: training/NLL batches (`collate_left`), attribution, evaluation."""
    if not rows:
        fail("left_pad: no rows to batch")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r) - prefix
        ids[i, :prefix] = torch.as_tensor(r[:prefix], dtype=torch.long)
        ids[i, T - k:] = torch.as_tensor(r[prefix:], dtype=torch.long)
        mask[i, :prefix] = 1
        mask[i, T - k:] = 1
    return ids, mask


def collate_left(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to the longest example (the reference pads to cutoff_len; RoPE is relative and pads
    are masked, so the loss is the same) -> input_ids, attention_mask, labels `[batch, seq]`."""
    ids, mask = left_pad([b["input_ids"] for b in batch], pad_id)
    labels, _ = left_pad([b["labels"] for b in batch], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def micro_batches(tok, records, size, cutoff_len, train_on_inputs, use_chat_template=False,
                  mask_first_response_token=False) -> list[dict]:
    """Left-padded `{input_ids, attention_mask, labels}` micro-batches of `size` chat records, in order."""
    examples = [tokenize_example(tok, r["messages"], cutoff_len=cutoff_len, train_on_inputs=train_on_inputs,
                                 use_chat_template=use_chat_template,
                                 mask_first_response_token=mask_first_response_token) for r in records]
    return [collate_left(examples[i:i + size], tok.pad_token_id) for i in range(0, len(examples), size)]


def task_split(task: str, split: str, data_dir="data") -> Path:
    """data/<task>/<task>_<split>_split.jsonl (split in extract, align, train)."""
    return Path(data_dir) / task / f"{task}_{split}_split.jsonl"
