"""Random-weight Llama models at real shapes for the benchmarks: built on the meta device, materialised
directly on the target device and filled there (normal(0, initializer_range) weights, unit norms), so a 13B
model costs seconds on a GPU and never a CPU initialisation pass. Nothing is downloaded.

    from random_models import random_llama
    model = random_llama("llama-2-13b", "cuda", torch.bfloat16)
"""
from __future__ import annotations

import torch

from pkt.testing import LLAMA2_SHAPES


def llama_config(shape, **overrides):
    """A LlamaConfig from a Llama-2 shape name or a dict of sizes (untied embeddings, sdpa attention)."""
    from transformers import LlamaConfig

    sizes = dict(LLAMA2_SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    sizes.setdefault("num_key_value_heads", sizes["num_attention_heads"])
    sizes.update(overrides)
    return LlamaConfig(**sizes, max_position_embeddings=4096, initializer_range=0.02, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def meta_llama(shape, **overrides):
    """The same model on the meta device: shapes and parameter counts, no memory."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(shape, **overrides))


@torch.no_grad()
def random_llama(shape, device, dtype=torch.bfloat16, seed: int = 0, **overrides):
    """A random Llama on `device` in `dtype`, in eval mode (transformers' default attention: sdpa)."""
    model = meta_llama(shape, **overrides).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    # non-persistent buffers (the rotary frequencies) were left uninitialised by to_empty: rebuild them
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(model.config).to(device)
    return model.eval()


def param_bytes(model, dtype=torch.bfloat16) -> int:
    return sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()
