"""LaTen (Locate-Then-Align, "Neural Incompatibility", ACL 2025) as library code: one training step, the
whole training run (`train`) and the transfer into a saved student (`transfer`). See docs/laten.md.

One training step, each arrow one call:

    example -> locate_pair(pair, example)             locate(teacher), locate(student): layers + ranked neurons
            -> extract(teacher, teacher_selection)    the teacher's located rows/columns
            -> align_step(translator, knowledge, ...)  translator(knowledge) -> deltas_for -> inject(student)
                                                       -> lm_loss on each align micro-batch + 1000 * MSE -> backward
            -> optimizer.step()
            -> save_checkpoint()                      checkpoint_<step>/ (translator + trainer state)

The i-th kept teacher layer feeds the i-th kept student layer and, within a layer, the i-th teacher neuron
by rank lands on the i-th student neuron by rank. Only the translator trains; teacher and student are frozen.
`train_LaTen.py` and `inference_LaTen.py` are the command lines of `train(TrainConfig)` and
`transfer(TransferConfig)`.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from knowledge_translator import KnowledgeTranslator
from modeling_llama_laten import Delta, fold, inject
from pkt.attribution import PRECISIONS, locate
from pkt.budget import BUDGET_FILE, Tally, add_budgets, read_budget
from pkt.data import load_chat_jsonl, locate_ids, micro_batches
from pkt.io import (BackgroundWriter, append_jsonl, atomic_dir, check_device, check_model_path, check_output,
                    check_safetensors, default_device, default_dtype, fail, holds_run, last_good_checkpoint, load_model,
                    load_tokenizer, non_finite, number_flag, parse_list, resolve_dtype, save_model, scan_checkpoints,
                    truncate_log, write_json)
from pkt.model import (MLP_MODULES, ROW_MODULES, TRANSFER_MODULES, Shape, attention_neuron_v_rows, decoder_layers,
                       linear, model_shape, parse_modules)

log = logging.getLogger("pkt.laten")

MSE_WEIGHT = 1000.0
TRAIN_METHOD, METHOD = "LaTen-train", "LaTen"   # pkt_budget.json of a checkpoint / of a transferred model
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_SEP = "_"   # checkpoint_<step>/, the reference's name


# ------------------------------------------------------------------------------------- the model pair
@dataclass
class ModelPair:
    """Frozen teacher and student, each with its own tokenizer; shapes are read once. `device` is the
    student's (the translator lives there); the teacher may sit elsewhere (the reference's two-GPU layout)."""
    teacher: Any
    student: Any
    teacher_tokenizer: Any
    student_tokenizer: Any
    device: Any = None
    teacher_shape: Shape = field(init=False)
    student_shape: Shape = field(init=False)

    def __post_init__(self):
        self.teacher_shape, self.student_shape = model_shape(self.teacher), model_shape(self.student)
        if self.device is None:
            self.device = self.student.lm_head.weight.device


def freeze(model):
    """Eval mode, no parameter requires grad."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_pair(source_model, target_model, dtype=None, teacher_device=None, student_device=None) -> ModelPair:
    """Teacher and student loaded frozen, both in `dtype` (None: `default_dtype` of the student's device).
    `teacher_device="auto"`: the teacher is placed across the visible GPUs (`pkt.placement`), leaving room on
    the student's GPU (default: the first) for the student and the translator's training (`memory_plan`)."""
    teacher_device = teacher_device or default_device()
    student_device = student_device or (default_device() if teacher_device == "auto" else teacher_device)
    dtype = dtype or default_dtype(student_device)
    budget = teacher_budget(source_model, target_model, dtype, student_device) if teacher_device == "auto" else None
    teacher = freeze(load_model(source_model, dtype=dtype, device=teacher_device, flag="--source_model",
                                max_memory=budget))
    student = freeze(load_model(target_model, dtype=dtype, device=student_device, flag="--target_model"))
    return ModelPair(teacher, student, load_tokenizer(source_model, "--source_model"),
                     load_tokenizer(target_model, "--target_model"), student_device)


def memory_plan(teacher_shape: Shape, student_shape: Shape, teacher_params: int, student_params: int, seq: int = 768,
                transfer_rate: float = 0.1, micro_batch_size: int = 1, weight_bytes: int = 2,
                n_modules: int = len(TRANSFER_MODULES)) -> list[tuple[str, int, str]]:
    """(item, bytes, note) of one training step on the student's device, by formula from the shapes (params
    counted on meta-device models by the caller): weights in `weight_bytes`, the translator fp32 + AdamW,
    the translated slices, the checkpointed student's activations and the locate read-out."""
    d_T, d_S, L, ffn, V = (teacher_shape.hidden, student_shape.hidden, student_shape.layers, student_shape.ffn,
                           student_shape.vocab)
    n_tr = n_modules * (d_T * d_T + d_T * d_S)
    ffn_k, attn_k = int(ffn * transfer_rate), int(d_S * transfer_rate)
    rows_k = L * (2 * ffn_k + 2 * attn_k)          # translated vectors per step: up, down, v, o
    T, B = seq, micro_batch_size
    w = {2: "bf16", 4: "fp32"}.get(weight_bytes, f"{weight_bytes} B")
    return [
        (f"teacher params ({w})", teacher_params * weight_bytes, f"{teacher_params / 1e9:.2f} B params"),
        (f"student params ({w})", student_params * weight_bytes, f"{student_params / 1e9:.2f} B params"),
        ("translator params (fp32)", n_tr * 4, f"{n_tr / 1e6:.1f} M = {n_modules} x ({d_T}x{d_T} + {d_T}x{d_S})"),
        ("translator grads (fp32)", n_tr * 4, ""),
        ("AdamW exp_avg + exp_avg_sq (fp32)", n_tr * 8, ""),
        (f"teacher slices ({w} + fp32 copy)", rows_k * d_T * (weight_bytes + 4), f"{rows_k} vectors of {d_T}"),
        ("translator activations (fp32)", rows_k * d_T * 4, "ReLU output kept for backward"),
        ("translated (shared with detached leaves) + leaf grads (fp32)", rows_k * d_S * 4 * 2,
         f"{rows_k} vectors of {d_S}"),
        ("translator backward transients (fp32)", rows_k * d_T * 4, "grad of the ReLU output"),
        (f"student activations, checkpointed ({w})", L * B * T * d_S * weight_bytes,
         f"{L} layer inputs of {B}x{T}x{d_S}"),
        (f"one recomputed student layer ({w})", B * T * (6 * d_S + 4 * ffn) * weight_bytes,
         "q,k,v,o,norms + gate,up,act,prod"),
        ("logits + fp32 loss + grad", B * T * V * (weight_bytes + 4 + 4), f"{B}x{T}x{V}"),
        ("locate: fp32 lm_head copy + score chunk", teacher_shape.vocab * d_T * 4 + 3 * (1 << 26) * 4,
         "pkt.attribution"),
    ]


def student_reserve(teacher, student, weight_bytes: int = 2) -> int:
    """Bytes the student's GPU keeps for the student and one translator training step (`memory_plan` at its
    defaults) when the teacher is placed with `--teacher_device auto` (`teacher`, `student`: meta models)."""
    items = memory_plan(model_shape(teacher), model_shape(student), sum(p.numel() for p in teacher.parameters()),
                        sum(p.numel() for p in student.parameters()), weight_bytes=weight_bytes)
    return sum(b for name, b, _ in items if not name.startswith("teacher params"))


def teacher_budget(source_model, target_model, dtype, student_device) -> dict:
    """accelerate's max_memory for a teacher placed with `--teacher_device auto`: every visible GPU (less the
    `student_reserve` on the student's) and the CPU."""
    from pkt import placement
    from pkt.io import meta_model

    return placement.beside_student(student_device, lambda: student_reserve(
        meta_model(source_model, "--source_model"), meta_model(target_model, "--target_model"),
        placement.element_size(dtype)))


def enable_checkpointing(student) -> None:
    """Gradient checkpointing through the frozen student. Non-reentrant (the inputs need no grad; the delta
    hooks carry it), and HF only checkpoints a layer whose `training` flag is set: set that flag on the
    decoder layers alone, so attention/dropout submodules stay in eval mode."""
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):  # the newer transformers 5 name
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in decoder_layers(student):
        layer.training = True


# ------------------------------------------------------------------------------------------- locate
def neuron_counts(student_shape: Shape, transfer_rate: float) -> tuple[int, int]:
    """(ffn_k, attn_k) = int(student ffn * rate), int(student hidden * rate), as the reference."""
    if not 0 < float(transfer_rate) <= 1:
        fail(f"--transfer_rate {transfer_rate}: must be in (0, 1]")
    ffn_k, attn_k = int(student_shape.ffn * transfer_rate), int(student_shape.hidden * transfer_rate)
    if ffn_k < 1 or attn_k < 1:
        fail(f"--transfer_rate {transfer_rate} selects no neurons (ffn_k={ffn_k}, attn_k={attn_k})")
    return ffn_k, attn_k


def check_pair(teacher_shape: Shape, student_shape: Shape, ffn_k: int, attn_k: int) -> None:
    """The teacher must have as many layers as the student (all student layers are used) and enough
    neurons for k; a teacher narrower than the student works (the translator maps d_T -> d_S) but is
    unusual, so it is logged."""
    if teacher_shape.layers < student_shape.layers:
        fail(f"the teacher has {teacher_shape.layers} layers, fewer than the student's {student_shape.layers}: "
             "LaTen maps one kept teacher layer to every student layer")
    if teacher_shape.ffn < ffn_k or teacher_shape.attn_neurons < attn_k:
        fail(f"the teacher has {teacher_shape.ffn} FFN / {teacher_shape.attn_neurons} attention neurons per layer, "
             f"fewer than the {ffn_k} / {attn_k} to transfer: lower --transfer_rate")
    if student_shape.attn_neurons < attn_k:
        fail(f"the student has {student_shape.attn_neurons} attention neurons per layer, fewer than {attn_k}")
    if teacher_shape.hidden < student_shape.hidden or teacher_shape.ffn < student_shape.ffn:
        log.warning("teacher (hidden %d, ffn %d) is narrower than the student (hidden %d, ffn %d): allowed, "
                    "the translator maps %d -> %d", teacher_shape.hidden, teacher_shape.ffn, student_shape.hidden,
                    student_shape.ffn, teacher_shape.hidden, student_shape.hidden)


def locate_pair(pair: ModelPair, messages, rate: float, precision: str = "fp32", use_chat_template: bool = False,
                layers=None, add_bos: bool = False, budget: Tally | None = None):
    """(teacher selection, student selection) on one example, each model reading the text with its own
    tokenizer. n_layers = student layers; k = int(student ffn * rate) FFN and int(student hidden * rate)
    attention neurons. `layers` = (teacher_sel, student_sel) forces the kept layers of an earlier selection
    (inference locates layers once, then neurons per rate). `add_bos`: read BOS + text (the reference's
    inference) instead of the text alone (its training). `budget`: counts each model's one forward pass."""
    ffn_k, attn_k = neuron_counts(pair.student_shape, rate)
    check_pair(pair.teacher_shape, pair.student_shape, ffn_k, attn_k)
    sels = []
    for i, (model, tok) in enumerate(((pair.teacher, pair.teacher_tokenizer), (pair.student, pair.student_tokenizer))):
        force = {} if layers is None else {"attn_layers": list(layers[i].attn_layers),
                                           "ffn_layers": list(layers[i].ffn_layers)}
        ids = locate_ids(tok, messages, use_chat_template=use_chat_template, add_bos=add_bos)
        sels.append(locate(model, [ids], n_layers=pair.student_shape.layers, ffn_k=ffn_k, attn_k=attn_k,
                           precision=precision, **force))
        if budget is not None:          # locate reads ids[:-1] (the last id is the read-out's target)
            if i == 0:
                budget.teacher_forward_tokens += len(ids) - 1
            else:
                budget.student_forward_tokens += len(ids) - 1
    return sels[0], sels[1]


# ------------------------------------------------------------------------ extract -> translate -> deltas
def _layers_neurons(selection, module: str) -> tuple[list[int], torch.Tensor]:
    if module in MLP_MODULES:
        return list(selection.ffn_layers), selection.ffn_neurons
    return list(selection.attn_layers), selection.attn_neurons


def _index(shape: Shape, module: str, neurons: torch.Tensor) -> torch.Tensor:
    """Weight rows/columns of ranked neurons: v_proj rows are GQA-mapped, everything else is identity."""
    neurons = neurons.long()
    return attention_neuron_v_rows(shape, neurons) if module == "v_proj" else neurons


@torch.no_grad()
def extract(model, selection, modules, shape: Shape | None = None, device=None) -> dict[str, torch.Tensor]:
    """Weight slices of the selected neurons, per kept layer in selection order, neurons in rank order.

    up_proj / v_proj rows -> `[n_layers, k, d]`; down_proj / o_proj columns -> `[n_layers, d, k]`
    (d = the model's hidden size), in the model's dtype, detached copies, on `device` (default: the model's).
    `shape`: the model's `Shape` when the caller already has it.
    """
    shape = shape or model_shape(model)
    out = {}
    for m in modules:
        layers, neurons = _layers_neurons(selection, m)
        slices = []
        for i, layer in enumerate(layers):
            w = linear(model, layer, m).weight
            device = device or w.device   # a placed teacher (--teacher_device auto) spans devices: gather on one
            index = _index(shape, m, neurons[i]).to(w.device)
            slices.append(w.index_select(0 if m in ROW_MODULES else 1, index).to(device))
        out[m] = torch.stack(slices)      # index_select and stack copy: detached from the weights
    return out


def deltas_for(student_selection, translated: dict[str, torch.Tensor], student_shape: Shape) -> list[Delta]:
    """Sparse deltas placing translated slice i of kept layer j on the student's i-th ranked neuron of its
    j-th kept layer (FFN modules: ffn_layers/ffn_neurons; attention: attn_layers/attn_neurons; v rows via the
    GQA map, where shared rows add up). `translated`: the translator's output, `[n, k, d_S]` (rows) /
    `[n, d_S, k]` (columns). Values keep their graph to the translator."""
    deltas = []
    for m, value in translated.items():
        layers, neurons = _layers_neurons(student_selection, m)
        if value.shape[0] != len(layers):
            fail(f"{m}: {value.shape[0]} translated layers for {len(layers)} kept student layers")
        for j, layer in enumerate(layers):
            deltas.append(Delta(layer=layer, module=m, index=_index(student_shape, m, neurons[j]).cpu(),
                                value=value[j]))
    return deltas


def mse_penalty(translated: dict[str, torch.Tensor], weight: float = MSE_WEIGHT, in_dtype: bool = False) -> torch.Tensor:
    """The reference's regulariser `1000 * sum over modules of mean(translated ** 2)` (MSE against 0), in fp32;
    `in_dtype`: as the reference computes it, `nn.MSELoss` on the translations in their own dtype (fp16 there:
    squares below ~6e-8 vanish), summed and weighted in that dtype."""
    if in_dtype:
        return sum(F.mse_loss(t, torch.zeros_like(t)) for t in translated.values()) * weight
    return weight * sum(t.float().pow(2).mean() for t in translated.values())


def cast_translated(translated: dict[str, torch.Tensor], dtype=None) -> dict[str, torch.Tensor]:
    """The reference's cast of the translator output (`.to(torch.float16)`) when `dtype` is given, else as is.
    The fp32 -> fp16 cast is differentiable: gradients reach the fp32 translator in fp32."""
    return translated if dtype is None else {m: t.to(dtype) for m, t in translated.items()}


def reference_dtype(model):
    """fp16 when `model` computes in fp16 (`--dtype fp16`): LaTen then follows the reference's fp16 numerics
    (translator output cast to fp16, fp16 MSE); None otherwise (fp32 translations, fp32 MSE)."""
    return torch.float16 if next(model.parameters()).dtype == torch.float16 else None


# --------------------------------------------------------------------------------------------- align
def lm_loss(student, batch) -> torch.Tensor:
    """Mean next-token loss over the micro-batch's supervised tokens (HF's causal-LM loss)."""
    dev = student.lm_head.weight.device
    return student(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                   labels=batch["labels"].to(dev), use_cache=False).loss


def align_step(translator, knowledge, student, s_sel, batches, skip_nan=False, step=0, translated_dtype=None,
               budget: Tally | None = None) -> dict:
    """Accumulate into the translator's .grad the gradient of sum over micro-batches of
    (student LM loss with the translated deltas injected + 1000 * MSE(translated, 0)), as the reference
    (summed, not averaged). `knowledge`: the extracted teacher slices (`extract`).

    The translation does not depend on the micro-batch, so it runs once per step: each micro-batch
    back-propagates into a detached copy of it, and the summed gradient then goes through the translator
    in one backward. Same gradient as re-translating per micro-batch (the reference), 1/n of the work.
    `translated_dtype` (fp16: the reference's numerics, see `reference_dtype`): the translations are cast
    to it before the MSE and the injection. Returns mean loss / lm_loss / mse_loss over the used
    micro-batches and the gradient norm. `budget`: counts the student's passes and the examples trained on."""
    s_shape = model_shape(student)
    translated = translator(knowledge)
    leaves = {m: t.detach().requires_grad_(True) for m, t in translated.items()}
    sums, used, skipped = {"loss": 0.0, "lm_loss": 0.0, "mse_loss": 0.0}, 0, 0
    for batch in batches:
        if not (batch["labels"][:, 1:] != -100).any():
            log.warning("step %d: a micro-batch has no supervised tokens (prompt >= cutoff_len): skipped", step)
            skipped += 1
            continue
        cast = cast_translated(leaves, translated_dtype)
        mse = mse_penalty(cast, in_dtype=translated_dtype is not None)
        with inject(student, deltas_for(s_sel, cast, s_shape)):
            lm = lm_loss(student, batch)
            n_tok = int(batch["attention_mask"].sum())
            if budget is not None:
                budget.student_forward_tokens += n_tok
            loss = lm + mse.to(lm.device)
            if not torch.isfinite(loss):
                if not skip_nan:
                    fail(f"step {step}: non-finite loss {loss.item()} (lm {lm.item()}, mse {mse.item()}); "
                         "pass --skip_nan_steps to skip such micro-batches as the reference does")
                log.warning("step %d: non-finite loss, micro-batch skipped", step)
                skipped += 1
                continue
            loss.backward()  # inside inject: checkpointed layers recompute with the deltas in place
        if budget is not None:
            budget.student_backward_tokens += n_tok
            budget.examples += int(batch["input_ids"].shape[0])
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


# ---------------------------------------------------------------------------------------- checkpoints
def checkpoints(save_dir, complete: bool = False) -> list[tuple[int, Path]]:
    """`(step, checkpoint_<step>/)` under save_dir, oldest first; `complete`: only those with a trainer state."""
    return scan_checkpoints(save_dir, CHECKPOINT_SEP, TRAINER_STATE if complete else None)


def resume_checkpoint(resume, save_dir) -> Path | None:
    """`--resume True` = the latest checkpoint with a trainer state under save_dir; a path = that checkpoint."""
    if resume in (None, False, "", "False", "false"):
        return None
    if resume is True or str(resume).lower() == "true":
        found = checkpoints(save_dir, complete=True)
        if not found:
            fail(f"--resume: no checkpoint_<step>/{TRAINER_STATE} under {save_dir}")
        return found[-1][1]
    p = Path(str(resume))
    if not (p / TRAINER_STATE).is_file():
        fail(f"--resume {resume}: no {TRAINER_STATE} there")
    return p


def save_checkpoint(save_dir, step: int, translator, optimizer, scheduler, order: list[int],
                    keep_all_states: bool = False, with_state: bool = True, budget: dict | None = None) -> Path:
    """checkpoint_<step>/ written now (atomically): `snapshot` + `write_checkpoint`."""
    return write_checkpoint(save_dir, snapshot(step, translator, optimizer, scheduler, order, with_state, budget),
                            keep_all_states)


def has_state(step: int, n_steps: int, save_every: int) -> bool:
    """Whether checkpoint_<step> carries the trainer state: every `save_every` steps and at the last step.
    (The translator itself is written every step, as the reference does.)"""
    return (step + 1) % save_every == 0 or step == n_steps - 1


def _cpu_copy(obj):
    """Tensors (nested in dicts/lists/tuples) copied to the CPU, everything else deep-copied: a snapshot that
    the next optimizer step, which updates its tensors in place, cannot change. CUDA tensors go to pinned
    memory without blocking (one synchronize in `snapshot`), about 25 GB/s instead of ~10 for pageable."""
    if torch.is_tensor(obj):
        t = obj.detach()
        if t.is_cuda:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return out.copy_(t, non_blocking=True)
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def snapshot(step: int, translator, optimizer, scheduler, order: list[int], with_state: bool = True,
             budget: dict | None = None) -> dict:
    """What checkpoint_<step> holds, as CPU copies taken now: the translator's weights, `budget` (the training's
    compute up to this step, for pkt_budget.json) and, `with_state`, the trainer state (optimizer, scheduler,
    Python/torch RNG as they are now, step, example order)."""
    snap = {"step": step, "translator": _cpu_copy(translator.state_dict()), "config": translator.config(),
            "trainer_state": None, "budget": budget}
    if with_state:
        snap["trainer_state"] = _cpu_copy({
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(), "step": step, "order": order})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()        # the non-blocking copies of _cpu_copy have landed
    return snap


def checkpoint_then_log(save_dir, snap: dict, keep_all_states: bool, log_path, record: dict) -> None:
    """One step's writes, in `train`'s background thread: checkpoint_<step>, then its train_log.jsonl line, so a
    log line never outlives a checkpoint that failed to write (a full disk leaves neither)."""
    write_checkpoint(save_dir, snap, keep_all_states)
    append_jsonl(log_path, record)


def write_checkpoint(save_dir, snap: dict, keep_all_states: bool = False) -> Path:
    """checkpoint_<step>/ written atomically from a `snapshot`: `translator.safetensors` + config, pkt_budget.json
    and, when the snapshot has one, `trainer_state.pt` (for `--resume`). Unless `keep_all_states`, a new trainer state
    removes the older checkpoints' ones (~1.5 GB each at 13B->7B). Safe to run in a background thread."""
    ckpt = Path(save_dir) / f"checkpoint{CHECKPOINT_SEP}{snap['step']}"
    with atomic_dir(ckpt) as tmp:
        KnowledgeTranslator.write_files(tmp, snap["translator"], snap["config"])
        if snap.get("budget") is not None:
            write_json(tmp / BUDGET_FILE, snap["budget"])
        if snap["trainer_state"] is not None:
            torch.save(snap["trainer_state"], tmp / TRAINER_STATE)
    if snap["trainer_state"] is not None and not keep_all_states:
        for s, p in checkpoints(save_dir, complete=True):
            if s != snap["step"]:
                (p / TRAINER_STATE).unlink()
    return ckpt


def restore_checkpoint(ckpt: Path, translator, optimizer, scheduler, order: list[int]) -> int:
    """Load a checkpoint's translator, optimizer, scheduler and RNG states in place; returns the step to run
    next. The run must use the same example order (extract split and seed)."""
    try:
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises RuntimeError / UnpicklingError / EOFError
        fail(f"--resume {ckpt / TRAINER_STATE}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if state.get("order") != order:
        fail(f"--resume {ckpt}: the run used another extract split or --seed (example order differs)")
    translator.load_state_dict(KnowledgeTranslator.load(ckpt).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"] + 1


# ------------------------------------------------------------------------------------------ the draws
def dataset_order(n: int) -> list[int]:
    """The permutation `datasets.Dataset.shuffle()` without a seed applies to n rows, as the reference calls
    it: the library seeds its generator from numpy's global RNG and advances that RNG one step, so
    successive calls after `set_seed` give the reference's successive shuffles."""
    from datasets import Dataset

    return list(Dataset.from_dict({"row": list(range(n))}).shuffle()["row"])


def training_orders(seed: int, n_extract: int, n_align: int) -> tuple[list[int], list[int]]:
    """(extract order, align order), drawn as the reference does: `set_seed(seed)`, then the extract split
    shuffled, then the align split. Step i locates on extract row `extract_order[i]`. Re-derived on every
    start, `--resume` included (nothing of it is persisted)."""
    from transformers import set_seed

    set_seed(seed)
    return dataset_order(n_extract), dataset_order(n_align)


def align_positions(step: int, n_rows: int, n_align: int) -> list[int]:
    """Positions in the *shuffled* align split of step's align examples: `random.seed(step)`, then
    `random.sample(range(n_rows), n_align)`, as the reference."""
    random.seed(step)
    return random.sample(range(n_rows), n_align)


def inference_row(seed: int, n: int) -> int:
    """Row of the train split inference locates on, drawn as the reference does: `set_seed(seed)`, the split
    shuffled, then `random.sample(range(n), 1)` picks a position in the shuffled split."""
    from transformers import set_seed

    set_seed(seed)
    order = dataset_order(n)
    return order[random.sample(range(n), 1)[0]]


# ------------------------------------------------------------------------------------------ training
def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        fail(f"--precision {precision}: expected {' or '.join(PRECISIONS)}")


def _check_placement(cfg) -> None:
    """--dtype, --teacher_device and --student_device of a LaTen stage."""
    if cfg.dtype is not None:
        resolve_dtype(cfg.dtype)
    check_device(cfg.teacher_device, "--teacher_device", allow_auto=True)   # pkt.placement
    check_device(cfg.student_device, "--student_device")


def check_translator_finite(translator, step: int, save_dir, what: str = "weight") -> None:
    """Stop training with a one-line error when the translator's gradients (`what="gradient"`) or weights hold
    NaN/inf. Called before the step is saved, so the newest checkpoint stays the last good one."""
    bad = non_finite({n: (p.grad if what == "gradient" else p) for n, p in translator.named_parameters()})
    if bad:
        fail(f"step {step}: translator {what} {bad[0]} has {bad[1]} non-finite value(s) (try a lower "
             f"--learning_rate); stopped, {last_good_checkpoint(checkpoints(save_dir))}")


def _check_saving(cfg) -> None:
    if isinstance(cfg.save_every, bool) or not isinstance(cfg.save_every, int) or cfg.save_every < 1:
        fail(f"--save_every {cfg.save_every!r}: expected an integer >= 1")


@dataclass
class TrainConfig:
    """Train the translator; writes <output_dir>/<translator_save_name>/checkpoint_<step>/ (with pkt_budget.json,
    the compute so far) and train_log.jsonl.

    The translator is written every step (checkpoint_<step>/translator.safetensors, as the reference);
    --save_every N: the trainer state (trainer_state.pt: optimizer/scheduler/RNG, for --resume; ~1.5 GB at
    13B->7B) goes into every N-th checkpoint and the last one (--resume continues from the newest one that
    has it; N=1 writes it every step). --background_save (default True) writes checkpoints in a background
    thread from CPU copies taken at the step, off the critical path (joined before the next write and at exit).
    --save_trainer_state last|all: keep the trainer state only in the newest checkpoint that has one (default)
    or in every one that was given one. An existing run directory is
    an error unless --resume (continue it) or --overwrite (start over: its checkpoints and log are removed).
    --dtype defaults to bf16 on CUDA, fp32 elsewhere (fp16: the reference's numerics, translator output cast to
    fp16); --gradient_checkpointing to on when the student is on CUDA. --mask_first_response_token True (the
    reference) masks the first response token's label as well; False supervises the whole response.
    --teacher_device auto places a teacher larger than one GPU across the visible GPUs (the CPU as a last
    resort), leaving room for the student on --student_device (default: the first GPU); see docs/gpu.md.
    """
    source_model: str = "meta-llama/Llama-2-13b-chat-hf"
    target_model: str = "meta-llama/Llama-2-7b-chat-hf"
    extract_data_path: str = "data/gsm/gsm_extract_split.jsonl"
    align_data_path: str = "data/gsm/gsm_align_split.jsonl"
    translator_save_name: str = "gsm"
    learning_rate: float = 3e-5
    transfer_rate: float = 0.1
    cutoff_len: int = 768
    micro_batch_size: int = 1
    train_on_inputs: bool = False
    mask_first_response_token: bool = True
    seed: int = 42
    lora_target_modules: str = "down_proj,up_proj,o_proj,v_proj"   # the reference's order (translator init draws)
    output_dir: str = "knowledge_translator/"
    n_align: int = 15
    dtype: str | None = None
    teacher_device: str | None = None
    student_device: str | None = None
    resume: bool | str | None = None
    skip_nan_steps: bool = False
    precision: str = "fp32"
    max_steps: int | None = None
    use_chat_template: bool = False
    gradient_checkpointing: bool | None = None
    save_trainer_state: str = "last"
    overwrite: bool = False
    save_every: int = 5
    background_save: bool = True
    modules: list = field(init=False, repr=False)        # lora_target_modules, parsed
    save_dir: Path = field(init=False, repr=False)       # output_dir / translator_save_name
    resume_from: Path | None = field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.transfer_rate, (int, float)) or not 0 < float(self.transfer_rate) <= 1:
            fail(f"--transfer_rate {self.transfer_rate}: must be in (0, 1]")
        self.modules = parse_modules(self.lora_target_modules, "--lora_target_modules", TRANSFER_MODULES)
        number_flag(self.learning_rate, "--learning_rate", 0, strict=True)
        _check_precision(self.precision)
        _check_placement(self)
        if self.save_trainer_state not in ("last", "all"):
            fail(f"--save_trainer_state {self.save_trainer_state}: expected last or all")
        _check_saving(self)
        if int(self.micro_batch_size) < 1 or int(self.n_align) < 0 or int(self.cutoff_len) < 2:
            fail("--micro_batch_size must be >= 1, --n_align >= 0, --cutoff_len >= 2")
        if self.max_steps is not None and int(self.max_steps) < 1:
            fail(f"--max_steps {self.max_steps}: must be >= 1")
        check_model_path(self.source_model, "--source_model")
        check_model_path(self.target_model, "--target_model")
        self.save_dir = Path(self.output_dir) / str(self.translator_save_name)
        self.resume_from = resume_checkpoint(self.resume, self.save_dir)
        if self.resume_from is None and not self.overwrite and holds_run(self.save_dir, CHECKPOINT_SEP):
            fail(f"{self.save_dir} already holds a run: pass --resume True to continue it, --overwrite True to "
                 "start over, or another --translator_save_name")
        # a run is continued or started over by design (above); anything else there needs --overwrite, and the
        # run directory is never an input
        check_output(self.save_dir, "--output_dir", self.overwrite or self.resume_from is not None, inputs={
            "--source_model": self.source_model, "--target_model": self.target_model,
            "--extract_data_path": self.extract_data_path, "--align_data_path": self.align_data_path})


def train(cfg: TrainConfig) -> str:
    """One optimizer step per example of the (shuffled) extract split; returns the run directory. Checkpoints
    are written by a `BackgroundWriter`, joined before this returns or raises."""
    with BackgroundWriter(cfg.background_save) as writer:
        return _train(cfg, writer)


def _train(cfg: TrainConfig, writer: BackgroundWriter) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extract_data = load_chat_jsonl(cfg.extract_data_path)
    align_data = load_chat_jsonl(cfg.align_data_path)
    if len(align_data) < cfg.n_align:
        fail(f"{cfg.align_data_path}: {len(align_data)} records, fewer than --n_align {cfg.n_align}")

    pair = load_pair(cfg.source_model, cfg.target_model, cfg.dtype, cfg.teacher_device, cfg.student_device)
    check_pair(pair.teacher_shape, pair.student_shape, *neuron_counts(pair.student_shape, cfg.transfer_rate))
    checkpointing = cfg.gradient_checkpointing
    if checkpointing if checkpointing is not None else str(pair.device).startswith("cuda"):
        enable_checkpointing(pair.student)

    # translator, optimizer, schedule (as the reference)
    torch.manual_seed(cfg.seed)
    translator = KnowledgeTranslator(pair.teacher_shape.hidden, pair.student_shape.hidden, cfg.modules,
                                     cfg.source_model, cfg.target_model, cfg.transfer_rate).to(pair.device).train()
    n_steps = len(extract_data) if cfg.max_steps is None else min(int(cfg.max_steps), len(extract_data))
    optimizer = torch.optim.AdamW(translator.parameters(), lr=cfg.learning_rate, weight_decay=0.05,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.learning_rate, total_steps=n_steps,
                                                    pct_start=0.1, final_div_factor=1, anneal_strategy="cos")
    order, align_order = training_orders(cfg.seed, len(extract_data), len(align_data))
    log_path = cfg.save_dir / "train_log.jsonl"
    start, budget, prior = 0, Tally(), []    # budget: this start's passes; prior: the resumed checkpoint's count
    if cfg.resume_from is not None:
        start = restore_checkpoint(cfg.resume_from, translator, optimizer, scheduler, order)
        log.info("resumed from %s: continuing at step %d of %d", cfg.resume_from, start, n_steps)
        prior = [read_budget(cfg.resume_from)]
        if prior[0] is None:
            log.warning("%s has no %s (written before budgets were kept): the run's compute is unknown, no "
                        "checkpoint of it gets one", cfg.resume_from, BUDGET_FILE)
        truncate_log(log_path, start)  # drop log lines of steps that will run again
    elif cfg.overwrite:
        for _, p in checkpoints(cfg.save_dir):
            shutil.rmtree(p)
        log_path.unlink(missing_ok=True)

    from tqdm import tqdm

    for step in tqdm(range(start, n_steps), total=n_steps, initial=start, desc="LaTen steps"):
        t0 = time.time()
        rec = extract_data[order[step]]
        t_sel, s_sel = locate_pair(pair, rec["messages"], cfg.transfer_rate, cfg.precision, cfg.use_chat_template,
                                   budget=budget)
        knowledge = extract(pair.teacher, t_sel, cfg.modules, pair.teacher_shape, device=pair.device)
        align_rows = [align_order[j] for j in align_positions(step, len(align_data), cfg.n_align)]
        batch_records = [align_data[i] for i in align_rows] + [rec]   # n_align align examples + the example
        batches = micro_batches(pair.student_tokenizer, batch_records, cfg.micro_batch_size, cfg.cutoff_len,
                                cfg.train_on_inputs, cfg.use_chat_template, cfg.mask_first_response_token)
        stats = align_step(translator, knowledge, pair.student, s_sel, batches, cfg.skip_nan_steps, step,
                           reference_dtype(pair.student), budget)
        if not math.isfinite(stats["grad_norm"]):
            check_translator_finite(translator, step, cfg.save_dir, "gradient")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        budget.optimizer_steps += 1
        snap = None     # the previous step's snapshot: its pinned blocks are reused once it is written
        writer.wait()   # that write (done by now, unless the disk is slower than a step); its error surfaces here
        check_translator_finite(translator, step, cfg.save_dir)   # never checkpoint a non-finite state
        spent = None if None in prior else add_budgets(TRAIN_METHOD, *prior, budget.record(TRAIN_METHOD))
        snap = snapshot(step, translator, optimizer, scheduler, order, has_state(step, n_steps, cfg.save_every),
                        spent)
        writer.submit(checkpoint_then_log, cfg.save_dir, snap, cfg.save_trainer_state == "all", log_path, {
            "step": step, "loss": stats["loss"], "lm_loss": stats["lm_loss"], "mse_loss": stats["mse_loss"],
            "lr": lr, "seconds": round(time.time() - t0, 3),
            "teacher_ffn_layers": list(t_sel.ffn_layers), "student_ffn_layers": list(s_sel.ffn_layers),
            "teacher_attn_layers": list(t_sel.attn_layers), "student_attn_layers": list(s_sel.attn_layers),
            "example_id": rec.get("id", f"extract:{order[step]}"), "grad_norm": stats["grad_norm"],
            "align_example_ids": [align_data[i].get("id", f"align:{i}") for i in align_rows],
            "micro_batches": stats["micro_batches"], "skipped_micro_batches": stats["skipped_micro_batches"]})
    writer.wait()       # the last checkpoint and its log line are on disk
    log.info("done: %s", cfg.save_dir)
    print(cfg.save_dir)
    return str(cfg.save_dir)


# ------------------------------------------------------------------------------------------ transfer
def rate_name(rate: float) -> str:
    """The reference's `rate * 100` naming (10.0%), rounded so 0.3 gives 30.0 and not 30.000000000000004."""
    return f"{round(rate * 100, 6)}"


def transfer_dir(output_dir, target_model, rate: float, step: int) -> Path:
    """<output_dir>/<target name>-transfer_rate<rate*100>%-step<step> (the reference's name)."""
    return Path(output_dir) / f"{Path(str(target_model).rstrip('/')).name}-transfer_rate{rate_name(rate)}%-step{step}"


@dataclass
class TransferConfig:
    """Writes <output_dir>/<target name>-transfer_rate<rate*100>%-step<step>/ (model, tokenizer,
    laten_transfer.json, pkt_budget.json) for every rate and step; returns the list of written directories.
    --transfer_rates / --steps: lists ('[0.1,0.3]' or 0.1,0.3); the defaults are the reference script's ([0.1],
    [0]). --locate_with_bos True (the reference's inference tokenizer) locates on BOS + text; False on the
    text alone, as training does. An existing output is an error unless --overwrite.
    --teacher_device auto places the teacher across the visible GPUs (see train's help and docs/gpu.md).
    """
    source_model: str = "meta-llama/Llama-2-13b-chat-hf"
    target_model: str = "meta-llama/Llama-2-7b-chat-hf"
    data_path: str = "data/gsm/gsm_train_split.jsonl"
    translator_checkpoints: str = "knowledge_translator/gsm"
    transfer_rates: str = "0.1"
    steps: str = "0"
    seed: int = 42
    output_dir: str = "outputs/laten"
    dtype: str | None = None
    precision: str = "fp32"
    teacher_device: str | None = None
    student_device: str | None = None
    use_chat_template: bool = False
    locate_with_bos: bool = True
    overwrite: bool = False
    rates: list = field(init=False, repr=False)          # transfer_rates, parsed
    checkpoint_steps: list = field(init=False, repr=False)

    def __post_init__(self):
        self.rates = parse_list(self.transfer_rates, "--transfer_rates", float)
        self.checkpoint_steps = parse_list(self.steps, "--steps", int)
        for r in self.rates:
            if not 0 < r <= 1:
                fail(f"--transfer_rates: {r} must be in (0, 1]")
        _check_precision(self.precision)
        _check_placement(self)
        for s in self.checkpoint_steps:
            weights = self.checkpoint(s) / "translator.safetensors"
            if not weights.is_file():
                fail(f"--translator_checkpoints {self.translator_checkpoints}: no checkpoint_{s}/translator.safetensors")
            check_safetensors(weights, "--translator_checkpoints")
        check_model_path(self.source_model, "--source_model")
        check_model_path(self.target_model, "--target_model")
        inputs = {"--source_model": self.source_model, "--target_model": self.target_model,
                  "--data_path": self.data_path, "--translator_checkpoints": self.translator_checkpoints}
        for r in self.rates:
            for s in self.checkpoint_steps:
                check_output(transfer_dir(self.output_dir, self.target_model, r, s), "--output_dir", self.overwrite,
                             inputs)

    def checkpoint(self, step: int) -> Path:
        return Path(self.translator_checkpoints) / f"checkpoint{CHECKPOINT_SEP}{step}"


@torch.no_grad()
def _restore(student, pristine: dict) -> None:
    for (layer, module), w in pristine.items():
        linear(student, layer, module).weight.copy_(w)


def transfer(cfg: TransferConfig) -> list[str]:
    """Fuse trained translators into the student: one saved HF model per (transfer rate, step).

        seed example (`inference_row`: set_seed, datasets shuffle, random.sample) -> locate layers once
        for each rate: locate neurons at that rate in those layers, extract the teacher's slices
            for each translator step: translator(slices) (no grad) -> fold the deltas into the student as
            loaded -> save_model
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = load_chat_jsonl(cfg.data_path)
    trained = {s: read_budget(cfg.checkpoint(s)) for s in cfg.checkpoint_steps}   # each step's training compute
    for s in (s for s, b in trained.items() if b is None):
        log.warning("%s has no %s (trained before budgets were kept): its transferred models get none",
                    cfg.checkpoint(s), BUDGET_FILE)
    pair = load_pair(cfg.source_model, cfg.target_model, cfg.dtype, cfg.teacher_device, cfg.student_device)
    t_shape, s_shape = pair.teacher_shape, pair.student_shape
    translators = {s: KnowledgeTranslator.load(cfg.checkpoint(s), device=pair.device).eval()
                   for s in cfg.checkpoint_steps}
    for s, tr in translators.items():
        bad = non_finite(tr)
        if bad:
            fail(f"--translator_checkpoints {cfg.checkpoint(s)}: {bad[0]} has {bad[1]} non-finite value(s) "
                 "(a diverged run); nothing was saved")
        if (tr.d_T, tr.d_S) != (t_shape.hidden, s_shape.hidden):
            fail(f"checkpoint_{s}: translator maps {tr.d_T} -> {tr.d_S}, the models need "
                 f"{t_shape.hidden} -> {s_shape.hidden}")
    modules = list(dict.fromkeys(m for tr in translators.values() for m in tr.modules_))
    # The student's editable weights as loaded (a CPU copy): every (rate, step) starts from them, so
    # transfers never compound.
    pristine = {(l, m): linear(pair.student, l, m).weight.detach().to("cpu", copy=True)
                for l in range(s_shape.layers) for m in TRANSFER_MODULES}

    idx = inference_row(cfg.seed, len(data))
    rec = data[idx]
    example_id = rec.get("id", f"train:{idx}")
    # layers once (at the first rate; layer scores do not depend on k), then neurons per rate in those layers.
    # The budget counts one forward of each model on the seed example: the per-rate locates repeat that same
    # forward (same ids, same weights), which pkt_budget.json does not count.
    spent = Tally(examples=1)
    layer_sel = locate_pair(pair, rec["messages"], cfg.rates[0], cfg.precision, cfg.use_chat_template,
                            add_bos=cfg.locate_with_bos, budget=spent)
    written = []
    for rate in cfg.rates:
        t_sel, s_sel = locate_pair(pair, rec["messages"], rate, cfg.precision, cfg.use_chat_template,
                                   layers=layer_sel, add_bos=cfg.locate_with_bos)
        knowledge = extract(pair.teacher, t_sel, modules, t_shape, device=pair.device)
        for step, translator in translators.items():
            with torch.no_grad():
                deltas = deltas_for(s_sel, cast_translated(translator(knowledge), reference_dtype(pair.student)),
                                    s_shape)
            _restore(pair.student, pristine)
            fold(pair.student, deltas)
            out = transfer_dir(cfg.output_dir, cfg.target_model, rate, step)
            files = {} if trained[step] is None else {
                BUDGET_FILE: add_budgets(METHOD, trained[step], spent.record(METHOD))}
            save_model(pair.student, out, pair.student_tokenizer, files={**files, "laten_transfer.json": {
                "source_model": cfg.source_model, "target_model": cfg.target_model, "step": step,
                "transfer_rate": rate, "seed": cfg.seed, "seed_example_id": example_id,
                "teacher_ffn_layers": list(t_sel.ffn_layers), "student_ffn_layers": list(s_sel.ffn_layers),
                "teacher_attn_layers": list(t_sel.attn_layers), "student_attn_layers": list(s_sel.attn_layers),
                "student_ffn_neurons": s_sel.ffn_neurons.tolist(),
                "student_attn_neurons": s_sel.attn_neurons.tolist(),
                "student_v_rows": attention_neuron_v_rows(s_shape, s_sel.attn_neurons.long()).tolist(),
                "intermediate_size": s_shape.ffn, "hidden_size": s_shape.hidden,
                "modules": list(translator.modules_), "translator_checkpoint": str(cfg.checkpoint(step)),
                "precision": cfg.precision, "locate_with_bos": cfg.locate_with_bos}})
            log.info("saved %s", out)
            written.append(str(out))
    _restore(pair.student, pristine)
    print("\n".join(written))
    return written
