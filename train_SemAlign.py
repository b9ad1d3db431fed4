"""SemAlign: cross-scale knowledge transfer through latent semantic alignment of activations
("Beyond Neural Incompatibility", Gu et al., arXiv 2510.24208; ACL 2026 Findings).

    task examples -> layer_attribution(teacher)              (Layer Gradient x Activation, per layer)
                  -> pair_layers(L_T, L_S, critical layers)  (one teacher depth per student depth)
                  -> alignment_map(W_T, W_S)                 (pinv(W_S) W_T, fp32, once)
                  -> for student layer k = 1..L_S (shallow to deep), only layer k trainable:
                         relation(student residual of layer k, aligned teacher residual) + KL(teacher || student)
                  -> save_pretrained(student) + semalign_config.json + semalign_log.jsonl

Teacher and student must share one vocabulary. See docs/semalign.md.

    python train_SemAlign.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf --data_path data/gsm/gsm_train_split.jsonl \
        --output_dir outputs/semalign/gsm
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from pkt.data import load_chat_jsonl, micro_batches
from pkt.io import (atomic_dir, check_model_path, default_device, default_dtype, fail, int_flag, load_model,
                    load_tokenizer, number_flag, resolve_dtype, run_cli, write_json, write_jsonl)
from pkt.semalign import (PAPER, Weights, alignment_map, check_shared_vocab, critical_layers, layer_attribution,
                          memory_plan, pair_layers, pairing_record, train_frontier)

log = logging.getLogger("train_SemAlign")
CONFIG = "semalign_config.json"
LOG = "semalign_log.jsonl"



def print_memory_plan(source_model, target_model, micro_batch_size, cutoff_len, dtype, budget_gb=75.0) -> dict:
    """Print the memory plan for one GPU from meta-device models (nothing loaded, nothing written)."""
    from pkt.io import meta_model

    teacher = meta_model(source_model, "--source_model")   # meta device: shapes only
    student = meta_model(target_model, "--target_model")
    n = lambda m: sum(p.numel() for p in m.parameters())
    n_layer = sum(p.numel() for p in student.model.layers[0].parameters())
    param_bytes = 4 if resolve_dtype(dtype) == torch.float32 else 2
    rows = memory_plan(teacher.config, student.config, micro_batch_size, cutoff_len, param_bytes, n(teacher),
                       n(student), n_layer)
    gib = 2 ** 30
    base = sum(b for name, b, _ in rows if not name.startswith("attribution"))
    attribution = sum(b for name, b, _ in rows if name.startswith(("teacher params", "student params",
                                                                    "attribution")))
    print(f"SemAlign memory plan: {source_model} -> {target_model}, micro-batch {micro_batch_size} x {cutoff_len} "
          f"tokens, {'bf16' if param_bytes == 2 else 'fp32'} weights\n")
    print("| item | GiB | note |\n|---|---:|---|")
    for name, b, note in rows:
        print(f"| {name} | {b / gib:.2f} | {note} |")
    peak = max(base, attribution)
    print(f"| **peak (estimate)** | **{peak / gib:.2f}** | training step {base / gib:.2f}, attribution "
          f"{attribution / gib:.2f}; target <= {budget_gb:.0f} GiB on one 80 GB GPU |")
    return {"rows": [(n_, b, note) for n_, b, note in rows], "peak_bytes": peak}


def main(
    source_model: str = "meta-llama/Llama-2-13b-chat-hf",
    target_model: str = "meta-llama/Llama-2-7b-chat-hf",
    data_path: str = "data/gsm/gsm_train_split.jsonl",
    output_dir: str = "outputs/semalign/gsm",
    max_examples: int = 256,
    attribution_examples: int = 32,
    cutoff_len: int = 768,
    micro_batch_size: int = 4,
    epochs_per_layer: int = 1,
    steps_per_layer: int | None = None,
    learning_rate: float = 2e-5,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    relation_weight: float = 1.0,
    kl_weight: float = 1.0,
    n_critical: int | None = None,
    interpolate: bool = False,
    cache_teacher_logits: bool = True,
    train_on_inputs: bool = False,
    use_chat_template: bool = False,
    dtype: str | None = None,
    teacher_device: str | None = None,
    student_device: str | None = None,
    seed: int = 42,
    dry_run: bool = False,
    overwrite: bool = False,
):
    """Train the student layer by layer against the teacher's aligned activations; writes a HF model to
    --output_dir with semalign_config.json and semalign_log.jsonl. --dry_run prints the memory plan only.

    --n_critical: how many top-attributed teacher layers the pairing honours (default: 10% of the teacher's
    layers, at least 1). --steps_per_layer overrides --epochs_per_layer. --dtype: fp32 on CPU, bf16 on CUDA.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # ---- validate every flag before loading a model or writing a byte
    max_examples = int_flag(max_examples, "--max_examples", 1)
    attribution_examples = int_flag(attribution_examples, "--attribution_examples", 1)
    micro_batch_size = int_flag(micro_batch_size, "--micro_batch_size", 1)
    epochs_per_layer = int_flag(epochs_per_layer, "--epochs_per_layer", 1)
    steps_per_layer = int_flag(steps_per_layer, "--steps_per_layer", 1, allow_none=True)
    int_flag(cutoff_len, "--cutoff_len", 2)
    learning_rate = number_flag(learning_rate, "--learning_rate", strict=True)
    weight_decay = number_flag(weight_decay, "--weight_decay")
    max_grad_norm = number_flag(max_grad_norm, "--max_grad_norm")
    relation_weight = number_flag(relation_weight, "--relation_weight")
    kl_weight = number_flag(kl_weight, "--kl_weight")
    if relation_weight == 0 and kl_weight == 0:
        fail("--relation_weight and --kl_weight are both 0: nothing to train")
    int_flag(n_critical, "--n_critical", 0, allow_none=True)
    int_flag(seed, "--seed")
    resolve_dtype(dtype)
    check_model_path(source_model, "--source_model")
    check_model_path(target_model, "--target_model")
    if dry_run:
        return print_memory_plan(source_model, target_model, micro_batch_size, cutoff_len, dtype or "bf16")
    records = load_chat_jsonl(data_path)
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        fail(f"--output_dir {out} is not empty: pass --overwrite True to replace it")
    for flag, m in (("--source_model", source_model), ("--target_model", target_model)):
        if Path(m).exists() and out.resolve() == Path(m).resolve():
            fail(f"--output_dir {out} is {flag}: choose another directory")

    # ---- tokenizers first (cheap): one shared vocabulary, or a one-line error
    t_tok, s_tok = load_tokenizer(source_model), load_tokenizer(target_model)
    check_shared_vocab(t_tok, s_tok)
    teacher_device = teacher_device or default_device()
    student_device = student_device or default_device()
    dtype = dtype or default_dtype(student_device)
    teacher = load_model(source_model, dtype, teacher_device, "--source_model")
    student = load_model(target_model, dtype, student_device, "--target_model")
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    check_shared_vocab(t_tok, s_tok, teacher, student)
    L_T, L_S = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    if L_T < L_S:
        log.warning("the teacher has fewer layers (%d) than the student (%d): teacher layers are reused", L_T, L_S)

    # ---- data: shuffled once by the seed; attribution reads the first examples
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = [records[i] for i in order[:max_examples]]
    torch.manual_seed(seed)
    batches = micro_batches(s_tok, chosen, micro_batch_size, cutoff_len, train_on_inputs, use_chat_template)
    attr_batches = micro_batches(s_tok, chosen[:attribution_examples], micro_batch_size, cutoff_len, train_on_inputs,
                              use_chat_template)

    # ---- 1. attribution, 2. pairing, 3. alignment map
    t0 = time.time()
    scores = layer_attribution(teacher, attr_batches)
    n_crit = max(1, round(0.1 * L_T)) if n_critical is None else min(int(n_critical), L_T)
    critical = critical_layers(scores, n_crit)
    pairs = pair_layers(L_T, L_S, critical, interpolate)
    log.info("attribution %.1fs; critical teacher depths %s; pairing %s", time.time() - t0, critical,
             [(p.student, p.teacher) if not p.lam else (p.student, p.teacher, p.teacher_next, round(p.lam, 3))
              for p in pairs])
    P = alignment_map(teacher.get_output_embeddings().weight, student.get_output_embeddings().weight)

    # ---- 4. frontier training
    steps = steps_per_layer or epochs_per_layer * len(batches)
    weights = Weights(relation=relation_weight, kl=kl_weight)
    t1 = time.time()
    history = train_frontier(teacher, student, batches, pairs, P, steps=steps, lr=learning_rate,
                             weight_decay=weight_decay, max_grad_norm=max_grad_norm, weights=weights, seed=seed,
                             cache_teacher_logits=bool(cache_teacher_logits))
    train_s = time.time() - t1

    # ---- 5. save: a standard HF model directory, written atomically
    stages = []
    for p in pairs:
        rec = [r for r in history if r["stage"] == p.student]
        stages.append({"stage": p.student, "first_loss": rec[0]["loss"], "last_loss": rec[-1]["loss"],
                       "mean_loss": sum(r["loss"] for r in rec) / len(rec)})
    config = {
        "method": "SemAlign", "paper": PAPER, "source_model": source_model, "target_model": target_model,
        "data_path": str(data_path), "examples": len(chosen), "example_ids": [r.get("id") for r in chosen],
        "attribution_examples": min(attribution_examples, len(chosen)),
        "depths": "1-based: depth d = output of model.layers[d-1], 0 = embedding output",
        "teacher_layers": L_T, "student_layers": L_S,
        "attribution_scores": [float(s) for s in scores], "critical_teacher_depths": critical,
        "pairing": pairing_record(pairs), "stages": stages,
        "hyperparameters": {"max_examples": max_examples, "cutoff_len": cutoff_len,
                            "micro_batch_size": micro_batch_size, "epochs_per_layer": epochs_per_layer,
                            "steps_per_layer": steps, "learning_rate": learning_rate, "weight_decay": weight_decay,
                            "max_grad_norm": max_grad_norm, "relation_weight": relation_weight,
                            "kl_weight": kl_weight, "n_critical": n_crit, "interpolate": bool(interpolate),
                            "cache_teacher_logits": bool(cache_teacher_logits),
                            "train_on_inputs": bool(train_on_inputs), "use_chat_template": bool(use_chat_template),
                            "dtype": str(dtype), "seed": seed, "optimizer": "AdamW (0.9, 0.999), constant lr"},
        "seconds": {"attribution": round(t1 - t0, 2), "training": round(train_s, 2)},
    }
    with atomic_dir(out) as tmp:
        student.save_pretrained(tmp)
        s_tok.save_pretrained(tmp)
        write_json(tmp / CONFIG, config)
        write_jsonl(tmp / LOG, history)
    log.info("saved %s (%d stages x %d steps, %.1fs)", out, len(pairs), steps, train_s)
    return str(out)


if __name__ == "__main__":
    run_cli(main)
