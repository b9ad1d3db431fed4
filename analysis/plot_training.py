"""LaTen translator training figures from a `train_log.jsonl` (one JSON object per step).

    python analysis/plot_training.py --log outputs/.../train_log.jsonl --out_dir figures
        -> figures/laten_training_loss.png, figures/laten_layer_map.png
    python analysis/plot_training.py --transfer_json outputs/.../laten_transfer.json --out_dir figures
        -> figures/laten_layer_map.png only
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pkt.data import load_jsonl
from pkt.figures import check_figures, pyplot, save_fig
from pkt.io import fail, read_json

LOSS_KEYS = ("loss", "lm_loss", "mse_loss")
LAYER_KEYS = ("teacher_ffn_layers", "student_ffn_layers", "teacher_attn_layers", "student_attn_layers")


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_loss(rows: list[dict], out) -> str:
    """Loss curves (total, LM, MSE) per step, learning rate below."""
    plt = pyplot()

    rows = [r for r in rows if _num(r.get("step"))]
    if not rows:
        fail("training log: no rows with a numeric 'step'")
    has_lr = any(_num(r.get("lr")) for r in rows)
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(7, 5 if has_lr else 3.6), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]} if has_lr else None, squeeze=False)
    ax = axes[0, 0]
    for key, style in zip(LOSS_KEYS, ("-o", "--s", ":^")):
        pts = [(r["step"], r[key]) for r in rows if _num(r.get(key))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, ms=3, label=key)
    ax.set_ylabel("loss")
    ax.set_title("LaTen knowledge-translator training")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite loss logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if has_lr:
        pts = [(r["step"], r["lr"]) for r in rows if _num(r.get("lr"))]
        xs, ys = zip(*pts)
        axes[1, 0].plot(xs, ys, color="gray")
        axes[1, 0].set_ylabel("lr")
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    total = sum(r["seconds"] for r in rows if _num(r.get("seconds")))
    if total:
        fig.text(0.99, 0.01, f"{len(rows)} steps, {total:.0f} s", ha="right", va="bottom", fontsize=8, color="gray")
    return save_fig(fig, out)


def layer_pairs(record: dict, kind: str) -> tuple[list[int], list[int]]:
    t = [int(i) for i in record.get(f"teacher_{kind}_layers") or []]
    s = [int(i) for i in record.get(f"student_{kind}_layers") or []]
    return t, s


def plot_layer_map(record: dict, out, teacher_layers: int | None = None, student_layers: int | None = None,
                   title: str = "") -> str:
    """Teacher layer i -> student layer j, one line per transferred pair (FFN and attention panels)."""
    plt = pyplot()

    if not any(record.get(k) for k in LAYER_KEYS):
        fail(f"no layer lists ({', '.join(LAYER_KEYS)}) to draw")
    fig, axes = plt.subplots(1, 2, figsize=(8, 5), sharey=False)
    for ax, kind, color in zip(axes, ("ffn", "attn"), ("tab:blue", "tab:orange")):
        t, s = layer_pairs(record, kind)
        nt = teacher_layers or (max(t) + 1 if t else 1)
        ns = student_layers or (max(s) + 1 if s else 1)
        ax.scatter([0] * nt, range(nt), s=10, color="lightgray", zorder=1)
        ax.scatter([1] * ns, range(ns), s=10, color="lightgray", zorder=1)
        for i, j in zip(t, s):
            ax.plot([0, 1], [i, j], color=color, alpha=0.7, lw=1.2, zorder=2)
        ax.scatter([0] * len(t), t, s=18, color=color, zorder=3)
        ax.scatter([1] * len(s), s, s=18, color=color, zorder=3)
        ax.set_xticks([0, 1], ["teacher layer", "student layer"])
        ax.set_xlim(-0.3, 1.3)
        ax.set_ylim(max(nt, ns) - 0.5, -0.5)
        ax.set_title(f"{kind.upper()}: {len(t)} teacher -> {len(s)} student layers"
                     + ("" if len(t) == len(s) else " (lists differ in length)"), fontsize=9)
        ax.grid(axis="y", alpha=0.2)
    fig.suptitle(title or "LaTen layer mapping")
    return save_fig(fig, out)


@dataclass
class TrainingFigures:
    """--log train_log.jsonl (loss curve + layer map at --step, default last) and/or --transfer_json
    laten_transfer.json (layer map from it instead). An existing figure in --out_dir is an error unless
    --overwrite True."""
    log: str | None = None
    out_dir: str = "figures"
    step: int | None = None
    transfer_json: str | None = None
    teacher_layers: int | None = None
    student_layers: int | None = None
    overwrite: bool = False

    def __post_init__(self):
        from pkt.io import int_flag

        if not self.log and not self.transfer_json:
            fail("give --log train_log.jsonl and/or --transfer_json laten_transfer.json")
        int_flag(self.teacher_layers, "--teacher_layers", 1, allow_none=True)
        int_flag(self.student_layers, "--student_layers", 1, allow_none=True)
        check_figures(self.outputs(), "--out_dir", self.overwrite,
                      {"--log": self.log, "--transfer_json": self.transfer_json})

    def outputs(self) -> list[Path]:
        out = Path(self.out_dir)
        return ([out / "laten_training_loss.png"] if self.log else []) + [out / "laten_layer_map.png"]


def main(cfg: TrainingFigures):
    out_dir = Path(cfg.out_dir)
    teacher_layers, student_layers = cfg.teacher_layers, cfg.student_layers
    written = []
    record, title = None, ""
    if cfg.log:
        rows = load_jsonl(cfg.log, require=("step",))
        written.append(plot_loss(rows, out_dir / "laten_training_loss.png"))
        with_layers = [r for r in rows if any(r.get(k) for k in LAYER_KEYS)]
        if cfg.step is not None:
            with_layers = [r for r in with_layers if r.get("step") == cfg.step]
            if not with_layers:
                fail(f"--step {cfg.step}: no log row with that step and layer lists")
        if with_layers:
            record, title = with_layers[-1], f"LaTen layer mapping (step {with_layers[-1].get('step')})"
    if cfg.transfer_json:
        record = read_json(cfg.transfer_json, "--transfer_json")
        title = "LaTen layer mapping (transfer)"
        teacher_layers = teacher_layers or record.get("teacher_num_layers")
        student_layers = student_layers or record.get("student_num_layers")
    if record is not None:
        written.append(plot_layer_map(record, out_dir / "laten_layer_map.png", teacher_layers, student_layers, title))
    for w in written:
        print(w)


if __name__ == "__main__":
    from pkt.io import run_cli

    run_cli(main, TrainingFigures)
