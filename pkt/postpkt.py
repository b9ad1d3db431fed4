"""PostPKT (Seeking Neural Nuggets): sensitivity, layer selection, max-sum submatrix, SVD into a LoRA.

Pipeline (see docs/postpkt.md):

1. `sensitivity`: for each seed example one forward/backward of the teacher, loss on the response
   tokens; every tracked parameter accumulates `|theta * grad|` in fp32. A post-accumulate-grad hook
   adds into the accumulator and drops `p.grad` at once, so at most one parameter's gradient is
   alive at a time (never a second full copy of the gradients).
2. `select_layers`: a layer's score is the sum over its parameters; keep the n_layers(student) best,
   ordered by index; kept teacher layer i feeds student layer i.
3. `max_sum_submatrix`: per weight, the contiguous block of the student's shape with the largest
   summed sensitivity.
4. `lora_factors`: SVD in fp32, B = U[:, :r] * S[:r], A = Vh[:r], handed (fp16) to
   `pkt.lora.extracted_adapter`, which builds and saves the PEFT adapter.

`extract(ExtractConfig)` runs the four steps end to end (`extract_lora_with_sensitivity.py` is its CLI).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from pkt.budget import BUDGET_FILE, Tally
from pkt.data import IGNORE, encode_chat, load_chat_jsonl, task_split
from pkt.io import (check_device, check_model_path, check_output, fail, int_flag, load_model, load_tokenizer,
                    meta_model, number_flag, resolve_dtype)
from pkt.lora import extracted_adapter, save_adapter
from pkt.model import ALL_MODULES, EMBED_MODULES, LINEAR_MODULES, decoder_layers, model_shape, parse_modules
from pkt.placement import main_device

log = logging.getLogger("pkt.postpkt")
EXTRACT_METHOD = "PostPKT-extract"   # pkt_budget.json of the extracted adapter

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Row chunk of the window scan: chunk * width float64 values live at once (a few of them).
SCAN_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------
# Max-sum submatrix
# ----------------------------------------------------------------------------------------------

def max_sum_submatrix(sensitivity: torch.Tensor, rows: int, cols: int,
                      chunk_elements: int = SCAN_CHUNK_ELEMENTS) -> tuple[int, int]:
    """Top-left corner (top, left) of the contiguous `rows x cols` block of `sensitivity [H, W]` with the
    largest sum; ties go to the first block in row-major order of (top, left) (the reference's scan).

    Summed-area idea, streamed: with C[k] = sum(x[:k]) (column sums of the first k rows, float64),
    the row-window sums are R[t] = C[t + rows] - C[t] for t in [0, H - rows]; a prefix sum of R along
    the columns then gives every block sum as a difference of two columns. Only the H - rows + 1
    candidate tops are ever materialised, in chunks of rows, so memory is O(chunk * W) and not a
    full float64 table of the matrix.

    Ties: every block sum is computed in float64; when the partial sums are exactly representable
    (integers, or values on a common power-of-two grid, below 2**53) all block sums are exact, so
    equal blocks compare exactly equal. Within a chunk `torch.argmax` of the flattened
    `[chunk, W - cols + 1]` window array returns the *first* maximal index, i.e. the first in
    row-major order; across chunks (scanned top to bottom) a later chunk only wins when strictly
    greater. For general real values two blocks whose true sums differ by less than float64 rounding
    (~1e-16 relative) may be ordered by rounding, as in any floating-point scan.
    """
    if sensitivity.dim() != 2:
        fail(f"max_sum_submatrix: expected a 2-D matrix, got shape {tuple(sensitivity.shape)}")
    H, W = sensitivity.shape
    rows, cols = int(rows), int(cols)
    if not (0 < rows <= H and 0 < cols <= W):
        fail(f"max_sum_submatrix: a {rows}x{cols} block does not fit in a {H}x{W} matrix")
    x = sensitivity.detach()
    f64 = torch.float64
    n_tops, n_lefts = H - rows + 1, W - cols + 1
    chunk = max(1, int(chunk_elements) // max(W, 1))

    # carry_a = C[t0], carry_b = C[t0 + rows] for the current chunk start t0.
    carry_a = torch.zeros(W, dtype=f64, device=x.device)
    carry_b = torch.zeros(W, dtype=f64, device=x.device)
    for s in range(0, rows, chunk):
        carry_b += x[s:min(s + chunk, rows)].sum(0, dtype=f64)

    best_val, best = None, (0, 0)
    zero_col = torch.zeros((1, 1), dtype=f64, device=x.device)
    for t0 in range(0, n_tops, chunk):
        n = min(chunk, n_tops - t0)
        # Exclusive prefix sums: C[t0 + j] = carry + sum(x[t0 : t0 + j]) for j in [0, n).
        a = _exclusive_rows(x[t0:t0 + n - 1], carry_a, n)
        b = _exclusive_rows(x[t0 + rows:t0 + rows + n - 1], carry_b, n)
        if t0 + n < n_tops:  # C[t0 + n] = C[t0 + n - 1] + x[t0 + n - 1]
            carry_a = a[-1] + x[t0 + n - 1].to(f64)
            carry_b = b[-1] + x[t0 + rows + n - 1].to(f64)
        band = b - a                                                     # [n, W] row-window sums
        q = torch.cat([zero_col.expand(n, 1), band.cumsum(1)], dim=1)    # [n, W + 1]
        win = q[:, cols:] - q[:, :n_lefts]                               # [n, n_lefts] block sums
        # Every entry lies in some block, and a NaN / inf entry makes the sums of the blocks holding it
        # non-finite: checking the (small) window array replaces an isfinite pass over the matrix.
        if not bool(torch.isfinite(win).all()):
            fail("max_sum_submatrix: the sensitivity matrix has NaN or infinite entries")
        flat = int(torch.argmax(win))                                    # first max, row-major
        val = win.view(-1)[flat].item()
        if best_val is None or val > best_val:
            best_val, best = val, (t0 + flat // n_lefts, flat % n_lefts)
    return best


def _exclusive_rows(x: torch.Tensor, carry: torch.Tensor, n: int) -> torch.Tensor:
    """`x [n - 1, W]` -> `[n, W]` float64 with row j = carry + sum(x[:j]) (row 0 is the carry)."""
    out = torch.empty((n, carry.shape[0]), dtype=torch.float64, device=carry.device)
    out[0] = carry
    if n > 1:
        torch.cumsum(x, dim=0, dtype=torch.float64, out=out[1:])
        out[1:] += carry
    return out


def max_sum_submatrix_bruteforce(sensitivity: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """The reference's scan: every position in a Python loop, strict `>` so the first max wins.
    Block sums are direct float64 sums (no summed-area table). For tests and the benchmark only."""
    x = sensitivity.detach().to(torch.float64)
    H, W = x.shape
    best, best_val = (0, 0), -float("inf")
    for t in range(H - rows + 1):
        for l in range(W - cols + 1):
            v = x[t:t + rows, l:l + cols].sum().item()
            if v > best_val:
                best, best_val = (t, l), v
    return best


# ----------------------------------------------------------------------------------------------
# Tokenisation, sensitivity, layer selection
# ----------------------------------------------------------------------------------------------

def sensitivity(model, examples: list[dict], params: dict[str, torch.nn.Parameter], accum_device=None,
                progress: bool = True, budget: Tally | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over examples of `|theta * dL/dtheta|` for every parameter in `params` (name -> parameter).

    `examples`: dicts of `input_ids`/`labels` lists (one backward per example; the reference's
    per-example |.| cannot be batched). Returns ({name: fp32 accumulator of the parameter's shape on
    `accum_device`, default: the parameter's own device}, number of examples used). Parameters outside
    `params` get no gradient at all. A model placed across devices (`pkt.placement`) works as is.
    `budget`: counts the model's passes (as the teacher's) and the examples used.
    """
    device = main_device(model)
    acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=accum_device or p.device)
           for name, p in params.items()}
    tracked = {id(p) for p in params.values()}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in tracked)

    def make_hook(name):
        def hook(p):
            # |theta * grad| in fp32, added in place; the gradient is freed right away.
            s = p.detach().float().mul_(p.grad.float()) if p.dtype != torch.float32 else p.detach() * p.grad
            acc[name].add_(s.abs_().to(acc[name].device, non_blocking=False))
            p.grad = None
        return hook

    handles = [p.register_post_accumulate_grad_hook(make_hook(n)) for n, p in params.items()]
    used = 0
    was_training = model.training
    model.eval()
    layers = decoder_layers(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        for layer in layers:   # HF recomputes only layers in training mode: flag those alone (no dropout elsewhere)
            layer.training = True
    try:
        for ex in tqdm(examples, desc="sensitivity", disable=not progress):
            labels = torch.tensor([ex["labels"]], device=device)
            if not bool((labels[:, 1:] != IGNORE).any()):
                log.warning("an example has no response tokens left after --cutoff_len: skipped")
                continue
            ids = torch.tensor([ex["input_ids"]], device=device)
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            loss.backward()
            used += 1
            if budget is not None:
                budget.teacher_forward_tokens += ids.shape[1]
                budget.teacher_backward_tokens += ids.shape[1]
                budget.examples += 1
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.train(was_training)
    return acc, used


def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_scores(sens: dict[str, torch.Tensor], n_layers: int) -> list[float]:
    """Per decoder layer, the sum of the accumulated sensitivity of all its parameters (float64)."""
    scores = [0.0] * n_layers
    for name, s in sens.items():
        i = layer_index(name)
        if i is not None:
            scores[i] += float(s.sum(dtype=torch.float64))
    return scores


def select_layers(scores: list[float], k: int) -> list[int]:
    """The k highest-scoring layers, in index order. Ties keep the lower index first (the reference
    sorts with Python's stable `sorted(..., reverse=True)` over layers in index order)."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return sorted(ranked[:k])


# ----------------------------------------------------------------------------------------------
# Blocks and factorisation
# ----------------------------------------------------------------------------------------------

@dataclass
class Block:
    """Where a student weight comes from: teacher weight `teacher` (as stored, `[out, in]`), possibly
    transposed first (embedding: `[vocab, d]` -> `[d, vocab]`), block at (top, left) of `shape`."""
    student: str                 # student module name, e.g. model.layers.0.self_attn.q_proj
    teacher: str                 # teacher module name
    shape: tuple[int, int]       # block shape = student weight (as oriented for the LoRA)
    transposed: bool = False


def lora_factors(block: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`block [m, n]` -> (B `[m, r]`, A `[r, n]`) fp32 with B @ A the best rank-r approximation:
    SVD in fp32, B = U[:, :r] * S[:r], A = Vh[:r]."""
    U, S, Vh = torch.linalg.svd(block.float(), full_matrices=False)
    return (U[:, :r] * S[:r]).contiguous(), Vh[:r].contiguous()


def to_fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    h = t.half()
    if not bool(torch.isfinite(h).all()):
        fail(f"{what}: values overflow fp16 (max |x| = {t.abs().max().item():.3g})")
    return h


def sensitivity_budget(shape, weight_bytes: int, cutoff_len: int, gradient_checkpointing: bool, accum_on_gpu: bool,
                       gpus: dict, cpu: int) -> dict:
    """accelerate's max_memory for a teacher of `shape` placed for the sensitivity pass: on every GPU room for
    one example's activations (by formula at `cutoff_len`, split over the GPUs as the layers are) and, with
    `accum_on_gpu`, the fp32 accumulators beside the weights; the CPU as a last resort."""
    from pkt import placement

    act = activation_bytes(shape, weight_bytes, cutoff_len, gradient_checkpointing)
    share = weight_bytes / (weight_bytes + 4) if accum_on_gpu else 1.0
    return placement.max_memory(gpus, cpu, headroom=placement.HEADROOM + act // max(1, len(gpus)), weight_share=share)


def activation_bytes(shape, weight_bytes: int, cutoff_len: int, gradient_checkpointing: bool = False) -> int:
    """Rough bytes kept for the backward of one example of `cutoff_len` tokens: per layer ~10 d + 4 ffn values
    per token (sdpa attention; d with gradient checkpointing), plus fp32 logits / log-softmax / grad."""
    T = int(cutoff_len)
    per_token = shape.hidden if gradient_checkpointing else 10 * shape.hidden + 4 * shape.ffn
    return shape.layers * T * per_token * weight_bytes + 3 * T * shape.vocab * 4


def teacher_budget(cfg) -> dict:
    """`sensitivity_budget` of `--device auto` for this run, over the visible GPUs and the free CPU memory."""
    from pkt import placement
    from pkt.io import meta_model

    shape = model_shape(meta_model(cfg.source_model, "--source_model"))
    return sensitivity_budget(shape, placement.element_size(cfg.dtype), cfg.cutoff_len, cfg.gradient_checkpointing,
                              cfg.accum_device != "cpu", placement.visible_gpus(), placement.free_cpu_memory())


def memory_plan(teacher, tracked_params: int, accum_device: str, model_device: str) -> str:
    """One-line memory note for the sensitivity pass."""
    n_all = sum(p.numel() for p in teacher.parameters())
    p_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    largest = max(p.numel() for p in teacher.parameters())
    acc_bytes = tracked_params * 4
    gib = 2 ** 30
    where = "same device" if str(accum_device) == str(model_device) else f"on {accum_device}"
    return (f"memory: teacher {n_all / 1e6:,.1f}M params = {p_bytes / gib:.2f} GiB; fp32 sensitivity "
            f"accumulators {acc_bytes / gib:.2f} GiB ({where}); live gradients <= one parameter "
            f"({largest * 4 / gib:.3f} GiB in fp32) thanks to the post-accumulate hooks; plus activations "
            f"of one example")


# ----------------------------------------------------------------------------------------------
# The extraction end to end
# ----------------------------------------------------------------------------------------------

def plan_blocks(teacher, student, layers: list[int], modules: list[str]) -> list[Block]:
    """Blocks for the LoRA of every targeted student module; fails (before any heavy work) when a
    module is missing or the student is larger than the teacher in some dimension."""
    t_mods = dict(teacher.named_modules())
    s_mods = dict(student.named_modules())
    blocks = []
    for m in modules:
        if m in EMBED_MODULES:
            t_mod = teacher.get_input_embeddings() if m == "embed_tokens" else teacher.get_output_embeddings()
            s_mod = student.get_input_embeddings() if m == "embed_tokens" else student.get_output_embeddings()
            t_name = next(n for n, mod in t_mods.items() if mod is t_mod)
            s_name = next(n for n, mod in s_mods.items() if mod is s_mod)
            tw, sw = t_mod.weight.shape, s_mod.weight.shape
            if tw[0] != sw[0]:
                fail(f"--include_embeddings needs equal vocabularies: the teacher has {tw[0]} tokens, "
                     f"the student {sw[0]}")
            transposed = m == "embed_tokens"   # [vocab, d] -> [d, vocab] (the LoRA's orientation)
            shape = (sw[1], sw[0]) if transposed else tuple(sw)
            blocks.append(Block(s_name, t_name, shape, transposed))
            continue
        suffix = "." + m
        t_layer = {layer_index(n): n for n in t_mods if n.endswith(suffix) and layer_index(n) is not None}
        s_layer = {layer_index(n): n for n in s_mods if n.endswith(suffix) and layer_index(n) is not None}
        if not t_layer or not s_layer:
            fail(f"module {m} not found in the {'teacher' if not t_layer else 'student'}")
        for j, i in enumerate(layers):
            if j not in s_layer:
                fail(f"the student has no {m} in layer {j}")
            blocks.append(Block(s_layer[j], t_layer[i], tuple(s_mods[s_layer[j]].weight.shape)))
    for b in blocks:
        tshape = tuple(t_mods[b.teacher].weight.shape)
        tshape = tshape[::-1] if b.transposed else tshape
        if b.shape[0] > tshape[0] or b.shape[1] > tshape[1]:
            fail(f"the student is wider than the teacher: {b.student} needs a {b.shape[0]}x{b.shape[1]} block "
                 f"but {b.teacher} is {tshape[0]}x{tshape[1]} (PostPKT only shrinks weights)")
    return blocks


@dataclass
class ExtractConfig:
    """Teacher sensitivity -> layers -> blocks -> SVD -> a PEFT LoRA (fp16) for the student in --output_dir,
    with selection.json and pkt_budget.json.

    --target_model (or --target_config: only the student's shapes are read); --data_path defaults to
    <data_dir>/<task>/<task>_extract_split.jsonl. --accum_device cpu keeps the fp32 accumulators off the
    GPU. --device auto places a teacher larger than one GPU across the visible GPUs (the CPU as a last
    resort), with room for the accumulators (unless --accum_device cpu) and activations; docs/gpu.md.
    --include_embeddings adds embed_tokens and lm_head (equal vocabularies needed). An existing output is
    an error unless --overwrite."""
    source_model: str
    output_dir: str
    target_model: str | None = None
    target_config: str | None = None
    task: str = "gsm"
    data_path: str | None = None
    num_examples: int | None = None
    lora_r: int = 16
    lora_alpha: int = 16
    include_embeddings: bool = False
    target_modules: str = ",".join(LINEAR_MODULES)
    dtype: str = "fp32"
    device: str | None = None
    accum_device: str | None = None
    cutoff_len: int = 2048
    add_bos: bool = True
    gradient_checkpointing: bool = False
    data_dir: str = "data"
    lora_dropout: float = 0.05
    overwrite: bool = False
    modules: list = field(init=False)        # target_modules parsed (+ the embeddings)

    def __post_init__(self):
        if (self.target_model is None) == (self.target_config is None):
            fail("give exactly one of --target_model or --target_config")
        self.data_path = self.data_path or str(task_split(self.task, "extract", self.data_dir))
        self.modules = parse_modules(self.target_modules, "--target_modules", ALL_MODULES)
        if self.include_embeddings:
            self.modules += [m for m in EMBED_MODULES if m not in self.modules]
        if int(self.lora_r) < 1:
            fail(f"--lora_r {self.lora_r}: must be >= 1")
        if self.num_examples is not None and int(self.num_examples) < 1:
            fail(f"--num_examples {self.num_examples}: must be >= 1")
        int_flag(self.lora_alpha, "--lora_alpha", 1)
        int_flag(self.cutoff_len, "--cutoff_len", 2)
        number_flag(self.lora_dropout, "--lora_dropout", 0, high=1, high_strict=True)
        resolve_dtype(self.dtype)
        check_device(self.device, "--device", allow_auto=True)   # the teacher, placed by pkt.placement
        check_device(self.accum_device, "--accum_device")
        check_model_path(self.source_model, "--source_model")
        check_model_path(self.target, self.target_flag)
        check_output(self.output_dir, "--output_dir", self.overwrite, inputs={
            "--source_model": self.source_model, self.target_flag: self.target, "--data_path": self.data_path})

    @property
    def target(self) -> str:
        return self.target_model or self.target_config

    @property
    def target_flag(self) -> str:
        return "--target_model" if self.target_model else "--target_config"


def extract(cfg: ExtractConfig) -> dict:
    """Teacher sensitivity -> layers -> blocks -> SVD -> `pkt.lora.extracted_adapter`, saved in `output_dir`
    (atomically, with selection.json). Returns the selection record."""
    # Validate everything cheap first: nothing is written when an input is wrong.
    records = load_chat_jsonl(cfg.data_path)
    if cfg.num_examples is not None:
        records = records[:int(cfg.num_examples)]
    lora_r, modules = int(cfg.lora_r), cfg.modules
    student = meta_model(cfg.target, cfg.target_flag)
    teacher_meta = meta_model(cfg.source_model, "--source_model")
    n_student = student.config.num_hidden_layers
    n_teacher = teacher_meta.config.num_hidden_layers
    if n_student > n_teacher:
        fail(f"the student has {n_student} layers, more than the teacher's {n_teacher}")
    for b in plan_blocks(teacher_meta, student, list(range(n_student)), modules):
        if lora_r > min(b.shape):
            fail(f"--lora_r {lora_r} exceeds the {b.shape[0]}x{b.shape[1]} block of {b.student}")
    del teacher_meta

    tokenizer = load_tokenizer(cfg.source_model, "--source_model")
    examples = [encode_chat(tokenizer, r["messages"], int(cfg.cutoff_len), cfg.add_bos) for r in records]
    teacher = load_model(cfg.source_model, dtype=cfg.dtype, device=cfg.device, flag="--source_model",
                         max_memory=teacher_budget(cfg) if cfg.device == "auto" else None)
    if cfg.gradient_checkpointing:
        teacher.gradient_checkpointing_enable()
        teacher.config.use_cache = False
    model_device = main_device(teacher)
    accum_device = cfg.accum_device      # None: beside each parameter (on every device of a placed teacher)

    # Track decoder-layer parameters (layer scores) and, if needed, the embedding / lm_head.
    embed_params = set()
    if cfg.include_embeddings:
        embed_params = {id(teacher.get_input_embeddings().weight), id(teacher.get_output_embeddings().weight)}
    params = {n: p for n, p in teacher.named_parameters()
              if layer_index(n) is not None or id(p) in embed_params}
    print(memory_plan(teacher, sum(p.numel() for p in params.values()), str(accum_device or model_device),
                      str(model_device)),
          flush=True)
    spent = Tally()     # the compute for pkt_budget.json (not a memory budget as `teacher_budget`)
    sens, used = sensitivity(teacher, examples, params, accum_device=accum_device, budget=spent)
    if used == 0:
        fail(f"{cfg.data_path}: no example has response tokens within --cutoff_len {cfg.cutoff_len}")

    scores = layer_scores(sens, n_teacher)
    layers = select_layers(scores, n_student)
    print(f"selected teacher layers {layers} (student layers 0..{n_student - 1})", flush=True)
    blocks = plan_blocks(teacher, student, layers, modules)
    name_of = {id(p): n for n, p in teacher.named_parameters()}
    t_mods = dict(teacher.named_modules())

    factors, record_blocks = {}, {}
    for b in tqdm(blocks, desc="submatrix + svd"):
        w = t_mods[b.teacher].weight
        s = sens[name_of[id(w)]]
        if b.transposed:
            w, s = w.t(), s.t()
        top, left = max_sum_submatrix(s, *b.shape)
        block = w[top:top + b.shape[0], left:left + b.shape[1]].detach().float()
        B, A = lora_factors(block, lora_r)
        factors[b.student] = (to_fp16(B.cpu(), b.student), to_fp16(A.cpu(), b.student))
        record_blocks[b.student] = {"teacher": b.teacher, "top": top, "left": left, "rows": b.shape[0],
                                    "cols": b.shape[1], "transposed": b.transposed,
                                    "block_sensitivity": float(s[top:top + b.shape[0], left:left + b.shape[1]]
                                                               .sum(dtype=torch.float64))}
    selection = {
        "source_model": str(cfg.source_model), "target_model": str(cfg.target), "data_path": str(cfg.data_path),
        "num_examples": used, "lora_r": lora_r, "lora_alpha": int(cfg.lora_alpha), "target_modules": modules,
        "selected_layers": layers, "layer_map": {str(i): j for j, i in enumerate(layers)},
        "layer_sensitivity": scores, "blocks": record_blocks,
    }
    # the student stays on the meta device: the adapter holds only the extracted factors
    adapter = extracted_adapter(student, factors, modules, lora_r, int(cfg.lora_alpha), cfg.lora_dropout,
                                base_model=str(cfg.target))
    save_adapter(adapter, cfg.output_dir, files={"selection.json": selection,
                                                 BUDGET_FILE: spent.record(EXTRACT_METHOD)})
    print(f"wrote {cfg.output_dir} ({len(record_blocks)} LoRA modules from {used} examples; "
          f"teacher layers {layers})")
    return selection
