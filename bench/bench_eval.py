"""Generation throughput of the evaluation harness: HF batched vs batch 1 (and vLLM on GPU when installed).

Workload: GSM8K prompts (8-shot CoT by default, plus a 0-shot row), greedy, `--max_new_tokens` per prompt
with the stop string off so every row generates the same budget; throughput = generated tokens / wall s.

    python bench/bench_eval.py                                    # CPU, random Llama d512 x 8 layers
    python bench/bench_eval.py --device cuda --model_path DIR     # GPU, bf16; + vLLM if importable

Target: batched >= 5x the batch-1 throughput.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pkt.eval import gsm
from pkt.eval.generate import (MIN_SHARED_PREFIX, generate_hf, generate_vllm, load_vllm,
                               shared_prefix_len, vllm_available)
from pkt.io import fail, load_model, load_tokenizer, run_cli

ROOT = Path(__file__).resolve().parent.parent


def random_llama(vocab: int, device, dtype, hidden=512, layers=8, heads=8, ffn=1376, seed=0):
    """A random Llama (no checkpoint, no download) sized like a small real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096,
                      initializer_range=0.02, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def bench_tokenizer(tokenizer_path=None):
    """A real tokenizer when one is at hand (the demo's SmolLM2 one gives realistic prompt lengths), else
    the tiny byte-level one built in code (prompts about 3x longer in tokens)."""
    from pkt.testing import make_tokenizer

    for p in ([tokenizer_path] if tokenizer_path else []) + [ROOT / ".cache/demo_models/teacher"]:
        if p and (Path(p) / "tokenizer_config.json").exists():
            return load_tokenizer(str(p)), str(p)
    return make_tokenizer(), "pkt.testing.make_tokenizer (byte-level, vocab 300)"


def time_hf(model, tok, prompts, batch_size, max_new_tokens, prefix_cache=False) -> tuple[float, int]:
    """(seconds, generated tokens) for one generate_hf pass (after a small warm-up)."""
    generate_hf(model, tok, prompts[:1], max_new_tokens=4, batch_size=1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    stats = {}
    generate_hf(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stats=stats,
                prefix_cache=prefix_cache)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, stats["new_tokens"]


def main(device: str = "cpu", model_path=None, tokenizer_path=None, limit: int = 16, batch_size: int = 16,
         max_new_tokens: int = 128, shots=(8, 0), threads: int = 2):
    """Print a markdown table of generated tokens/s: HF batch 1, HF batched, vLLM (GPU, if installed)."""
    if device not in ("cpu", "cuda"):
        fail(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device")
    if device == "cpu":
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if model_path:
        model, tok, what = load_model(model_path, dtype=dtype, device=device, flag="--model_path"), \
            load_tokenizer(model_path), str(model_path)
    else:
        tok, tok_name = bench_tokenizer(tokenizer_path)
        model = random_llama(len(tok), device, dtype)
        what = f"random Llama d512 ffn1376 L8 ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params), tokenizer {tok_name}"
    test, exemplars = gsm.load(ROOT / "data" / "eval")
    shots = (shots,) if isinstance(shots, int) else tuple(shots)
    rows = []
    for k in shots:
        prompts = [gsm.build_prompt(ex["question"], exemplars[:k]) for ex in test[:limit]]
        plen = sum(len(tok(p)["input_ids"]) for p in prompts) / len(prompts)
        s1, n1 = time_hf(model, tok, prompts, 1, max_new_tokens)
        sb, nb = time_hf(model, tok, prompts, batch_size, max_new_tokens)
        rows.append((k, plen, "HF batch 1", s1, n1, n1 / s1, 1.0))
        rows.append((k, plen, f"HF batch {batch_size}", sb, nb, nb / sb, (nb / sb) / (n1 / s1)))
        print(f"{k}-shot: batch 1 {n1 / s1:.1f} tok/s, batch {batch_size} {nb / sb:.1f} tok/s", flush=True)
        shared = shared_prefix_len(tok(prompts)["input_ids"])
        if shared >= MIN_SHARED_PREFIX:     # the exemplars: prefilled once, their KV cache reused
            sp, np_ = time_hf(model, tok, prompts, batch_size, max_new_tokens, prefix_cache=True)
            rows.append((k, plen, f"HF batch {batch_size} + shared-prefix cache ({shared} tokens)", sp, np_,
                         np_ / sp, (np_ / sp) / (n1 / s1)))
            print(f"{k}-shot: batch {batch_size} + prefix cache {np_ / sp:.1f} tok/s", flush=True)
    if device == "cuda" and model_path and vllm_available():
        base = {k: r[5] for r in rows if r[2] == "HF batch 1" for k in [r[0]]}
        del model
        torch.cuda.empty_cache()
        llm = load_vllm(str(model_path), gpu_memory_utilization=0.8)
        for k in shots:
            prompts = [gsm.build_prompt(ex["question"], exemplars[:k]) for ex in test[:limit]]
            plen = sum(len(tok(p)["input_ids"]) for p in prompts) / len(prompts)
            generate_vllm(llm, tok, prompts[:1], max_new_tokens=4)
            t = time.perf_counter()
            stats = {}
            generate_vllm(llm, tok, prompts, max_new_tokens=max_new_tokens, stats=stats)
            s = time.perf_counter() - t
            n = stats["new_tokens"]
            rows.append((k, plen, "vLLM", s, n, n / s, (n / s) / base[k]))
    print(f"\nmodel: {what}; device {device} ({dtype}); {limit} GSM8K prompts, greedy, "
          f"{max_new_tokens} new tokens max, no stop string\n")
    print("| shots | prompt tokens (mean) | backend | seconds | generated tokens | tokens/s | vs batch 1 |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for k, plen, name, s, n, tps, x in rows:
        print(f"| {k} | {plen:.0f} | {name} | {s:.2f} | {n} | {tps:.1f} | {x:.2f}x |")
    return None


if __name__ == "__main__":
    run_cli(main)
