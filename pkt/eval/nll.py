"""Mean response negative log-likelihood per token of chat JSONL files (lower is better), per example
(predictions.jsonl: each example's NLL sum and token count, for paired comparisons) and pooled over tokens with
a 95 % bootstrap interval over examples. `response_batches` / `response_logits` are also the KL task's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pkt.data import collate_left, load_chat_jsonl, tokenize_example
from pkt.eval.common import select
from pkt.io import fail, parse_named

NAME = "nll"
HEADLINE = "nll"
NEEDS_HF = True
CUTOFF_LEN = 768


def parse_nll_data(nll_data, task: str = NAME) -> list[tuple[str, str]]:
    """'path', 'name=path,name=path', a list/tuple of those, or a dict -> [(name, path)] (unnamed: 'data')."""
    out = parse_named(nll_data, "--nll_data", default_name=lambda _: "data") if nll_data not in (None, "") else []
    if not out:
        fail(f"--tasks {task} needs --nll_data PATH (or name=path,name=path): the held-out chats it reads")
    return out


def response_batches(tokenizer, records: list[dict], batch_size: int = 8, cutoff_len: int = CUTOFF_LEN):
    """Left-padded batches of `records` (pkt.data's prompt/response split), longest first:
    yields (the records' indices [b], {input_ids, attention_mask, labels} [b, s])."""
    feats = [tokenize_example(tokenizer, r["messages"], cutoff_len=cutoff_len) for r in records]
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        yield idx, collate_left([feats[i] for i in idx], tokenizer.pad_token_id)


def response_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's next-token logits at the response tokens of a left-padded batch: (logits [n, V] fp32, the
    tokens they predict [n], each one's row in the batch [n]), n = response tokens in the batch. Only the last
    positions that hold responses get logits (`logits_to_keep`: left padding puts every response at the end),
    so a 152k vocabulary costs [b, response length, V], not [b, s, V]."""
    device = next(model.parameters()).device
    labels = batch["labels"]                                               # [b, s]
    s = labels.shape[1]
    supervised = (labels != -100).any(0).nonzero()
    if supervised.numel() == 0:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    keep = min(s, s - int(supervised[0]) + 1)          # from the position that predicts the first response token
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   logits_to_keep=keep).logits[:, :-1]                    # [b, keep-1, V]: predict s-keep+1 .. s-1
    targets = labels[:, s - keep + 1:].to(device)                          # [b, keep-1]
    sel = targets != -100
    rows = sel.nonzero()[:, 0]
    return logits[sel].float(), targets[sel], rows


@torch.no_grad()
def example_nll(model, tokenizer, records: list[dict], batch_size: int = 8,
                cutoff_len: int = CUTOFF_LEN) -> tuple[list[float], list[int]]:
    """Per record: (sum of its response-token NLLs, its number of response tokens), in the records' order."""
    sums, counts = [0.0] * len(records), [0] * len(records)
    for idx, batch in tqdm(response_batches(tokenizer, records, batch_size, cutoff_len), desc="nll", leave=False,
                           total=-(-len(records) // batch_size)):
        logits, targets, rows = response_logits(model, batch)
        if targets.numel() == 0:
            continue
        nll = F.cross_entropy(logits, targets, reduction="none")             # [n]
        per_row = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, rows.cpu(), nll.double().cpu())
        n_row = torch.bincount(rows.cpu(), minlength=len(idx))
        for j, i in enumerate(idx):
            sums[i], counts[i] = float(per_row[j]), int(n_row[j])
    return sums, counts


def response_nll(model, tokenizer, records: list[dict], batch_size: int = 8, cutoff_len: int = CUTOFF_LEN) -> tuple[float, int]:
    """(sum of response-token NLLs, number of response tokens) with pkt.data's prompt/response split."""
    sums, counts = example_nll(model, tokenizer, records, batch_size, cutoff_len)
    return sum(sums), sum(counts)


def example_records(items: list[dict], sums: list[list[float]], counts: list[list[int]], key: str) -> list[dict]:
    """One record per example: dataset, its index among the selected records and its id, the per-token sum
    `<key>_sum`, `n_tokens` and the mean `<key>` (what compare.py's paired bootstrap reads)."""
    return [{"dataset": it["dataset"], "index": j, "id": rec.get("id"), f"{key}_sum": s, "n_tokens": c,
             key: s / c if c else None}
            for it, ss, cc in zip(items, sums, counts) for j, (rec, s, c) in enumerate(zip(it["records"], ss, cc))]


def pooled(items: list[dict], sums: list[list[float]], counts: list[list[int]], key: str) -> dict:
    """The token-weighted mean `key` over every example, with its 95 % bootstrap interval over examples
    (`<key>_ci`), and the same per dataset."""
    from pkt.stats import bootstrap_ci

    def summary(ss, cc):
        tot, cnt = sum(ss), sum(cc)
        out = {key: tot / max(cnt, 1), "n_tokens": cnt, "n": len(ss)}
        if cnt:
            out[f"{key}_ci"] = list(bootstrap_ci(ss, cc))
        return out

    datasets = {it["dataset"]: {**summary(ss, cc), "path": it["path"]} for it, ss, cc in zip(items, sums, counts)}
    return {**summary([s for ss in sums for s in ss], [c for cc in counts for c in cc]), "datasets": datasets}


def settings(cfg) -> dict:
    return {"cutoff_len": CUTOFF_LEN, "limit": cfg.limit_for(NAME), "limit_mode": cfg.limit_mode}


def build(cfg, tokenizer=None, task: str = NAME) -> list[dict]:
    """One item per dataset of --nll_data: `{dataset, path, records}` (`--<task>_limit` records of each file)."""
    return [{"dataset": name, "path": path,
             "records": select(load_chat_jsonl(path), cfg.limit_for(task), cfg.limit_mode, cfg.seed)}
            for name, path in parse_nll_data(cfg.nll_data, task)]


def generate(items: list[dict], backend, cfg) -> list[tuple[list[float], list[int]]]:
    return [example_nll(backend.model, backend.tokenizer, it["records"], backend.batch_size) for it in items]


def score(items: list[dict], outputs: list[tuple[list[float], list[int]]], cfg=None) -> tuple[list[dict], dict]:
    """One record per example (predictions.jsonl); the metrics: pooled (token-weighted) mean response NLL with
    its 95 % bootstrap interval over examples, and the same per dataset."""
    sums, counts = [o[0] for o in outputs], [o[1] for o in outputs]
    return example_records(items, sums, counts, "nll"), pooled(items, sums, counts, "nll")


read = None   # no predictions to score alone
