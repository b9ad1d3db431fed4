"""Shared plumbing for the figure scripts: Agg backend, JSON reading, output checks, atomic PNG writes."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from pkt.io import atomic_path, check_output, fail, read_json  # noqa: F401  (fail, read_json: for the scripts)


def check_figures(outputs, flag: str, overwrite: bool, inputs: dict) -> None:
    """Refuse before any work: an existing figure / JSON unless --overwrite, and an output that is, contains
    or lies inside an input."""
    for out in outputs:
        check_output(out, flag, overwrite, inputs)


def save_fig(fig, out) -> str:
    """Write `fig` as PNG to `out` atomically and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(out)
