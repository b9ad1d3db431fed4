"""Every LoRA adapter of the project: how it is initialised, the delta, fine-tuning and the merge (PostPKT
steps 2-4, and the random / PiSSA baselines). See docs/postpkt.md.

Inits, named as peft names its init methods (`LoraConfig.init_lora_weights`, `LoraLayer.pissa_init`):

- `extracted_adapter(student, factors, ...)`: a LoRA whose B, A are given (PostPKT's SVD factors of teacher
  blocks, from `pkt.postpkt.extract`); `extracted_init(model, path)` re-opens such an adapter for training.
- `random_init(model, ...)`: peft's default init (A Kaiming-uniform, B = 0: the model starts unchanged).
- `pissa_init(model, ...)`: PiSSA (A, B from the principal singular vectors; the base weights lose them).

`negate_lora_A` is the delta (merging it subtracts B A). The fine-tuning loop is plain torch +
`accelerate.Accelerator`, so the same code runs on one CPU/GPU or under `accelerate launch` / `torchrun`
(DDP). One optimizer step = `batch_size // (micro_batch_size x processes)` micro-batches per process, grouped
as the reference's HF Trainer groups them (`trainer_steps`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pkt.budget import BUDGET_FILE, COUNTS, Tally, add_budgets, read_budget
from pkt.data import IGNORE, collate_left, encode_finetune, load_chat_jsonl, task_split
from pkt.io import (append_jsonl, atomic_dir, check_device, check_finite, check_model_path, check_output,
                    check_safetensors, fail, holds_run, int_flag, last_good_checkpoint, load_model, load_tokenizer,
                    non_finite, number_flag, read_json, resolve_dtype, save_model, save_tensors, scan_checkpoints,
                    truncate_log, write_json)
from pkt.model import ALL_MODULES, parse_modules

log = logging.getLogger("pkt.lora")

INITS = ("random", "pissa", "extracted")
METHODS = {"extracted": "PostPKT", "random": "LoRA", "pissa": "PiSSA"}   # pkt_budget.json's method, per init
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECKPOINT_SEP = "-"   # checkpoint-<step>/, the reference's (HF Trainer's) name
CHECKPOINT_MARKER = "state.json"


# ------------------------------------------------------------------------------------------ adapters
def check_adapter_dir(path, flag: str) -> dict:
    """An adapter directory must hold adapter_config.json + adapter_model.safetensors; returns the config."""
    p = Path(path)
    missing = [f for f in ADAPTER_FILES if not (p / f).is_file()]
    if missing:
        fail(f"{flag} {path}: not a PEFT LoRA adapter directory (missing {', '.join(missing)})")
    cfg = read_json(p / "adapter_config.json", flag)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        fail(f"{flag} {path}: peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}, "
             "expected 'LORA'")
    check_safetensors(p / ADAPTER_FILES[1], flag)
    return cfg


def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """Base-model module name (without peft's prefix) -> its LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): mod for name, mod in peft_model.named_modules()
            if isinstance(mod, LoraLayer)}


def _lora_config(modules, r: int, alpha: int, dropout: float, init=True, base_model: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=int(r), lora_alpha=int(alpha), target_modules=list(modules), lora_dropout=dropout,
                      bias="none", task_type="CAUSAL_LM", init_lora_weights=init, base_model_name_or_path=base_model)


def extracted_adapter(student, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], modules, r: int, alpha: int,
                      dropout: float = 0.05, base_model: str | None = None):
    """A PEFT LoRA on `student` whose layer `name` gets `B, A = factors[name]`: `B [out, r]`, `A [r, in]`
    (an embedding, oriented `[d, vocab]`: `B [d, r]`, `A [r, vocab]`). `student` may live on the meta device:
    only the factors are real, and `save_adapter` writes only them."""
    from peft import get_peft_model

    peft_model = get_peft_model(student, _lora_config(modules, r, alpha, dropout, base_model=base_model))
    layers = lora_layers(peft_model)
    missing = sorted(set(layers) - set(factors))
    if missing:
        fail(f"no extracted factors for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for name, (B, A) in factors.items():
        layer = layers[name]
        if "default" in layer.lora_embedding_A:                       # nn.Embedding: peft's embedding LoRA
            layer.lora_embedding_A["default"] = torch.nn.Parameter(A)   # [r, vocab]
            layer.lora_embedding_B["default"] = torch.nn.Parameter(B)   # [d, r]
        else:
            layer.lora_A["default"].weight = torch.nn.Parameter(A)       # [r, in]
            layer.lora_B["default"].weight = torch.nn.Parameter(B)       # [out, r]
    return peft_model


def save_adapter(peft_model, path, files: dict | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (+ `files`: name -> JSON) written atomically. Only the
    LoRA factors are saved (save_embedding_layers=False): the base weights may be on the meta device."""
    r = peft_model.peft_config["default"].r
    check_finite({n: t for n, t in peft_model.named_parameters() if "lora_" in n and t.device.type != "meta"},
                 f"adapter for {path}")
    with atomic_dir(path) as tmp:
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        (Path(tmp) / "README.md").unlink(missing_ok=True)   # peft's empty model card
        for name, obj in (files or {}).items():
            write_json(Path(tmp) / name, obj)
        if json.loads((Path(tmp) / "adapter_config.json").read_text()).get("r") != r:
            fail("peft wrote an unexpected adapter_config.json")


def extracted_init(model, adapter_path):
    """Open a saved (extracted) adapter on `model` for training."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)


def _check_targets(model, modules) -> None:
    missing = [m for m in modules if not any(n.endswith("." + m) or n == m for n, _ in model.named_modules())]
    if missing:
        fail(f"--lora_target_modules: the student has no module {', '.join(missing)}")


def random_init(model, modules, r: int, alpha: int, dropout: float = 0.05):
    """peft's default LoRA init: A Kaiming-uniform, B = 0 (the model starts unchanged)."""
    from peft import get_peft_model

    _check_targets(model, modules)
    return get_peft_model(model, _lora_config(modules, r, alpha, dropout, init=True))


def pissa_init(model, modules, r: int, alpha: int, dropout: float = 0.05):
    """PiSSA: B A = the top-r singular part of each targeted weight, which the base weight gives up."""
    from peft import get_peft_model

    _check_targets(model, modules)
    return get_peft_model(model, _lora_config(modules, r, alpha, dropout, init="pissa"))


def negate_lora_A(lora_path, output_path) -> int:
    """Copy the adapter in `lora_path` to `output_path` with every lora_A / lora_embedding_A negated,
    so that merging it subtracts B @ A. Returns the number of tensors negated."""
    from safetensors.torch import load_file

    src = Path(lora_path)
    check_adapter_dir(src, "--lora_path")
    weights = src / ADAPTER_FILES[1]
    tensors = load_file(str(weights))
    flipped = 0
    for k in tensors:
        if ".lora_A." in k or k.endswith(".lora_A") or "lora_embedding_A" in k:
            tensors[k] = -tensors[k]
            flipped += 1
    if not flipped:
        fail(f"--lora_path {lora_path}: no lora_A tensors found")
    with atomic_dir(output_path) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name != weights.name:
                shutil.copy2(f, Path(tmp) / f.name)
        save_tensors(Path(tmp) / weights.name, tensors, metadata={"format": "pt"})
    return flipped


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


# -------------------------------------------------------------------------------------------- delta
@dataclass
class DeltaConfig:
    """The delta adapter of an extracted LoRA (every lora_A / lora_embedding_A negated): merged into the
    student it gives W - B A, so the extracted LoRA on top starts exactly at the student.
    --output_path defaults to <lora_path>-delta; an existing output is an error unless --overwrite."""
    lora_path: str
    output_path: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        check_adapter_dir(self.lora_path, "--lora_path")
        self.output_path = self.output_path or str(self.lora_path).rstrip("/") + "-delta"
        check_output(self.output_path, "--output_path", self.overwrite, {"--lora_path": self.lora_path})


def delta(cfg: DeltaConfig) -> int:
    """Write the delta adapter; returns the number of A matrices negated."""
    n = negate_lora_A(cfg.lora_path, cfg.output_path)
    print(f"wrote {cfg.output_path} ({n} A matrices negated)")
    return n


# ---------------------------------------------------------------------------------------- fine-tune
@dataclass
class FinetuneConfig:
    """LoRA fine-tuning of the student on the reference fine-tuning text (the assistant turn ends "\\n\\n", then
    EOS), the loss on responses only unless --train_on_inputs; --add_eos_token as the reference's flag (it only
    changes how the prompt mask is measured). Optimizer steps are grouped as the reference's HF Trainer groups
    them (`trainer_steps`: 1000 examples, batch 64, micro 8, 3 epochs -> 45 steps).

    --lora_init random|pissa|extracted (default: extracted when --lora_init_path is given, else random).
    With an extracted adapter, r / alpha / target modules come from it. --data_path defaults to
    <data_dir>/<task>/<task>_train_split.jsonl. --dtype defaults to bf16 on GPU, fp32 on CPU. An output
    directory holding a run is an error unless --resume (continue it) or --overwrite (start over)."""
    base_model: str
    output_dir: str
    data_path: str | None = None
    task: str = "gsm"
    delta_path: str | None = None
    lora_init_path: str | None = None
    lora_init: str | None = None
    num_epochs: int = 3
    learning_rate: float = 3e-4
    batch_size: int = 64
    micro_batch_size: int = 8
    cutoff_len: int = 2048
    lora_target_modules: str | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 1
    max_steps: int | None = None
    resume: bool = False
    save_steps: int = 0
    save_total_limit: int = 2
    dtype: str | None = None
    gradient_checkpointing: bool = False
    train_on_inputs: bool = False
    add_eos_token: bool = False
    add_bos: bool = True
    data_dir: str = "data"
    overwrite: bool = False
    init: str = field(init=False)            # resolved: random | pissa | extracted
    modules: list = field(init=False)        # resolved target modules, r and alpha
    r: int = field(init=False)
    alpha: int = field(init=False)

    def __post_init__(self):
        self.data_path = self.data_path or str(task_split(self.task, "train", self.data_dir))
        self.init, self.modules, self.r, self.alpha = _resolve_lora(self)
        check_model_path(self.base_model, "--base_model")
        if self.delta_path:
            check_adapter_dir(self.delta_path, "--delta_path")
        if int(self.batch_size) < 1 or int(self.micro_batch_size) < 1:
            fail("--batch_size and --micro_batch_size must be >= 1")
        for flag, value, low in (("--num_epochs", self.num_epochs, 1), ("--cutoff_len", self.cutoff_len, 2),
                                 ("--save_steps", self.save_steps, 0), ("--save_total_limit", self.save_total_limit, 1),
                                 ("--lora_r", self.r, 1), ("--lora_alpha", self.alpha, 1)):
            int_flag(value, flag, low)
        int_flag(self.max_steps, "--max_steps", 1, allow_none=True)
        number_flag(self.learning_rate, "--learning_rate", 0, strict=True)
        number_flag(self.warmup_ratio, "--warmup_ratio", 0, high=1)
        number_flag(self.lora_dropout, "--lora_dropout", 0, high=1, high_strict=True)
        number_flag(self.weight_decay, "--weight_decay", 0)
        number_flag(self.max_grad_norm, "--max_grad_norm", 0)
        if self.dtype is not None:
            resolve_dtype(self.dtype)
        out = Path(self.output_dir)
        if not self.resume and not self.overwrite and holds_run(out, CHECKPOINT_SEP, CHECKPOINT_MARKER):
            fail(f"--output_dir {self.output_dir} already holds a training run: pass --resume to continue it, "
                 "--overwrite True to start over, or choose another directory")
        # Only the first process refuses a non-empty directory: the others start while it may be writing there.
        first = int(os.environ.get("RANK", "0")) == 0
        check_output(out, "--output_dir", self.overwrite or self.resume or not first, inputs={
            "--base_model": self.base_model, "--data_path": self.data_path, "--delta_path": self.delta_path,
            "--lora_init_path": self.lora_init_path})


def _resolve_lora(cfg: FinetuneConfig):
    """(init, modules, r, alpha): the extracted adapter fixes r / alpha / modules; asking for others is
    an error rather than a silent override."""
    init = cfg.lora_init or ("extracted" if cfg.lora_init_path else "random")
    if init not in INITS:
        fail(f"--lora_init {init!r}: expected one of {', '.join(INITS)}")
    modules = parse_modules(cfg.lora_target_modules, "--lora_target_modules", ALL_MODULES) \
        if cfg.lora_target_modules is not None else None
    if init == "extracted":
        if not cfg.lora_init_path:
            fail("--lora_init extracted needs --lora_init_path")
        saved_cfg = check_adapter_dir(cfg.lora_init_path, "--lora_init_path")
        got = {"--lora_r": saved_cfg["r"], "--lora_alpha": saved_cfg["lora_alpha"]}
        for flag, want in (("--lora_r", cfg.lora_r), ("--lora_alpha", cfg.lora_alpha)):
            if want is not None and int(want) != int(got[flag]):
                fail(f"{flag} {want} differs from the extracted adapter's {got[flag]}: drop the flag")
        saved = saved_cfg["target_modules"]
        saved = sorted(saved) if isinstance(saved, list) else saved
        if modules is not None and sorted(modules) != saved:
            fail(f"--lora_target_modules {','.join(modules)} differs from the extracted adapter's {saved}: "
                 "drop the flag")
        return init, saved, int(saved_cfg["r"]), int(saved_cfg["lora_alpha"])
    if cfg.lora_init_path:
        fail(f"--lora_init_path is only used with --lora_init extracted (got --lora_init {init})")
    return init, modules or list(ALL_MODULES), int(cfg.lora_r or 16), int(cfg.lora_alpha or 16)


def checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints `checkpoint-<step>` in output_dir, oldest first."""
    return scan_checkpoints(output_dir, CHECKPOINT_SEP, CHECKPOINT_MARKER)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The examples' order in one epoch: a permutation seeded by (seed, epoch). (The reference's order cannot be
    reproduced: it shuffles the data with numpy's unseeded global RNG before the Trainer's sampler.)"""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + epoch)).tolist()


def trainer_steps(n: int, micro_size: int, accum: int, num_epochs: int, seed: int, world: int = 1,
                  rank: int = 0) -> list[list[tuple[int, list[int]]]]:
    """Per optimizer step, this process's micro-batches `(epoch, example indices)`, grouped as the reference's
    HF Trainer (transformers 4.3x/4.4x) groups them. Each epoch, `epoch_order` is cut into micro-batches and
    dealt to the processes by accelerate's `BatchSamplerShard` (as accelerate prepares the Trainer's
    dataloader). The Trainer counts micro-batches over the whole run and steps after every `accum`-th, so an
    epoch's leftover micro-batches carry over into the next epoch's first step; when an epoch has no more
    than `accum` micro-batches it also steps after the epoch's last one; it stops after
    `ceil(num_epochs * max(micro-batches per epoch // accum, 1))` steps."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    def epoch_batches(epoch):
        batches = BatchSampler(epoch_order(n, seed, epoch), micro_size, drop_last=False)
        return list(BatchSamplerShard(batches, num_processes=world, process_index=rank))

    per_epoch = len(epoch_batches(0))   # the same on every process (even_batches)
    total = math.ceil(num_epochs * max(per_epoch // accum, 1))
    steps, group, seen = [], [], 0
    for epoch in range(math.ceil(num_epochs)):
        for j, mb in enumerate(epoch_batches(epoch)):
            seen += 1
            group.append((epoch, mb))
            if seen % accum == 0 or (per_epoch <= accum and j + 1 == per_epoch):
                steps.append(group)
                group = []
                if len(steps) == total:
                    return steps
    return steps


def epoch_end_steps(steps: list[list[tuple[int, list[int]]]]) -> set[int]:
    """The step counts at which the Trainer has finished an epoch (its `save_strategy="epoch"` checkpoints): after
    step i + 1 when step i + 2 ends in a later epoch (an epoch ending mid-step ends before that step)."""
    return {i + 1 for i in range(len(steps) - 1) if steps[i + 1][-1][0] > steps[i][-1][0]}


def finetune(cfg: FinetuneConfig, progress: bool = True) -> list[dict]:
    """LoRA fine-tuning with the loss on responses only; returns the log records of this run."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    if cfg.init == "extracted" and not cfg.delta_path:
        log.warning("--lora_init extracted without --delta_path: the student starts at W + B A, not at W")
    records = load_chat_jsonl(cfg.data_path)
    out = Path(cfg.output_dir)
    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: torchrun on CPU -> gloo DDP
    world, rank = acc.num_processes, acc.process_index
    batch_size, micro_size = int(cfg.batch_size), int(cfg.micro_batch_size)
    if batch_size % (micro_size * world):
        fail(f"--batch_size {batch_size} must be a multiple of --micro_batch_size x processes "
             f"({micro_size} x {world})")
    accum = batch_size // (micro_size * world)
    if cfg.overwrite and not cfg.resume and acc.is_main_process:   # start over
        for _, p in scan_checkpoints(out, CHECKPOINT_SEP):
            shutil.rmtree(p)
        shutil.rmtree(out / "pissa_init", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    done = checkpoints(out) if cfg.resume else []
    torch.manual_seed(cfg.seed)

    # ---- data: response-only labels, one fixed order per epoch (seed + epoch)
    tokenizer = load_tokenizer(cfg.base_model, "--base_model")
    examples = [encode_finetune(tokenizer, rec["messages"], int(cfg.cutoff_len), cfg.train_on_inputs,
                                cfg.add_eos_token, cfg.add_bos) for rec in records]
    # An example whose response is cut off entirely by --cutoff_len has no loss (0/0 = NaN): drop it.
    kept = [ex for ex in examples if any(t != IGNORE for t in ex["labels"][1:])]
    if len(kept) < len(examples):
        acc.print(f"warning: {len(examples) - len(kept)} example(s) have no response tokens within "
                  f"--cutoff_len {cfg.cutoff_len}: skipped")
    examples = kept
    plan = trainer_steps(len(examples), micro_size, accum, int(cfg.num_epochs), int(cfg.seed), world, rank)
    steps_per_epoch = max(len(plan) // max(int(cfg.num_epochs), 1), 1)   # for the log's epoch field
    epoch_ends = epoch_end_steps(plan)
    total = len(plan)
    if cfg.max_steps:
        total = min(total, int(cfg.max_steps))
    if total < 1:
        fail(f"{cfg.data_path}: {len(examples)} examples give no optimizer step")

    # ---- model: student (+ delta merged) with the LoRA to train
    model = build_student(cfg.base_model, cfg.delta_path, cfg.dtype, str(acc.device))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    if cfg.init == "extracted":
        model = extracted_init(model, cfg.lora_init_path)
    else:
        model = (pissa_init if cfg.init == "pissa" else random_init)(model, cfg.modules, cfg.r, cfg.alpha,
                                                                     cfg.lora_dropout)
    pissa_init_dir = out / "pissa_init"
    if cfg.init == "pissa" and acc.is_main_process and not pissa_init_dir.exists():
        # PiSSA rewrites the base weights; keep the initial adapter so the final one can be converted
        # into a plain LoRA on the unmodified student (peft's path_initial_model_for_weight_conversion).
        with atomic_dir(pissa_init_dir) as tmp:
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(str(tmp), save_embedding_layers=False)
            model.peft_config["default"].init_lora_weights = "pissa"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=float(cfg.learning_rate),
                            weight_decay=float(cfg.weight_decay))
    sched = get_linear_schedule_with_warmup(opt, math.ceil(float(cfg.warmup_ratio) * total), total)

    # ---- resume
    step = 0
    if done:
        step, ck = done[-1]
        from safetensors.torch import load_file

        check_safetensors(ck / "trainable.safetensors", "--resume")
        state = load_file(str(ck / "trainable.safetensors"))
        for n, p in trainable.items():
            p.data.copy_(state[n].to(p.device, p.dtype))
        try:
            opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location=acc.device, weights_only=True))
            sched.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True))
        except Exception as e:  # a truncated file: RuntimeError / UnpicklingError / EOFError
            fail(f"--resume {ck}: optimizer.pt / scheduler.pt unreadable ({str(e).splitlines()[0] if str(e) else e})")
        if acc.is_main_process:
            truncate_log(out / "train_log.jsonl", step + 1)
        acc.print(f"resumed from {ck} (step {step}/{total})")
    elif acc.is_main_process and (out / "train_log.jsonl").exists():
        (out / "train_log.jsonl").unlink()   # --resume before any checkpoint: start the log afresh
    # The budget: what was spent before this start (a resumed checkpoint's count, which holds the extraction's;
    # or the extraction that made the initial adapter) + this start's passes (`tally`, per process).
    method, tally = METHODS[cfg.init], Tally()
    prior = [read_budget(ck)] if done else [read_budget(cfg.lora_init_path)] if cfg.init == "extracted" else []
    if None in prior:
        acc.print(f"warning: {ck if done else cfg.lora_init_path} has no {BUDGET_FILE} (written before budgets "
                  "were kept): the compute is unknown, none is written")
    model, opt = acc.prepare(model, opt)
    model.train()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in trainable.values())
        acc.print(f"LoRA ({cfg.init}) r={cfg.r} alpha={cfg.alpha} on {','.join(cfg.modules)}: {n_train:,} "
                  f"trainable params; {total} steps of {batch_size} examples ({world} process(es) x {micro_size} "
                  f"x {accum})")

    pad = tokenizer.pad_token_id
    logs = []
    bar = tqdm(total=total, initial=step, desc="finetune", disable=not (progress and acc.is_main_process))
    while step < total:
        micro = [mb for _, mb in plan[step]]
        torch.manual_seed(int(cfg.seed) * 1_000_003 + step)   # dropout: a resumed run replays the same masks
        loss_sum = torch.zeros((), device=acc.device)
        for k, mb in enumerate(micro):
            batch = {key: v.to(acc.device) for key, v in collate_left([examples[i] for i in mb], pad).items()}
            sync = k == len(micro) - 1
            with (acc.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()):
                loss = model(**batch).loss
                # As the Trainer: each micro-batch's mean loss / accum (DDP then averages over processes).
                acc.backward(loss / accum)
            loss_sum += loss.detach()
            n_tok = int(batch["attention_mask"].sum())
            tally.student_forward_tokens += n_tok
            tally.student_backward_tokens += n_tok
            tally.examples += len(mb)
        # Every process sees the same reduced loss and the same synced gradients, so all stop together.
        mean_loss = (acc.reduce(loss_sum, reduction="sum") / (len(micro) * world)).item()
        params = list(trainable.values())
        grad_norm = float(acc.clip_grad_norm_(params, float(cfg.max_grad_norm)) if cfg.max_grad_norm else
                          torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        _check_finite_step(step + 1, out, mean_loss, grad_norm, trainable)   # before the update
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tally.optimizer_steps += 1
        _check_finite_step(step, out, weights=trainable)                     # never checkpoint a broken state
        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": mean_loss,
               "lr": sched.get_last_lr()[0]}
        logs.append(rec)
        if acc.is_main_process:
            append_jsonl(out / "train_log.jsonl", rec)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        end_epoch = step in epoch_ends
        if step < total and ((cfg.save_steps and step % int(cfg.save_steps) == 0) or end_epoch):
            _save_checkpoint(acc, model, opt, sched, out, step, cfg.save_total_limit,
                             _spent(acc, method, prior, tally))
    bar.close()

    # ---- final adapter (PEFT format) in output_dir
    acc.wait_for_everyone()
    spent = _spent(acc, method, prior, tally)
    if acc.is_main_process:
        peft_model = acc.unwrap_model(model)
        with atomic_dir(out / ".final") as tmp:
            kw = {"path_initial_model_for_weight_conversion": str(pissa_init_dir)} if cfg.init == "pissa" else {}
            peft_model.save_pretrained(str(tmp), save_embedding_layers=False, **kw)
            for f in ADAPTER_FILES:
                os.replace(Path(tmp) / f, out / f)
        shutil.rmtree(out / ".final", ignore_errors=True)
        write_json(out / "finetune_args.json", {
            "base_model": str(cfg.base_model), "delta_path": str(cfg.delta_path) if cfg.delta_path else None,
            "lora_init": cfg.init, "lora_init_path": str(cfg.lora_init_path) if cfg.lora_init_path else None,
            "data_path": str(cfg.data_path), "steps": total, "seed": cfg.seed})
        if spent is not None:
            write_json(out / BUDGET_FILE, spent)
        if logs:
            print(f"wrote {cfg.output_dir} (step {logs[-1]['step']}, loss {logs[-1]['loss']:.4f})")
    acc.wait_for_everyone()
    return logs


def _check_finite_step(step: int, out: Path, loss: float = 0.0, grad_norm: float = 0.0, weights=None):
    """Stop fine-tuning with a one-line error naming the step and the tensor when the loss, the gradient norm
    or a trainable weight is NaN/inf; nothing of this step is saved, the newest checkpoint stays the good one."""
    what = None
    if not math.isfinite(loss):
        what = f"non-finite loss {loss}"
    elif not math.isfinite(grad_norm):
        bad = non_finite({n: p.grad for n, p in (weights or {}).items()})
        what = f"non-finite gradient norm {grad_norm}" + (f" ({bad[0]})" if bad else "")
    elif weights is not None and (bad := non_finite(weights)):
        what = f"weight {bad[0]} has {bad[1]} non-finite value(s) after the update"
    if what:
        fail(f"step {step}: {what} (try a lower --learning_rate); stopped, nothing of this step saved, "
             f"{last_good_checkpoint(checkpoints(out))}")


def _spent(acc, method: str, prior: list, tally: Tally) -> dict | None:
    """The budget so far: `prior` + every process's `tally` (None when a prior count is unknown). Collective:
    every process calls it."""
    if None in prior:
        return None
    counts = acc.reduce(torch.tensor([getattr(tally, k) for k in COUNTS], device=acc.device), reduction="sum")
    counts = dict(zip(COUNTS, (int(v) for v in counts.tolist())))
    counts["optimizer_steps"] = tally.optimizer_steps      # every process takes the same steps
    return add_budgets(method, *prior, counts)


def _save_checkpoint(acc, model, opt, sched, out: Path, step: int, limit: int, budget: dict | None = None):
    acc.wait_for_everyone()
    if acc.is_main_process:
        inner = acc.unwrap_model(model)
        state = {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}
        with atomic_dir(out / f"checkpoint{CHECKPOINT_SEP}{step}") as tmp:
            if budget is not None:
                write_json(Path(tmp) / BUDGET_FILE, budget)
            save_tensors(Path(tmp) / "trainable.safetensors", state)
            torch.save(opt.state_dict(), Path(tmp) / "optimizer.pt")
            torch.save(sched.state_dict(), Path(tmp) / "scheduler.pt")
            write_json(Path(tmp) / CHECKPOINT_MARKER, {"step": step})
        for _, old in checkpoints(out)[:-max(1, int(limit))]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


# -------------------------------------------------------------------------------------------- merge
@dataclass
class MergeConfig:
    """student (+ delta merged) + trained LoRA merged -> a plain HF model directory (safetensors + tokenizer +
    the adapter's pkt_budget.json).
    --delta_path is the get_delta.py output used in fine-tuning (leave it out for random/PiSSA LoRA).
    --dtype fp32 (the reference: its base model loads in fp32 and is merged and saved so); auto = the base
    model's saved precision. --save_dtype casts the merged weights before saving (default: the merge dtype,
    as the reference; e.g. fp16 halves the size with one rounding after an fp32 merge).
    An existing output is an error unless --overwrite."""
    base_model: str
    lora_path: str
    output_dir: str
    delta_path: str | None = None
    dtype: str = "fp32"
    save_dtype: str | None = None
    device: str = "cpu"
    overwrite: bool = False

    def __post_init__(self):
        resolve_dtype(self.dtype)   # an unknown name is a one-line error
        check_device(self.device, "--device")
        if self.save_dtype is not None and str(self.save_dtype) not in ("fp32", "fp16", "bf16", "float32", "float16",
                                                                        "bfloat16"):
            fail(f"--save_dtype {self.save_dtype!r}: expected fp32, fp16 or bf16 (or leave it out: the merge dtype)")
        check_model_path(self.base_model, "--base_model")
        check_adapter_dir(self.lora_path, "--lora_path")
        if self.delta_path:
            check_adapter_dir(self.delta_path, "--delta_path")
        check_output(self.output_dir, "--output_dir", self.overwrite, inputs={
            "--base_model": self.base_model, "--lora_path": self.lora_path, "--delta_path": self.delta_path})


def merge(cfg: MergeConfig) -> None:
    """Write the merged model (no non-finite weight is ever saved) with the trained adapter's pkt_budget.json:
    the whole chain's compute (finetune counted the extraction in; the delta and the merge add no passes)."""
    budget = read_budget(cfg.lora_path)
    model = build_student(cfg.base_model, cfg.delta_path, cfg.dtype, cfg.device)
    model = merge_adapter(model, cfg.lora_path)
    if cfg.save_dtype is not None:
        model = model.to(resolve_dtype(cfg.save_dtype))
    save_model(model, cfg.output_dir, load_tokenizer(cfg.base_model, "--base_model"),
               files={BUDGET_FILE: budget} if budget else None)
    print(f"wrote {cfg.output_dir}")
