"""One way to write a figure: matplotlib's Agg backend (no display on a GPU node or in CI), outputs checked
before any work, PNGs written atomically (a kill leaves the old file or none, never half a PNG)."""
from __future__ import annotations

from pathlib import Path

from pkt.io import atomic_path, check_output


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: plotting is optional for most stages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_figures(outputs, flag: str, overwrite: bool, inputs: dict) -> None:
    """Refuse before any work: an existing figure / JSON unless --overwrite, and an output that is, contains
    or lies inside an input."""
    for out in outputs:
        check_output(out, flag, overwrite, inputs)


def save_fig(fig, out) -> str:
    """Write `fig` as PNG to `out` atomically and close it."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return str(out)
