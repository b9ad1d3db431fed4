"""LaTen's model layer: traces and differentiable weight deltas on *stock* Hugging Face Llama / Qwen2 / Mistral
models (`trace`, `Delta`, `inject`, `fold`). Decoder access, shapes and module names live in `pkt.model`.

Nothing here copies transformers' modeling code: everything is forward hooks on the unmodified
modules (the TransformerLens habit), registered for the duration of a `with` block.

- `trace(model, input_ids)` reads, at the last input position of each example, every layer's input
  `x`, attention output `a`, MLP output `f`, MLP coefficients `m = act(gate x) * up x`, the
  attention-neuron values `w[h*head_dim + j] = attn_prob[h, last, last] * v[kv(h), last, j]`, and
  the last layer's output `y` (the final norm's input).
- `inject(model, deltas)` makes the model compute with `W + delta` for chosen rows/columns of
  `up_proj`, `v_proj` (rows) and `down_proj`, `o_proj` (columns); the deltas stay differentiable
  and the model's own weights are never touched. `fold(model, deltas)` writes them into the
  weights for saving.

Attention neurons under grouped-query attention (Qwen2, Llama-3): neuron `n = h*head_dim + j` is
o_proj input column `n` (query head h, dimension j); its value comes from the KV head
`kv(h) = h // (num_heads // num_kv_heads)`, so its v_proj row is `kv(h)*head_dim + j`. Several
attention neurons can share one v_proj row; their deltas then add up.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pkt.io import fail
from pkt.model import ROW_MODULES, decoder_layers, linear, model_shape
from pkt.placement import main_device


# --------------------------------------------------------------------------------------------- trace
@dataclass
class Trace:
    """Activations at the last input position. `x, a, f: [L, B, d]`, `m: [L, B, ffn]`,
    `attn_w: [L, B, heads*head_dim]`, `y: [B, d]`; in the model's dtype, on its device."""
    x: torch.Tensor
    a: torch.Tensor
    f: torch.Tensor
    m: torch.Tensor
    attn_w: torch.Tensor
    y: torch.Tensor

    @property
    def r(self) -> torch.Tensor:
        """Residual stream after attention, `x + a`, as the model computes it (its dtype) `[L, B, d]`."""
        return self.x + self.a


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def trace(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Trace:
    """One forward pass; returns the `Trace` at position -1 of every row (left-pad batches).

    `input_ids: [B, T]`, `attention_mask: [B, T]` (1 = token, 0 = left padding). A model placed across
    devices (`pkt.placement`) works too: what is read is gathered on its `main_device`.
    """
    layers = decoder_layers(model)
    shape = model_shape(model)
    device = main_device(model)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    rope = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
    L = len(layers)
    store = {k: [None] * L for k in ("x", "a", "f", "m", "q", "p", "v")}
    rotary = {}
    handles = []

    def keep(name, i, from_output=True, transform=None):
        def hook(mod, args, out=None):
            t = out if from_output else args[0]
            store[name][i] = t[:, -1] if transform is None else transform(t)
        return hook

    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp

        def layer_pre(mod, args, kwargs, i=i):
            store["x"][i] = _hidden_arg(args, kwargs)[:, -1]
            if "cos" not in rotary:
                rotary["cos"], rotary["sin"] = kwargs["position_embeddings"]

        def attention_prob(mod, args, out, i=i, attn=attn):
            # attn_prob[h, last, last] recomputed from the real q/k projections with the model's own
            # RoPE function: independent of the attention backend (sdpa/eager/flash) the model uses.
            B, T, _ = out.shape
            k = out.view(B, T, shape.kv_heads, shape.head_dim).transpose(1, 2)        # [B, KV, T, hd]
            q = store["q"][i].view(B, shape.heads, 1, shape.head_dim)                 # [B, H, 1, hd]
            cos, sin = rotary["cos"].to(q.device), rotary["sin"].to(q.device)
            q = rope(q, q, cos[:, -1:], sin[:, -1:])[0]
            k = rope(k, k, cos, sin)[0]
            k = k.repeat_interleave(shape.heads // shape.kv_heads, dim=1)             # [B, H, T, hd]
            # As eager attention: scores in the model dtype, softmax in fp32, probabilities cast back.
            logits = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling              # [B, H, T]
            logits = logits.float().masked_fill(attention_mask.to(logits.device)[:, None, :] == 0, float("-inf"))
            store["p"][i] = torch.softmax(logits, dim=-1)[..., -1].to(out.dtype)      # [B, H]

        handles += [
            layer.register_forward_pre_hook(layer_pre, with_kwargs=True),
            attn.q_proj.register_forward_hook(keep("q", i)),
            attn.k_proj.register_forward_hook(attention_prob),
            attn.v_proj.register_forward_hook(keep("v", i)),
            attn.o_proj.register_forward_hook(keep("a", i)),
            mlp.down_proj.register_forward_pre_hook(keep("m", i, from_output=False)),
            mlp.down_proj.register_forward_hook(keep("f", i)),
        ]
    y = {}
    handles.append(model.model.norm.register_forward_pre_hook(lambda mod, args: y.update(y=args[0][:, -1])))
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    B = input_ids.shape[0]
    store = {k: [t.to(device) for t in ts] for k, ts in store.items() if k != "q"}   # placed models: one device
    v = torch.stack(store["v"]).view(L, B, shape.kv_heads, 1, shape.head_dim)
    v = v.expand(L, B, shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim)
    v = v.reshape(L, B, shape.heads, shape.head_dim)
    p = torch.stack(store["p"])                                                        # [L, B, H]
    attn_w = (p[..., None] * v).reshape(L, B, shape.attn_neurons)   # in the model dtype, as the model
    return Trace(x=torch.stack(store["x"]), a=torch.stack(store["a"]), f=torch.stack(store["f"]),
                 m=torch.stack(store["m"]), attn_w=attn_w, y=y["y"].to(device))


# -------------------------------------------------------------------------------------------- deltas
@dataclass
class Delta:
    """A sparse additive edit of one weight: `value` lands on rows (up/v: `[k, in]`) or columns
    (down/o: `[out, k]`) `index: [k]` of `layer`'s `module`. Repeated indices add up."""
    layer: int
    module: str
    index: torch.Tensor
    value: torch.Tensor

    @property
    def rows(self) -> bool:
        return self.module in ROW_MODULES


def _check(model, d: Delta) -> torch.nn.Linear:
    lin = linear(model, d.layer, d.module)
    k = d.index.numel()
    want = (k, lin.in_features) if d.rows else (lin.out_features, k)
    if tuple(d.value.shape) != want:
        fail(f"delta for layer {d.layer} {d.module}: value shape {tuple(d.value.shape)}, expected {want}")
    limit = lin.out_features if d.rows else lin.in_features
    if k and (int(d.index.min()) < 0 or int(d.index.max()) >= limit):
        fail(f"delta for layer {d.layer} {d.module}: neuron index out of range [0, {limit})")
    return lin


@contextlib.contextmanager
def inject(model, deltas: list[Delta]):
    """Inside the block, `model` computes with `W + delta` for every delta; gradients flow into the
    delta values (not the frozen weights). Only the k touched rows/columns enter the graph:
    `(W + D) x = W x + D x`, with `D x` a `[.., k]` product instead of a dense weight copy."""
    handles = []
    for d in deltas:
        lin = _check(model, d)
        index = d.index.to(lin.weight.device)

        def hook(mod, args, out, d=d, index=index):
            x = args[0]
            value = d.value.to(device=x.device, dtype=x.dtype)
            if d.rows:
                return out.index_add(-1, index, F.linear(x, value))
            return out + F.linear(x.index_select(-1, index), value)

        handles.append(lin.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold(model, deltas: list[Delta]) -> None:
    """Add the deltas into the weights in place (for saving a real, transferred model)."""
    for d in deltas:
        lin = _check(model, d)
        w = lin.weight
        value = d.value.detach().to(device=w.device, dtype=torch.float32)
        index = d.index.to(w.device)
        merged = w.float().index_add(0 if d.rows else 1, index, value)
        w.copy_(merged.to(w.dtype))
