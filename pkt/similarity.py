"""How alike are two models? Layer x layer similarity of teacher and student, the *Neural
Incompatibility* analyses (docs/similarity.md).

- **Representation similarity**: linear CKA (Kornblith et al., 2019) between the residual stream
  after every teacher layer and after every student layer, on the same tokens of the same texts.
- **Parametric similarity**: linear CKA between the weights of one module type (`up_proj`, ...) of
  every teacher layer and every student layer, each weight read in the vocabulary space the two
  models share (Dar et al., 2023, "Analyzing Transformers in Embedding Space"): a module that reads
  the residual stream is applied to the (RMS-normed) input embeddings of sampled tokens, a module
  that writes to it is read out through the final norm and the unembedding. Both give one row per
  token, so widths may differ (Llama-2-13B 5120/13824 vs 7B 4096/11008).

Linear CKA of `X: [n, d_x]` and `Y: [n, d_y]` (rows = the same n samples), with `Xc`, `Yc` the
column-centred features and `K = Xc Xc^T`, `L = Yc Yc^T` their centred Gram matrices:

    CKA = <K, L>_F / (||K||_F ||L||_F) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

The Gram ("sample space") form costs O(n^2 d), the feature form O(n d_x d_y); both are used, the
cheaper one is picked. Everything is computed in fp32, on whatever device the tensors are on.
A *signature* is the centred Gram matrix scaled to unit Frobenius norm: the CKA of two
representations is the dot product of their signatures, so a layer x layer CKA matrix is one matmul.
A representation without variance has signature 0 and CKA 0 with anything.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from pkt.model import LINEAR_MODULES, TRANSFER_MODULES, decoder_layers, linear, residual_stream
from pkt.data import collate_left, tokenize_example
from pkt.io import fail

READS = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
         "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
WRITES = ("o_proj", "down_proj")
POSITIONS = ("all", "last")


# ------------------------------------------------------------------------------------------- CKA
def _fro(T: torch.Tensor) -> torch.Tensor:
    """Frobenius norm accumulated in fp64 (torch's fp32 norm of millions of entries is off by ~1e-4)."""
    return torch.linalg.vector_norm(T, dtype=torch.float64)


def _centred_unit(X: torch.Tensor) -> torch.Tensor:
    """`[n, d]` -> column-centred fp32 copy scaled to unit Frobenius norm (CKA ignores the scale;
    this keeps fp32 squares of large activations far from overflow)."""
    X = X.float()
    X = X - X.mean(0, keepdim=True)
    return X / _fro(X).clamp_min(torch.finfo(torch.float32).tiny)


def _rows(*reps) -> int:
    n = {r.shape[0] for r in reps}
    if len(n) != 1:
        fail(f"CKA needs the same samples (rows) on both sides, got row counts {sorted(n)}")
    n = n.pop()
    if n < 2:
        fail("CKA needs at least 2 samples")
    return n


def gram_signature(X: torch.Tensor) -> torch.Tensor:
    """`[n, d]` -> `[n, n]`: centred Gram matrix with unit Frobenius norm (0 if X has no variance)."""
    Xc = _centred_unit(X)
    K = Xc @ Xc.T
    return K / _fro(K).clamp_min(torch.finfo(torch.float32).tiny)


def _self_norm(Xc: torch.Tensor) -> torch.Tensor:
    """||Xc^T Xc||_F = ||Xc Xc^T||_F, through the smaller of the two products."""
    return _fro(Xc.T @ Xc) if Xc.shape[1] <= Xc.shape[0] else _fro(Xc @ Xc.T)


def _use_gram_form(n: int, dx: int, dy: int) -> bool:
    """Gram form costs ~n^2 (dx + dy + 1), feature form ~n (dx^2 + dy^2 + dx dy)."""
    return n * (dx + dy + 1) < dx * dx + dy * dy + dx * dy


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of `X: [n, d_x]` and `Y: [n, d_y]` (same n rows), in [0, 1]."""
    n = _rows(X, Y)
    Y = Y.to(X.device)
    if _use_gram_form(n, X.shape[1], Y.shape[1]):
        return float((gram_signature(X).double() * gram_signature(Y).double()).sum())
    Xc, Yc = _centred_unit(X), _centred_unit(Y)
    den = _self_norm(Xc) * _self_norm(Yc)
    return float(_fro(Yc.T @ Xc) ** 2 / den.clamp_min(torch.finfo(torch.float32).tiny))


def cka_matrix(sigs_a: torch.Tensor, sigs_b: torch.Tensor) -> torch.Tensor:
    """Signatures `[L_a, n, n]`, `[L_b, n, n]` -> CKA matrix `[L_a, L_b]` (fp32, on sigs_a's device).
    The n^2-long dot products accumulate in fp64 (in fp32 their rounding reaches ~1e-4)."""
    if sigs_a.shape[1:] != sigs_b.shape[1:]:
        fail(f"CKA needs the same samples on both sides: signatures {tuple(sigs_a.shape[1:])} "
             f"vs {tuple(sigs_b.shape[1:])}")
    a = sigs_a.reshape(sigs_a.shape[0], -1)
    b = sigs_b.to(a.device).reshape(sigs_b.shape[0], -1)
    b = b.double()
    return torch.stack([b @ row.double() for row in a]).float()


def _chunks(items: list, bytes_each: int, budget: int) -> list[list]:
    step = max(1, budget // max(bytes_each, 1))
    return [items[i:i + step] for i in range(0, len(items), step)]


@torch.no_grad()
def layer_cka(reps_a: list[torch.Tensor], reps_b: list[torch.Tensor], device=None,
              chunk_bytes: int = 2 ** 30) -> torch.Tensor:
    """Linear CKA of every layer of A with every layer of B -> `[L_a, L_b]` (fp32, CPU).

    `reps_a[i]: [n, d_a]`, `reps_b[j]: [n, d_b]`, the same n samples in the same order (e.g. from
    `hidden_states`). Computed on `device` (default: where reps_a[0] is), holding at most about
    `chunk_bytes` of B's layers there at a time: the Gram form (n^2 per layer) when n is small
    next to the widths, the feature form (n d per layer) otherwise. Loops run over layers only.
    """
    n = _rows(*reps_a, *reps_b)
    device = torch.device(device) if device is not None else reps_a[0].device
    da = sum(r.shape[1] for r in reps_a) // len(reps_a)
    db = sum(r.shape[1] for r in reps_b) // len(reps_b)
    out = torch.zeros(len(reps_a), len(reps_b))
    if _use_gram_form(n, da, db):
        for cols in _chunks(list(range(len(reps_b))), 4 * n * n, chunk_bytes):
            sb = torch.stack([gram_signature(reps_b[j].to(device)) for j in cols])          # [c, n, n]
            for i, x in enumerate(reps_a):
                out[i, cols] = cka_matrix(gram_signature(x.to(device))[None], sb)[0].cpu()
        return out
    # feature form: ||Yc^T Xc||^2 / (||Xc^T Xc|| ||Yc^T Yc||), unit-norm centred features
    self_a = torch.stack([_self_norm(_centred_unit(x.to(device))) for x in reps_a]).cpu()
    for cols in _chunks(list(range(len(reps_b))), 4 * n * db, chunk_bytes):
        yb = [_centred_unit(reps_b[j].to(device)) for j in cols]
        self_b = torch.stack([_self_norm(y) for y in yb]).cpu()
        for i, x in enumerate(reps_a):
            xc = _centred_unit(x.to(device))
            cross = torch.stack([_fro(y.T @ xc) ** 2 for y in yb]).cpu()
            out[i, cols] = (cross / (self_a[i] * self_b).clamp_min(torch.finfo(torch.float32).tiny)).float()
    return out


# ---------------------------------------------------------------------------- representations
def chat_batches(tokenizer, records: list[dict], max_len: int = 256, batch_size: int = 4) -> list[dict]:
    """Chat records -> left-padded batches (input_ids, attention_mask `[b, s]`) of the chat text
    (prompt + response, as pkt.data builds it for training), in record order."""
    feats = [tokenize_example(tokenizer, r["messages"], cutoff_len=max_len) for r in records]
    return [collate_left(feats[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(feats), batch_size)]


def select_positions(batches: list[dict], positions: str = "all", max_tokens: int | None = None,
                     skip_first: int = 1, seed: int = 0) -> list[dict]:
    """Add `keep: [b, s]` (bool) to each batch: each example's last token ('last'), or ('all') every
    non-pad token from its `skip_first`-th on, a seeded uniform subset of `max_tokens` of them when
    there are more. `skip_first=1` drops the first token, where LLMs put their attention sink and
    its massive activations (norms ~100x the rest) that would otherwise dominate linear CKA."""
    if positions not in POSITIONS:
        fail(f"--positions {positions!r}: expected one of {', '.join(POSITIONS)}")
    masks = [b["attention_mask"].bool() for b in batches]
    if positions == "last":     # left padding: the last column is every row's last token
        keeps = [torch.zeros_like(m) for m in masks]
        for k in keeps:
            k[:, -1] = True
    else:
        keeps = [m & (m.long().cumsum(1) > skip_first) for m in masks]     # position in example >= skip_first
        flat = torch.cat([k.flatten() for k in keeps])
        idx = flat.nonzero().squeeze(1)
        if max_tokens and len(idx) > max_tokens:
            g = torch.Generator().manual_seed(seed)
            chosen = idx[torch.randperm(len(idx), generator=g)[:max_tokens]]
            flat = torch.zeros_like(flat)
            flat[chosen] = True
            keeps = [f.view_as(m) for f, m in zip(flat.split([m.numel() for m in masks]), masks)]
    return [{**b, "keep": k} for b, k in zip(batches, keeps)]


@torch.no_grad()
def hidden_states(model, batches: list[dict], desc: str = "hidden states") -> list[torch.Tensor]:
    """The residual stream after every decoder layer at the kept positions -> L tensors `[n, d]`
    (fp32, CPU; rows in batch order, then row-major (example, position) order).

    `batches`: dicts with `input_ids`, `attention_mask` `[b, s]` and optionally `keep` `[b, s]`
    (default: the non-pad tokens). `pkt.model.residual_stream` at depths 1..L (the output of layer 0..L-1);
    no LM head is run. (This is HF's `hidden_states[1:]`, except that HF gives the last one after the final
    norm.)
    """
    L = len(decoder_layers(model))
    device = next(model.parameters()).device
    store: list[list[torch.Tensor]] = [[] for _ in range(L)]
    with residual_stream(model, range(1, L + 1)) as hs:
        for b in tqdm(batches, desc=desc, leave=False):
            mask = b["attention_mask"].to(device)
            keep = b.get("keep", mask.bool()).to(device)
            model.model(input_ids=b["input_ids"].to(device), attention_mask=mask, use_cache=False)
            for d in range(1, L + 1):
                store[d - 1].append(hs[d][keep].float().cpu())                            # [k, d]
    return [torch.cat(s) for s in store]


# -------------------------------------------------------------------------------------- weights
def vocab_sample(vocab_size: int, n: int, seed: int = 0) -> torch.Tensor:
    """`n` distinct token ids drawn uniformly from `range(vocab_size)` (seeded), sorted -> `[n]`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab_size, generator=g)[:min(n, vocab_size)].sort().values


@torch.no_grad()
def weight_in_vocab_space(model, layer: int, module: str, token_ids: torch.Tensor) -> torch.Tensor:
    """One module's weight seen from the vocabulary -> `[n_tokens, neurons]` (fp32).

    Readers of the residual stream (q/k/v/gate/up, `W: [out, d]`): the layer's own RMSNorm applied
    to the input embeddings of `token_ids`, times `W^T` -> `[n, out]`. Writers (o/down,
    `W: [d, in]`): the unembedding rows of `token_ids` scaled by the final norm's weight, times
    `W` -> `[n, in]` (what each neuron's output vector adds to those tokens' logits).
    """
    if module not in LINEAR_MODULES:
        fail(f"unknown module '{module}': expected one of {', '.join(LINEAR_MODULES)}")
    W = linear(model, layer, module).weight
    ids = token_ids.to(W.device)
    if module in READS:
        norm = getattr(decoder_layers(model)[layer], READS[module])
        x = norm(model.get_input_embeddings().weight[ids]).float()                          # [n, d]
        return x @ W.float().T
    u = model.lm_head.weight[ids].float() * model.model.norm.weight.float()                  # [n, d]
    return u @ W.float()


@torch.no_grad()
def parametric_signatures(model, token_ids: torch.Tensor, modules=TRANSFER_MODULES,
                          desc: str = "weights") -> dict[str, torch.Tensor]:
    """{module: `[L, n, n]`} Gram signatures of every layer's weight in vocabulary space (fp32, CPU).
    Models can then be compared one at a time: `cka_matrix(sig_teacher, sig_student)`."""
    L = len(decoder_layers(model))
    out = {}
    for m in tqdm(list(modules), desc=desc, leave=False):
        out[m] = torch.stack([gram_signature(weight_in_vocab_space(model, i, m, token_ids)).cpu()
                              for i in range(L)])
    return out


@torch.no_grad()
def embedding_signatures(model, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'input_embeddings', 'unembeddings'}: `[1, n, n]` signatures of the rows of `token_ids` in the
    two matrices every vocabulary-space reading goes through. Their CKA across two models is the
    reference for `parametric_signatures`: what the vocabulary geometry alone contributes."""
    ids = token_ids.to(model.lm_head.weight.device)
    return {"input_embeddings": gram_signature(model.get_input_embeddings().weight[ids]).cpu()[None],
            "unembeddings": gram_signature(model.lm_head.weight[ids]).cpu()[None]}


def parametric_similarity(teacher, student, token_ids: torch.Tensor, modules=TRANSFER_MODULES) -> dict[str, torch.Tensor]:
    """{module: `[L_teacher, L_student]`} linear CKA of the two models' weights in vocabulary space.
    Both models must share the vocabulary that `token_ids` index."""
    st, ss = parametric_signatures(teacher, token_ids, modules), parametric_signatures(student, token_ids, modules)
    return {m: cka_matrix(st[m], ss[m]) for m in modules}
