"""The ground floor: access to a stock Hugging Face decoder (Llama, Qwen2, Mistral) and its named parts.

Everything above this module speaks these names; nothing here copies transformers' modeling code.

- `decoder_layers(model)` / `model_shape(model)` / `linear(model, layer, module)`: the decoder, its sizes, one
  projection by (layer index, module name).
- One vocabulary of module names: `ATTN_MODULES`, `MLP_MODULES`, `LINEAR_MODULES`, `EMBED_MODULES`, ...
- `residual_stream(model, depths)`: a named capture of the residual stream during a forward pass.

**Depth convention** (used by every capture in the project): depth `d` is the residual stream after `d`
decoder layers, i.e. the output of `model.model.layers[d - 1]`; depth 0 is the embedding output. Layer
*indices* (`linear(model, i, ...)`, selections, logs) are 0-based, so layer `i`'s output is depth `i + 1`.
Papers that number layers from 1 (SemAlign) therefore use depths directly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pkt.io import fail, parse_list

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBED_MODULES = ("embed_tokens", "lm_head")
ALL_MODULES = LINEAR_MODULES + EMBED_MODULES
# LaTen's transferred weights: rows of up/v (readers of the residual stream, `weight[index, :]`) and
# columns of down/o (writers, `weight[:, index]`).
TRANSFER_MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
ROW_MODULES = ("up_proj", "v_proj")
COL_MODULES = ("down_proj", "o_proj")


def parse_modules(value, flag: str, allowed=ALL_MODULES) -> list[str]:
    """A module-list flag (`up_proj,v_proj`, `[q_proj, v_proj]`, a list) -> validated names, order kept, through
    `pkt.io.parse_list`; an unknown name is a one-line error listing the allowed ones."""
    modules = parse_list(value, flag)
    unknown = [m for m in modules if m not in allowed]
    if unknown:
        fail(f"unknown module(s) {', '.join(map(str, unknown))} in {flag}: expected some of {', '.join(allowed)}")
    return modules


@dataclass(frozen=True)
class Shape:
    """Sizes of a decoder: `layers`, `hidden` (d), `ffn` (intermediate), query `heads`, `kv_heads`, `head_dim`,
    `vocab` (rows of the LM head)."""
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def attn_neurons(self) -> int:
        """Attention neurons per layer: o_proj input columns, `heads * head_dim`."""
        return self.heads * self.head_dim


def decoder_layers(model):
    """The list of decoder layers of a Llama-like causal LM, or a one-line error."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = layers is not None and len(layers) > 0 and hasattr(model, "lm_head") and hasattr(inner, "norm")
    if ok:
        l0 = layers[0]
        attn, mlp = getattr(l0, "self_attn", None), getattr(l0, "mlp", None)
        ok = (attn is not None and mlp is not None
              and all(hasattr(attn, n) for n in ATTN_MODULES)
              and all(hasattr(mlp, n) for n in MLP_MODULES)
              and not hasattr(attn, "q_norm"))  # q/k norms (Qwen3) would change the attention read-out
    if not ok:
        name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        fail(f"model type '{name}' is not Llama/Qwen2-like (needs model.layers[i].self_attn.{{q,k,v,o}}_proj, "
             f"mlp.{{gate,up,down}}_proj, model.norm and lm_head)")
    return layers


def model_shape(model) -> Shape:
    layers = decoder_layers(model)
    attn, mlp = layers[0].self_attn, layers[0].mlp
    head_dim = attn.head_dim
    heads = attn.o_proj.in_features // head_dim
    kv_heads = attn.v_proj.out_features // head_dim
    return Shape(layers=len(layers), hidden=attn.o_proj.out_features, ffn=mlp.up_proj.out_features,
                 heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=model.lm_head.out_features)


def linear(model, layer: int, module: str) -> torch.nn.Linear:
    """The projection `module` (one of LINEAR_MODULES) of decoder layer `layer` (0-based)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        fail(f"layer index {layer} out of range: the model has {len(layers)} layers")
    block = layers[layer]
    if module in ATTN_MODULES:
        return getattr(block.self_attn, module)
    if module in MLP_MODULES:
        return getattr(block.mlp, module)
    fail(f"unknown module '{module}': expected one of {', '.join(LINEAR_MODULES)}")


def attention_neuron_v_rows(shape: Shape, neurons: torch.Tensor) -> torch.Tensor:
    """v_proj rows feeding attention neurons `h*head_dim + j` (GQA-aware): `kv(h)*head_dim + j`, where
    `kv(h) = h // (heads // kv_heads)`. Several query heads may share one row."""
    group = shape.heads // shape.kv_heads
    return (neurons // shape.head_dim) // group * shape.head_dim + neurons % shape.head_dim


def unembedding(model) -> torch.Tensor:
    """The output embedding (LM head) weight `[V, d]`, tied or not."""
    return model.get_output_embeddings().weight


# ------------------------------------------------------------------------------------- residual stream
class StopForward(Exception):
    """Raised by a `residual_stream(..., stop_after=d)` hook once depth d is recorded: the rest of the forward
    pass is skipped (see `run_until`)."""


@contextlib.contextmanager
def residual_stream(model, depths, leaf_embeddings: bool = False, stop_after: int | None = None):
    """Record the residual stream at `depths` (see the module docstring: 0 = embedding output, d = output of
    `layers[d-1]`) during the forward passes of the `with` block -> dict depth -> `[B, T, d]` (the model's
    dtype, still in the autograd graph; each forward pass overwrites the previous one's entries).

    `leaf_embeddings`: the embedding output becomes a leaf that requires grad, so activation gradients exist
    even when every parameter is frozen (attribution on a frozen model).
    `stop_after`: raise `StopForward` right after that depth is recorded."""
    layers = decoder_layers(model)
    depths = set(depths)
    out: dict[int, torch.Tensor] = {}
    handles = []

    def keep(d):
        def hook(mod, args, o):
            out[d] = o[0] if isinstance(o, tuple) else o
            if d == stop_after:
                raise StopForward
        return hook

    def embed_hook(mod, args, o):
        if leaf_embeddings:
            o = o.detach().requires_grad_(True)
        out[0] = o
        return o

    try:
        if 0 in depths or leaf_embeddings:
            handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
        for d in sorted((depths | ({stop_after} if stop_after else set())) - {0}):
            if not 1 <= d <= len(layers):
                fail(f"depth {d} out of range: the model has {len(layers)} layers")
            handles.append(layers[d - 1].register_forward_hook(keep(d)))
        yield out
    finally:
        for h in handles:
            h.remove()


def run_until(model, input_ids, attention_mask, depths) -> dict[int, torch.Tensor]:
    """Residual streams at `depths` (`[B, T, d]` each), running the decoder only up to the deepest of them
    (no LM head, no later layers)."""
    depths = set(depths)
    with residual_stream(model, depths, stop_after=max(depths) or None) as hs:
        try:
            model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return hs
