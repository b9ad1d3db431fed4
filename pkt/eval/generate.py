"""The model side of the evaluation: batched HF generation (left-padded, prompts sorted by length, greedy or
sampled, stop strings, a shared-prefix KV cache), optional vLLM, next-token logits, and `Backend`, the one
object every task generates and scores through.

Completions are decoded as Open-Instruct decodes them (`eval/utils.py:generate_completions`): the prompt and
the new tokens together, minus the decoded prompt. Decoding the new tokens alone loses characters with
SentencePiece-style tokenizers (Llama-2, Mistral: their decoder strips one leading space, so a completion
that starts with a 4-space indent comes back with 3 and the program does not compile)."""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


def truncate_at_stop(text: str, stop: list[str] | None) -> str:
    """Cut `text` at the first occurrence of any stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in stop or ():
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def continuations(tokenizer, prompt_rows: list[list[int]], new_rows: list[list[int]]) -> list[str]:
    """The text each row's new tokens add to its prompt: `decode(prompt + new)[len(decode(prompt)):]`
    (special tokens skipped). New tokens after the first EOS are dropped (what pads a finished row)."""
    eos = tokenizer.eos_token_id
    new_rows = [r[:r.index(eos)] if eos is not None and eos in r else r for r in new_rows]
    full = tokenizer.batch_decode([p + n for p, n in zip(prompt_rows, new_rows)], skip_special_tokens=True)
    head = tokenizer.batch_decode(prompt_rows, skip_special_tokens=True)
    return [f[len(h):] for f, h in zip(full, head)]


class StopOnStrings(StoppingCriteria):
    """Per-row stop: a row is done once the text of its last few generated tokens holds a stop string.
    The window is decoded with the token before it and that token's text cut off again (the same rule as
    `continuations`), so a Llama tokenizer does not drop the window's first space."""

    def __init__(self, tokenizer, stop: list[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, list(stop), prompt_len
        self.tail = max(len(s) for s in self.stop) + 4  # tokens hold >= 1 char, plus slack

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.tail)
        rows = input_ids[:, start - 1:].tolist()          # [batch, 1 + window]; start - 1 is a real token
        texts = continuations(self.tokenizer, [r[:1] for r in rows], [r[1:] for r in rows])
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def _longest_first(rows: list[list[int]]) -> list[int]:
    """Indices of token rows, longest first (similar lengths share a batch: less padding; OOM shows early)."""
    return sorted(range(len(rows)), key=lambda i: -len(rows[i]))


# Shortest shared prompt prefix worth caching (tokens): few-shot prompts share hundreds.
MIN_SHARED_PREFIX = 32


def shared_prefix_len(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving at least one token of each row to feed the model."""
    if len(rows) < 2:
        return 0
    a, b = min(rows), max(rows)          # the lexicographic extremes bound every row's common prefix
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return min(n, min(len(r) for r in rows) - 1)


def _prefix_cache(model, prefix: list[int], device):
    """The KV cache of the shared prefix, computed once (an 8-shot GSM8K prompt is ~800 tokens of
    exemplars before each question: prefilling them once instead of per prompt is what vLLM's prefix
    caching does; transformers' generate accepts a started cache, so no home-made decoder is needed)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **{_cache_kwarg(model): cache})
    return cache


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _batch_after_prefix(rows: list[list[int]], P: int, pad_id: int, device):
    """`[prefix | left padding | rest]` ids and mask for a batch whose rows share their first P tokens:
    the pads sit between the cached prefix and each row's own tokens (masked; positions skip them)."""
    T = max(len(r) for r in rows) - P
    ids = torch.full((len(rows), P + T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P + T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :P] = torch.tensor(r[:P])
        ids[i, P + T - (len(r) - P):] = torch.tensor(r[P:])
        mask[i, :P] = 1
        mask[i, P + T - (len(r) - P):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], max_new_tokens: int = 512, batch_size: int = 8,
                stop: list[str] | None = None, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                desc: str = "generating", stats: dict | None = None, prefix_cache: bool = True) -> list[list[str]]:
    """Completions `[len(prompts)][n]` (stop strings cut off). temperature 0 = greedy.
    `stats`, when given, gets "new_tokens": the generated (non-pad) tokens, for throughput measurements.

    Each prompt is repeated n times, all sequences are sorted by prompt length and generated in
    left-padded batches of `batch_size` sequences. With `prefix_cache`, a token prefix that every
    prompt shares (few-shot exemplars, >= MIN_SHARED_PREFIX tokens) is prefilled once and its KV cache
    reused by every batch."""
    tokenizer.padding_side = "left"
    seqs = [i for i in range(len(prompts)) for _ in range(n)]  # sequence -> prompt index
    rows = tokenizer([prompts[i] for i in seqs], add_special_tokens=True)["input_ids"]
    order = _longest_first(rows)
    texts = [""] * len(seqs)
    device = next(model.parameters()).device
    sample = temperature > 0
    kw = dict(do_sample=sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id)
    if sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    P = shared_prefix_len(rows) if prefix_cache else 0
    cache = _prefix_cache(model, rows[0][:P], device) if P >= MIN_SHARED_PREFIX else None
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[b:b + batch_size]
        if cache is None:
            enc = tokenizer([prompts[seqs[i]] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=True).to(device)
        else:
            ids, mask = _batch_after_prefix([rows[i] for i in idx], P, tokenizer.pad_token_id, device)
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(len(idx))
            enc = {"input_ids": ids, "attention_mask": mask, _cache_kwarg(model): c}
        plen = enc["input_ids"].shape[1]
        crit = StoppingCriteriaList([StopOnStrings(tokenizer, stop, plen)]) if stop else None
        gen = model.generate(**enc, stopping_criteria=crit, **kw)  # [b, plen + new]
        if stats is not None:
            stats["new_tokens"] = stats.get("new_tokens", 0) + int((gen[:, plen:] != tokenizer.pad_token_id).sum())
        done = continuations(tokenizer, [rows[i] for i in idx], gen[:, plen:].tolist())
        for i, t in zip(idx, done):
            texts[i] = truncate_at_stop(t, stop)
    out: list[list[str]] = [[] for _ in prompts]
    for i, t in zip(seqs, texts):
        out[i].append(t)
    return out


def vllm_available() -> bool:
    """vLLM is used only when it imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def load_vllm(model_path: str, seed: int = 42, dtype: str = "bfloat16", **kwargs):
    """A vLLM engine (imported lazily: vLLM is optional); kwargs go to vllm.LLM (e.g. gpu_memory_utilization)."""
    import vllm

    return vllm.LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, **kwargs)


def generate_vllm(llm, tokenizer, prompts: list[str], max_new_tokens: int = 512, stop: list[str] | None = None,
                  n: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 42,
                  stats: dict | None = None) -> list[list[str]]:
    """Same contract as generate_hf, through vLLM. The text is rebuilt from the prompt and generated token
    ids with `continuations` (the HF path's rule, whatever vLLM's incremental detokenizer does with a
    first space), then cut at the first stop string (vLLM stops there; its last token may run past it)."""
    import vllm

    params = vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                 max_tokens=max_new_tokens, stop=stop or None, seed=seed)
    outs = llm.generate(prompts, params)
    if stats is not None:
        stats["new_tokens"] = stats.get("new_tokens", 0) + sum(len(o.token_ids) for r in outs for o in r.outputs)
    result = []
    for r in outs:
        texts = continuations(tokenizer, [list(r.prompt_token_ids)] * len(r.outputs),
                              [list(o.token_ids) for o in r.outputs])
        result.append([truncate_at_stop(t, stop) for t in texts])
    return result


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: list[str], candidate_ids: list[int], batch_size: int = 8,
                      desc: str = "scoring") -> torch.Tensor:
    """Logits `[len(prompts), len(candidate_ids)]` of the candidate tokens right after each prompt."""
    tokenizer.padding_side = "left"
    order = _longest_first(tokenizer(prompts, add_special_tokens=True)["input_ids"])
    out = torch.empty(len(prompts), len(candidate_ids))
    device = next(model.parameters()).device
    cand = torch.tensor(candidate_ids, device=device)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[b:b + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=True).to(device)
        logits = model(**enc).logits[:, -1, :]  # [b, vocab]; left padding puts every prompt's end last
        out[idx] = logits.index_select(-1, cand).float().cpu()
    return out


class Backend:
    """The loaded model(s) behind every task: `generate` through vLLM when loaded, else HF; logits and
    likelihoods always from the HF model (`model`), loaded only when a task needs it or HF generates."""

    def __init__(self, tokenizer, model=None, llm=None, batch_size: int = 8, seed: int = 42):
        self.tokenizer, self.model, self.llm = tokenizer, model, llm
        self.batch_size, self.seed = batch_size, seed

    @property
    def name(self) -> str:
        return "vllm" if self.llm is not None else "hf"

    def generate(self, prompts: list[str], max_new_tokens: int = 512, stop=None, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, desc: str = "generating") -> list[list[str]]:
        """`[len(prompts)][n]` completions. Greedy n > 1 generates once and repeats it."""
        if temperature == 0 and n > 1:
            return [o * n for o in self.generate(prompts, max_new_tokens, stop, 1, 0.0, top_p, desc)]
        if self.llm is not None:
            return generate_vllm(self.llm, self.tokenizer, prompts, max_new_tokens, stop, n, temperature, top_p,
                                 self.seed)
        return generate_hf(self.model, self.tokenizer, prompts, max_new_tokens, self.batch_size, stop, n,
                           temperature, top_p, desc)

    def next_token_logits(self, prompts: list[str], candidate_ids: list[int], desc: str = "scoring") -> torch.Tensor:
        return next_token_logits(self.model, self.tokenizer, prompts, candidate_ids, self.batch_size, desc)


def load_eval_tokenizer(model_path: str, adapter_path: str | None = None):
    """The adapter's tokenizer when it saved one, else the model's (pad = EOS when it has none)."""
    from pkt.io import load_tokenizer

    own = adapter_path and (Path(adapter_path) / "tokenizer_config.json").exists()
    return load_tokenizer(adapter_path if own else model_path)


def load_backend(tokenizer, model_path: str, adapter_path: str | None = None, backend: str = "hf",
                 needs_hf: bool = True, dtype="auto", device=None, batch_size: int = 8, seed: int = 42,
                 tensor_parallel_size: int = 1) -> Backend:
    """vLLM when asked for and usable (CUDA, no adapter; `tensor_parallel_size` GPUs share its engine), and the
    HF model (with the PEFT adapter on top) when HF generates or `needs_hf` (logits, likelihoods)."""
    from pkt.io import load_model

    llm = None
    if backend == "vllm":
        if adapter_path:
            print("note: --backend vllm with --adapter_path is not supported; using the HF backend")
        elif not vllm_available():
            print("note: vLLM not importable or no CUDA device; using the HF backend")
        else:
            llm = load_vllm(model_path, seed=seed, tensor_parallel_size=int(tensor_parallel_size))
    model = None
    if llm is None or needs_hf:
        model = load_model(model_path, dtype=dtype, device=device, flag="--model_path")
        if adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path).eval()
    return Backend(tokenizer, model, llm, batch_size=batch_size, seed=seed)
