"""Teacher agreement: the mean KL(teacher || model) of the next-token distributions on held-out responses
(lower is closer to the teacher; 0 for the teacher itself).

    evaluate.py --model_path STUDENT --tasks kl --teacher TEACHER --nll_data gsm=heldout.jsonl

Where accuracy is flat (small models score chance on MMLU and 0 on GSM8K) it still says how much of the
teacher's behaviour a transfer moved into the student. It reads the chats of --nll_data (the same held-out
responses as the nll task, split into prompt / response as pkt.data does) and compares, at every response
token, the teacher's distribution p with the model's q:

    KL(p || q) = sum_v p_v (log p_v - log q_v)      (nats per token, forward KL, as GKD's beta 0)

Per example: the sum over its response tokens and their count (predictions.jsonl), so compare.py can pair
rows example by example; pooled: the token-weighted mean with a 95 % bootstrap interval over examples.
The teacher is read in the model's tokenisation, so both must share one vocabulary (checked before any model
loads).

`--teacher_cache DIR` keeps the teacher's response log-probabilities (fp32, [response tokens, V] per dataset,
safetensors) so that evaluating several students against one teacher runs the teacher once: the file is keyed
by the teacher's files, the dtype flag and the token ids of every example, so a changed teacher or data set
never reads a stale one. (Written here: no library caches a model's outputs across processes.)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pkt.data import tokenize_example
from pkt.eval import nll
from pkt.io import fail, load_model, save_tensors

NAME = "kl"
HEADLINE = "kl"
NEEDS_HF = True
TOKEN_CHUNK = 512     # response tokens per KL evaluation: bounds the [tokens, V] fp32 temporaries


def require_teacher(cfg) -> None:
    if not cfg.teacher:
        fail("--tasks kl needs --teacher DIR: the model whose next-token distributions the KL is measured from")


def _resolved(p) -> str:
    return str(Path(p).expanduser().resolve()) if Path(str(p)).expanduser().exists() else str(p)


def same_model(cfg) -> bool:
    """The model evaluated is the teacher itself (same directory, no adapter): its KL is 0 without a forward."""
    return not cfg.adapter_path and _resolved(cfg.model_path) == _resolved(cfg.teacher)


def cache_path(cache_dir, teacher: str, dtype, tokenizer, records: list[dict], cutoff_len: int = nll.CUTOFF_LEN) -> Path:
    """`<cache_dir>/teacher_<hash>.safetensors`, the hash over what the teacher's log-probs depend on: the
    teacher (its path and each file's name, size and mtime), the dtype flag and every example's token ids."""
    h = hashlib.sha256()
    root = Path(_resolved(teacher))
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in root.iterdir() if f.is_file()) \
        if root.is_dir() else []
    h.update(json.dumps([str(root), files, str(dtype), cutoff_len]).encode())
    for r in records:
        f = tokenize_example(tokenizer, r["messages"], cutoff_len=cutoff_len)
        h.update(json.dumps([f["input_ids"], f["labels"]]).encode())
    return Path(cache_dir) / f"teacher_{h.hexdigest()[:24]}.safetensors"


def read_cache(path: Path, n: int) -> list[torch.Tensor] | None:
    """The per-example teacher log-probs [n_i, V] saved at `path` (None when there is no such file)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    t = load_file(str(path))
    offsets = t["offsets"].tolist()
    if len(offsets) != n + 1:
        return None
    return [t["log_probs"][offsets[i]:offsets[i + 1]] for i in range(n)]


def write_cache(path: Path, per_example: list[torch.Tensor | None]) -> None:
    """Save the per-example log-probs (an example without response tokens, None, as 0 rows)."""
    width = next((x.shape[-1] for x in per_example if x is not None), 0)
    per_example = [torch.empty(0, width) if x is None else x for x in per_example]
    lengths = [len(x) for x in per_example]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    save_tensors(path, {"log_probs": torch.cat(per_example), "offsets": offsets})


def check_vocabularies(cfg, tokenizer, teacher_tokenizer) -> None:
    """Both models must read the same token ids: one token -> id map (one-line error naming both)."""
    tv, sv = teacher_tokenizer.get_vocab(), tokenizer.get_vocab()
    if tv != sv:
        diff = len(set(tv.items()) ^ set(sv.items()))
        fail(f"--teacher {cfg.teacher} and --model_path {cfg.model_path} have different vocabularies ({len(tv)} vs "
             f"{len(sv)} tokens, {diff} token/id entries differ): the KL compares their next-token distributions "
             "over one tokenizer")


def settings(cfg) -> dict:
    return {"teacher": str(cfg.teacher), "direction": "KL(teacher || model)", "cutoff_len": nll.CUTOFF_LEN,
            "limit": cfg.limit_for(NAME), "limit_mode": cfg.limit_mode}


def build(cfg, tokenizer=None) -> list[dict]:
    """One item per dataset of --nll_data (`--kl_limit` records of each); the vocabularies are compared here,
    before the models load."""
    from pkt.io import load_tokenizer

    if tokenizer is not None and not same_model(cfg):
        check_vocabularies(cfg, tokenizer, load_tokenizer(cfg.teacher))
    return nll.build(cfg, tokenizer, task=NAME)


def log_probs(logits: torch.Tensor, chunk: int = TOKEN_CHUNK) -> torch.Tensor:
    """[n, V] logits -> fp32 log-softmax, in chunks of rows."""
    return torch.cat([F.log_softmax(logits[i:i + chunk].float(), dim=-1) for i in range(0, len(logits), chunk)]) \
        if len(logits) else logits.float()


def token_kl(teacher_log_probs: torch.Tensor, logits: torch.Tensor, chunk: int = TOKEN_CHUNK) -> torch.Tensor:
    """KL(p || softmax(logits)) per row, p = exp(teacher_log_probs): [n, V], [n, V] -> [n] (fp32, in chunks)."""
    if teacher_log_probs.shape != logits.shape:
        fail(f"--teacher has {teacher_log_probs.shape[-1]} output logits and --model_path {logits.shape[-1]}: "
             "the KL needs one vocabulary")
    out = [F.kl_div(log_probs(logits[i:i + chunk]), teacher_log_probs[i:i + chunk].float(), log_target=True,
                    reduction="none").sum(-1) for i in range(0, logits.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0)


def _per_row(values: torch.Tensor, rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row: the sum of `values` [t] over its tokens and its token count."""
    rows = rows.cpu()
    return (torch.zeros(n, dtype=torch.float64).index_add_(0, rows, values.double().cpu()),
            torch.bincount(rows, minlength=n))


@torch.no_grad()
def example_kl(teacher, model, tokenizer, records: list[dict], batch_size: int = 8,
               cutoff_len: int = nll.CUTOFF_LEN, cached: list[torch.Tensor] | None = None):
    """Per record: (sum over its response tokens of KL(teacher || model), its number of response tokens) and
    the teacher's log-probs per record ([n_i, V], for the cache). `teacher=None` with `cached`: the teacher's
    log-probs are read from there; `teacher=None` without: the model is the teacher (every KL is 0)."""
    sums, counts = [0.0] * len(records), [0] * len(records)
    teacher_lp = list(cached) if cached is not None else [None] * len(records)
    for idx, batch in tqdm(nll.response_batches(tokenizer, records, batch_size, cutoff_len), desc="kl",
                           leave=False, total=-(-len(records) // batch_size)):
        if teacher is None and cached is None:
            for j, i in enumerate(idx):
                counts[i] = int((batch["labels"][j, 1:] != -100).sum())
            continue
        logits, targets, rows = nll.response_logits(model, batch)
        if targets.numel() == 0:
            continue
        if cached is None:
            t_lp = log_probs(nll.response_logits(teacher, batch)[0])
            for j, i in enumerate(idx):          # tokens come row by row (row-major selection)
                teacher_lp[i] = t_lp[rows == j].cpu()
        else:
            t_lp = torch.cat([cached[i] for i in idx])
        per_row, n_row = _per_row(token_kl(t_lp.to(logits.device), logits), rows, len(idx))
        for j, i in enumerate(idx):
            sums[i], counts[i] = float(per_row[j]), int(n_row[j])
    return sums, counts, teacher_lp


def generate(items: list[dict], backend, cfg) -> list[tuple[list[float], list[int]]]:
    """Per dataset: the teacher's log-probs from --teacher_cache, or the teacher loaded next to the model (same
    dtype flag and device) and run (then cached); the model's logits; the per-example KL."""
    if same_model(cfg):
        return [example_kl(None, backend.model, backend.tokenizer, it["records"], backend.batch_size)[:2]
                for it in items]
    paths = [cache_path(cfg.teacher_cache, cfg.teacher, cfg.dtype, backend.tokenizer, it["records"])
             if cfg.teacher_cache else None for it in items]
    cached = [read_cache(p, len(it["records"])) if p else None for p, it in zip(paths, items)]
    teacher = None
    if any(c is None for c in cached):
        device = next(backend.model.parameters()).device
        teacher = load_model(cfg.teacher, dtype=cfg.dtype, device=str(device), flag="--teacher")
    out = []
    for it, path, c in zip(items, paths, cached):
        sums, counts, teacher_lp = example_kl(teacher if c is None else None, backend.model, backend.tokenizer,
                                              it["records"], backend.batch_size, cached=c)
        if path and c is None:
            write_cache(path, teacher_lp)
        out.append((sums, counts))
    return out


def score(items: list[dict], outputs: list[tuple[list[float], list[int]]], cfg=None) -> tuple[list[dict], dict]:
    """One record per example; the pooled (token-weighted) mean KL with its 95 % bootstrap interval, and the
    same per dataset."""
    sums, counts = [o[0] for o in outputs], [o[1] for o in outputs]
    return nll.example_records(items, sums, counts, "kl"), nll.pooled(items, sums, counts, "kl")


read = None   # no predictions to score alone
