"""`python -m pkt.locate MODEL_DIR EXAMPLE_JSON --n_layers N --ffn_k K --attn_k K --out OUT.json`

Locate the layers and neurons of one model on one example and write them in the reference's
selection format. EXAMPLE_JSON holds `input_ids` (the model reads all but the last id; the last id
is the target), e.g. tests/fixtures/tiny_llama/reference_selection.json. Instead of a file, give
`--prompt` and `--response` to tokenise a chat example with the model's own tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

from pkt.io import fail, load_model, run_cli, write_json


def main(model_dir: str, example_json: str | None = None, n_layers: int | None = None, ffn_k: int = 0,
         attn_k: int = 0, out: str = "selection.json", precision: str = "fp32", prompt: str | None = None,
         response: str | None = None, dtype: str = "auto", device: str | None = None):
    """Write attn/ffn layer rankings, selected neurons and their scores to OUT (atomic)."""
    from pkt.attribution import PRECISIONS, locate

    if precision not in PRECISIONS:
        fail(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if example_json is not None:
        p = Path(example_json)
        if not p.is_file():
            fail(f"{example_json}: no such file")
        try:
            ids = json.loads(p.read_text())["input_ids"]
        except (json.JSONDecodeError, KeyError, TypeError):
            fail(f"{example_json}: expected a JSON object with field 'input_ids'")
    elif prompt is not None and response is not None:
        from pkt.data import locate_ids
        from pkt.io import load_tokenizer

        ids = locate_ids(load_tokenizer(model_dir), [{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": response}])
    else:
        fail("give EXAMPLE_JSON, or --prompt and --response")
    # The reference ran the patched (eager) attention; the reference-precision mode follows it.
    model = load_model(model_dir, dtype=dtype, device=device, flag="MODEL_DIR",
                       attn_implementation="eager" if precision == "reference" else None)
    n_layers = n_layers or model.config.num_hidden_layers
    sel = locate(model, [ids], n_layers=n_layers, ffn_k=ffn_k, attn_k=attn_k, precision=precision)
    write_json(out, sel.to_json(), indent=None)
    print(f"attention layers {sel.attn_layers}, FFN layers {sel.ffn_layers} -> {out}")


if __name__ == "__main__":
    run_cli(main)
