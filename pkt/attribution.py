"""Where neurons are scored: the logit-lens read-out, layer scores, FFN and attention neuron scores,
and `locate()` — exactly as the LaTen reference code computes them (see docs/laten.md).

The reference loops in Python over neurons, one `lm_head` call each. Here the read-out is linear
given its fixed per-example normaliser `s`, so for a layer with neuron directions `cols: [d, n]`
and coefficients `c: [B, n]`:

    logits(base + c_i * cols[:, i]) = logits(base) + s * c_i * (W_U (g * cols))[:, i]

one `[n, d] x [d, vocab]` product per layer (shared by all examples), then a chunked log-softmax
over the vocabulary. `precision="reference"` instead follows the original fp16 path (each candidate
vector scaled in fp32, cast to fp16, `lm_head` and softmax in fp16), still vectorised.
`precision="bf16"` runs that one product in bf16 (fp32 accumulation; twice the tensor-core rate of TF32,
half its memory) and everything else as fp32: measured against fp32 selections in bench/RESULTS.md.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_llama_laten import Trace, trace

from pkt.model import decoder_layers, model_shape
from pkt.data import left_pad
from pkt.io import fail

PRECISIONS = ("fp32", "reference", "bf16")
# Elements of the [examples, neurons, vocab] logit block materialised at once (fp32: 4 bytes each).
CHUNK_ELEMENTS = 1 << 26
# On the CPU the log-softmax runs over cache-sized row blocks of that chunk (4 MiB): memory traffic,
# not arithmetic, is its cost there (1.6x faster read-out at vocab 32k). On CUDA one block per chunk.
CPU_BLOCK_ELEMENTS = 1 << 20
TF32 = True   # fp32 read-out products on TF32 tensor cores when on CUDA (set False for full fp32)


@dataclass
class Selection:
    """What `locate` found in one model. Kept layers are in index order; neurons best first."""
    attn_layers: list[int]            # kept attention layers, sorted by index
    ffn_layers: list[int]             # kept FFN layers, sorted by index
    ffn_neurons: torch.Tensor         # [n_layers, ffn_k] long, per kept FFN layer, ranked
    attn_neurons: torch.Tensor        # [n_layers, attn_k] long, per kept attention layer, ranked
    attn_layers_ranked: list[int]     # all layers, best first
    ffn_layers_ranked: list[int]
    attn_layer_scores: torch.Tensor   # [L]
    ffn_layer_scores: torch.Tensor    # [L]
    ffn_scores: torch.Tensor          # [n_layers, ffn] (kept FFN layers in index order)
    attn_scores: torch.Tensor         # [n_layers, heads*head_dim] (kept attention layers)

    def to_json(self) -> dict:
        """The reference's selection format (`[layer, neuron]` pairs in selection order)."""
        def pairs(layers, neurons):
            return [[l, int(n)] for l, row in zip(layers, neurons.tolist()) for n in row]
        return {
            "attn_layers_ranked": self.attn_layers_ranked,
            "ffn_layers_ranked": self.ffn_layers_ranked,
            "ffn_neurons": pairs(self.ffn_layers, self.ffn_neurons),
            "attn_neurons": pairs(self.attn_layers, self.attn_neurons),
            "ffn_scores": self.ffn_scores.tolist(),
            "attn_scores": self.attn_scores.tolist(),
            "attn_layer_scores": self.attn_layer_scores.tolist(),
            "ffn_layer_scores": self.ffn_layer_scores.tolist(),
        }


# ------------------------------------------------------------------------------------------ read-out
@dataclass
class Readout:
    """The logit lens of one model on one batch: `logits(v) = W_U (g * v * s)`.
    `g: [d]` final-norm weight (fp32), `W_U: [V, d]` (fp32, or fp16 in reference precision),
    `s: [B]`, `targets: [B]`; `W_bf16`: `W_U` in bf16 for the neuron-score product (bf16 precision)."""
    g: torch.Tensor
    W_U: torch.Tensor
    s: torch.Tensor
    targets: torch.Tensor
    precision: str
    W_bf16: torch.Tensor | None = None

    def logp(self, v: torch.Tensor) -> torch.Tensor:
        """log p(target_b) of read-out vectors `v: [..., B, n, d]`-broadcastable as `[B, n, d]` -> `[B, n]`.
        fp32: fp32 logits and log_softmax. reference: fp16 lm_head, fp16 softmax, fp16 log."""
        h = v.float() * self.s[:, None, None] * self.g                       # [B, n, d] fp32
        t = self.targets[:, None, None].expand(h.shape[0], h.shape[1], 1)
        if self.precision == "reference":
            probs = torch.softmax(h.half() @ self.W_U.T, dim=-1)
            return probs.gather(-1, t).squeeze(-1).log()                       # fp16
        return torch.log_softmax(h @ self.W_U.T, dim=-1).gather(-1, t).squeeze(-1)


def make_readout(model, tr: Trace, targets: torch.Tensor, precision: str = "fp32") -> Readout:
    """`s = (sqrt(var(y) + 1e-5) + 1e-6) ** -0.5` per example: the reference's normaliser, with its
    two quirks (population variance instead of mean square; the std square-rooted again)."""
    if precision not in PRECISIONS:
        fail(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    y = tr.y.float()
    sigma = torch.sqrt(y.var(-1, unbiased=False) + 1e-5)
    W_U = model.lm_head.weight.detach().to(y.device)     # y: on the model's main device (placed models)
    low = W_U.to(torch.bfloat16) if precision == "bf16" else None      # a bf16 model's own weight: no copy
    W_U = W_U.half() if precision == "reference" else W_U.float()        # one copy, reused by every score
    return Readout(g=model.model.norm.weight.detach().to(y.device, torch.float32), W_U=W_U,
                   s=(sigma + 1e-6) ** -0.5, targets=targets.to(y.device), precision=precision, W_bf16=low)


def _diff(new: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Score difference; in reference precision the subtraction happens in fp16 as in the original."""
    return (new - base).float()


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 tensor cores for the fp32 read-out product on CUDA (10-bit mantissa, the precision of the
    reference's fp16 path; about 8x the fp32 throughput). No effect on the CPU."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or old
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def round4(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 1e4) / 1e4


# -------------------------------------------------------------------------------------- layer scores
def layer_scores(ro: Readout, tr: Trace) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer attention `logp(x+a) - logp(x)` and FFN `logp(r+f) - logp(r)` scores, summed over
    examples -> (`attn [L]`, `ffn [L]`)."""
    x, a = tr.x.float().transpose(0, 1), tr.a.float().transpose(0, 1)       # [B, L, d]
    r = tr.r.float().transpose(0, 1)                                          # the model's own residual
    attn = _diff(ro.logp(x + a), ro.logp(x))
    ffn = _diff(ro.logp(r + tr.f.float().transpose(0, 1)), ro.logp(r))
    return attn.sum(0), ffn.sum(0)


# ------------------------------------------------------------------------------------- neuron scores
def neuron_scores(ro: Readout, base: torch.Tensor, coef: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Scores of adding neuron i's contribution `coef[b, i] * cols[:, i]` to `base[b]`:
    `logp(base + contribution) - logp(base)`, rounded to 4 decimals, per example -> `[B, n]`.

    `base: [B, d]`, `coef: [B, n]`, `cols: [d, n]` (down_proj or o_proj weight)."""
    B, n = coef.shape
    V = ro.W_U.shape[0]
    base = base.float()
    logp0 = ro.logp(base[:, None, :])                                         # [B, 1]
    out = torch.empty(B, n, device=base.device)
    step = max(1, CHUNK_ELEMENTS // (B * V))
    exact = ro.precision != "reference"                                       # fp32 logits (bf16: its product)
    if exact:
        z0 = (base * ro.s[:, None] * ro.g) @ ro.W_U.T                         # [B, V]
        block = step if base.is_cuda else max(1, CPU_BLOCK_ELEMENTS // (B * V))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        c = coef[:, lo:hi].float()                                            # [B, k]
        w = cols[:, lo:hi].to(base.device, torch.float32).T                   # [k, d] (placed: layer's device)
        if exact:
            if ro.W_bf16 is not None:
                P = (w * ro.g).to(torch.bfloat16) @ ro.W_bf16.T               # [k, V] bf16, fp32 accumulation
            else:
                with _tf32(TF32):
                    P = (w * ro.g) @ ro.W_U.T                                 # [k, V], shared by examples
            new = _shifted_logp(z0, c * ro.s[:, None], P, ro.targets, block)
        else:
            new = ro.logp(base[:, None, :] + c[:, :, None] * w[None])         # [B, k] fp16
        out[:, lo:hi] = _diff(new, logp0)
    return round4(out)


def _shifted_logp(z0: torch.Tensor, cs: torch.Tensor, P: torch.Tensor, targets: torch.Tensor,
                  block: int) -> torch.Tensor:
    """`log_softmax(z0[b] + cs[b, i] * P[i])[targets[b]]` for every example b and row i -> `[B, k]`,
    `block` rows at a time: one fused multiply-add builds the logits, the log-sum-exp runs in place
    (fewer passes over memory than `torch.logsumexp` on a separately built sum)."""
    B, k = cs.shape
    out = torch.empty(B, k, device=P.device)
    t = targets[:, None, None]
    for a in range(0, k, block):
        b = min(k, a + block)
        z = torch.addcmul(z0[:, None, :], cs[:, a:b, None], P[None, a:b])    # [B, rows, V]
        zt = z.gather(-1, t.expand(B, b - a, 1)).squeeze(-1)
        m = z.amax(-1, keepdim=True)
        out[:, a:b] = zt - m.squeeze(-1) - z.sub_(m).exp_().sum(-1).log_()
    return out


def ffn_neuron_scores(model, ro: Readout, tr: Trace, layers: list[int]) -> torch.Tensor:
    """FFN neuron i of layer l: `v_i = m_l[i] * down_proj[:, i]` on top of `r_l`; summed over
    examples -> `[len(layers), ffn]`."""
    blocks = decoder_layers(model)
    return torch.stack([neuron_scores(ro, tr.r[l], tr.m[l], blocks[l].mlp.down_proj.weight).sum(0)
                        for l in layers]) if layers else torch.empty(0, model_shape(model).ffn)


def attn_neuron_scores(model, ro: Readout, tr: Trace, layers: list[int]) -> torch.Tensor:
    """Attention neuron n = h*head_dim + j of layer l: `attn_w[n] * o_proj[:, n]` on top of the layer
    input `x_l` (reference quirk), scored on the last example only (reference quirk: the last
    example's score overwrites the others) -> `[len(layers), heads*head_dim]`."""
    blocks = decoder_layers(model)
    last = _last_example(ro)
    return torch.stack([neuron_scores(last, tr.x[l, -1:], tr.attn_w[l, -1:], blocks[l].self_attn.o_proj.weight)[0]
                        for l in layers]) if layers else torch.empty(0, model_shape(model).attn_neurons)


def _last_example(ro: Readout) -> Readout:
    return Readout(g=ro.g, W_U=ro.W_U, s=ro.s[-1:], targets=ro.targets[-1:], precision=ro.precision,
                   W_bf16=ro.W_bf16)


# ---------------------------------------------------------------------------------------- selection
def rank_layers(scores: torch.Tensor) -> list[int]:
    """Best first; equal scores rank the higher layer index first (the reference's
    `sorted(..., key=score)[::-1]`)."""
    s = scores.tolist()
    return sorted(range(len(s)), key=lambda i: (s[i], i), reverse=True)


def top_neurons(scores: torch.Tensor, k: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """`[n_layers, width] -> [n_layers, k]` indices by score, descending. Equal scores are ordered by
    `tiebreak` (descending) when given, then by lower index."""
    order = torch.arange(scores.shape[-1]).expand_as(scores)
    if tiebreak is not None:
        order = torch.sort(tiebreak, dim=-1, descending=True, stable=True).indices
    ranked = torch.sort(scores.gather(-1, order), dim=-1, descending=True, stable=True).indices
    return order.gather(-1, ranked)[:, :k]


def valid_topk_fraction(neurons: torch.Tensor, scores, k: int) -> float:
    """Share of selected `neurons: [n_layers, k]` whose score under `scores: [n_layers, width]` (e.g.
    the reference's) reaches that layer's k-th best score: with many ties, the fair way to compare
    two selections."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    kth = scores.sort(dim=-1, descending=True).values[:, k - 1:k]
    return (scores.gather(-1, neurons) >= kth - 1e-6).float().mean().item()


def _batch(examples, pad_id: int = 0):
    """Token-id lists -> left-padded `input_ids[:, :-1]`, mask and targets `ids[-1]`."""
    rows = [list(map(int, e)) for e in examples]
    if not rows:
        fail("locate needs at least one example")
    for i, r in enumerate(rows):
        if len(r) < 2:
            fail(f"example {i} has {len(r)} token(s): need at least 2 (input and target)")
    ids, mask = left_pad([r[:-1] for r in rows], pad_id)
    return ids, mask, torch.tensor([r[-1] for r in rows])


def _check_layers(layers, L, flag):
    for l in layers:
        if not 0 <= l < L:
            fail(f"{flag}: layer index {l} out of range: the model has {L} layers")
    return sorted(layers)


@torch.no_grad()
def locate(model, examples, n_layers: int, ffn_k: int, attn_k: int, precision: str = "fp32",
           attn_layers: list[int] | None = None, ffn_layers: list[int] | None = None,
           batch_size: int = 8) -> Selection:
    """Score layers and neurons of `model` on `examples` (token-id lists; the model reads ids[:-1],
    the target is ids[-1]); keep the top `n_layers` layers of each ranking (then sorted by index)
    and the top `ffn_k` / `attn_k` neurons of each kept layer. `attn_layers` / `ffn_layers` force
    the kept layers (inference locates layers once, then neurons per transfer rate)."""
    shape = model_shape(model)
    if not 1 <= n_layers <= shape.layers:
        fail(f"n_layers {n_layers}: must be in [1, {shape.layers}] for this model")
    if not 0 <= ffn_k <= shape.ffn:
        fail(f"ffn_k {ffn_k} larger than the layer's FFN width {shape.ffn}")
    if not 0 <= attn_k <= shape.attn_neurons:
        fail(f"attn_k {attn_k} larger than the layer's attention width {shape.attn_neurons}")
    examples = list(examples)
    attn_l = torch.zeros(shape.layers)
    ffn_l = torch.zeros(shape.layers)
    parts = []
    for lo in range(0, len(examples), batch_size):
        ids, mask, targets = _batch(examples[lo:lo + batch_size])
        tr = trace(model, ids, mask)
        ro = make_readout(model, tr, targets, precision)
        a, f = layer_scores(ro, tr)
        attn_l += a.cpu()
        ffn_l += f.cpu()
        parts.append((tr, ro))
    attn_ranked, ffn_ranked = rank_layers(attn_l), rank_layers(ffn_l)
    keep_attn = _check_layers(attn_layers, shape.layers, "attn_layers") if attn_layers is not None \
        else sorted(attn_ranked[:n_layers])
    keep_ffn = _check_layers(ffn_layers, shape.layers, "ffn_layers") if ffn_layers is not None \
        else sorted(ffn_ranked[:n_layers])

    ffn_s = sum(ffn_neuron_scores(model, ro, tr, keep_ffn).cpu() for tr, ro in parts)
    tr, ro = parts[-1]                      # the last example's attention scores win (reference)
    attn_s = attn_neuron_scores(model, ro, tr, keep_attn).cpu()
    ffn_tie = attn_tie = None
    if precision == "reference":
        # fp16 read-outs tie massively (3-30 distinct values per layer) and the original's unstable
        # argsort picks among ties arbitrarily; we pick the neurons with the larger exact (fp32) score.
        exact = [(tr, make_readout(model, tr, ro.targets, "fp32")) for tr, ro in parts]
        ffn_tie = sum(ffn_neuron_scores(model, ro32, tr, keep_ffn).cpu() for tr, ro32 in exact)
        attn_tie = attn_neuron_scores(model, exact[-1][1], exact[-1][0], keep_attn).cpu()
    return Selection(attn_layers=keep_attn, ffn_layers=keep_ffn,
                     ffn_neurons=top_neurons(ffn_s, ffn_k, ffn_tie),
                     attn_neurons=top_neurons(attn_s, attn_k, attn_tie),
                     attn_layers_ranked=attn_ranked, ffn_layers_ranked=ffn_ranked,
                     attn_layer_scores=attn_l, ffn_layer_scores=ffn_l, ffn_scores=ffn_s, attn_scores=attn_s)


# ------------------------------------------------------------------------------- one example, one file
@dataclass
class LocateConfig:
    """Locate the layers and neurons of one model on one example; write them in the reference's selection
    format (attn/ffn layer rankings, selected neurons and their scores) to --out, atomically.

    EXAMPLE_JSON holds `input_ids` (the model reads all but the last id; the last id is the target), e.g.
    tests/fixtures/tiny_llama/reference_selection.json. Instead of a file, give --prompt and --response to
    tokenise a chat example with the model's own tokenizer. --n_layers defaults to all the model's layers.
    An existing --out is an error unless --overwrite."""
    model_dir: str
    example_json: str | None = None
    n_layers: int | None = None
    ffn_k: int = 0
    attn_k: int = 0
    out: str = "selection.json"
    precision: str = "fp32"
    prompt: str | None = None
    response: str | None = None
    dtype: str = "auto"
    device: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        from pkt.io import check_device, check_model_path, check_output, int_flag, resolve_dtype

        if self.precision not in PRECISIONS:
            fail(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        int_flag(self.n_layers, "--n_layers", 1, allow_none=True)
        int_flag(self.ffn_k, "--ffn_k", 0)
        int_flag(self.attn_k, "--attn_k", 0)
        resolve_dtype(self.dtype)
        check_device(self.device, "--device")
        check_model_path(self.model_dir, "MODEL_DIR")
        if self.example_json is not None:
            if not Path(self.example_json).is_file():
                fail(f"{self.example_json}: no such file")
        elif self.prompt is None or self.response is None:
            fail("give EXAMPLE_JSON, or --prompt and --response")
        check_output(self.out, "--out", self.overwrite, inputs={"MODEL_DIR": self.model_dir,
                                                               "EXAMPLE_JSON": self.example_json})


def locate_example(cfg: LocateConfig) -> Selection:
    """`locate` on the one example of `cfg`, written to cfg.out."""
    from pkt.data import locate_ids
    from pkt.io import load_config, load_model, load_tokenizer, read_json, write_json

    if cfg.example_json is not None:
        ex = read_json(cfg.example_json, "EXAMPLE_JSON")
        ids = ex.get("input_ids") if isinstance(ex, dict) else None
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            fail(f"EXAMPLE_JSON {cfg.example_json}: expected a JSON object with a list of integers 'input_ids'")
        if len(ids) < 2:
            fail(f"EXAMPLE_JSON {cfg.example_json}: 'input_ids' needs at least 2 ids (the last is the target)")
    else:
        ids = locate_ids(load_tokenizer(cfg.model_dir, "MODEL_DIR"), [{"role": "user", "content": cfg.prompt},
                                                                      {"role": "assistant", "content": cfg.response}])
    # Checked against the model's config before the weights load.
    config = load_config(cfg.model_dir, "MODEL_DIR")
    vocab, depth = int(config.vocab_size), int(config.num_hidden_layers)
    oov = [i for i in ids if not 0 <= i < vocab]
    if oov:
        fail(f"{cfg.example_json or '--prompt/--response'}: token id(s) {oov[:5]} outside the model's vocabulary "
             f"[0, {vocab})")
    if cfg.n_layers is not None and cfg.n_layers > depth:
        fail(f"--n_layers {cfg.n_layers}: the model has {depth} layers")
    # The reference ran the patched (eager) attention; the reference-precision mode follows it.
    model = load_model(cfg.model_dir, dtype=cfg.dtype, device=cfg.device, flag="MODEL_DIR",
                       attn_implementation="eager" if cfg.precision == "reference" else None)
    n_layers = cfg.n_layers or model.config.num_hidden_layers
    sel = locate(model, [ids], n_layers=n_layers, ffn_k=cfg.ffn_k, attn_k=cfg.attn_k, precision=cfg.precision)
    write_json(cfg.out, sel.to_json(), indent=None)
    print(f"attention layers {sel.attn_layers}, FFN layers {sel.ffn_layers} -> {cfg.out}")
    return sel
