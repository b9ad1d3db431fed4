"""Mean response negative log-likelihood per token of chat JSONL files (lower is better)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pkt.data import collate_left, load_chat_jsonl, tokenize_example
from pkt.eval.common import select
from pkt.io import fail

NAME = "nll"
HEADLINE = "nll"
NEEDS_HF = True
CUTOFF_LEN = 768


def parse_nll_data(nll_data) -> list[tuple[str, str]]:
    """'path', 'name=path,name=path', a list/tuple of those, or a dict -> [(name, path)]."""
    if nll_data is None or nll_data == "":
        fail("--tasks nll needs --nll_data PATH (or name=path,name=path)")
    if isinstance(nll_data, dict):
        items = [f"{k}={v}" for k, v in nll_data.items()]
    elif isinstance(nll_data, (list, tuple)):
        items = [str(x) for x in nll_data]
    else:
        items = [s for s in str(nll_data).split(",") if s.strip()]
    out = []
    for item in items:
        name, sep, path = item.strip().partition("=")
        out.append((name.strip(), path.strip()) if sep else ("data", name.strip()))
    if len({n for n, _ in out}) != len(out):
        fail(f"--nll_data {nll_data!r}: dataset names must be distinct")
    return out


@torch.no_grad()
def response_nll(model, tokenizer, records: list[dict], batch_size: int = 8, cutoff_len: int = CUTOFF_LEN) -> tuple[float, int]:
    """(sum of response-token NLLs, number of response tokens) with pkt.data's prompt/response split."""
    feats = [tokenize_example(tokenizer, r["messages"], cutoff_len=cutoff_len) for r in records]
    feats.sort(key=lambda f: -len(f["input_ids"]))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in tqdm(range(0, len(feats), batch_size), desc="nll", leave=False):
        batch = collate_left(feats[b:b + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()  # [b, s-1, V]
        labels = batch["labels"][:, 1:].to(device)  # [b, s-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total, count


def settings(cfg) -> dict:
    return {"cutoff_len": CUTOFF_LEN, "limit": cfg.limit_for(NAME), "limit_mode": cfg.limit_mode}


def build(cfg, tokenizer=None) -> list[dict]:
    """One item per dataset: `{dataset, path, records}` (`limit` records of each file)."""
    return [{"dataset": name, "path": path,
             "records": select(load_chat_jsonl(path), cfg.limit_for(NAME), cfg.limit_mode, cfg.seed)}
            for name, path in parse_nll_data(cfg.nll_data)]


def generate(items: list[dict], backend, cfg) -> list[tuple[float, int]]:
    return [response_nll(backend.model, backend.tokenizer, it["records"], backend.batch_size) for it in items]


def score(items: list[dict], outputs: list[tuple[float, int]], cfg=None) -> tuple[list[dict], dict]:
    """Per dataset and pooled (token-weighted) mean response NLL."""
    datasets = {it["dataset"]: {"nll": s / max(c, 1), "n_tokens": c, "n": len(it["records"]), "path": it["path"]}
                for it, (s, c) in zip(items, outputs)}
    tot, cnt = sum(s for s, _ in outputs), sum(c for _, c in outputs)
    return ([{"dataset": k, **v} for k, v in datasets.items()],
            {"nll": tot / max(cnt, 1), "n_tokens": cnt, "datasets": datasets})


read = None   # no predictions to score alone
