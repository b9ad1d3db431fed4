"""Where LaTen's located neurons sit: one raster row per student layer, x = neuron index.

    python analysis/plot_neurons.py --transfer_json outputs/.../laten_transfer.json --out figures/laten_neurons.png

`laten_transfer.json` keys used: student_ffn_layers, student_ffn_neurons (one index list per layer),
student_attn_layers, student_attn_neurons, intermediate_size (FFN width) and hidden_size (attention
width) of the student; optional student_num_layers (rows to draw).
"""
from __future__ import annotations

from dataclasses import dataclass

from pkt.figures import check_figures, pyplot, save_fig
from pkt.io import fail, read_json


def _panel(ax, layers, neurons, width, kind, color, n_layers=None):
    from matplotlib.ticker import MaxNLocator

    layers = [int(i) for i in layers or []]
    neurons = neurons or []
    if len(neurons) != len(layers):
        fail(f"student_{kind}_neurons has {len(neurons)} lists for {len(layers)} student_{kind}_layers")
    total = 0
    for layer, idx in zip(layers, neurons):
        idx = [int(i) for i in idx]
        total += len(idx)
        ax.scatter(idx, [layer] * len(idx), marker="|", s=40, color=color, linewidths=0.8)
    if width:
        ax.set_xlim(-0.5, int(width) - 0.5)
    n_rows = max(int(n_layers or 0), (max(layers) + 1) if layers else 1)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("student layer")
    ax.set_xlabel(f"{kind.upper()} neuron index" + (f" (of {width})" if width else ""))
    frac = f", {100 * total / (int(width) * len(layers)):.1f}% of those layers" if width and layers else ""
    ax.set_title(f"{kind.upper()}: {total} neurons in {len(layers)} layers{frac}", fontsize=9)
    ax.grid(alpha=0.2)


def plot_neurons(record: dict, out) -> str:
    plt = pyplot()

    if not record.get("student_ffn_layers") and not record.get("student_attn_layers"):
        fail("no student_ffn_layers / student_attn_layers to draw")
    n_layers = record.get("student_num_layers") or record.get("num_hidden_layers")
    fig, axes = plt.subplots(2, 1, figsize=(9, 7))
    _panel(axes[0], record.get("student_ffn_layers"), record.get("student_ffn_neurons"),
           record.get("intermediate_size"), "ffn", "tab:blue", n_layers)
    _panel(axes[1], record.get("student_attn_layers"), record.get("student_attn_neurons"),
           record.get("hidden_size"), "attn", "tab:orange", n_layers)
    fig.suptitle("LaTen located neurons in the student")
    fig.tight_layout()
    return save_fig(fig, out)


@dataclass
class NeuronsFigure:
    """--transfer_json laten_transfer.json --out figures/laten_neurons.png (an existing --out is an error
    unless --overwrite True)."""
    transfer_json: str
    out: str = "figures/laten_neurons.png"
    overwrite: bool = False

    def __post_init__(self):
        check_figures([self.out], "--out", self.overwrite, {"--transfer_json": self.transfer_json})


def main(cfg: NeuronsFigure):
    print(plot_neurons(read_json(cfg.transfer_json, "--transfer_json"), cfg.out))


if __name__ == "__main__":
    from pkt.io import run_cli

    run_cli(main, NeuronsFigure)
