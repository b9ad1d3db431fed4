"""Seconds per LaTen optimizer step and peak memory, with the training loop's own functions.

One step = locate(teacher) + locate(student) on one example, extract, align_step over n_align+1 align
micro-batches (translate once, inject, LM loss + 1000 MSE, backward), AdamW step, checkpoint: a CPU
snapshot on the critical path, the write in `train`'s background thread (its own time is reported apart).
Every timed step writes the trainer state (the worst case, `--save_every 1`). `--profile` adds one more
step split into its parts (translate, student forward/backward, translator backward).

    python bench/bench_laten_step.py                      # CPU, small random models built in code
    python bench/bench_laten_step.py --profile            # + where the time of a step goes
    python bench/bench_laten_step.py --dry_run            # memory plan at Llama-2 13B -> 7B (meta device)
    python bench/bench_laten_step.py --device cuda        # 13B -> 7B shapes, random bf16 weights, one GPU

Target: 13B -> 7B on one 80 GB GPU, <= 75 GB peak, <= 10 s/step.
"""
from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch


from knowledge_translator import KnowledgeTranslator
from modeling_llama_laten import inject
from pkt.attribution import locate
from pkt.io import BackgroundWriter, fail, run_cli
from pkt.laten import (ModelPair, align_step, check_pair, deltas_for, enable_checkpointing, extract, freeze,
                       lm_loss, mse_penalty, neuron_counts, snapshot, write_checkpoint)
from pkt.model import model_shape
from random_models import random_llama

GB = 1024 ** 3
LLAMA2 = {"13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
          "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)}
SMALL = {"teacher": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
         "student": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4)}


def config(shape: dict, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], vocab_size=vocab,
                       max_position_embeddings=4096, initializer_range=0.02, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build(shape: dict, vocab: int, device, dtype):
    """A random Llama materialised directly on `device` (no checkpoint, no download)."""
    return freeze(random_llama({**shape, "vocab_size": vocab}, device, dtype))


def fake_batches(n: int, seq: int, vocab: int, micro: int, gen):
    """n micro-batched examples of `seq` tokens, labels on the second half (the 'response')."""
    out = []
    for lo in range(0, n, micro):
        b = min(micro, n - lo)
        ids = torch.randint(3, vocab, (b, seq), generator=gen)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench(device="cpu", steps=None, n_align=None, seq=None, transfer_rate=0.1, micro_batch_size=1,
          gradient_checkpointing=None, vocab=None, save=True, profile=False):
    """Run warm-up + `steps` timed optimizer steps; returns a dict of timings (s) and peak memory (GB)."""
    cuda = str(device).startswith("cuda")
    steps = steps or (3 if cuda else 3)
    n_align = 15 if n_align is None else n_align
    seq = seq or (768 if cuda else 128)
    vocab = vocab or (32000 if cuda else 4096)
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = (LLAMA2["13b"], LLAMA2["7b"]) if cuda else (SMALL["teacher"], SMALL["student"])
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    t0 = time.time()
    teacher, student = build(shapes[0], vocab, device, dtype), build(shapes[1], vocab, device, dtype)
    build_s = time.time() - t0
    if gradient_checkpointing if gradient_checkpointing is not None else cuda:
        enable_checkpointing(student)
    pair = ModelPair(teacher, student, None, None, device)   # random token ids: no tokenizers
    t_shape, s_shape = pair.teacher_shape, pair.student_shape
    ffn_k, attn_k = neuron_counts(s_shape, transfer_rate)
    check_pair(t_shape, s_shape, ffn_k, attn_k)
    translator = KnowledgeTranslator(t_shape.hidden, s_shape.hidden).to(device)
    opt = torch.optim.AdamW(translator.parameters(), lr=3e-4, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=steps + 1, pct_start=0.1,
                                                final_div_factor=1, anneal_strategy="cos")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows, writes = [], []
    tmp = tempfile.TemporaryDirectory()

    def timed_write(snap):
        t0 = time.time()
        write_checkpoint(Path(tmp.name), snap)
        writes.append(time.time() - t0)

    def example():
        ids = torch.randint(3, vocab, (seq,), generator=gen).tolist()
        return ids, fake_batches(n_align + 1, seq, vocab, micro_batch_size, gen)

    with BackgroundWriter(True) as writer:
        for step in range(steps + 1):                       # step 0 = warm-up, not reported
            ids, batches = example()
            sync(device)
            t = {"start": time.time()}
            t_sel = locate(teacher, [ids], n_layers=s_shape.layers, ffn_k=ffn_k, attn_k=attn_k)
            s_sel = locate(student, [ids], n_layers=s_shape.layers, ffn_k=ffn_k, attn_k=attn_k)
            sync(device)
            t["locate"] = time.time()
            knowledge = extract(teacher, t_sel, translator.modules_, t_shape, device=device)
            sync(device)
            t["extract"] = time.time()
            align_step(translator, knowledge, student, s_sel, batches, step=step)
            sync(device)
            t["align"] = time.time()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            sync(device)
            t["optim"] = time.time()
            writer.wait()                               # as train: the previous write, on the critical path
            t["wait"] = time.time()
            if save:
                writer.submit(timed_write, snapshot(step, translator, opt, sched, list(range(steps + 1))))
            t["save"] = time.time()
            del knowledge
            if step:
                rows.append({"locate": t["locate"] - t["start"], "extract": t["extract"] - t["locate"],
                             "align": t["align"] - t["extract"], "optim": t["optim"] - t["align"],
                             "wait": t["wait"] - t["optim"], "snapshot": t["save"] - t["wait"],
                             "total": t["save"] - t["start"]})
    parts = profile_step(translator, teacher, student, t_shape, s_shape, ffn_k, attn_k, *example(), device) \
        if profile else None
    tmp.cleanup()
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    if cuda:
        peak = torch.cuda.max_memory_allocated() / GB
        reserved = torch.cuda.max_memory_reserved() / GB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB
        reserved = None
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "teacher": shapes[0], "student": shapes[1],
            "tokens": seq, "examples_per_step": n_align + 1, "micro_batch_size": micro_batch_size,
            "transfer_rate": transfer_rate, "steps": steps, "build_s": build_s, "mean": mean, "peak_gb": peak,
            "reserved_gb": reserved, "write_s": sum(writes) / len(writes) if writes else None, "profile": parts}


def profile_step(translator, teacher, student, t_shape, s_shape, ffn_k, attn_k, ids, batches, device) -> dict:
    """Seconds of each part of one step, the same library calls as `align_step` timed one by one (the real
    step is timed whole above): translator forward, student forward + backward per micro-batch with the deltas
    injected, translator backward."""
    out = {}

    def clock(name, fn):
        sync(device)
        t0 = time.time()
        r = fn()
        sync(device)
        out[name] = out.get(name, 0.0) + time.time() - t0
        return r

    t_sel = clock("locate teacher", lambda: locate(teacher, [ids], n_layers=s_shape.layers, ffn_k=ffn_k,
                                                   attn_k=attn_k))
    s_sel = clock("locate student", lambda: locate(student, [ids], n_layers=s_shape.layers, ffn_k=ffn_k,
                                                   attn_k=attn_k))
    knowledge = clock("extract", lambda: extract(teacher, t_sel, translator.modules_, t_shape, device=device))
    translated = clock("translate (forward)", lambda: translator(knowledge))
    leaves = {m: v.detach().requires_grad_(True) for m, v in translated.items()}

    def micro(batch):
        with inject(student, deltas_for(s_sel, leaves, model_shape(student))):
            (lm_loss(student, batch) + mse_penalty(leaves).to(device)).backward()

    for batch in batches:
        clock("student forward + backward (all micro-batches)", lambda: micro(batch))
    clock("translator backward", lambda: torch.autograd.backward([translated[m] for m in leaves],
                                                                  [leaves[m].grad for m in leaves]))
    translator.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------------------ dry run
def memory_plan(seq=768, n_layers_student=None, transfer_rate=0.1, micro_batch_size=1, vocab=32000):
    """GB per item at Llama-2 13B -> 7B on one GPU (`pkt.laten.memory_plan`), params from meta-device models."""
    from transformers import LlamaForCausalLM

    from pkt.laten import memory_plan as laten_plan
    from pkt.model import model_shape

    with torch.device("meta"):
        teacher = LlamaForCausalLM(config(LLAMA2["13b"], vocab))
        student = LlamaForCausalLM(config(LLAMA2["7b"], vocab))
    n = lambda m: sum(p.numel() for p in m.parameters())
    return laten_plan(model_shape(teacher), model_shape(student), n(teacher), n(student), seq=seq,
                      transfer_rate=transfer_rate, micro_batch_size=micro_batch_size)


def print_plan(plan, budget_gb=75.0):
    total = sum(b for _, b, _ in plan)
    print("| item | GB | note |\n|---|---:|---|")
    for name, b, note in plan:
        print(f"| {name} | {b / GB:.2f} | {note} |")
    print(f"| **total (estimate)** | **{total / GB:.2f}** | target <= {budget_gb:.0f} GB on one 80 GB GPU |")
    return total


def print_result(r):
    shape = lambda s: f"L{s['num_hidden_layers']} d{s['hidden_size']} ffn{s['intermediate_size']}"
    m = r["mean"]
    print(f"device: {r['device']}; teacher {shape(r['teacher'])} -> student {shape(r['student'])}; "
          f"{r['examples_per_step']} examples x {r['tokens']} tokens per step, micro-batch {r['micro_batch_size']}, "
          f"transfer_rate {r['transfer_rate']}; mean of {r['steps']} steps after 1 warm-up\n")
    print("| locate (T+S) s | extract s | align s | AdamW s | wait for writer s | snapshot s | **s/step** | "
          "background write s | peak GB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    peak = f"{r['peak_gb']:.2f}" + (f" (reserved {r['reserved_gb']:.2f})" if r["reserved_gb"] is not None else
                                    " (process max RSS)")
    write = f"{r['write_s']:.3f}" if r["write_s"] is not None else "-"
    print(f"| {m['locate']:.3f} | {m['extract']:.3f} | {m['align']:.3f} | {m['optim']:.3f} | {m['wait']:.3f} | "
          f"{m['snapshot']:.3f} | **{m['total']:.3f}** | {write} | {peak} |")
    if r.get("profile"):
        total = sum(r["profile"].values())
        print("\n| part of one step (profiled apart) | s | share |\n|---|---:|---:|")
        for name, sec in r["profile"].items():
            print(f"| {name} | {sec:.3f} | {sec / total:.0%} |")


def main(device: str = "cpu", dry_run: bool = False, steps: int | None = None, n_align: int | None = None,
         seq: int | None = None, transfer_rate: float = 0.1, micro_batch_size: int = 1,
         gradient_checkpointing: bool | None = None, save: bool = True, threads: int | None = None,
         profile: bool = False):
    if threads:
        torch.set_num_threads(int(threads))
    if dry_run:
        print_plan(memory_plan(seq=seq or 768, transfer_rate=transfer_rate, micro_batch_size=micro_batch_size))
        return
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device")
    print_result(bench(device, steps, n_align, seq, transfer_rate, micro_batch_size, gradient_checkpointing,
                       save=save, profile=profile))


if __name__ == "__main__":
    run_cli(main)
