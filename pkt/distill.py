"""Knowledge distillation, the baseline a researcher would pick instead of parametric transfer: on-policy GKD
(Agarwal et al., 2024) of the teacher into a LoRA on the student, with TRL's `GKDTrainer`, as the Neural
Incompatibility authors ran it in their rebuttal (`rebuttal/Distillation`). See docs/distill.md.

A GKD step (lmbda 1, beta 0, the rebuttal's): the student samples a completion of up to `max_new_tokens` for
each prompt; teacher and student read prompt + completion; the loss is the forward KL(teacher || student) of
the next-token distributions on the completion tokens, averaged per sequence and over the micro-batches of an
optimizer step. Only the LoRA is trained; the output is the merged student (and the adapter).

What is written here and not taken from TRL, and why:
- `gkd_examples` / `collate_gkd`: the prompts the rebuttal's TRL (<= 0.16) built, a prompt cut to its first
  `max_seq_length` tokens; today's TRL collator keeps the *last* tokens instead and refuses such short windows.
- `BudgetGKDTrainer`: counts the tokens for `pkt_budget.json`, stops on a non-finite loss, and normalises the
  loss as the rebuttal's TRL did (today's divides by the reference responses' token count, which on-policy
  training never trains on).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from pkt.budget import BUDGET_FILE, COUNTS, make_budget
from pkt.data import (IGNORE, chat_prompt_response, collate_left, encode, load_chat_jsonl, task_split,
                      template_prompt_response)
from pkt.io import (atomic_dir, check_finite, check_model_path, check_output, default_device, fail, int_flag,
                    load_model, load_tokenizer, meta_model, number_flag, parse_list, save_model)
from pkt.model import LINEAR_MODULES

log = logging.getLogger("pkt.distill")

METHOD = "GKD"
CONFIG_FILE = "distill_config.json"
ADAPTER_DIR = "adapter"
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
DTYPES = ("fp32", "fp16", "bf16")
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass
class DistillConfig:
    """On-policy knowledge distillation (TRL's GKD) of --teacher into a LoRA on --student; writes the merged
    student to --output_dir (with the adapter in <output_dir>/adapter, pkt_budget.json, distill_config.json).

    Defaults are the rebuttal's settings (lmbda 1, beta 0, LoRA r 16 / alpha 16, lr 1e-5, 5 epochs,
    max_new_tokens 32, max_seq_length 64, batch 1 x gradient accumulation 16, warmup 10, cosine,
    gradient checkpointing, fp16 on CUDA). --data_path defaults to <data_dir>/<task>/<task>_train_split.jsonl;
    --max_examples keeps its first N chats. --use_chat_template: the tokenizer's template (the rebuttal's)
    instead of the `<|user|>` chat text the other methods and evaluate.py use. --truncate_prompt False keeps
    whole prompts (the rebuttal's TRL cut them to their first --max_seq_length tokens). --lora_target_modules:
    default PEFT's for the architecture (q_proj,v_proj for Llama/Qwen2). --dtype: fp16 on CUDA, fp32 on CPU.
    --max_steps overrides --num_train_epochs. --dry_run prints the memory plan only (configs suffice)."""
    teacher: str
    student: str
    output_dir: str
    task: str = "gsm"
    data_path: str | None = None
    data_dir: str = "data"
    max_examples: int | None = None
    use_chat_template: bool = False
    truncate_prompt: bool = True
    max_seq_length: int = 64
    max_new_tokens: int = 32
    lmbda: float = 1.0
    beta: float = 0.0
    temperature: float = 0.9
    seq_kd: bool = False
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str | None = None
    learning_rate: float = 1e-5
    num_train_epochs: int = 5
    max_steps: int | None = None
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    warmup_steps: int = 10
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    dtype: str | None = None
    seed: int = 42
    logging_steps: int = 1
    dry_run: bool = False
    overwrite: bool = False

    def __post_init__(self):
        for flag in ("max_seq_length", "max_new_tokens", "lora_r", "num_train_epochs",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            int_flag(getattr(self, flag), f"--{flag}", 1)
        int_flag(self.max_examples, "--max_examples", 1, allow_none=True)
        int_flag(self.max_steps, "--max_steps", 1, allow_none=True)
        int_flag(self.warmup_steps, "--warmup_steps", 0)
        int_flag(self.seed, "--seed")
        self.lmbda = number_flag(self.lmbda, "--lmbda", high=1.0)
        self.beta = number_flag(self.beta, "--beta", high=1.0)
        self.temperature = number_flag(self.temperature, "--temperature", strict=True)
        self.lora_alpha = number_flag(self.lora_alpha, "--lora_alpha", strict=True)
        self.lora_dropout = number_flag(self.lora_dropout, "--lora_dropout", high=1.0, high_strict=True)
        self.learning_rate = number_flag(self.learning_rate, "--learning_rate", strict=True)
        self.max_grad_norm = number_flag(self.max_grad_norm, "--max_grad_norm")
        if self.lr_scheduler_type not in SCHEDULERS:
            fail(f"--lr_scheduler_type {self.lr_scheduler_type!r}: expected one of {', '.join(SCHEDULERS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            fail(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.lora_target_modules is not None:
            parse_list(self.lora_target_modules, "--lora_target_modules", choices=LINEAR_MODULES)
        for flag in ("teacher", "student", "output_dir", "task", "data_dir"):
            if not isinstance(getattr(self, flag), str) or not getattr(self, flag).strip():
                fail(f"--{flag} is empty")

    @property
    def data_file(self) -> Path:
        return Path(self.data_path) if self.data_path else task_split(self.task, "train", self.data_dir)

    def target_modules(self) -> list[str] | None:
        if self.lora_target_modules is None:
            return None
        return parse_list(self.lora_target_modules, "--lora_target_modules", choices=LINEAR_MODULES)

    def resolved_dtype(self, device: str) -> str:
        """fp16 on CUDA (the rebuttal's --torch_dtype float16 --fp16), fp32 elsewhere; fp16 needs CUDA."""
        dtype = self.dtype or ("fp16" if device.startswith("cuda") else "fp32")
        if dtype == "fp16" and not device.startswith("cuda"):
            fail("--dtype fp16: fp16 mixed precision needs CUDA; use fp32 or bf16 on the CPU")
        return dtype


# ------------------------------------------------------------------------------------------- data

def gkd_examples(tokenizer, records: list[dict], max_seq_length: int, truncate_prompt: bool = True,
                 use_chat_template: bool = False) -> list[dict]:
    """Per chat record, token id lists (no BOS): `prompt_ids` (what the student continues), `input_ids` =
    prompt + reference response and `labels` (-100 over the prompt) for off-policy steps (lmbda < 1, seq_kd);
    `prompt_cut` says whether the prompt lost tokens.

    As the rebuttal's TRL collator: the chat text is cut to its first `max_seq_length` tokens and the prompt to
    as many tokens as that kept, so a prompt longer than `max_seq_length` loses its end (with it the turn
    marker). With `truncate_prompt=False` prompts stay whole and `max_seq_length` bounds the response only.
    Text: the `<|user|>` chat of pkt.data with the reply ended by EOS, or the tokenizer's template."""
    out = []
    for rec in records:
        msgs = rec["messages"]
        if use_chat_template:
            prompt, response = template_prompt_response(tokenizer, msgs)
        else:
            prompt, response = chat_prompt_response(msgs, eos=tokenizer.eos_token)
        prompt_ids = encode(tokenizer, prompt)
        if truncate_prompt:
            ids = encode(tokenizer, prompt + response)[:max_seq_length]
            prompt_ids = prompt_ids[:len(ids)]
        else:
            ids = prompt_ids + encode(tokenizer, response)[:max_seq_length]
        n = len(prompt_ids)
        out.append({"prompt_ids": prompt_ids, "input_ids": ids, "labels": [IGNORE] * n + ids[n:],
                    "prompt_cut": n < len(encode(tokenizer, prompt))})
    return out


def collate_gkd(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """GKDTrainer's batch, left-padded: input_ids / attention_mask / labels `[B, T]` and prompts /
    prompt_attention_mask `[B, P]`."""
    seq = collate_left([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch], pad_id)
    prompts = collate_left([{"input_ids": b["prompt_ids"], "labels": b["prompt_ids"]} for b in batch], pad_id)
    return {**seq, "prompts": prompts["input_ids"], "prompt_attention_mask": prompts["attention_mask"]}


# ------------------------------------------------------------------------------------------- checks

def _vocab_size(cfg) -> int:
    return cfg.get_text_config().vocab_size


def check_one_vocabulary(teacher: str, student: str, t_cfg, s_cfg, t_tok=None, s_tok=None) -> None:
    """GKD compares the two models' next-token distributions position by position, so both must read the
    student's token ids: the same token -> id map and as many output rows. One-line error naming both."""
    why = "GKD compares the teacher's and the student's next-token distributions over one tokenizer"
    if t_tok is not None and s_tok is not None:
        tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
        if tv != sv:
            diff = len(set(tv.items()) ^ set(sv.items()))
            fail(f"--teacher {teacher} and --student {student} have different vocabularies ({len(tv)} vs "
                 f"{len(sv)} tokens, {diff} token/id entries differ): {why}")
    vt, vs = _vocab_size(t_cfg), _vocab_size(s_cfg)
    if vt != vs:
        fail(f"--teacher {teacher} has vocab_size {vt} and --student {student} {vs}: {why}")


# ------------------------------------------------------------------------------------------- memory plan

def lora_config(cfg: DistillConfig, base_model: str | None = None):
    """The rebuttal's LoRA (trl's get_peft_config): r, alpha, dropout, no bias, PEFT's default targets."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules(), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model)


def memory_plan(cfg: DistillConfig, dtype: str = "fp16") -> dict:
    """(item, bytes, note) rows for one device holding teacher and student, from meta-device models (shapes
    only): weights, the LoRA with its gradients and AdamW state, the student's activations for backward,
    the logits and fp32 log-softmaxes of both models. Sequence length: prompt (<= --max_seq_length tokens,
    as the rebuttal cuts it) + --max_new_tokens. Returns {"rows", "peak_bytes"}."""
    from peft import get_peft_model

    teacher = meta_model(cfg.teacher, "--teacher")
    student = meta_model(cfg.student, "--student")
    check_one_vocabulary(cfg.teacher, cfg.student, teacher.config, student.config)
    pb = BYTES[dtype]
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    peft_student = get_peft_model(student, lora_config(cfg))
    n_lora = sum(p.numel() for p in peft_student.parameters() if p.requires_grad)
    sc, tc = student.config.get_text_config(), teacher.config.get_text_config()
    B, T, V = cfg.per_device_train_batch_size, cfg.max_seq_length + cfg.max_new_tokens, _vocab_size(sc)
    d, f, L = sc.hidden_size, sc.intermediate_size, sc.num_hidden_layers
    layer_act = B * T * (6 * d + 4 * f) * pb          # what one layer keeps for backward (sdpa attention)
    if cfg.gradient_checkpointing:
        act, act_note = L * B * T * d * pb + layer_act, f"{L} checkpointed layer inputs + one layer recomputed"
        kv, kv_note = 0, "decoding without a cache (gradient checkpointing, as TRL does)"
    else:
        act, act_note = L * layer_act, f"{L} layers x {B}x{T}"
        head_dim = getattr(sc, "head_dim", None) or d // sc.num_attention_heads
        kv = 2 * L * B * T * sc.num_key_value_heads * head_dim * pb
        kv_note = f"student KV cache, {B}x{T}"
    rows = [
        ("teacher weights", n_t * pb, f"{n_t / 1e9:.2f} B params, {dtype}, no gradients"),
        ("student weights", n_s * pb, f"{n_s / 1e9:.2f} B params, {dtype}, frozen"),
        ("LoRA + grads + AdamW (fp32)", n_lora * 16, f"{n_lora / 1e6:.2f} M params, r {cfg.lora_r}"),
        ("student activations", act, act_note),
        ("logits + fp32 log-softmax, KL and grad", B * T * V * (2 * pb + 4 * 4), f"teacher and student, {B}x{T}x{V}"),
        ("teacher forward (transient)", B * T * (6 * tc.hidden_size + 4 * tc.intermediate_size) * pb,
         "one layer at a time, no grad"),
        ("generation", kv, kv_note),
    ]
    return {"rows": rows, "peak_bytes": sum(r[1] for r in rows)}


def print_memory_plan(plan: dict, title: str) -> None:
    gib = 2 ** 30
    print(f"memory plan: {title}\n\n| item | GiB | note |\n|---|---|---|")
    for name, b, note in plan["rows"]:
        print(f"| {name} | {b / gib:.2f} | {note} |")
    print(f"| **peak (estimate)** | **{plan['peak_bytes'] / gib:.2f}** | plus the CUDA context and allocator slack |")


# ------------------------------------------------------------------------------------------- trainer

def _trainer_class():
    """GKDTrainer with the three additions of the module docstring (imported late: trl is heavy)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    class BudgetGKDTrainer(GKDTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.counts = dict.fromkeys(COUNTS, 0)

        def generate_on_policy_outputs(self, model, inputs, generation_config, *args, **kwargs):
            ids, mask, labels = super().generate_on_policy_outputs(model, inputs, generation_config, *args, **kwargs)
            teacher = model is self.teacher_model or model is self.accelerator.unwrap_model(self.teacher_model)
            # Decoding feeds the prompt and every generated token but the last (pads excluded).
            self.counts[f"{'teacher' if teacher else 'student'}_forward_tokens"] += int(mask.sum()) - ids.shape[0]
            return ids, mask, labels

        def training_step(self, model, inputs, num_items_in_batch=None):
            # num_items_in_batch=None: the loss is each micro-batch's mean over its completion tokens and the
            # Trainer divides by the accumulation steps, as in the rebuttal's TRL/transformers. Today's count
            # would be of the dataset's reference-response tokens, not of the completions trained on.
            loss = super().training_step(model, inputs, None)
            n = int(inputs["attention_mask"].sum())      # the (possibly on-policy) batch the loss read
            for key in ("student_forward_tokens", "student_backward_tokens", "teacher_forward_tokens"):
                self.counts[key] += n
            self.counts["examples"] += int(inputs["attention_mask"].shape[0])
            if not bool(torch.isfinite(loss).all()):
                fail(f"non-finite GKD loss ({float(loss):g}) in optimizer step {self.state.global_step + 1}: "
                     "training stopped, nothing was saved")
            return loss

    return BudgetGKDTrainer


def _log_callback(history: list):
    from transformers import TrainerCallback

    class TrainLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append({"step": state.global_step, "epoch": round(float(state.epoch or 0), 4),
                                "loss": float(logs["loss"]), "lr": logs.get("learning_rate"),
                                "grad_norm": logs.get("grad_norm")})

    return TrainLog()


def gkd_config(cfg: DistillConfig, work_dir: str, dtype: str):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig

    names = {f.name for f in fields(GKDConfig)}
    return GKDConfig(
        output_dir=work_dir, report_to="none", save_strategy="no", disable_dropout=True,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps or -1, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        fp16=dtype == "fp16", bf16=dtype == "bf16", dataloader_pin_memory=torch.cuda.is_available(),
        seed=cfg.seed, lmbda=cfg.lmbda, beta=cfg.beta, temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens, seq_kd=cfg.seq_kd, max_length=cfg.max_seq_length,
        # transformers >= 5.2x renames gradient_checkpointing (TRL's default: True) to activation_checkpointing
        **{"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing":
           cfg.gradient_checkpointing})


# ------------------------------------------------------------------------------------------- the run

def distill(cfg: DistillConfig):
    """Validate everything, then train and save (see DistillConfig); with --dry_run print the memory plan."""
    from datasets import Dataset
    from transformers import AutoConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_model_path(cfg.teacher, "--teacher")
    check_model_path(cfg.student, "--student")
    if cfg.dry_run:
        plan = memory_plan(cfg, cfg.dtype or "fp16")
        print_memory_plan(plan, f"GKD {cfg.teacher} -> {cfg.student}")
        return None
    dtype = cfg.resolved_dtype(default_device())
    out = check_output(cfg.output_dir, "--output_dir", cfg.overwrite,
                       inputs={"--teacher": cfg.teacher, "--student": cfg.student, "--data_path": cfg.data_file})
    records = load_chat_jsonl(cfg.data_file)[:cfg.max_examples]
    t_tok, s_tok = load_tokenizer(cfg.teacher), load_tokenizer(cfg.student)
    check_one_vocabulary(cfg.teacher, cfg.student, AutoConfig.from_pretrained(cfg.teacher),
                         AutoConfig.from_pretrained(cfg.student), t_tok, s_tok)
    s_tok.padding_side = "left"
    examples = gkd_examples(s_tok, records, cfg.max_seq_length, cfg.truncate_prompt, cfg.use_chat_template)
    cut = sum(e["prompt_cut"] for e in examples)
    if cut:
        log.warning("%d of %d prompts are longer than --max_seq_length %d and were cut to their first tokens "
                    "(the rebuttal's behaviour; --truncate_prompt False keeps them whole)", cut, len(examples),
                    cfg.max_seq_length)

    # Both models load in the compute dtype; the Trainer moves them to its device.
    teacher = load_model(cfg.teacher, dtype, "cpu", "--teacher")
    student = load_model(cfg.student, dtype, "cpu", "--student")
    history: list[dict] = []
    work_dir = tempfile.mkdtemp(prefix="pkt-distill-")
    t0 = time.time()
    try:
        trainer = _trainer_class()(
            model=student, teacher_model=teacher, args=gkd_config(cfg, work_dir, dtype),
            data_collator=functools.partial(collate_gkd, pad_id=s_tok.pad_token_id),
            train_dataset=Dataset.from_list(examples), processing_class=s_tok,
            peft_config=lora_config(cfg, cfg.student), callbacks=[_log_callback(history)])
        trainer.train()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.time() - t0
    steps = int(trainer.state.global_step)
    totals = trainer.accelerator.reduce(torch.tensor([trainer.counts[k] for k in COUNTS],
                                                     device=trainer.accelerator.device), reduction="sum")
    counts = dict(zip(COUNTS, (int(v) for v in totals.tolist())), optimizer_steps=steps)
    if not trainer.is_world_process_zero():
        return None
    budget = make_budget(METHOD, **counts)
    record = {"method": METHOD, "config": asdict(cfg), "dtype": dtype, "device": str(trainer.args.device),
              "data_path": str(cfg.data_file), "examples_in_data": len(examples), "prompts_cut": cut,
              "trl_version": _version("trl"), "transformers_version": _version("transformers"),
              "optimizer_steps": steps, "seconds": round(seconds, 2),
              "seconds_per_step": round(seconds / max(steps, 1), 3), "log": history}
    save_outputs(trainer.accelerator.unwrap_model(trainer.model), out, s_tok,
                 {BUDGET_FILE: budget, CONFIG_FILE: record})
    log.info("saved %s (%d optimizer steps, %.1fs, %.2fs/step)", out, steps, seconds, seconds / max(steps, 1))
    return None


def save_outputs(peft_model, out: Path, tokenizer, files: dict) -> None:
    """The merged student in `out` (pkt.io.save_model: refuses non-finite weights) with the adapter in
    `out/adapter`. The adapter is saved first, to a scratch directory, because merging folds the LoRA into the
    weights; it is then copied in atomically."""
    check_finite({n: p for n, p in peft_model.named_parameters() if p.requires_grad}, f"LoRA for {out}")
    scratch = tempfile.mkdtemp(prefix="pkt-distill-adapter-")
    try:
        peft_model.save_pretrained(scratch)
        merged = peft_model.merge_and_unload()
        save_model(merged, out, tokenizer, files=files)
        with atomic_dir(Path(out) / ADAPTER_DIR) as tmp:
            shutil.copytree(scratch, tmp, dirs_exist_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
