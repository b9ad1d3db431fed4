"""How closely `locate` reproduces the reference fixture on a given device (CPU or CUDA).

    python bench/reference_parity.py [--device cuda]
"""
import json
from pathlib import Path

import fire
import torch

from pkt.attribution import locate, valid_topk_fraction

ROOT = Path(__file__).resolve().parent.parent

FIX = ROOT / "tests" / "fixtures" / "tiny_llama"


def main(device: str = "cpu", attn_implementation: str = "eager"):
    from transformers import AutoModelForCausalLM

    ref = json.loads((FIX / "reference_selection.json").read_text())
    print("| device | attention | precision | FFN scores equal | attention scores equal | max abs diff "
          "| valid top-k FFN | valid top-k attention |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in ("fp32", "reference"):
        model = AutoModelForCausalLM.from_pretrained(FIX, dtype=torch.float16,
                                                     attn_implementation=attn_implementation).to(device).eval()
        sel = locate(model, [ref["input_ids"]], 4, 68, 25, precision=precision)
        f = (sel.ffn_scores - torch.tensor(ref["ffn_scores"])).abs()
        a = (sel.attn_scores - torch.tensor(ref["attn_scores"])).abs()
        print(f"| {device} | {attn_implementation} | {precision} | {(f < 5e-4).float().mean():.1%} | "
              f"{(a < 5e-4).float().mean():.1%} | {max(f.max(), a.max()):.4f} | "
              f"{valid_topk_fraction(sel.ffn_neurons, ref['ffn_scores'], 68):.1%} | "
              f"{valid_topk_fraction(sel.attn_neurons, ref['attn_scores'], 25):.1%} |")


if __name__ == "__main__":
    fire.Fire(main)
