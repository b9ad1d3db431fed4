"""Train LaTen's knowledge translator (Locate-Then-Align, "Neural Incompatibility", ACL 2025).

One optimizer step per example of the (shuffled) extract split:

    example -> locate(teacher), locate(student) on that example    (layers + ranked neurons)
            -> extract the teacher's located rows/columns
            -> for each micro-batch of n_align align examples + the example itself:
                   translate -> inject into the frozen student -> LM loss + 1000 * MSE -> backward
            -> optimizer.step(), scheduler.step() -> save checkpoint_<step>/

Only the translator trains; teacher and student are frozen. See docs/laten.md.

    python train_LaTen.py --source_model meta-llama/Llama-2-13b-chat-hf \
        --target_model meta-llama/Llama-2-7b-chat-hf \
        --extract_data_path data/gsm/gsm_extract_split.jsonl --align_data_path data/gsm/gsm_align_split.jsonl \
        --translator_save_name gsm --learning_rate 3e-4
"""
from __future__ import annotations

import logging
import math
import random
import re
import shutil
import time
from pathlib import Path

import torch

from knowledge_translator import KnowledgeTranslator
from modeling_llama_laten import inject
from pkt.model import model_shape
from pkt.attribution import locate
from pkt.data import load_chat_jsonl, locate_ids, micro_batches
from pkt.io import (append_jsonl, atomic_dir, check_model_path, default_device, default_dtype, fail, load_model,
                    load_tokenizer, run_cli, truncate_log)
from pkt.transfer import check_pair, deltas_for, extract, mse_penalty, neuron_counts, parse_modules, translate

log = logging.getLogger("train_LaTen")
TRAINER_STATE = "trainer_state.pt"


# ------------------------------------------------------------------------------------------ helpers

def locate_pair(teacher, t_tok, student, s_tok, messages, rate, precision="fp32", use_chat_template=False,
                layers=None):
    """Locate on one example in both models, each reading the text with its own tokenizer.
    n_layers = student layers; k = int(student ffn * rate) FFN and int(student hidden * rate) attention neurons.
    `layers` = (teacher_sel, student_sel) forces the kept layers of an earlier selection (inference)."""
    s_shape = model_shape(student)
    ffn_k, attn_k = neuron_counts(s_shape, rate)
    check_pair(model_shape(teacher), s_shape, ffn_k, attn_k)
    sels = []
    for i, (model, tok) in enumerate(((teacher, t_tok), (student, s_tok))):
        force = {} if layers is None else {"attn_layers": list(layers[i].attn_layers),
                                           "ffn_layers": list(layers[i].ffn_layers)}
        ids = locate_ids(tok, messages, use_chat_template=use_chat_template)
        sels.append(locate(model, [ids], n_layers=s_shape.layers, ffn_k=ffn_k, attn_k=attn_k, precision=precision,
                           **force))
    return sels[0], sels[1]


def lm_loss(student, batch) -> torch.Tensor:
    """Mean next-token loss over the micro-batch's supervised tokens (HF's causal-LM loss)."""
    dev = student.lm_head.weight.device
    return student(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                   labels=batch["labels"].to(dev), use_cache=False).loss


def align_step(translator, knowledge, student, s_sel, batches, skip_nan=False, step=0) -> dict:
    """Accumulate into the translator's .grad the gradient of sum over micro-batches of
    (student LM loss with the translated deltas injected + 1000 * MSE(translated, 0)), as the reference
    (summed, not averaged). `knowledge`: extracted teacher slices (see pkt.transfer.extract).

    The translation does not depend on the micro-batch, so it runs once per step: each micro-batch
    back-propagates into a detached copy of it, and the summed gradient then goes through the translator
    in one backward. Same gradient as re-translating per micro-batch (the reference), 1/n of the work.
    Returns mean loss / lm_loss / mse_loss over the used micro-batches and the gradient norm."""
    s_shape = model_shape(student)
    translated = translate(translator, knowledge)
    leaves = {m: t.detach().requires_grad_(True) for m, t in translated.items()}
    sums, used, skipped = {"loss": 0.0, "lm_loss": 0.0, "mse_loss": 0.0}, 0, 0
    for batch in batches:
        if not (batch["labels"][:, 1:] != -100).any():
            log.warning("step %d: a micro-batch has no supervised tokens (prompt >= cutoff_len): skipped", step)
            skipped += 1
            continue
        mse = mse_penalty(leaves)
        with inject(student, deltas_for(s_sel, leaves, s_shape)):
            lm = lm_loss(student, batch)
            loss = lm + mse.to(lm.device)
            if not torch.isfinite(loss):
                if not skip_nan:
                    fail(f"step {step}: non-finite loss {loss.item()} (lm {lm.item()}, mse {mse.item()}); "
                         "pass --skip_nan_steps to skip such micro-batches as the reference does")
                log.warning("step %d: non-finite loss, micro-batch skipped", step)
                skipped += 1
                continue
            loss.backward()  # inside inject: checkpointed layers recompute with the deltas in place
        for k, v in (("loss", loss), ("lm_loss", lm), ("mse_loss", mse)):
            sums[k] += v.item()
        used += 1
    with_grad = [m for m in leaves if leaves[m].grad is not None]
    if with_grad:
        torch.autograd.backward([translated[m] for m in with_grad], [leaves[m].grad for m in with_grad])
    grad_norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in translator.parameters()
                              if p.grad is not None))
    out = {k: (v / used if used else None) for k, v in sums.items()}
    out.update(grad_norm=grad_norm, micro_batches=used, skipped_micro_batches=skipped)
    return out


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_models(source_model, target_model, dtype=None, teacher_device=None, student_device=None):
    """Frozen teacher and student, each with its own tokenizer and shape; teacher and student may
    live on different devices (the reference's two-GPU layout)."""
    teacher_device = teacher_device or default_device()
    student_device = student_device or teacher_device
    dtype = dtype or default_dtype(student_device)
    teacher = freeze(load_model(source_model, dtype=dtype, device=teacher_device, flag="--source_model"))
    student = freeze(load_model(target_model, dtype=dtype, device=student_device, flag="--target_model"))
    return (teacher, student, load_tokenizer(source_model), load_tokenizer(target_model),
            model_shape(teacher), model_shape(student), student_device)


def enable_checkpointing(student) -> None:
    """Gradient checkpointing through the frozen student. Non-reentrant (the inputs need no grad; the delta
    hooks carry it), and HF only checkpoints a layer whose `training` flag is set: set that flag on the
    decoder layers alone, so attention/dropout submodules stay in eval mode."""
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):  # the newer transformers 5 name
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in student.model.layers:
        layer.training = True


def checkpoints(save_dir: Path) -> dict[int, Path]:
    out = {}
    for p in save_dir.glob("checkpoint_*"):
        m = re.fullmatch(r"checkpoint_(\d+)", p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def resume_checkpoint(resume, save_dir: Path) -> Path | None:
    """`--resume True` = the latest checkpoint with a trainer state under save_dir; a path = that checkpoint."""
    if resume in (None, False, "", "False", "false"):
        return None
    if resume is True or str(resume).lower() == "true":
        found = [p for _, p in sorted(checkpoints(save_dir).items()) if (p / TRAINER_STATE).is_file()]
        if not found:
            fail(f"--resume: no checkpoint_<step>/{TRAINER_STATE} under {save_dir}")
        return found[-1]
    p = Path(str(resume))
    if not (p / TRAINER_STATE).is_file():
        fail(f"--resume {resume}: no {TRAINER_STATE} there")
    return p


# --------------------------------------------------------------------------------------------- main
def main(
    source_model: str = "meta-llama/Llama-2-13b-chat-hf",
    target_model: str = "meta-llama/Llama-2-7b-chat-hf",
    extract_data_path: str = "data/gsm/gsm_extract_split.jsonl",
    align_data_path: str = "data/gsm/gsm_align_split.jsonl",
    translator_save_name: str = "gsm",
    learning_rate: float = 3e-5,
    transfer_rate: float = 0.1,
    cutoff_len: int = 768,
    micro_batch_size: int = 1,
    train_on_inputs: bool = False,
    seed: int = 42,
    lora_target_modules=("up_proj", "down_proj", "v_proj", "o_proj"),
    output_dir: str = "knowledge_translator/",
    n_align: int = 15,
    dtype: str | None = None,
    teacher_device: str | None = None,
    student_device: str | None = None,
    resume=None,
    skip_nan_steps: bool = False,
    precision: str = "fp32",
    max_steps: int | None = None,
    use_chat_template: bool = False,
    gradient_checkpointing: bool | None = None,
    save_trainer_state: str = "last",
    overwrite: bool = False,
):
    """Train the translator; writes <output_dir>/<translator_save_name>/checkpoint_<step>/ and train_log.jsonl.

    --save_trainer_state last|all: keep trainer_state.pt (optimizer/scheduler/RNG, for --resume) only in the
    newest checkpoint (default; at 13B->7B it is ~1.5 GB) or in every one. An existing run directory is
    an error unless --resume (continue it) or --overwrite (start over: its checkpoints and log are removed).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # ---- validate everything before loading models or writing a byte
    if not isinstance(transfer_rate, (int, float)) or not 0 < float(transfer_rate) <= 1:
        fail(f"--transfer_rate {transfer_rate}: must be in (0, 1]")
    modules = parse_modules(lora_target_modules)
    if precision not in ("fp32", "reference"):
        fail(f"--precision {precision}: expected fp32 or reference")
    if save_trainer_state not in ("last", "all"):
        fail(f"--save_trainer_state {save_trainer_state}: expected last or all")
    if int(micro_batch_size) < 1 or int(n_align) < 0 or int(cutoff_len) < 2:
        fail("--micro_batch_size must be >= 1, --n_align >= 0, --cutoff_len >= 2")
    if max_steps is not None and int(max_steps) < 1:
        fail(f"--max_steps {max_steps}: must be >= 1")
    extract_data = load_chat_jsonl(extract_data_path)
    align_data = load_chat_jsonl(align_data_path)
    if len(align_data) < n_align:
        fail(f"{align_data_path}: {len(align_data)} records, fewer than --n_align {n_align}")
    check_model_path(source_model, "--source_model")
    check_model_path(target_model, "--target_model")
    save_dir = Path(output_dir) / str(translator_save_name)
    resume_from = resume_checkpoint(resume, save_dir)
    log_path = save_dir / "train_log.jsonl"
    if resume_from is None and (checkpoints(save_dir) or log_path.exists()) and not overwrite:
        fail(f"{save_dir} already holds a run: pass --resume True to continue it, --overwrite True to start over, "
             "or another --translator_save_name")

    # ---- models: frozen, each with its own tokenizer
    teacher, student, t_tok, s_tok, t_shape, s_shape, student_device = load_models(
        source_model, target_model, dtype, teacher_device, student_device)
    check_pair(t_shape, s_shape, *neuron_counts(s_shape, transfer_rate))
    if gradient_checkpointing is None:
        gradient_checkpointing = str(student_device).startswith("cuda")
    if gradient_checkpointing:
        enable_checkpointing(student)

    # ---- translator, optimizer, schedule (as the reference)
    torch.manual_seed(seed)
    translator = KnowledgeTranslator(t_shape.hidden, s_shape.hidden, modules, source_model, target_model,
                                     transfer_rate).to(student_device).train()
    n_steps = len(extract_data) if max_steps is None else min(int(max_steps), len(extract_data))
    optimizer = torch.optim.AdamW(translator.parameters(), lr=learning_rate, weight_decay=0.05, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=n_steps,
                                                    pct_start=0.1, final_div_factor=1, anneal_strategy="cos")
    order = list(range(len(extract_data)))
    random.seed(seed)
    random.shuffle(order)  # the extract split, shuffled once by the seed (resume recomputes the same order)
    start = 0
    if resume_from is not None:
        state = torch.load(resume_from / TRAINER_STATE, map_location="cpu", weights_only=False)
        if state.get("order") != order:
            fail(f"--resume {resume_from}: the run used another extract split or --seed (example order differs)")
        translator.load_state_dict(KnowledgeTranslator.load(resume_from).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"] + 1
        log.info("resumed from %s: continuing at step %d of %d", resume_from, start, n_steps)
        truncate_log(log_path, start)  # drop log lines of steps that will run again
    elif overwrite:
        for p in checkpoints(save_dir).values():
            shutil.rmtree(p)
        log_path.unlink(missing_ok=True)

    for step in _progress(range(start, n_steps), n_steps, start):
        t0 = time.time()
        rec = extract_data[order[step]]
        # 1. locate on this one example, in both models
        t_sel, s_sel = locate_pair(teacher, t_tok, student, s_tok, rec["messages"], transfer_rate, precision,
                                   use_chat_template)
        # 2. the teacher's knowledge: its located rows/columns, moved next to the translator
        knowledge = {m: v.to(student_device) for m, v in extract(teacher, t_sel, modules).items()}
        # 3. align on n_align sampled align examples + this example
        random.seed(step)
        batch_records = [align_data[i] for i in random.sample(range(len(align_data)), n_align)] + [rec]
        batches = micro_batches(s_tok, batch_records, micro_batch_size, cutoff_len, train_on_inputs,
                                use_chat_template)
        stats = align_step(translator, knowledge, student, s_sel, batches, skip_nan_steps, step)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        # 4. checkpoint (atomic), then the log line
        ckpt = save_dir / f"checkpoint_{step}"
        with atomic_dir(ckpt) as tmp:
            translator.save_into(tmp)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(), "step": step,
                        "order": order}, tmp / TRAINER_STATE)
        if save_trainer_state == "last":
            for s, p in checkpoints(save_dir).items():
                if s != step and (p / TRAINER_STATE).is_file():
                    (p / TRAINER_STATE).unlink()
        append_jsonl(log_path, {
            "step": step, "loss": stats["loss"], "lm_loss": stats["lm_loss"], "mse_loss": stats["mse_loss"],
            "lr": lr, "seconds": round(time.time() - t0, 3),
            "teacher_ffn_layers": list(t_sel.ffn_layers), "student_ffn_layers": list(s_sel.ffn_layers),
            "teacher_attn_layers": list(t_sel.attn_layers), "student_attn_layers": list(s_sel.attn_layers),
            "example_id": rec.get("id", f"extract:{order[step]}"), "grad_norm": stats["grad_norm"],
            "micro_batches": stats["micro_batches"], "skipped_micro_batches": stats["skipped_micro_batches"]})
    log.info("done: %s", save_dir)
    return str(save_dir)


def _progress(it, total, start):
    from tqdm import tqdm

    return tqdm(it, total=total, initial=start, desc="LaTen steps")


if __name__ == "__main__":
    run_cli(main)
