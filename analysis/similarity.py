"""The Neural Incompatibility similarity analyses: teacher x student layer heatmaps (docs/similarity.md).

    python analysis/similarity.py --teacher DIR --student DIR --data data/gsm/gsm_extract_split.jsonl \\
        --n_examples 16 --out_dir figures/similarity
        -> representation_similarity.json/.png  (linear CKA of hidden states, [teacher layers, student layers])
           parametric_similarity.json/.png      (linear CKA of weights in vocabulary space, per module)

Models are loaded one at a time (teacher, then student) with pkt.io.load_model, so peak memory is
one model plus the collected hidden states. Nothing is written until everything is computed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pkt.figures import check_figures, pyplot, save_fig
from pkt.io import fail

ANALYSES = ("representation", "parametric")


def _label(path) -> str:
    p = Path(str(path))
    return p.name if p.exists() else str(path)


# --------------------------------------------------------------------------------------- figures
def _heatmap(ax, matrix, title: str):
    """Teacher layers on y, student layers on x, layer 0 bottom-left; white dots mark, for each
    student layer, the most similar teacher layer."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    m = np.asarray(matrix, dtype=float)
    im = ax.imshow(m, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    ax.plot(np.arange(m.shape[1]), m.argmax(0), "o", ms=3, color="white", mec="black", mew=0.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("student layer")
    ax.set_ylabel("teacher layer")
    ax.set_title(title, fontsize=9)
    return im


def representation_figure(record: dict):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.2, 5.4), layout="constrained")
    where = "last token of each" if record["positions"] == "last" else "tokens from"
    im = _heatmap(ax, record["cka"], f"{record['n_rows']} hidden states: {where} "
                                     f"{record['n_examples']} examples of {Path(record['data']).name}")
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.suptitle(f"Representation similarity: {record['teacher_name']} vs {record['student_name']}")
    return fig


def parametric_figure(record: dict):
    plt = pyplot()

    mods = list(record["cka"])
    cols = min(2, len(mods))
    rows = (len(mods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False, layout="constrained")
    for ax, m in zip(axes.flat, mods):
        im = _heatmap(ax, record["cka"][m], m)
    for ax in list(axes.flat)[len(mods):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label="linear CKA", shrink=0.8)
    ref = record.get("reference_cka") or {}
    ref = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in ref.items())
    fig.suptitle(f"Parametric similarity: {record['teacher_name']} vs {record['student_name']}\n"
                 f"weights read through {record['n_rows']} vocabulary tokens"
                 + (f"; reference CKA of {ref}" if ref else ""))
    return fig


def plot_representation(record: dict, out) -> str:
    """representation_similarity.json record -> PNG heatmap `[teacher layers, student layers]`."""
    return save_fig(representation_figure(record), out)


def plot_parametric(record: dict, out) -> str:
    """parametric_similarity.json record -> PNG, one heatmap per module."""
    return save_fig(parametric_figure(record), out)


# ----------------------------------------------------------------------------------------- main
@dataclass
class SimilarityConfig:
    """Write representation_similarity.{json,png} and parametric_similarity.{json,png} to --out_dir (an
    existing one of them is an error unless --overwrite True).

    --teacher: the larger model (HF directory or hub id); rows of every matrix.
    --student: the smaller model; columns. Same tokenizer for --positions all and for parametric.
    --data: chat JSONL ({"messages": [...]}); the first --n_examples records are read.
    --out_dir: where the four files go (written only once everything is computed).
    --n_examples: examples whose chat text (prompt + response) is run through both models.
    --max_len: tokens per example (truncated beyond). --batch_size: examples per forward pass.
    --positions: 'all' (every token, pooled) or 'last' (each example's last token).
    --max_tokens: with 'all', a seeded uniform subset of this many tokens (0: every token).
    --skip_first: with 'all', drop each example's first tokens (the attention sink's massive activations).
    --vocab_rows: vocabulary tokens (seeded uniform sample) through which weights are read.
    --modules: comma-separated, of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
    --analyses: 'representation', 'parametric' or both (comma-separated).
    --dtype: model dtype (auto = as saved, fp32, fp16, bf16); CKA is always computed in fp32.
    --device: default cuda when available, else cpu. --seed: for the token and vocabulary samples.
    """
    teacher: str
    student: str
    data: str
    out_dir: str = "figures/similarity"
    n_examples: int = 16
    max_len: int = 256
    batch_size: int = 4
    positions: str = "all"
    max_tokens: int = 4096
    skip_first: int = 1
    vocab_rows: int = 2048
    modules: str = "up_proj,down_proj,v_proj,o_proj"
    analyses: str = "representation,parametric"
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0
    overwrite: bool = False
    module_list: list = field(init=False, repr=False)      # modules, parsed
    analysis_list: list = field(init=False, repr=False)    # analyses, parsed

    def __post_init__(self):
        from pkt import similarity as sim
        from pkt.io import check_device, check_model_path, int_flag, parse_list, resolve_dtype
        from pkt.model import LINEAR_MODULES, parse_modules

        for flag, low in (("n_examples", 2), ("max_len", 2), ("batch_size", 1), ("max_tokens", 0),
                          ("vocab_rows", 2), ("skip_first", 0), ("seed", 0)):
            int_flag(getattr(self, flag), f"--{flag}", low)
        if self.positions not in sim.POSITIONS:
            fail(f"--positions {self.positions!r}: expected one of {', '.join(sim.POSITIONS)}")
        self.module_list = parse_modules(self.modules, "--modules", LINEAR_MODULES)
        self.analysis_list = parse_list(self.analyses, "--analyses", choices=ANALYSES)
        resolve_dtype(self.dtype)
        check_device(self.device, "--device")
        check_model_path(self.teacher, "--teacher")
        check_model_path(self.student, "--student")
        check_figures([Path(self.out_dir) / f"{a}_similarity.{ext}" for a in self.analysis_list
                       for ext in ("json", "png")], "--out_dir", self.overwrite,
                      {"--teacher": self.teacher, "--student": self.student, "--data": self.data})


def main(cfg: SimilarityConfig):
    """Both analyses of `cfg`; nothing is written until every figure is drawn."""
    import torch

    from pkt import similarity as sim
    from pkt.data import load_chat_jsonl
    from pkt.io import default_device, load_model, load_tokenizer, write_json

    teacher, student, data, positions, seed = cfg.teacher, cfg.student, cfg.data, cfg.positions, cfg.seed
    n_examples, max_len, batch_size, dtype = cfg.n_examples, cfg.max_len, cfg.batch_size, cfg.dtype
    max_tokens, skip_first, vocab_rows = cfg.max_tokens, cfg.skip_first, cfg.vocab_rows
    modules, analyses, device, out_dir = cfg.module_list, cfg.analysis_list, cfg.device, cfg.out_dir
    records = load_chat_jsonl(data)[:n_examples] if "representation" in analyses else []
    if "representation" in analyses and len(records) < 2:
        fail(f"--data {data}: needs at least 2 examples")
    tok_t, tok_s = load_tokenizer(teacher, "--teacher"), load_tokenizer(student, "--student")
    if "parametric" in analyses and tok_t.get_vocab() != tok_s.get_vocab():
        fail("--analyses parametric needs teacher and student to share one vocabulary (tokenizer)")
    device = device or default_device()

    batches = {}
    if records:
        batches = {"teacher": sim.chat_batches(tok_t, records, max_len, batch_size),
                   "student": sim.chat_batches(tok_s, records, max_len, batch_size)}
        same = all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches["teacher"], batches["student"]))
        if positions == "all" and not same:
            fail("--positions all needs teacher and student to tokenize --data identically; use --positions last")
        batches = {k: sim.select_positions(v, positions, max_tokens or None, skip_first, seed)
                   for k, v in batches.items()}

    token_ids = sim.vocab_sample(len(tok_t), vocab_rows, seed)
    reps, sigs, n_layers = {}, {}, {}
    t0 = time.time()
    for role, path in (("teacher", teacher), ("student", student)):
        model = load_model(path, dtype=dtype, device=device, flag=f"--{role}")
        n_layers[role] = model.config.num_hidden_layers
        if "representation" in analyses:
            reps[role] = sim.hidden_states(model, batches[role], desc=f"{role} hidden states")
        if "parametric" in analyses:
            if model.get_input_embeddings().weight.shape[0] < len(tok_t):
                fail(f"--{role} {path}: embedding matrix smaller than the tokenizer's vocabulary")
            sigs[role] = sim.parametric_signatures(model, token_ids, modules, desc=f"{role} weights")
            sigs[role].update(sim.embedding_signatures(model, token_ids))
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    common = {"teacher": str(teacher), "student": str(student), "teacher_name": _label(teacher),
              "student_name": _label(student), "teacher_layers": n_layers["teacher"],
              "student_layers": n_layers["student"], "seed": seed,
              "layout": "cka[i][j]: teacher layer i (0-based) vs student layer j"}
    out_dir = Path(out_dir)
    results = []
    if "representation" in analyses:
        cka = sim.layer_cka(reps["teacher"], reps["student"], device=device)
        rec = {**common, "metric": "linear CKA of the residual stream after each decoder layer",
               "data": str(data), "n_examples": len(records), "max_len": max_len, "positions": positions,
               "max_tokens": max_tokens, "skip_first": skip_first,
               "n_rows": int(reps["teacher"][0].shape[0]),
               "cka": [[round(float(v), 6) for v in row] for row in cka]}
        results.append(("representation_similarity", rec, representation_figure))
    if "parametric" in analyses:
        cka = {m: sim.cka_matrix(sigs["teacher"][m], sigs["student"][m]) for m in modules}
        rec = {**common, "metric": "linear CKA of each module's weight read in vocabulary space "
                                   "(readers: normed input embeddings @ W^T; writers: normed unembedding @ W)",
               "modules": modules, "n_rows": int(len(token_ids)),
               "reference_cka": {k: round(float(sim.cka_matrix(sigs["teacher"][k], sigs["student"][k])), 6)
                                 for k in ("input_embeddings", "unembeddings")},
               "cka": {m: [[round(float(v), 6) for v in row] for row in c] for m, c in cka.items()}}
        results.append(("parametric_similarity", rec, parametric_figure))
    figures = [(name, rec, figure(rec)) for name, rec, figure in results]   # all drawn before any write
    for name, rec, fig in figures:
        write_json(out_dir / f"{name}.json", rec, indent=None)
        print(save_fig(fig, out_dir / f"{name}.png"))
    print(f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    from pkt.io import run_cli

    run_cli(main, SimilarityConfig)
