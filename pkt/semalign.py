"""SemAlign (*Beyond Neural Incompatibility*, Gu et al., arXiv 2510.24208 v2 / ACL 2026 Findings):
activations, not weights, carry the teacher's knowledge into the student. See docs/semalign.md.

1. `layer_attribution`: Layer Gradient x Activation on the teacher: one forward + backward per batch
   with the LM loss; per decoder layer `sum_d |h * dL/dh|` averaged over tokens and examples -> `[L_T]`.
2. `pair_layers`: each student depth k (1-based) gets one teacher depth by the paper's rule
   `l_T(k) = max(1, floor(L_T / L_S * k))`; critical (highest-attributed) teacher layers the rule
   skips take over the nearest deeper-or-equal student depth; optionally the fractional depth
   `L_T / L_S * k` is interpolated between adjacent teacher layers.
3. `decompose` / `recompose` / `alignment_map` / `align`: a teacher hidden state is read in the
   vocabulary (teacher final norm + unembedding: the logit lens) and rebuilt in the student's
   read-out space through the pseudo-inverse of the student's unembedding (fp32, computed once; the
   two linear maps fuse into one `[d_S, d_T]` matrix). Teacher and student share one vocabulary.
4. `relation_loss` + `output_kl`, `train_frontier`: shallow-to-deep frontier schedule; at stage k only
   student layer k trains; loss = centered token-token relation geometry of the layer's residual
   contribution against the aligned teacher residual + KL(teacher || student) on the next-token
   distributions. Teacher activations are computed under no_grad.

Depths: depth d is the residual stream after `model.layers[d-1]`; depth 0 is the embedding output.
Everything is forward hooks on stock Hugging Face Llama-like models; nothing copies modeling code.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pkt.model import decoder_layers, residual_stream, run_until, unembedding
from pkt.data import IGNORE
from pkt.io import fail

log = logging.getLogger("pkt.semalign")

PAPER = "arXiv 2510.24208 v2 (18 May 2026), with the layer pairing of v1 (Oct 2025)"


# ------------------------------------------------------------------------------------ model access
def final_norm(model) -> torch.nn.Module:
    decoder_layers(model)  # a one-line error for non-Llama-like models
    return model.model.norm


def check_shared_vocab(t_tok, s_tok, teacher=None, student=None, source="--source_model",
                       target="--target_model") -> None:
    """SemAlign reads both models in one vocabulary: same token -> id map and same unembedding rows."""
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    if tv != sv:
        diff = len(set(tv.items()) ^ set(sv.items()))
        fail(f"{target}: its vocabulary differs from {source} ({len(sv)} vs {len(tv)} tokens, {diff} token/id "
             f"entries differ); SemAlign needs teacher and student to share one vocabulary")
    if teacher is not None and student is not None:
        vt, vs = unembedding(teacher).shape[0], unembedding(student).shape[0]
        if vt != vs:
            fail(f"{target}: its unembedding has {vs} rows, {source}'s {vt}; SemAlign needs teacher and student "
                 "to share one vocabulary")


def logits_at(model, ids, mask, labels, depths=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Next-token logits only at the positions the LM loss supervises (`labels[:, t+1] != -100`) -> `[N, V]`
    in row-major (example, position) order, plus the residual streams at `depths`. The LM head runs on
    those N rows only (not on `[B, T]`)."""
    with residual_stream(model, depths) as hs:
        h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    sel = labels[:, 1:] != IGNORE
    return model.get_output_embeddings()(h[:, :-1][sel.to(h.device)]), hs


def _to(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device))


def _device(model):
    return unembedding(model).device


# --------------------------------------------------------------------------------- 1. attribution
def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of each example, the mean over its supervised tokens (HF's causal-LM loss per row).
    `logits: [B, T, V]`, `labels: [B, T]` (-100 = ignored) -> (`loss [B]` fp32, `valid [B]` bool)."""
    target = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp_min(0), reduction="none")
    keep = target != IGNORE
    n = keep.sum(1)
    loss = torch.where(keep, ce, torch.zeros_like(ce)).sum(1) / n.clamp_min(1)
    return loss, n > 0


def layer_attribution(model, batches: list[dict], progress: bool = True) -> torch.Tensor:
    """Layer Gradient x Activation: per teacher layer l (depth l = 1..L) and example n,
    `s[l, n] = mean_{t in tokens(n)} sum_d | h_l[n, t, d] * dL_n/dh_l[n, t, d] |` with L_n the example's
    mean next-token loss on its supervised tokens; returns `mean_n s` `[L]` (fp32, CPU).

    The elementwise attribution (Captum's `LayerGradientXActivation`) is reduced with |.| before the
    sum over d: the signed sum `h . dL/dh` is ~0 at the last layer for any input, because the final RMSNorm
    is scale invariant (`norm(c h) = norm(h)`), so it would rank the last layer last by construction.

    One forward + one backward per batch: the batch loss is `sum_n L_n`, so each example's gradient is
    its own (no mixing through a batch mean) and the scores do not depend on batching or padding.
    Examples without a supervised token are skipped. Parameters are not touched (no parameter grads)."""
    from tqdm import tqdm

    L = len(decoder_layers(model))
    dev = _device(model)
    total = torch.zeros(L, dtype=torch.float64)
    count = 0
    for batch in tqdm(batches, desc="attribution", disable=not progress, leave=False):
        ids, mask, labels = _to(batch, dev)
        with torch.enable_grad(), residual_stream(model, range(1, L + 1), leaf_embeddings=True) as hs:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss, valid = per_example_lm_loss(logits, labels)
            if not valid.any():
                continue
            acts = [hs[d] for d in range(1, L + 1)]
            grads = torch.autograd.grad(loss[valid].sum(), acts)
        tok = mask.bool()
        n_tok = tok.sum(1).clamp_min(1)
        with torch.no_grad():
            for i, (a, g) in enumerate(zip(acts, grads)):
                per_tok = (a.float() * g.float()).abs().sum(-1)                       # [B, T]
                per_ex = torch.where(tok, per_tok, torch.zeros_like(per_tok)).sum(1) / n_tok
                total[i] += per_ex[valid].double().sum().cpu()
        count += int(valid.sum())
        del acts, grads, logits, loss
    if count == 0:
        fail("layer attribution: no example has a supervised token (prompts longer than --cutoff_len?)")
    return (total / count).float()


def critical_layers(scores: torch.Tensor, n: int) -> list[int]:
    """The n teacher depths (1-based) with the highest attribution, most important first (ties: shallower)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return [i + 1 for i in order[:max(0, int(n))]]


# ------------------------------------------------------------------------------------- 2. pairing
@dataclass
class Pair:
    """Student depth k reads teacher depth `(1 - lam) * teacher + lam * teacher_next` (1-based depths)."""
    student: int
    teacher: int
    teacher_next: int
    lam: float = 0.0
    critical: bool = False


def base_pairing(n_teacher: int, n_student: int) -> list[int]:
    """The paper's depth-aware rule, 1-based: entry k-1 is `l_T(k) = max(1, floor(L_T / L_S * k))`.
    Integer arithmetic (`L_T * k // L_S`), so no floating-point floor surprises."""
    if n_teacher < 1 or n_student < 1:
        fail(f"layer pairing needs at least one layer on each side (teacher {n_teacher}, student {n_student})")
    return [max(1, n_teacher * k // n_student) for k in range(1, n_student + 1)]


def pair_layers(n_teacher: int, n_student: int, critical=(), interpolate: bool = False) -> list[Pair]:
    """One teacher depth per student depth k = 1..L_S (paper, v1 Sec. "Layer Pairing"; v2 keeps "exactly
    one source layer for each target layer").

    - base: `l_T(k) = max(1, floor(L_T / L_S * k))`;
    - `critical`: teacher depths by decreasing importance. One that no base entry hits is moved to the
      nearest deeper-or-equal student depth `k+ = min{k : l_T(k) >= l*}`, replacing that entry. A student
      depth already holding a critical layer keeps it (the more important one wins); the mapping stays
      non-decreasing because `l_T(k+ - 1) < l* <= l_T(k+)`;
    - `interpolate`: a non-integer `L_T / L_S * k` (and no critical override) reads
      `(1 - lam) h_T^(a) + lam h_T^(a+1)` with `a = floor`, `lam` the fractional part (v1)."""
    base = base_pairing(n_teacher, n_student)
    pairs = [Pair(k, t, t) for k, t in zip(range(1, n_student + 1), base)]
    crit = [int(c) for c in critical]
    for c in crit:
        if not 1 <= c <= n_teacher:
            fail(f"critical teacher layer {c} out of range 1..{n_teacher}")
    held = set()
    for p in pairs:
        if p.teacher in crit:
            p.critical = True
            held.add(p.student)
    for c in crit:
        if c in base:
            continue
        k = next(i for i, t in enumerate(base, 1) if t >= c)   # exists: base[-1] = L_T >= c when L_T >= L_S
        if k in held:
            log.info("critical teacher layer %d: student depth %d already holds a more important one", c, k)
            continue
        pairs[k - 1] = Pair(k, c, c, 0.0, True)
        held.add(k)
    if interpolate:
        for p in pairs:
            a, rem = divmod(n_teacher * p.student, n_student)
            if not p.critical and rem and 1 <= a < n_teacher and p.teacher == a:
                p.teacher_next, p.lam = a + 1, rem / n_student
    return pairs


# ---------------------------------------------------------- 3. decomposition and recomposition
def decompose(h: torch.Tensor, norm: torch.nn.Module, W_U: torch.Tensor) -> torch.Tensor:
    """Vocabulary-space semantics of hidden states: `W_U norm(h)` (the logit lens). `h: [..., d]` ->
    `[..., V]` fp32."""
    return norm(h).float() @ W_U.float().T


def recomposer(W_U: torch.Tensor) -> torch.Tensor:
    """`pinv(W_U)` `[d, V]` in fp32: `recompose(s) = pinv(W_U) s` is the least-squares solution of
    `W_U z = s` (the minimum-norm one when W_U is rank deficient)."""
    return torch.linalg.pinv(W_U.detach().float())


def recompose(s: torch.Tensor, pinv: torch.Tensor) -> torch.Tensor:
    """Vocabulary semantics `[..., V]` -> the student's read-out space `[..., d_S]` (fp32)."""
    return s.float() @ pinv.T


def alignment_map(W_teacher: torch.Tensor, W_student: torch.Tensor) -> torch.Tensor:
    """`P = pinv(W_S) W_T` `[d_S, d_T]` (fp32, computed once): decomposition through the teacher's
    unembedding followed by recomposition through the student's, fused into one matrix, so that
    `align(h) = recompose(decompose(h))` never materialises `[tokens, V]`."""
    if W_teacher.shape[0] != W_student.shape[0]:
        fail(f"unembeddings of different vocabularies ({W_teacher.shape[0]} vs {W_student.shape[0]} rows)")
    pinv = recomposer(W_student)
    return pinv @ W_teacher.detach().to(pinv.device, torch.float32)


def align(h: torch.Tensor, teacher_norm: torch.nn.Module, P: torch.Tensor) -> torch.Tensor:
    """Teacher hidden states `[..., d_T]` -> aligned states in the student's read-out space `[..., d_S]`
    (fp32, on P's device): `pinv(W_S) W_T norm_T(h)`."""
    return teacher_norm(h).to(P.device, torch.float32) @ P.T


# --------------------------------------------------------------------------------------- 4. losses
def relation_loss(r_student: torch.Tensor, r_teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Centered token-token relation geometry: per example, `G = R_c R_c^T` over its tokens (R_c = the
    residuals centered over the tokens), normalised to unit Frobenius norm;
    loss = mean_n ||G_S / |G_S| - G_T / |G_T| ||_F^2 (in [0, 4]; = 2 - 2 x the linear CKA of the two).

    `r_student: [B, T, d_S]`, `r_teacher: [B, T, d']` (any width), `mask: [B, T]` bool (tokens that count)."""
    m = mask.bool().unsqueeze(-1)
    n = m.sum(1, keepdim=True).clamp_min(1)

    def unit_gram(r):
        r = torch.where(m, r.float(), torch.zeros((), device=r.device))
        rc = torch.where(m, r - r.sum(1, keepdim=True) / n, torch.zeros((), device=r.device))
        g = rc @ rc.transpose(1, 2)                                                         # [B, T, T]
        return g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]

    return (unit_gram(r_student) - unit_gram(r_teacher)).pow(2).sum((1, 2)).mean()


def output_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) of next-token distributions `[N, V]` (the supervised positions, see `logits_at`),
    mean over the N positions, fp32, on the student's device. 0 when N = 0."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.to(s.device).float(), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


# ---------------------------------------------------------------------------- 5. frontier training
class Frontier:
    """During a stage only decoder layer `index` (0-based) trains: every other parameter has
    requires_grad False. AdamW runs on fp32 master copies when the model is in half precision."""

    def __init__(self, model, index: int, lr: float, weight_decay: float = 0.0):
        self.model = model
        model.requires_grad_(False)
        self.params = list(decoder_layers(model)[index].parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, weight_decay=weight_decay)

    def step(self, max_grad_norm: float = 0.0) -> float:
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(self.master, max_grad_norm if max_grad_norm > 0 else math.inf)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.grad = None
                if m is not p:
                    p.copy_(m)
        return float(norm)

    def close(self) -> None:
        for p in self.params:
            p.grad = None
            p.requires_grad_(False)


@dataclass
class Weights:
    relation: float = 1.0
    kl: float = 1.0


def _teacher_point(hs: dict, pair: Pair | None, teacher_norm, P) -> torch.Tensor:
    """Aligned teacher state for student depth k (None = depth 0, the embeddings): interpolate the hidden
    states, then align (the paper interpolates h_T)."""
    if pair is None:
        h = hs[0]
    elif pair.lam:
        h = torch.lerp(hs[pair.teacher].float(), hs[pair.teacher_next].float(), pair.lam).to(hs[pair.teacher].dtype)
    else:
        h = hs[pair.teacher]
    return align(h, teacher_norm, P)


def teacher_depths(pair: Pair, prev: Pair | None) -> set[int]:
    out = {0} if prev is None else {prev.teacher, prev.teacher_next}
    return out | {pair.teacher, pair.teacher_next}


@torch.no_grad()
def teacher_logits(teacher, batches: list[dict], progress: bool = True) -> list[torch.Tensor]:
    """The KL targets, once: per batch the teacher's logits at the supervised positions `[N, V]` (teacher
    dtype, CPU). Every stage reuses them, so a stage step runs the teacher only up to the depths it pairs."""
    from tqdm import tqdm

    dev = _device(teacher)
    return [logits_at(teacher, *_to(b, dev))[0].cpu()
            for b in tqdm(batches, desc="teacher logits", disable=not progress, leave=False)]


def stage_loss(teacher, student, batch: dict, pair: Pair, prev: Pair | None, P: torch.Tensor,
               weights: Weights = Weights(), t_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stage-k objective on one batch (k = pair.student):
    `w_rel * relation(n_S(h_S^k) - n_S(h_S^{k-1}), Z_T(k) - Z_T(k-1)) + w_kl * KL(p_T || p_S)`, where n_S is the
    student's final norm (its read-out space, where the aligned teacher states live) and Z_T(k) the aligned
    teacher state paired with student depth k (Z_T(0): the teacher's embeddings). The KL is over the
    supervised positions. The teacher runs under no_grad; with `t_logits` (cached, see `teacher_logits`)
    only up to the deepest teacher depth this stage reads."""
    t_dev, s_dev = _device(teacher), _device(student)
    k = pair.student
    need = teacher_depths(pair, prev)
    with torch.no_grad():
        ids, mask, labels = _to(batch, t_dev)
        if t_logits is None and weights.kl:
            t_logits, th = logits_at(teacher, ids, mask, labels, need)
        else:
            th = run_until(teacher, ids, mask, need)
        t_norm = final_norm(teacher)
        target = _teacher_point(th, pair, t_norm, P) - _teacher_point(th, prev, t_norm, P)   # [B, T, d_S]
    ids, mask, labels = _to(batch, s_dev)
    if weights.kl:
        s_logits, sh = logits_at(student, ids, mask, labels, {k - 1, k})
        kl = output_kl(t_logits, s_logits)
    else:
        sh = run_until(student, ids, mask, {k - 1, k})
        kl = torch.zeros((), device=s_dev)
    s_norm = final_norm(student)
    r = s_norm(sh[k]).float() - s_norm(sh[k - 1]).float()
    rel = relation_loss(r, target.to(s_dev), mask)
    return {"loss": weights.relation * rel + weights.kl * kl, "relation_loss": rel, "kl_loss": kl}


def stage_order(n_batches: int, steps: int, seed: int, stage: int) -> list[int]:
    """Batch indices for one stage: fresh shuffles of all batches (seeded by seed and stage), cut to `steps`."""
    rng = random.Random(seed * 100003 + stage)
    order: list[int] = []
    while len(order) < steps:
        perm = list(range(n_batches))
        rng.shuffle(perm)
        order += perm
    return order[:steps]


def train_stage(teacher, student, batches: list[dict], pair: Pair, prev: Pair | None, P: torch.Tensor, *,
                steps: int, lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                weights: Weights = Weights(), seed: int = 0, t_logits: list | None = None, on_step=None,
                progress=None) -> list[dict]:
    """Stage k of the frontier schedule: only student layer k (0-based k-1) trains, `steps` AdamW steps over
    shuffled `batches`. Returns the per-step log records (and passes each to `on_step`)."""
    frontier = Frontier(student, pair.student - 1, lr, weight_decay)
    records = []
    try:
        for i, b in enumerate(stage_order(len(batches), steps, seed, pair.student)):
            t0 = time.time()
            out = stage_loss(teacher, student, batches[b], pair, prev, P, weights,
                             None if t_logits is None else t_logits[b])
            if not torch.isfinite(out["loss"]):
                fail(f"non-finite loss at student layer {pair.student}, stage step {i} (try a smaller "
                     "--learning_rate or --dtype fp32)")
            out["loss"].backward()
            grad_norm = frontier.step(max_grad_norm)
            rec = {"stage": pair.student, "stage_step": i, "teacher_depth": pair.teacher,
                   "teacher_depth_next": pair.teacher_next, "lambda": pair.lam, "critical": pair.critical,
                   "loss": out["loss"].item(), "relation_loss": out["relation_loss"].item(),
                   "kl_loss": out["kl_loss"].item(), "grad_norm": grad_norm, "lr": lr,
                   "seconds": round(time.time() - t0, 3)}
            records.append(rec)
            if on_step is not None:
                on_step(rec)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(layer=pair.student, loss=f"{rec['loss']:.4f}")
    finally:
        frontier.close()
    return records


def train_frontier(teacher, student, batches: list[dict], pairs: list[Pair], P: torch.Tensor, *, steps: int,
                   lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0, weights: Weights = Weights(),
                   seed: int = 0, cache_teacher_logits: bool = True, on_step=None,
                   progress: bool = True) -> list[dict]:
    """Shallow to deep: stage k = 1..L_S trains student layer k alone against its paired teacher depth.
    Every record gets a global `step`. `cache_teacher_logits`: compute the KL targets once (CPU memory:
    supervised tokens x V in the teacher's dtype) instead of a full teacher forward every step."""
    from tqdm import tqdm

    teacher.eval()
    student.eval()   # no dropout; gradients still flow
    records: list[dict] = []

    def numbered(rec):
        rec["step"] = len(records)
        records.append(rec)
        if on_step is not None:
            on_step(rec)

    cache = teacher_logits(teacher, batches, progress) if cache_teacher_logits and weights.kl else None
    if cache is not None:
        log.info("cached teacher logits: %.2f GiB", sum(t.numel() * t.element_size() for t in cache) / 2**30)
    bar = tqdm(total=steps * len(pairs), desc="SemAlign frontier", disable=not progress)
    try:
        for j, pair in enumerate(pairs):
            train_stage(teacher, student, batches, pair, pairs[j - 1] if j else None, P, steps=steps, lr=lr,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm, weights=weights, seed=seed,
                        t_logits=cache, on_step=numbered, progress=bar)
    finally:
        bar.close()
    return records


def pairing_record(pairs: list[Pair]) -> list[dict]:
    return [asdict(p) for p in pairs]


# ------------------------------------------------------------------------------------ memory plan
def memory_plan(teacher_cfg, student_cfg, micro_batch_size: int, cutoff_len: int, param_bytes: int = 2,
                n_teacher_params: int | None = None, n_student_params: int | None = None,
                n_layer_params: int | None = None) -> list[tuple[str, int, str]]:
    """(item, bytes, note) rows for one GPU holding teacher and student, by formula from the configs
    (parameter counts from meta-device models when given). The peak is the larger of the attribution pass
    and a stage-1 training step (stage 1 back-propagates through every student layer)."""
    B, T = micro_batch_size, cutoff_len
    V = student_cfg.vocab_size
    dT, dS = teacher_cfg.hidden_size, student_cfg.hidden_size
    fT, fS = teacher_cfg.intermediate_size, student_cfg.intermediate_size
    LT, LS = teacher_cfg.num_hidden_layers, student_cfg.num_hidden_layers
    half = param_bytes < 4
    act = lambda L, d, f: L * B * T * (6 * d + 4 * f) * param_bytes   # saved per layer for backward (sdpa)
    n_layer = n_layer_params or (4 * dS * dS + 3 * dS * fS)
    rows = [
        ("teacher params", (n_teacher_params or 0) * param_bytes, f"{(n_teacher_params or 0) / 1e9:.2f} B params"),
        ("student params", (n_student_params or 0) * param_bytes, f"{(n_student_params or 0) / 1e9:.2f} B params"),
        ("alignment map P = pinv(W_S) W_T (fp32)", dS * dT * 4, f"{dS} x {dT}; pinv(W_S) {V}x{dS} fp32 "
         f"only while building it ({V * dS * 4 * 3 / 2**30:.2f} GiB transient with the SVD)"),
        ("frontier layer: grads + AdamW (+ fp32 master)", n_layer * (param_bytes + 8 + (4 if half else 0)),
         f"{n_layer / 1e6:.0f} M params in one layer"),
        ("student activations, stage 1 (all layers kept)", act(LS, dS, fS), f"{LS} layers x {B}x{T}"),
        ("logits + fp32 log-softmax (teacher and student) + grad", B * T * V * (2 * param_bytes + 3 * 4),
         f"{B}x{T}x{V}"),
        ("relation Grams (fp32)", 4 * B * T * T * 4, f"{B}x{T}x{T}, student + teacher + grad"),
    ]
    attribution = act(LT, dT, fT) + B * T * V * (param_bytes + 4 * 2)
    rows.append(("attribution pass (before training, not at once with the step)", attribution,
                 f"teacher activations with grad, {LT} layers x {B}x{T}"))
    return rows
