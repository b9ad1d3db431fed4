"""Shared plumbing for the figure scripts: Agg backend, JSON reading, atomic PNG writes."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from pkt.io import atomic_path, fail


def read_json(path, what: str):
    p = Path(path)
    if not p.is_file():
        fail(f"{what} {p}: no such file")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        fail(f"{what} {p}: not JSON ({e})")


def save_fig(fig, out) -> str:
    """Write `fig` as PNG to `out` atomically and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(out)
