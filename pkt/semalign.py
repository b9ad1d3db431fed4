"""SemAlign (Gu, Aleti, Chen, Zhang, *Beyond Neural Incompatibility*, arXiv 2510.24208): the teacher's
layer outputs, read through its vocabulary and rebuilt in the student's, supervise the student's layers.
See docs/semalign.md; section numbers below are those of the v1 text (28 Oct 2025).

v1 (the default, the published method):
  1. `semantic_bases` (Sec. 3.1): unit-normalised columns of `pinv(W_U)`, `[d, V]` fp32, cached per model
     (`cached_bases`, keyed by the unembedding's bytes).
  2. `alignment_map` (Sec. 4.2, eqs. 1-2): decomposition `a = S_Tᵀ h/||h||`, recomposition `S_S a`, fused into one
     fixed `M = S_S S_Tᵀ` `[d_S, d_T]`; `align(h, M) = M h/||h||`. Over the token strings both vocabularies hold
     (`shared_vocab`).
  3. `layer_attribution` (Sec. 4.1): Layer Gradient x Activation on every teacher layer -> one score per layer.
  4. `base_pairing`, `v1_pairs` (Sec. 4.1): `l_T(k) = max(1, floor(L_T k / L_S))`; a critical teacher layer goes to
     `k† = min{k : l_T(k) >= l*}`; interpolation at k† when `L_T / L_S` is not an integer.
  5. `v1_loss_sums` (Sec. 4.3): `(1 - cos(u_S, target)) + (1 - cos(z, onehot(y)))` over supervised positions, `u`
     the decoder layer's whole update `h_out - h_in`; only the paired layer(s) train (`train_layers`).
v2 (`v2_pairs`, `relation_loss`, `output_kl`, `v2_micro_loss`): a reading of the v2 abstract only (frontier
schedule, one source layer per target layer, relation geometry + output KL); not the published method.
The stage: `SemAlignConfig` (the flags, checked in `__post_init__`) -> `train(cfg)` (train_SemAlign.py);
`print_memory_plans` for --dry_run.

Depths: depth d is the residual stream after `model.layers[d-1]` (the paper's 1-based layer d), 0 the
embedding output (pkt.model). Everything runs through forward hooks on stock Hugging Face models.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pkt.budget import BUDGET_FILE, Tally
from pkt.data import IGNORE, collate_left, load_chat_jsonl, tokenize_example
from pkt.io import (
    check_device,
    check_model_path,
    check_output,
    default_device,
    default_dtype,
    fail,
    int_flag,
    load_model,
    load_tokenizer,
    number_flag,
    resolve_dtype,
    save_model,
    save_tensors,
    write_jsonl,
)
from pkt.model import decoder_layers, residual_stream, run_until, unembedding

log = logging.getLogger("pkt.semalign")

PAPER_V1 = "arXiv 2510.24208v1 (28 Oct 2025), Sec. 3-4 and App. A"
V2_READING = ("a reading of the arXiv 2510.24208v2 abstract (May 2026): its formulas are not published; "
              "this is not the published method")
VARIANTS = ("v1", "v2")
CRITICAL_PAIRINGS = ("literal", "critical")
ATTRIBUTION_SIGNS = ("abs", "signed")
ATTRIBUTION_REDUCES = ("mean", "sum")
ATTRIBUTION_TOKENS = ("all", "supervised")
ATTRIBUTION_AT = ("output", "update")
ALIGN_POSITIONS = ("supervised", "all")
LR_SCHEDULES = ("linear", "constant")


def _device(model) -> torch.device:
    """Where a model's read-outs run: its LM head's device (for a teacher placed over several devices with
    --teacher_device auto, accelerate's hooks move each layer's inputs to that layer's device)."""
    return unembedding(model).device


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token prediction the LM loss supervises: `sel[:, t] = labels[:, t+1] != -100`, the
    last position never. `labels: [B, T]` -> `[B, T]` bool."""
    sel = torch.zeros_like(labels, dtype=torch.bool)
    sel[:, :-1] = labels[:, 1:] != IGNORE
    return sel


def positions(labels: torch.Tensor, mask: torch.Tensor, which: str) -> torch.Tensor:
    """`supervised` (see `supervised_positions`) or `all` non-pad tokens -> `[B, T]` bool."""
    return supervised_positions(labels) if which == "supervised" else mask.bool()


def n_supervised(example: dict) -> int:
    """Supervised positions of one tokenised example (`{input_ids, labels}` lists)."""
    return sum(t != IGNORE for t in example["labels"][1:])


# ------------------------------------------------------------------------------ shared vocabulary
@dataclass
class SharedVocab:
    """The token strings both tokenizers hold: column `teacher_ids[j]` of the teacher's bases and
    `student_ids[j]` of the student's mean the same token. `input_map[s]` = the teacher id of student id s (-1:
    none), None when every student token has the same id in the teacher."""
    teacher_ids: torch.Tensor
    student_ids: torch.Tensor
    teacher_only: list[str]
    student_only: list[str]
    input_map: torch.Tensor | None

    @property
    def size(self) -> int:
        return len(self.teacher_ids)

    def record(self) -> dict:
        return {"shared_tokens": self.size, "teacher_only_tokens": len(self.teacher_only),
                "student_only_tokens": len(self.student_only), "teacher_only": self.teacher_only[:20],
                "student_only": self.student_only[:20], "same_ids": self.input_map is None}


def shared_vocab(t_tok, s_tok, t_rows: int, s_rows: int) -> SharedVocab:
    """Pair the token ids whose token strings are equal in both tokenizers (ids below each model's unembedding
    rows `t_rows` / `s_rows`). WizardCoder-13B-Python's 32,001st token, for example, has no student partner and
    is left out. No common token at all is a one-line error."""
    tv = {s: i for s, i in t_tok.get_vocab().items() if i < t_rows}
    sv = {s: i for s, i in s_tok.get_vocab().items() if i < s_rows}
    common = sorted((sv[s], tv[s]) for s in sv.keys() & tv.keys())
    if not common:
        fail("--source_model and --target_model share no token string: SemAlign aligns teacher and student over "
             "the tokens both vocabularies contain")
    s_ids = torch.tensor([c[0] for c in common], dtype=torch.long)
    t_ids = torch.tensor([c[1] for c in common], dtype=torch.long)
    same = len(common) == len(sv) and bool((s_ids == t_ids).all())
    imap = None
    if not same:
        imap = torch.full((s_rows,), -1, dtype=torch.long)
        imap[s_ids] = t_ids
    return SharedVocab(t_ids, s_ids, sorted(tv.keys() - sv.keys(), key=tv.get),
                       sorted(sv.keys() - tv.keys(), key=sv.get), imap)


def check_teacher_reads(examples: list[dict], vocab: SharedVocab, s_tok, what: str) -> None:
    """Teacher and student read the same token sequence (position t means the same token on both sides): every
    token of the data must exist in the teacher's vocabulary, else a one-line error naming the example."""
    if vocab.input_map is None:
        return
    for n, ex in enumerate(examples, 1):
        ids = torch.tensor(ex["input_ids"])
        bad = vocab.input_map[ids] < 0
        if bad.any():
            tok = s_tok.convert_ids_to_tokens(int(ids[bad][0]))
            fail(f"{what}: example {n} has the token {tok!r}, which the teacher's vocabulary lacks")


def teacher_batch(batch: dict, vocab: SharedVocab | None) -> dict:
    """The student's batch in teacher ids (labels too; pads map to 0, they are masked)."""
    if vocab is None or vocab.input_map is None:
        return batch
    imap = vocab.input_map
    ids = imap[batch["input_ids"]].clamp_min(0)
    labels = torch.where(batch["labels"] == IGNORE, batch["labels"], imap[batch["labels"].clamp_min(0)])
    return {**batch, "input_ids": ids, "labels": labels}


def _to(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device))


# ------------------------------------------------------------------------ 1. semantic bases (Sec. 3.1)
def semantic_bases(W_U: torch.Tensor) -> torch.Tensor:
    """Semantic bases of a model with unembedding `W_U: [V, d]`: column i of `pinv(W_U)` `[d, V]` is the
    least-squares hidden vector whose logits are the one-hot e_i; every column normalised to unit L2 norm.
    fp32, on W_U's device."""
    P = torch.linalg.pinv(W_U.detach().float())
    return P / P.norm(dim=0, keepdim=True).clamp_min(1e-30)


def bases_key(W_U: torch.Tensor) -> str:
    """sha256 of the unembedding's shape, dtype and bytes: the cache key of its bases (another model, or the
    same one in another dtype, never reuses them)."""
    w = W_U.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(w.shape)} {w.dtype}".encode())
    h.update(memoryview(w.view(torch.uint8).numpy()))
    return h.hexdigest()


def cached_bases(model, cache_dir, key: str | None = None) -> torch.Tensor:
    """`semantic_bases` of the model's unembedding, computed once and kept in `cache_dir` as
    `bases-<sha256>.safetensors` -> `[d, V]` fp32 on the model's device (`key`: its `bases_key`, when the
    caller has it). A cache file that does not load or does not match is recomputed (with a warning)."""
    from safetensors import safe_open

    W = unembedding(model)
    key = key or bases_key(W)
    path = Path(cache_dir) / f"bases-{key[:40]}.safetensors"
    shape = (W.shape[1], W.shape[0])
    if path.exists():
        try:
            with safe_open(str(path), "pt", device=str(W.device)) as f:
                if (f.metadata() or {}).get("sha256") == key:
                    S = f.get_tensor("bases")
                    if tuple(S.shape) == shape and S.dtype == torch.float32:
                        log.info("semantic bases %s from %s", list(shape), path)
                        return S
        except Exception as e:  # a torn or foreign file: recompute it
            log.warning("%s: unreadable bases cache (%s): recomputing", path, e)
    t0 = time.time()
    S = semantic_bases(W)
    save_tensors(path, {"bases": S}, metadata={"sha256": key, "shape": str(list(shape))})
    log.info("semantic bases %s computed in %.1fs, cached in %s", list(shape), time.time() - t0, path)
    return S


# -------------------------------------------------------------- 2. alignment map (Sec. 4.2, eqs. 1-2)
def decompose(h: torch.Tensor, S_T: torch.Tensor) -> torch.Tensor:
    """Eq. 1: semantic coefficients, the cosines of h with the teacher's unit bases: `S_Tᵀ h / ||h||`.
    `h: [..., d_T]`, `S_T: [d_T, m]` -> `[..., m]` fp32."""
    h = h.float()
    return (h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ S_T


def recompose(a: torch.Tensor, S_S: torch.Tensor) -> torch.Tensor:
    """Eq. 2: the same coefficients on the student's bases: `S_S a`. `a: [..., m]`, `S_S: [d_S, m]` -> `[..., d_S]`."""
    return a.float() @ S_S.T


def alignment_map(S_T: torch.Tensor, S_S: torch.Tensor, vocab: SharedVocab | None = None) -> torch.Tensor:
    """Decomposition then recomposition as one fixed operator `M = S_S S_Tᵀ` `[d_S, d_T]` (fp32, on S_T's
    device), over the shared tokens when `vocab` is given: `recompose(decompose(h)) = align(h, M)`, and no
    `[tokens, V]` tensor is ever built."""
    if vocab is not None:
        S_T = S_T[:, vocab.teacher_ids.to(S_T.device)]
        S_S = S_S[:, vocab.student_ids.to(S_S.device)]
    if S_T.shape[1] != S_S.shape[1]:
        fail(f"semantic bases over different vocabularies ({S_T.shape[1]} vs {S_S.shape[1]} columns)")
    return S_S.to(S_T.device, torch.float32) @ S_T.float().T


def align(h: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Teacher vectors `[..., d_T]` -> supervisory vectors in the student's space `M h / ||h||` `[..., d_S]`
    (fp32, on M's device)."""
    h = h.to(M.device, torch.float32)
    return (h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ M.T


# ------------------------------------------------------------------------ 3. attribution (Sec. 4.1)
def layer_attribution(model, batches: list[dict], sign: str = "abs", reduce: str = "mean", tokens: str = "all",
                      at: str = "output", progress: bool = True, budget: Tally | None = None) -> torch.Tensor:
    """Layer Gradient x Activation (Captum's `LayerGradientXActivation` on each decoder layer) -> `[L]` fp32 CPU,
    entry l-1 for the paper's layer l. For example n with next-token loss `L_n` (mean over its supervised
    tokens) and activation `x_l` (`at="output"`: the layer's output h_l; `"update"`: its update h_l - h_(l-1)):

        per token  e[n, t] = sum_d |x_l * dL_n/dh_l|   (sign="abs")   or   sum_d x_l * dL_n/dh_l   ("signed")
        per layer  mean (or sum, `reduce`) over the tokens (`tokens`: all non-pad, or the supervised positions),
                   then mean (or sum) over the examples.

    The signed sum at the last layer is ~0 for every input (the final RMSNorm is scale invariant, so
    `h . dL/dh = 0` there): "abs" keeps it comparable. One forward + backward per batch on `sum_n L_n`, so each
    example's gradient is its own and nothing depends on batching or padding; no parameter gradients."""
    from tqdm import tqdm

    L = len(decoder_layers(model))
    dev = _device(model)
    total = torch.zeros(L, dtype=torch.float64)
    count = 0
    for batch in tqdm(batches, desc="attribution", disable=not progress, leave=False):
        ids, mask, labels = _to(batch, dev)
        sup = supervised_positions(labels)
        n_sup = sup.sum(1)
        valid = n_sup > 0
        if not valid.any():
            continue
        depths = range(0 if at == "update" else 1, L + 1)
        with torch.enable_grad(), residual_stream(model, depths, leaf_embeddings=True) as hs:
            h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            z = model.get_output_embeddings()(h[sup])                                    # [N, V]
            ce = F.cross_entropy(z.float(), labels[:, 1:][sup[:, :-1]], reduction="none")
            per_ex = torch.zeros(len(ids), device=dev).index_add_(0, sup.nonzero()[:, 0], ce)
            loss = (per_ex[valid] / n_sup[valid]).sum()
            acts = [hs[d] for d in range(1, L + 1)]
            grads = torch.autograd.grad(loss, acts)
        keep = (mask.bool() if tokens == "all" else sup) & valid[:, None]
        n_tok = keep.sum(1).clamp_min(1)
        with torch.no_grad():
            for i, g in enumerate(grads):   # on the read-out's device (a placed teacher spans several)
                x = acts[i].to(dev, torch.float32) - (hs[i].to(dev, torch.float32) if at == "update" else 0.0)
                e = x * g.to(dev, torch.float32)
                e = (e.abs() if sign == "abs" else e).sum(-1)                           # [B, T]
                per = torch.where(keep, e, torch.zeros_like(e)).sum(1)
                if reduce == "mean":
                    per = per / n_tok
                total[i] += per[valid].double().sum().cpu()
        count += int(valid.sum())
        if budget is not None:
            budget.teacher_forward_tokens += int(mask.sum())
            budget.teacher_backward_tokens += int(mask.sum())
        del acts, grads, z, h, hs
    if count == 0:
        fail("layer attribution: no example has a supervised token (prompts longer than --cutoff_len?)")
    return (total / (count if reduce == "mean" else 1)).float()


def critical_layers(scores: torch.Tensor, n: int) -> list[int]:
    """The n teacher layers (1-based) with the highest attribution, most important first (ties: shallower)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return [i + 1 for i in order[:max(0, int(n))]]


# ------------------------------------------------------------------------------ 4. pairing (Sec. 4.1)
@dataclass
class Pair:
    """Student layer `student` (1-based) is supervised by teacher layer `teacher`, read at the interface as
    `(1 - lam) * u_T(a) + lam * u_T(b)` (`a = b = teacher`, lam 0 without interpolation). `critical`: the
    attributed teacher layer that put this student layer in training (None: base pairing only)."""
    student: int
    teacher: int
    a: int
    b: int
    lam: float = 0.0
    critical: int | None = None


def base_pairing(n_teacher: int, n_student: int) -> list[int]:
    """`l_T(k) = max(1, floor(L_T k / L_S))` for k = 1..L_S (entry k-1), in integer arithmetic. For L_T >= L_S
    teacher layers are skipped, never shared (40 -> 32 skips 4, 9, ..., 39)."""
    if n_teacher < 1 or n_student < 1:
        fail(f"layer pairing needs at least one layer on each side (teacher {n_teacher}, student {n_student})")
    return [max(1, n_teacher * k // n_student) for k in range(1, n_student + 1)]


def nearest_student(critical: int, base: list[int]) -> int:
    """`k† = min{k : l_T(k) >= l*}`, L_S when no student layer reaches that deep."""
    return next((k for k, t in enumerate(base, 1) if t >= critical), len(base))


def interpolation(k: int, n_teacher: int, n_student: int) -> tuple[int, int, float]:
    """Target at student depth k when `L_T / L_S` is not an integer: `rho = k / L_S, u = L_T rho,
    a = max(1, min(floor(u), L_T - 1)), b = a + 1, lam = clip(u - a, 0, 1)` -> (a, b, lam); for an integer ratio
    (or a one-layer teacher) the base layer itself, lam 0."""
    if n_teacher % n_student == 0 or n_teacher < 2:
        t = base_pairing(n_teacher, n_student)[k - 1]
        return t, t, 0.0
    a = max(1, min(n_teacher * k // n_student, n_teacher - 1))
    lam = min(1.0, max(0.0, (n_teacher * k - a * n_student) / n_student))
    return a, a + 1, lam


def v1_pairs(n_teacher: int, n_student: int, critical, pairing: str = "literal",
             interpolate: bool = True) -> list[Pair]:
    """The student layers v1 trains, one per critical teacher layer l* (most important first), sorted by depth:
    `k† = nearest_student(l*)`, then
    - `literal` (the text as printed): the pair `(l_T(k†), k†)`, interpolated at k† when `L_T / L_S` is not an
      integer and `interpolate`;
    - `critical`: the pair `(l*, k†)`: student k† against the attributed layer itself, no interpolation.
    Two critical layers landing on one k† train it once (the more important one's pair is kept)."""
    base = base_pairing(n_teacher, n_student)
    pairs: dict[int, Pair] = {}
    for c in [int(c) for c in critical]:
        if not 1 <= c <= n_teacher:
            fail(f"critical teacher layer {c} out of range 1..{n_teacher}")
        k = nearest_student(c, base)
        if k in pairs:
            log.info("critical teacher layer %d: student layer %d is already paired (with %d)", c, k,
                     pairs[k].critical)
            continue
        if pairing == "literal":
            a, b, lam = interpolation(k, n_teacher, n_student) if interpolate else (base[k - 1], base[k - 1], 0.0)
            pairs[k] = Pair(k, base[k - 1], a, b, lam, c)
        else:
            pairs[k] = Pair(k, c, c, c, 0.0, c)
    return [pairs[k] for k in sorted(pairs)]


def v2_pairs(n_teacher: int, n_student: int, critical=()) -> list[Pair]:
    """[v2 reading] exactly one source layer per target layer k = 1..L_S: the base pairing, with each critical
    teacher layer the base skips taking over its k† (the critical reading `(l*, k†)`; a k† already holding a
    more important critical layer keeps it). No interpolation: one source layer, not a blend."""
    base = base_pairing(n_teacher, n_student)
    pairs = [Pair(k, t, t, t) for k, t in enumerate(base, 1)]
    crit = [int(c) for c in critical]
    for p in pairs:
        if p.teacher in crit:
            p.critical = p.teacher
    for c in crit:
        if not 1 <= c <= n_teacher:
            fail(f"critical teacher layer {c} out of range 1..{n_teacher}")
        if c in base:
            continue
        k = nearest_student(c, base)
        if pairs[k - 1].critical is None:
            pairs[k - 1] = Pair(k, c, c, c, 0.0, c)
    return pairs


def pairing_record(pairs: list[Pair]) -> list[dict]:
    return [asdict(p) for p in pairs]


def layer_update(hs: dict, depth: int) -> torch.Tensor:
    """The decoder layer's whole update `h_out - h_in` (attention + MLP: the output before the residual
    addition) of the paper's layer `depth` -> `[B, T, d]` in the stream's dtype."""
    return hs[depth] - hs[depth - 1].to(hs[depth].device)   # the two ends sit on two GPUs of a placed teacher


def pair_depths(pairs: list[Pair], side: str) -> set[int]:
    """Residual-stream depths a set of pairs reads on the teacher (`side="teacher"`) or student side."""
    if side == "student":
        return {d for p in pairs for d in (p.student - 1, p.student)}
    return {d for p in pairs for t in {p.a, p.b} for d in (t - 1, t)}


# ------------------------------------------------------------------------------ 5. v1 loss (Sec. 4.3)
def onehot_cosine(z: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """`cos(z_n, onehot(y_n))` = `z_y / ||z||`, or against the label-smoothed target
    `(1 - eps) e_y + eps/V`: `((1 - eps) z_y + eps/V sum z) / (||z|| ||target||)`. No `[N, V]` one-hot is built.
    `z: [N, V]`, `y: [N]` -> `[N]` fp32."""
    zf = z.float()
    num = zf.gather(1, y[:, None]).squeeze(1)
    norm = zf.norm(dim=1).clamp_min(1e-12)
    if not smoothing:
        return num / norm
    V, eps = z.shape[1], float(smoothing)
    num = (1 - eps) * num + eps / V * zf.sum(1)
    t_norm = math.sqrt((1 - eps) ** 2 + 2 * (1 - eps) * eps / V + eps * eps / V)
    return num / (norm * t_norm)


def v1_loss_sums(updates: list[torch.Tensor], targets: list[torch.Tensor], z: torch.Tensor, y: torch.Tensor,
                 smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two cosine terms as sums over positions: `sum_n (1 - cos(u_n, t_n))` over every paired layer
    (`updates[j]`, `targets[j]`: `[N_align, d_S]`) and `sum_n (1 - cos(z_n, onehot(y_n)))` (`z: [N, V]`, `y: [N]`).
    Dividing each by its number of positions in the (whole, accumulated) batch gives
    `L = L_layer + L_out` of the paper."""
    layer = z.new_zeros((), dtype=torch.float32)
    for u, t in zip(updates, targets):
        layer = layer + (1 - F.cosine_similarity(u.float(), t.to(u.device, torch.float32), dim=-1, eps=1e-8)).sum()
    out = (1 - onehot_cosine(z, y, smoothing)).sum()
    return layer, out


def v1_loss(updates, targets, z, y, smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """`L = (1 - Avg cos(u, target)) + (1 - Avg cos(z, onehot(y)))`, averages over the given positions."""
    layer, out = v1_loss_sums(updates, targets, z, y, smoothing)
    layer = layer / max(1, updates[0].shape[0]) if updates else layer
    out = out / max(1, z.shape[0])
    return {"loss": layer + out, "layer_loss": layer, "out_loss": out}


@torch.no_grad()
def teacher_targets(teacher, examples: list[dict], pairs: list[Pair], M: torch.Tensor, micro_batch_size: int,
                    pad_id: int, which: str = "supervised", vocab: SharedVocab | None = None,
                    dtype=torch.float32, budget: Tally | None = None, progress: bool = True) -> list[list]:
    """The v1 supervision, once (the teacher is frozen, so it does not change between epochs): for pair j and
    example i, `align(u_T, M)` at the example's `which` positions -> `[j][i]: [n_i, d_S]` on the CPU in `dtype`,
    with `u_T = (1 - lam) u_T(a) + lam u_T(b)` the teacher's layer update(s). The teacher runs only up to the
    deepest layer a pair reads."""
    from tqdm import tqdm

    dev = _device(teacher)
    depths = pair_depths(pairs, "teacher")
    M = M.to(dev)
    out: list[list] = [[] for _ in pairs]
    for lo in tqdm(range(0, len(examples), micro_batch_size), desc="teacher targets", disable=not progress,
                   leave=False):
        batch = teacher_batch(collate_left(examples[lo:lo + micro_batch_size], pad_id), vocab)
        ids, mask, labels = _to(batch, dev)
        hs = run_until(teacher, ids, mask, depths)
        pos = positions(labels, mask, which)
        counts = pos.sum(1).tolist()
        for j, p in enumerate(pairs):
            u = layer_update(hs, p.a)[pos].float() if p.lam < 1 else 0.0
            if p.lam:
                u = (1 - p.lam) * u + p.lam * layer_update(hs, p.b)[pos].float()
            out[j] += [t.to("cpu", dtype) for t in align(u, M).split(counts)]
        if budget is not None:
            budget.teacher_forward_tokens += int(mask.sum())
    return out


def v1_micro_loss(student, pairs: list[Pair], targets: list[list], which: str = "supervised",
                  smoothing: float = 0.0):
    """The v1 objective on one micro-batch for `train_layers`: sums normalised by the whole batch's counts."""
    depths = pair_depths(pairs, "student")

    def loss_fn(idx: list[int], batch: dict, counts: dict) -> dict[str, torch.Tensor]:
        dev = _device(student)
        ids, mask, labels = _to(batch, dev)
        sup = supervised_positions(labels)
        pos = positions(labels, mask, which)
        with residual_stream(student, depths) as hs:
            h = student.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        z = student.get_output_embeddings()(h[sup])
        y = labels[:, 1:][sup[:, :-1]]
        updates = [hs[p.student][pos] - hs[p.student - 1][pos] for p in pairs]
        tgt = [torch.cat([targets[j][i] for i in idx]).to(dev) for j in range(len(pairs))]
        layer, out = v1_loss_sums(updates, tgt, z, y, smoothing)
        layer = layer / counts["align"]
        out = out / counts["supervised"]
        return {"loss": layer + out, "layer_loss": layer, "out_loss": out}

    return loss_fn


# ---------------------------------------------------------------------------------- v2 (a reading)
def relation_loss(r_student: torch.Tensor, r_teacher: torch.Tensor, mask: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """[v2 reading] centered token-token relation geometry: per example `G = R_c R_cᵀ` over its tokens (R_c the
    vectors centred over the tokens), normalised to unit Frobenius norm; loss per example
    `||G_S/|G_S| - G_T/|G_T| ||_F^2` (in [0, 4]; = 2 - 2 x linear CKA), mean (or sum) over the examples.
    `r_student: [B, T, d_S]`, `r_teacher: [B, T, d']` (any width), `mask: [B, T]` bool."""
    m = mask.bool().unsqueeze(-1)
    n = m.sum(1, keepdim=True).clamp_min(1)

    def unit_gram(r):
        r = torch.where(m, r.float(), torch.zeros((), device=r.device))
        rc = torch.where(m, r - r.sum(1, keepdim=True) / n, torch.zeros((), device=r.device))
        g = rc @ rc.transpose(1, 2)                                                         # [B, T, T]
        return g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]

    per = (unit_gram(r_student) - unit_gram(r_teacher.to(r_student.device))).pow(2).sum((1, 2))
    return per.mean() if reduction == "mean" else per.sum()


def output_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """[v2 reading] KL(p_T || p_S) of next-token distributions `[N, V]`, mean (or sum) over the N positions,
    fp32 on the student's device; 0 when N = 0."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.to(s.device).float(), -1)
    kl = F.kl_div(s, t, log_target=True, reduction="sum")
    return kl / s.shape[0] if reduction == "mean" else kl


def logits_at(model, ids, mask, labels, depths=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits at the supervised positions only -> `[N, V]` (row-major (example, position) order; the LM head
    never runs on `[B, T]`), plus the residual streams at `depths`."""
    with residual_stream(model, depths) as hs:
        h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(h[supervised_positions(labels)]), hs


def v2_micro_loss(teacher, student, pair: Pair, M: torch.Tensor, vocab: SharedVocab | None,
                  relation_weight: float = 1.0, kl_weight: float = 1.0, budget: Tally | None = None):
    """[v2 reading] stage-k objective on one micro-batch (k = pair.student, the only trainable layer):
    `w_rel relation(u_S^k, align(u_T^l)) + w_kl KL(p_T || p_S)`, u the decoder layers' whole updates, l the one
    source layer paired with k, the relation term over each example's non-pad tokens, the KL over the
    supervised positions (over the shared tokens when the vocabularies differ). Teacher under no_grad."""
    k, l = pair.student, pair.teacher

    def loss_fn(idx: list[int], batch: dict, counts: dict) -> dict[str, torch.Tensor]:
        t_dev, s_dev = _device(teacher), _device(student)
        with torch.no_grad():
            ids, mask, labels = _to(teacher_batch(batch, vocab), t_dev)
            if kl_weight:
                t_logits, th = logits_at(teacher, ids, mask, labels, {l - 1, l})
            else:
                th = run_until(teacher, ids, mask, {l - 1, l})
            target = align(layer_update(th, l), M.to(t_dev)).to(s_dev)                    # [B, T, d_S]
            if budget is not None:
                budget.teacher_forward_tokens += int(mask.sum())
        ids, mask, labels = _to(batch, s_dev)
        if kl_weight:
            s_logits, sh = logits_at(student, ids, mask, labels, {k - 1, k})
            if vocab is not None and not (t_logits.shape[1] == s_logits.shape[1] == vocab.size
                                          and vocab.input_map is None):
                t_logits = t_logits[:, vocab.teacher_ids.to(t_logits.device)]
                s_logits = s_logits[:, vocab.student_ids.to(s_dev)]
            kl = output_kl(t_logits, s_logits, "sum") / counts["supervised"]
        else:
            sh = run_until(student, ids, mask, {k - 1, k})
            kl = torch.zeros((), device=s_dev)
        rel = relation_loss(layer_update(sh, k), target, mask, "sum") / counts["examples"]
        return {"loss": relation_weight * rel + kl_weight * kl, "relation_loss": rel, "kl_loss": kl}

    return loss_fn


# ------------------------------------------------------------------------------------- 6. training
@dataclass
class Schedule:
    """Optimizer settings of one training phase (AdamW, betas 0.9/0.999)."""
    lr: float = 3e-4
    epochs: int = 5
    batch_size: int = 64
    micro_batch_size: int = 4
    max_steps: int | None = None
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42

    def steps(self, n_examples: int) -> tuple[int, int]:
        """(optimizer steps per epoch, total steps): every epoch covers all examples, the last batch may be short."""
        per_epoch = math.ceil(n_examples / self.batch_size)
        total = self.epochs * per_epoch
        return per_epoch, min(total, self.max_steps) if self.max_steps else total


class LayerOptimizer:
    """Full-weight AdamW on the decoder layers `indices` (0-based) only; every other parameter frozen. A half-
    precision model trains through fp32 master copies of those layers."""

    def __init__(self, model, indices, sched: Schedule, total_steps: int):
        from transformers import (
            get_constant_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        model.requires_grad_(False)
        layers = decoder_layers(model)
        wanted = {id(p) for i in indices for p in layers[i].parameters()}
        self.named = [(n, p) for n, p in model.named_parameters() if id(p) in wanted]
        for _, p in self.named:
            p.requires_grad_(True)
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone() for _, p in self.named]
        self.opt = torch.optim.AdamW(self.master, lr=sched.lr, weight_decay=sched.weight_decay)
        warmup = math.ceil(sched.warmup_ratio * total_steps)
        self.sched = (get_linear_schedule_with_warmup(self.opt, warmup, total_steps) if sched.lr_schedule == "linear"
                      else get_constant_schedule_with_warmup(self.opt, warmup))
        self.max_grad_norm = sched.max_grad_norm

    def step(self, step: int) -> tuple[float, float]:
        """Clip, step, copy back -> (gradient norm before clipping, lr used). A non-finite gradient norm or weight
        is a one-line error naming the step and the tensor."""
        for (_, p), m in zip(self.named, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        norm = float(torch.nn.utils.clip_grad_norm_(self.master, self.max_grad_norm or math.inf))
        if not math.isfinite(norm):
            bad = next((n for (n, _), m in zip(self.named, self.master)
                        if m.grad is not None and not bool(torch.isfinite(m.grad).all())), "?")
            fail(f"step {step}: non-finite gradient norm (gradient of {bad}); nothing was saved")
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for (name, p), m in zip(self.named, self.master):
                p.grad = None
                if not bool(torch.isfinite(m).all()):
                    fail(f"step {step}: weight {name} is non-finite after the optimizer step (try a smaller "
                         "--learning_rate); nothing was saved")
                if m is not p:
                    p.copy_(m)
        return norm, lr

    def close(self) -> None:
        for _, p in self.named:
            p.grad = None
            p.requires_grad_(False)


def batch_counts(examples: list[dict], which: str) -> dict[str, int]:
    """Denominators of one (accumulated) batch: supervised positions, positions the layer term averages over
    (`which`), examples."""
    sup = sum(n_supervised(e) for e in examples)
    align_n = sup if which == "supervised" else sum(len(e["input_ids"]) for e in examples)
    return {"supervised": max(1, sup), "align": max(1, align_n), "examples": max(1, len(examples))}


def train_layers(student, examples: list[dict], layers: list[int], loss_fn, sched: Schedule, pad_id: int,
                 which: str = "supervised", budget: Tally | None = None, on_step=None, desc: str = "SemAlign",
                 extra: dict | None = None, progress: bool = True) -> list[dict]:
    """One training phase: AdamW on decoder layers `layers` (0-based) only, `sched.epochs` passes over
    `examples` (a fresh permutation per epoch, seeded by `seed + epoch`), batches of `sched.batch_size` built
    from micro-batches of `sched.micro_batch_size` with gradient accumulation (each micro-batch's loss is
    normalised by the whole batch's counts, so the step does not depend on the micro-batch size), at most
    `sched.max_steps` optimizer steps. `loss_fn(idx, batch, counts) -> {"loss": tensor, parts...}`.
    A non-finite loss, gradient norm or weight stops training with a one-line error. Returns one record per step."""
    from tqdm import tqdm

    per_epoch, total = sched.steps(len(examples))
    opt = LayerOptimizer(student, layers, sched, total)
    student.eval()   # no dropout; gradients still flow
    records: list[dict] = []
    bar = tqdm(total=total, desc=desc, disable=not progress)
    try:
        for step in range(1, total + 1):
            t0 = time.time()
            epoch = (step - 1) // per_epoch
            if (step - 1) % per_epoch == 0:
                order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(sched.seed + epoch))
            start = ((step - 1) % per_epoch) * sched.batch_size
            idx = order[start:start + sched.batch_size].tolist()
            counts = batch_counts([examples[i] for i in idx], which)
            sums: dict[str, float] = {}
            for lo in range(0, len(idx), sched.micro_batch_size):
                mb = idx[lo:lo + sched.micro_batch_size]
                batch = collate_left([examples[i] for i in mb], pad_id)
                out = loss_fn(mb, batch, counts)
                for name, v in out.items():
                    if not bool(torch.isfinite(v).all()):
                        fail(f"step {step}: non-finite {name} ({float(v.detach())}); nothing was saved")
                out["loss"].backward()
                n_tok = int(batch["attention_mask"].sum())
                if budget is not None:
                    budget.student_forward_tokens += n_tok
                    budget.student_backward_tokens += n_tok
                for name, v in out.items():
                    sums[name] = sums.get(name, 0.0) + float(v.detach())
            grad_norm, lr = opt.step(step)
            if budget is not None:
                budget.optimizer_steps += 1
                budget.examples += len(idx)     # each use counted (epochs, v2's stages), as pkt.budget says
            rec = {**(extra or {}), "step": step, "epoch": round(step / per_epoch, 4), **sums,
                   "grad_norm": grad_norm, "lr": lr, "examples": len(idx), "seconds": round(time.time() - t0, 3)}
            records.append(rec)
            if on_step is not None:
                on_step(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
    finally:
        bar.close()
        opt.close()
    return records


# ------------------------------------------------------------------------------------ memory plan
def memory_plan(variant: str, teacher_cfg, student_cfg, micro_batch_size: int, cutoff_len: int,
                param_bytes: int = 2, n_teacher_params: int = 0, n_student_params: int = 0,
                n_layer_params: int = 0, n_trained_layers: int = 1) -> dict:
    """Bytes on one GPU, by formula from the configs (parameter counts from meta-device models), per phase:
    `rows` = [(phase, item, bytes, note)], `phases` = {phase: bytes}, `peak` = the largest phase.

    v1: phase "teacher" (both models loaded; bases, map, attribution, targets) then phase "train" (the
    teacher is freed; the targets wait on the CPU; worst case k† = 1, every student layer's activations kept).
    v2: one phase, both models resident through every frontier stage (stage 1 is the worst)."""
    B, T = micro_batch_size, cutoff_len
    V = student_cfg.vocab_size
    Vt = teacher_cfg.vocab_size
    dT, dS = teacher_cfg.hidden_size, student_cfg.hidden_size
    fT, fS = teacher_cfg.intermediate_size, student_cfg.intermediate_size
    LT, LS = teacher_cfg.num_hidden_layers, student_cfg.num_hidden_layers
    half = param_bytes < 4
    gib = 2 ** 30

    def act(L, d, f):   # what a layer keeps for its backward (sdpa attention), per token
        return L * B * T * (6 * d + 4 * f) * param_bytes

    n_layer = n_layer_params or (4 * dS * dS + 3 * dS * fS)
    trained = n_trained_layers * n_layer * (param_bytes + 8 + (4 if half else 0))
    t_params, s_params = n_teacher_params * param_bytes, n_student_params * param_bytes
    bases = 4 * (Vt * dT + V * dS)
    rows = [
        ("setup", "teacher params", t_params, f"{n_teacher_params / 1e9:.2f} B params"),
        ("setup", "student params", s_params, f"{n_student_params / 1e9:.2f} B params"),
        ("setup", "semantic bases S_T, S_S (fp32)", bases, f"{dT} x {Vt} + {dS} x {V}, cached on disk"),
        ("setup", "pinv transient (SVD of the larger W_U, fp32)", 3 * 4 * Vt * dT, "W, U and the result; once"),
        ("setup", "alignment map M = S_S S_Tᵀ (fp32)", 4 * dS * dT, f"{dS} x {dT}"),
        ("setup", "attribution: teacher activations with grad + logits", act(LT, dT, fT) + B * T * Vt * (param_bytes + 8),
         f"{LT} layers x {B}x{T} tokens"),
    ]
    if variant == "v1":
        rows += [
            ("train", "student params", s_params, "the teacher is freed after the targets"),
            ("train", f"trained layer(s): grads + AdamW{' + fp32 master' if half else ''}", trained,
             f"{n_trained_layers} x {n_layer / 1e6:.0f} M params"),
            ("train", "student activations (worst case k† = 1: all layers kept)", act(LS, dS, fS),
             f"{LS} layers x {B}x{T}"),
            ("train", "logits at supervised positions + fp32 copy + grad", B * T * V * (param_bytes + 8),
             f"{B}x{T}x{V}; the one-hot is never built"),
        ]
    else:
        rows += [
            ("train", "teacher + student params", t_params + s_params, "both resident for every stage"),
            ("train", f"frontier layer: grads + AdamW{' + fp32 master' if half else ''}", trained,
             f"{n_layer / 1e6:.0f} M params"),
            ("train", "alignment map M (fp32)", 4 * dS * dT, ""),
            ("train", "student activations, stage 1 (all layers kept)", act(LS, dS, fS), f"{LS} layers x {B}x{T}"),
            ("train", "logits + fp32 log-softmax (teacher and student) + grad", B * T * (V + Vt) * (param_bytes + 8),
             f"{B}x{T}x{V}"),
            ("train", "relation Grams (fp32)", 4 * B * T * T * 4, f"{B}x{T}x{T}, student + teacher + grad"),
        ]
    setup = sum(b for ph, name, b, _ in rows if ph == "setup" and not name.startswith("pinv"))
    setup = max(setup, t_params + s_params + bases + 3 * 4 * Vt * dT)   # the SVD runs before the attribution
    train = sum(b for ph, _, b, _ in rows if ph == "train")
    phases = {"setup": setup, "train": train}
    return {"rows": rows, "phases": phases, "peak": max(phases.values()), "peak_gib": max(phases.values()) / gib}


# ------------------------------------------------------------------------- the stage (CLI config)
CONFIG = "semalign_config.json"
LOG = "semalign_log.jsonl"


def _choice(value, flag: str, choices) -> None:
    if value not in choices:
        fail(f"{flag} {value!r}: expected one of {', '.join(choices)}")


@dataclass
class SemAlignConfig:
    """Flags (defaults: the v1 paper's settings where it prints them, App. A; docs/semalign.md lists every
    choice the paper leaves open):

    --variant v1 | v2       v1: the published method. v2: a reading of the v2 ABSTRACT (formulas unpublished),
                            not the published method: frontier schedule, relation geometry + output KL.
    --source_model / --target_model   teacher / student (hub id or local directory).
    --data_path             chat JSONL (the *_train_split.jsonl of a task); --max_examples: the first N (all).
    --output_dir            the trained student (an existing non-empty one needs --overwrite True).
    --epochs 5, --batch_size 64 (gradient accumulation over --micro_batch_size), --learning_rate 3e-4
                            (the paper's HumanEval setting: 3 epochs, 3e-5), --max_steps N: at most N optimizer
                            steps per trained layer. AdamW, --lr_schedule linear with --warmup_ratio 0.03.
    --n_critical 1          teacher layers taken as critical (the paper's worked example has one).
    --critical_pairing      literal: the pair (l_T(k†), k†) as printed; critical: (l*, k†) (v2 always).
    --interpolate True      v1, literal pairs: blend adjacent teacher layers at k† when L_T/L_S is not an
                            integer (v2: never, one source layer per target layer).
    --attribution_*         examples (64), sign (abs | signed), reduce (mean | sum), tokens (all | supervised),
                            at (output: the layer's output h_l, as Captum on the decoder layer | update).
    --align_positions       supervised (default) | all: the positions the layer cosine averages over.
    --label_smoothing 0     of the one-hot target of the output cosine.
    --relation_weight / --kl_weight   v2 only.
    --bases_cache_dir       where the semantic bases are cached (default: <output_dir's parent>/semalign_bases).
    --dry_run True          print the memory plans (both variants) from meta-device models and exit.
    """
    variant: str = "v1"
    source_model: str = "meta-llama/Llama-2-13b-chat-hf"
    target_model: str = "meta-llama/Llama-2-7b-chat-hf"
    data_path: str = "data/gsm/gsm_train_split.jsonl"
    output_dir: str = "outputs/semalign/gsm"
    overwrite: bool = False
    max_examples: int | None = None
    cutoff_len: int = 768
    train_on_inputs: bool = False
    use_chat_template: bool = False
    epochs: int = 5
    batch_size: int = 64
    micro_batch_size: int = 4
    max_steps: int | None = None
    learning_rate: float = 3e-4
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    align_positions: str = "supervised"
    n_critical: int = 1
    critical_pairing: str = "literal"
    interpolate: bool = True
    attribution_examples: int = 64
    attribution_sign: str = "abs"
    attribution_reduce: str = "mean"
    attribution_tokens: str = "all"
    attribution_at: str = "output"
    relation_weight: float = 1.0
    kl_weight: float = 1.0
    bases_cache_dir: str | None = None
    dtype: str | None = None
    teacher_device: str | None = None
    student_device: str | None = None
    seed: int = 42
    dry_run: bool = False

    def __post_init__(self):
        _choice(self.variant, "--variant", VARIANTS)
        _choice(self.critical_pairing, "--critical_pairing", CRITICAL_PAIRINGS)
        _choice(self.attribution_sign, "--attribution_sign", ATTRIBUTION_SIGNS)
        _choice(self.attribution_reduce, "--attribution_reduce", ATTRIBUTION_REDUCES)
        _choice(self.attribution_tokens, "--attribution_tokens", ATTRIBUTION_TOKENS)
        _choice(self.attribution_at, "--attribution_at", ATTRIBUTION_AT)
        _choice(self.align_positions, "--align_positions", ALIGN_POSITIONS)
        _choice(self.lr_schedule, "--lr_schedule", LR_SCHEDULES)
        int_flag(self.max_examples, "--max_examples", 1, allow_none=True)
        int_flag(self.cutoff_len, "--cutoff_len", 2)
        int_flag(self.epochs, "--epochs", 1)
        int_flag(self.batch_size, "--batch_size", 1)
        int_flag(self.micro_batch_size, "--micro_batch_size", 1)
        int_flag(self.max_steps, "--max_steps", 1, allow_none=True)
        int_flag(self.n_critical, "--n_critical", 1)
        int_flag(self.attribution_examples, "--attribution_examples", 1)
        int_flag(self.seed, "--seed")
        number_flag(self.learning_rate, "--learning_rate", strict=True)
        number_flag(self.warmup_ratio, "--warmup_ratio", high=1, high_strict=True)
        number_flag(self.weight_decay, "--weight_decay")
        number_flag(self.max_grad_norm, "--max_grad_norm")
        number_flag(self.label_smoothing, "--label_smoothing", high=1, high_strict=True)
        number_flag(self.relation_weight, "--relation_weight")
        number_flag(self.kl_weight, "--kl_weight")
        if self.variant == "v2" and self.relation_weight == 0 and self.kl_weight == 0:
            fail("--relation_weight and --kl_weight are both 0: nothing to train")
        resolve_dtype(self.dtype)
        check_device(self.teacher_device, "--teacher_device", allow_auto=True)   # auto: pkt.placement
        check_device(self.student_device, "--student_device")

    def schedule(self) -> Schedule:
        return Schedule(lr=self.learning_rate, epochs=self.epochs, batch_size=self.batch_size,
                        micro_batch_size=self.micro_batch_size, max_steps=self.max_steps,
                        lr_schedule=self.lr_schedule, warmup_ratio=self.warmup_ratio,
                        weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, seed=self.seed)


def _config(name: str, flag: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        fail(f"{flag} {name}: cannot read its config ({type(e).__name__}; offline without a cached copy?)")


# ------------------------------------------------------------------------------------- dry run
def plan_config(name: str, flag: str):
    """A model's config for a plan, without weights: a local model/config directory, else a Llama-2 shape
    named in the hub id (pkt.testing.LLAMA2_SHAPES: works offline), else the hub's config."""
    from transformers import LlamaConfig

    from pkt.testing import LLAMA2_SHAPES

    check_model_path(name, flag)
    if not Path(name).expanduser().is_dir():
        for key, shape in LLAMA2_SHAPES.items():
            if key in name.lower():
                return LlamaConfig(**shape)
    return _config(name, flag)


def print_memory_plans(cfg: SemAlignConfig, budget_gb: float = 75.0) -> dict:
    """The memory plan of both variants on one GPU from meta-device models (nothing loaded, nothing written)."""
    from transformers import AutoModelForCausalLM

    models = {}
    for flag, name in (("--source_model", cfg.source_model), ("--target_model", cfg.target_model)):
        with torch.device("meta"):
            models[flag] = AutoModelForCausalLM.from_config(plan_config(name, flag))
    teacher, student = models["--source_model"], models["--target_model"]
    n = lambda m: sum(p.numel() for p in m.parameters())
    n_layer = sum(p.numel() for p in student.model.layers[0].parameters())
    dtype = resolve_dtype(cfg.dtype or "bf16")
    param_bytes = 4 if dtype == torch.float32 else 2
    gib = 2 ** 30
    plans = {}
    for variant in VARIANTS:
        plan = memory_plan(variant, teacher.config, student.config, cfg.micro_batch_size, cfg.cutoff_len,
                           param_bytes, n(teacher), n(student), n_layer, cfg.n_critical if variant == "v1" else 1)
        plans[variant] = plan
        label = "the published method" if variant == "v1" else "a reading of the v2 abstract"
        mark = " (selected)" if variant == cfg.variant else ""
        print(f"\nSemAlign {variant}{mark}, {label}: {cfg.source_model} -> {cfg.target_model}, micro-batch "
              f"{cfg.micro_batch_size} x {cfg.cutoff_len} tokens, {'fp32' if param_bytes == 4 else 'bf16'} weights\n")
        print("| phase | item | GiB | note |\n|---|---|---:|---|")
        for phase, item, b, note in plan["rows"]:
            print(f"| {phase} | {item} | {b / gib:.2f} | {note} |")
        parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in plan["phases"].items())
        print(f"| | **peak (estimate)** | **{plan['peak'] / gib:.2f}** | {parts}; target <= {budget_gb:.0f} GiB "
              f"on one 80 GB GPU |")
    return plans


def teacher_budget(cfg: SemAlignConfig, dtype, student_device) -> dict:
    """accelerate's max_memory for a teacher placed with `--teacher_device auto`: every visible GPU and the CPU,
    the student's GPU keeping `memory_plan`'s peak without the teacher's weights (student, bases, map,
    activations, the trained layers' state)."""
    from pkt import placement
    from pkt.io import meta_model

    def student_bytes() -> int:
        t, s = meta_model(cfg.source_model, "--source_model"), meta_model(cfg.target_model, "--target_model")
        return memory_plan(cfg.variant, t.config, s.config, cfg.micro_batch_size, cfg.cutoff_len,
                           placement.element_size(dtype), 0, sum(p.numel() for p in s.parameters()),
                           sum(p.numel() for p in s.model.layers[0].parameters()),
                           cfg.n_critical if cfg.variant == "v1" else 1)["peak"]

    return placement.beside_student(student_device, student_bytes)


# -------------------------------------------------------------------------------------- training
def _summary(history: list[dict], keys) -> dict:
    return {k: {"first": history[0][k], "last": history[-1][k]} for k in keys if history and k in history[0]}


def train(cfg: SemAlignConfig):
    """Run SemAlign (see --help) and save the student to --output_dir; --dry_run prints the memory plans."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.dry_run:
        print_memory_plans(cfg)
        return
    # ---- everything checked before a model loads or a byte is written
    out = Path(check_output(cfg.output_dir, "--output_dir", cfg.overwrite,
                            inputs={"--source_model": cfg.source_model, "--target_model": cfg.target_model,
                                    "--data_path": cfg.data_path}))
    check_model_path(cfg.source_model, "--source_model")
    check_model_path(cfg.target_model, "--target_model")
    t_cfg, s_cfg = _config(cfg.source_model, "--source_model"), _config(cfg.target_model, "--target_model")
    L_T, L_S = t_cfg.num_hidden_layers, s_cfg.num_hidden_layers
    if cfg.n_critical > L_T:
        fail(f"--n_critical {cfg.n_critical}: the teacher has only {L_T} layers")
    records = load_chat_jsonl(cfg.data_path)[:cfg.max_examples]
    t_tok, s_tok = load_tokenizer(cfg.source_model), load_tokenizer(cfg.target_model)
    vocab = shared_vocab(t_tok, s_tok, t_cfg.vocab_size, s_cfg.vocab_size)
    log.info("shared vocabulary: %d tokens aligned; %d teacher-only token(s) dropped %s, %d student-only "
             "token(s) dropped %s", vocab.size, len(vocab.teacher_only), vocab.teacher_only[:5],
             len(vocab.student_only), vocab.student_only[:5])
    examples, ids = [], []
    for r in records:
        ex = tokenize_example(s_tok, r["messages"], cfg.cutoff_len, cfg.train_on_inputs,
                              use_chat_template=cfg.use_chat_template)
        if n_supervised(ex):
            examples.append(ex)
            ids.append(r.get("id"))
    if len(examples) < len(records):
        log.warning("%d example(s) have no supervised token within --cutoff_len %d: skipped",
                    len(records) - len(examples), cfg.cutoff_len)
    if not examples:
        fail(f"{cfg.data_path}: no example has a supervised token within --cutoff_len {cfg.cutoff_len}")
    check_teacher_reads(examples, vocab, s_tok, cfg.data_path)
    sched = cfg.schedule()
    per_epoch, steps = sched.steps(len(examples))

    # ---- models
    torch.manual_seed(cfg.seed)
    t_dev, s_dev = cfg.teacher_device or default_device(), cfg.student_device or default_device()
    dtype = cfg.dtype or default_dtype(s_dev)
    # auto: the teacher is placed over the visible GPUs and, last, the CPU (pkt.placement); it only reads out
    room = teacher_budget(cfg, dtype, s_dev) if t_dev == "auto" else None
    teacher = load_model(cfg.source_model, dtype, t_dev, "--source_model", max_memory=room).requires_grad_(False)
    student = load_model(cfg.target_model, dtype, s_dev, "--target_model").requires_grad_(False)
    budget = Tally()
    pad = s_tok.pad_token_id
    t0 = time.time()

    # ---- 1-2. semantic bases (cached per model) and the fixed map M = S_S S_Tᵀ
    cache_dir = Path(cfg.bases_cache_dir) if cfg.bases_cache_dir else out.parent / "semalign_bases"
    keys = {"teacher": bases_key(unembedding(teacher)), "student": bases_key(unembedding(student))}
    S_T, S_S = cached_bases(teacher, cache_dir, keys["teacher"]), cached_bases(student, cache_dir, keys["student"])
    M = alignment_map(S_T, S_S, vocab)
    del S_T, S_S
    t_bases = time.time() - t0

    # ---- 3. attribution on the teacher, 4. pairing
    n_attr = min(cfg.attribution_examples, len(examples))
    attr_batches = [teacher_batch(collate_left(examples[i:i + cfg.micro_batch_size], pad), vocab)
                    for i in range(0, n_attr, cfg.micro_batch_size)]
    scores = layer_attribution(teacher, attr_batches, cfg.attribution_sign, cfg.attribution_reduce,
                               cfg.attribution_tokens, cfg.attribution_at, budget=budget)
    critical = critical_layers(scores, cfg.n_critical)
    if cfg.variant == "v1":
        pairs = v1_pairs(L_T, L_S, critical, cfg.critical_pairing, cfg.interpolate)
    else:
        pairs = v2_pairs(L_T, L_S, critical)
    log.info("attribution over %d examples: critical teacher layer(s) %s; pairs %s", n_attr, critical,
             [(p.student, p.teacher) if p.a == p.b else (p.student, p.teacher, p.a, p.b, round(p.lam, 4))
              for p in pairs])
    t_attr = time.time() - t0 - t_bases

    # ---- 5. training
    history: list[dict] = []
    if cfg.variant == "v1":
        targets = teacher_targets(teacher, examples, pairs, M, cfg.micro_batch_size, pad, cfg.align_positions,
                                  vocab, student.dtype, budget)
        del teacher, M                      # v1 needs nothing more from the teacher
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        layers = [p.student - 1 for p in pairs]
        log.info("v1: training student layer(s) %s (1-based) for %d steps of %d examples (%d per epoch)",
                 [p.student for p in pairs], steps, cfg.batch_size, per_epoch)
        history = train_layers(student, examples, layers,
                               v1_micro_loss(student, pairs, targets, cfg.align_positions, cfg.label_smoothing),
                               sched, pad, cfg.align_positions, budget, desc="SemAlign v1")
    else:
        log.info("v2 (%s): %d frontier stages x %d steps", V2_READING, len(pairs), steps)
        for p in pairs:
            loss_fn = v2_micro_loss(teacher, student, p, M, vocab, cfg.relation_weight, cfg.kl_weight, budget)
            for rec in train_layers(student, examples, [p.student - 1], loss_fn, sched, pad, "all", budget,
                                    desc=f"SemAlign v2 layer {p.student}", extra={"stage": p.student,
                                                                                  "teacher_layer": p.teacher}):
                rec["stage_step"], rec["step"] = rec["step"], len(history) + 1
                history.append(rec)
    t_train = time.time() - t0 - t_bases - t_attr

    # ---- save: a standard HF model directory (refused when a weight is non-finite)
    config = {
        "method": "SemAlign", "variant": cfg.variant, "paper": PAPER_V1 if cfg.variant == "v1" else V2_READING,
        "source_model": cfg.source_model, "target_model": cfg.target_model, "data_path": str(cfg.data_path),
        "examples": len(examples), "example_ids": ids, "attribution_examples": n_attr,
        "layers": "1-based as in the paper: layer d = model.layers[d-1], its output = depth d",
        "teacher_layers": L_T, "student_layers": L_S, "vocabulary": vocab.record(),
        "semantic_bases": {"cache_dir": str(cache_dir), "sha256": keys},
        "attribution_scores": [float(s) for s in scores], "critical_teacher_layers": critical,
        "pairing": pairing_record(pairs), "trained_student_layers": sorted({p.student for p in pairs}),
        "steps_per_trained_layer": steps, "losses": _summary(history, ("loss", "layer_loss", "out_loss",
                                                                        "relation_loss", "kl_loss")),
        "hyperparameters": {**asdict(cfg), "dtype": str(dtype), "optimizer": "AdamW (0.9, 0.999)"},
        "seconds": {"bases": round(t_bases, 2), "attribution": round(t_attr, 2), "training": round(t_train, 2)},
    }
    save_model(student, out, s_tok, files={CONFIG: config, BUDGET_FILE: budget.record("semalign")})
    write_jsonl(out / LOG, history)
    log.info("saved %s (%d optimizer steps, %.1fs)", out, budget.optimizer_steps, time.time() - t0)
