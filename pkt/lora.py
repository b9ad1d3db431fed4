"""PostPKT steps 3-4: LoRA fine-tuning of the student (delta merged first) and the final merge.

The training loop is plain torch + `accelerate.Accelerator`, so the same script runs on one CPU/GPU
or under `accelerate launch` / `torchrun` (DDP). One optimizer step = `batch_size` examples over all
processes (micro-batches of `micro_batch_size` per process, gradient accumulation in between).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from pkt.io import (append_jsonl, atomic_dir, check_model_path, default_dtype, fail, load_model, load_tokenizer,
                    save_tensors, truncate_log, write_json)

log = logging.getLogger("pkt.lora")

INITS = ("random", "pissa", "extracted")
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj", "embed_tokens",
                   "lm_head")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_adapter_dir(path, flag: str) -> dict:
    """An adapter directory must hold adapter_config.json + adapter_model.safetensors; returns the config."""
    p = Path(path)
    missing = [f for f in ADAPTER_FILES if not (p / f).is_file()]
    if missing:
        fail(f"{flag} {path}: not a PEFT LoRA adapter directory (missing {', '.join(missing)})")
    cfg = json.loads((p / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        fail(f"{flag} {path}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    return cfg


def merge_adapter(model, adapter_path):
    """model + the adapter in `adapter_path`, merged into the weights (peft's merge_and_unload)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload()


def build_student(base_model: str, delta_path: str | None, dtype, device):
    """The student, with the delta (W - B A) merged in when given."""

    model = load_model(base_model, dtype=dtype, device=device, flag="--base_model")
    if delta_path:
        model = merge_adapter(model, delta_path)
    return model


def checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints `checkpoint-<step>` in output_dir, oldest first."""
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        if p.is_dir() and (p / "state.json").is_file() and p.name.split("-")[-1].isdigit():
            out.append((int(p.name.split("-")[-1]), p))
    return sorted(out)


def resolve_lora(lora_init, lora_init_path, lora_target_modules, lora_r, lora_alpha):
    """(init, modules, r, alpha): the extracted adapter fixes r / alpha / modules; asking for others is
    an error rather than a silent override."""
    from pkt.postpkt import ALL_MODULES, parse_modules

    init = lora_init or ("extracted" if lora_init_path else "random")
    if init not in INITS:
        fail(f"--lora_init {init!r}: expected one of {', '.join(INITS)}")
    modules = parse_modules(lora_target_modules, ALL_MODULES, "--lora_target_modules") \
        if lora_target_modules is not None else None
    if init == "extracted":
        if not lora_init_path:
            fail("--lora_init extracted needs --lora_init_path")
        cfg = check_adapter_dir(lora_init_path, "--lora_init_path")
        got = {"--lora_r": cfg["r"], "--lora_alpha": cfg["lora_alpha"]}
        for flag, want in (("--lora_r", lora_r), ("--lora_alpha", lora_alpha)):
            if want is not None and int(want) != int(got[flag]):
                fail(f"{flag} {want} differs from the extracted adapter's {got[flag]}: drop the flag")
        saved = sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], list) else cfg["target_modules"]
        if modules is not None and sorted(modules) != saved:
            fail(f"--lora_target_modules {','.join(modules)} differs from the extracted adapter's {saved}: "
                 "drop the flag")
        return init, saved, int(cfg["r"]), int(cfg["lora_alpha"])
    if lora_init_path:
        fail(f"--lora_init_path is only used with --lora_init extracted (got --lora_init {init})")
    return init, modules or list(DEFAULT_MODULES), int(lora_r or 16), int(lora_alpha or 16)


def finetune(base_model: str, data_path: str, output_dir: str, delta_path: str | None = None,
             lora_init_path: str | None = None, lora_init: str | None = None, num_epochs: int = 3,
             learning_rate: float = 3e-4, batch_size: int = 64, micro_batch_size: int = 8, cutoff_len: int = 2048,
             lora_target_modules=None, lora_r: int | None = None, lora_alpha: int | None = None,
             lora_dropout: float = 0.05, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
             max_grad_norm: float = 1.0, seed: int = 1, max_steps: int | None = None, resume: bool = False,
             save_steps: int = 0, save_total_limit: int = 2, dtype: str | None = None,
             gradient_checkpointing: bool = False, add_bos: bool = True, progress: bool = True) -> list[dict]:
    """LoRA fine-tuning with the loss on responses only; returns the log records of this run."""
    from accelerate import Accelerator
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    from pkt.data import IGNORE, collate_left, load_chat_jsonl
    from pkt.postpkt import encode_chat

    # ---- validate inputs before anything is loaded or written
    init, modules, r, alpha = resolve_lora(lora_init, lora_init_path, lora_target_modules, lora_r, lora_alpha)
    check_model_path(base_model, "--base_model")
    if delta_path:
        check_adapter_dir(delta_path, "--delta_path")
    if init == "extracted" and not delta_path:
        log.warning("--lora_init extracted without --delta_path: the student starts at W + B A, not at W")
    records = load_chat_jsonl(data_path)
    if int(batch_size) < 1 or int(micro_batch_size) < 1:
        fail("--batch_size and --micro_batch_size must be >= 1")
    out = Path(output_dir)
    done = checkpoints(out)
    if not resume and (done or (out / "train_log.jsonl").exists()):
        fail(f"--output_dir {output_dir} already holds a training run: pass --resume or choose another directory")

    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: torchrun on CPU -> gloo DDP
    world, rank = acc.num_processes, acc.process_index
    if int(batch_size) % (int(micro_batch_size) * world):
        fail(f"--batch_size {batch_size} must be a multiple of --micro_batch_size x processes "
             f"({micro_batch_size} x {world})")
    accum = int(batch_size) // (int(micro_batch_size) * world)
    torch.manual_seed(seed)
    dtype = dtype or default_dtype(acc.device.type)

    # ---- data: response-only labels, one fixed order per epoch (seed + epoch)
    tokenizer = load_tokenizer(base_model)
    examples = [encode_chat(tokenizer, rec["messages"], int(cutoff_len), add_bos) for rec in records]
    # An example whose response is cut off entirely by --cutoff_len has no loss (0/0 = NaN): drop it.
    kept = [ex for ex in examples if any(t != IGNORE for t in ex["labels"][1:])]
    if len(kept) < len(examples):
        acc.print(f"warning: {len(examples) - len(kept)} example(s) have no response tokens within "
                  f"--cutoff_len {cutoff_len}: skipped")
    examples = kept
    steps_per_epoch = len(examples) // int(batch_size) + (len(examples) % int(batch_size) >= world)
    total = int(num_epochs) * steps_per_epoch
    if max_steps:
        total = min(total, int(max_steps))
    if total < 1:
        fail(f"{data_path}: {len(examples)} examples give no optimizer step")

    # ---- model: student (+ delta merged) with the LoRA to train
    model = build_student(base_model, delta_path, dtype, str(acc.device))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    if init == "extracted":
        model = PeftModel.from_pretrained(model, str(lora_init_path), is_trainable=True)
    else:
        missing = [m for m in modules if not any(n.endswith("." + m) or n == m for n, _ in model.named_modules())]
        if missing:
            fail(f"--lora_target_modules: the student has no module {', '.join(missing)}")
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, lora_dropout=lora_dropout, bias="none",
                         task_type="CAUSAL_LM", init_lora_weights="pissa" if init == "pissa" else True)
        model = get_peft_model(model, cfg)
    pissa_init_dir = out / "pissa_init"
    if init == "pissa" and acc.is_main_process and not pissa_init_dir.exists():
        # PiSSA rewrites the base weights; keep the initial adapter so the final one can be converted
        # into a plain LoRA on the unmodified student (peft's path_initial_model_for_weight_conversion).
        with atomic_dir(pissa_init_dir) as tmp:
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(str(tmp), save_embedding_layers=False)
            model.peft_config["default"].init_lora_weights = "pissa"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=float(learning_rate), weight_decay=float(weight_decay))
    sched = get_linear_schedule_with_warmup(opt, math.ceil(float(warmup_ratio) * total), total)

    # ---- resume
    step = 0
    if resume and done:
        step, ck = done[-1]
        from safetensors.torch import load_file

        state = load_file(str(ck / "trainable.safetensors"))
        for n, p in trainable.items():
            p.data.copy_(state[n].to(p.device, p.dtype))
        opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location=acc.device, weights_only=True))
        sched.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True))
        if acc.is_main_process:
            truncate_log(out / "train_log.jsonl", step + 1)
        acc.print(f"resumed from {ck} (step {step}/{total})")
    elif acc.is_main_process and (out / "train_log.jsonl").exists():
        (out / "train_log.jsonl").unlink()   # --resume before any checkpoint: start the log afresh
    model, opt = acc.prepare(model, opt)
    model.train()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in trainable.values())
        acc.print(f"LoRA ({init}) r={r} alpha={alpha} on {','.join(modules)}: {n_train:,} trainable params; "
                  f"{total} steps of {batch_size} examples ({world} process(es) x {micro_batch_size} x {accum})")

    pad = tokenizer.pad_token_id
    logs = []
    bar = tqdm(total=total, initial=step, desc="finetune", disable=not (progress and acc.is_main_process))
    while step < total:
        epoch = step // steps_per_epoch
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(int(seed) + epoch)).tolist()
        idx = order[(step % steps_per_epoch) * int(batch_size):][:int(batch_size)]
        mine = idx[rank::world]
        micro = [mine[i:i + int(micro_batch_size)] for i in range(0, len(mine), int(micro_batch_size))]
        torch.manual_seed(int(seed) * 1_000_003 + step)   # dropout: a resumed run replays the same masks
        loss_sum = torch.zeros((), device=acc.device)
        for k, mb in enumerate(micro):
            batch = {key: v.to(acc.device) for key, v in collate_left([examples[i] for i in mb], pad).items()}
            sync = k == len(micro) - 1
            with (acc.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()):
                loss = model(**batch).loss
                # Example-weighted mean over the global batch; DDP averages over processes, hence x world.
                acc.backward(loss * (len(mb) * world / len(idx)))
            loss_sum += loss.detach() * len(mb)
        if max_grad_norm:
            acc.clip_grad_norm_(list(trainable.values()), float(max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        mean_loss = (acc.reduce(loss_sum, reduction="sum") / len(idx)).item()
        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": mean_loss,
               "lr": sched.get_last_lr()[0]}
        logs.append(rec)
        if acc.is_main_process:
            append_jsonl(out / "train_log.jsonl", rec)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        end_epoch = step % steps_per_epoch == 0
        if step < total and ((save_steps and step % int(save_steps) == 0) or end_epoch):
            _save_checkpoint(acc, model, opt, sched, out, step, save_total_limit)
    bar.close()

    # ---- final adapter (PEFT format) in output_dir
    acc.wait_for_everyone()
    if acc.is_main_process:
        peft_model = acc.unwrap_model(model)
        with atomic_dir(out / ".final") as tmp:
            kw = {"path_initial_model_for_weight_conversion": str(pissa_init_dir)} if init == "pissa" else {}
            peft_model.save_pretrained(str(tmp), save_embedding_layers=False, **kw)
            for f in ADAPTER_FILES:
                os.replace(Path(tmp) / f, out / f)
        shutil.rmtree(out / ".final", ignore_errors=True)
        write_json(out / "finetune_args.json", {"base_model": str(base_model), "delta_path": str(delta_path) if delta_path else None,
                                                "lora_init": init, "lora_init_path": str(lora_init_path) if lora_init_path else None,
                                                "data_path": str(data_path), "steps": total, "seed": seed})
    acc.wait_for_everyone()
    return logs


def _save_checkpoint(acc, model, opt, sched, out: Path, step: int, limit: int):
    acc.wait_for_everyone()
    if acc.is_main_process:
        inner = acc.unwrap_model(model)
        state = {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}
        with atomic_dir(out / f"checkpoint-{step}") as tmp:
            save_tensors(Path(tmp) / "trainable.safetensors", state)
            torch.save(opt.state_dict(), Path(tmp) / "optimizer.pt")
            torch.save(sched.state_dict(), Path(tmp) / "scheduler.pt")
            write_json(Path(tmp) / "state.json", {"step": step})
        for _, old in checkpoints(out)[:-max(1, int(limit))]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def merge(base_model: str, lora_path: str, output_dir: str, delta_path: str | None = None, dtype="auto",
          device: str = "cpu") -> None:
    """student (+ delta merged) + trained LoRA merged -> a plain HF model directory (safetensors + tokenizer)."""

    check_model_path(base_model, "--base_model")
    check_adapter_dir(lora_path, "--lora_path")
    if delta_path:
        check_adapter_dir(delta_path, "--delta_path")
    model = build_student(base_model, delta_path, dtype, device)
    model = merge_adapter(model, lora_path)
    tokenizer = load_tokenizer(base_model)
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
