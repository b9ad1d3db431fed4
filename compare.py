"""One comparison table (markdown) and one bar chart for all methods' evaluation results.

    python compare.py --runs student=out/eval/student,laten=out/eval/laten,teacher=out/eval/teacher \
        --out figures/demo_results.md --png figures/demo_scores.png [--paper_rows True] [--overwrite True]

Each run directory holds the `summary.json` written by evaluate.py:
  {"model_path": ..., "tasks": {"gsm": {"accuracy": ..}, "mmlu": {"accuracy": ..},
   "humaneval": {"pass@1": ..}, "mbpp": {"pass@1": ..}, "nll": {"nll": ..}}}
Missing tasks are shown as "-". Accuracies / pass@1 are printed in percent: values in [0, 1] are
read as fractions (`--scale auto`, the default), `--scale fraction|percent` forces one reading.
`--paper_rows` adds the paper's reported Llama-2-7b-chat row (a reference, not comparable with small
demo models).

Compute: once some run's model directory (`model_path`) holds a `pkt_budget.json` (pkt/budget.py), the
table adds what each method used (teacher / student forward and backward tokens, optimizer steps, examples;
"-" for runs without one).

Runs evaluated under different protocols (the preset and the settings evaluate.py records per task:
shots, chat format, samples, temperature, limits, ...) are refused in one table unless
`--mixed_protocols True`; then each run's protocol is listed under the table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pkt.budget import BUDGET_HEADERS, budget_cells, read_budget
from pkt.io import atomic_path, check_output, fail, run_cli, write_text

# (column title, task, key, is a percentage)
METRICS = [("MMLU", "mmlu", "accuracy", True), ("GSM8K", "gsm", "accuracy", True),
           ("HumanEval", "humaneval", "pass@1", True), ("MBPP", "mbpp", "pass@1", True),
           ("NLL", "nll", "nll", False)]
PAPER_ROWS = {"Llama-2-7b-chat (paper)": {"MMLU": 44.20, "GSM8K": 16.07, "HumanEval": 14.05, "MBPP": 17.80}}


def parse_runs(runs) -> list[tuple[str, Path]]:
    """'a=dir1,b=dir2', a list of 'name=dir' / 'dir' items, or a dict -> [(name, dir)]."""
    if isinstance(runs, dict):
        items = [f"{k}={v}" for k, v in runs.items()]
    elif isinstance(runs, str):
        items = [s for s in runs.split(",") if s.strip()]
    elif isinstance(runs, (list, tuple)):
        items = [str(s) for s in runs]
    else:
        items = []
    if not items:
        fail("--runs: give name=eval_dir pairs, e.g. --runs student=out/eval/student,laten=out/eval/laten")
    out, seen = [], set()
    for item in items:
        name, _, d = item.strip().partition("=")
        if not d:
            name, d = Path(name).name, name
        name = name.strip()
        if name in seen:
            fail(f"--runs: name {name!r} given twice")
        seen.add(name)
        out.append((name, Path(d.strip())))
    return out


def _metric(tasks: dict, task: str, key: str):
    v = (tasks.get(task) or {}).get(key) if isinstance(tasks.get(task), dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def read_summary(d: Path) -> dict:
    """`d/summary.json` (or the file `d`) as written by evaluate.py."""
    p = d / "summary.json" if d.is_dir() or not d.suffix else d
    if not p.is_file():
        fail(f"--runs: {p} not found (run evaluate.py with --output_dir {d})")
    try:
        summary = json.loads(p.read_text())
    except ValueError as e:
        fail(f"{p}: not JSON ({e})")
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), dict):
        fail(f"{p}: no 'tasks' object")
    return summary


def load_run(d: Path, scale: str = "auto", summary: dict | None = None) -> dict:
    """{column title: value} from `d/summary.json`; percentages in 0..100."""
    summary = summary or read_summary(d)
    tasks = summary["tasks"]
    row = {}
    for title, task, key, pct in METRICS:
        v = _metric(tasks, task, key)
        if v is not None and pct and (scale == "fraction" or (scale == "auto" and v <= 1.0)):
            v *= 100.0
        row[title] = v
    row["budget"] = read_budget(summary.get("model_path"))     # <model_path>/pkt_budget.json, or None
    return row


def protocol_of(summary: dict, task: str) -> dict:
    """What a task's number depends on besides the model: the preset and the recorded settings
    ({} for summaries written before evaluate.py recorded them)."""
    m = summary["tasks"].get(task)
    if not isinstance(m, dict) or "protocol" not in m:
        return {}
    return {"protocol": m["protocol"], **(m.get("settings") or {})}


def protocol_differences(summaries: dict[str, dict]) -> list[str]:
    """One line per task whose protocol differs between runs: `gsm: a and b differ in shots (8 vs 0)`."""
    out = []
    for _, task, _, _ in METRICS:
        seen = [(name, protocol_of(s, task)) for name, s in summaries.items() if task in s["tasks"]]
        for name, proto in seen[1:]:
            first, ref = seen[0]
            if proto != ref:
                keys = sorted(set(proto) | set(ref), key=str)
                k = next(k for k in keys if proto.get(k) != ref.get(k))
                out.append(f"{task}: {first} and {name} differ in {k} ({ref.get(k, 'not recorded')} vs "
                           f"{proto.get(k, 'not recorded')})")
                break
    return out


def protocol_notes(summaries: dict[str, dict]) -> str:
    """Under a mixed table: each run's protocol per task."""
    lines = ["", "Protocols differ between runs:"]
    for name, s in summaries.items():
        parts = [f"{t}: " + (", ".join(f"{k}={v}" for k, v in protocol_of(s, t).items()) or "not recorded")
                 for _, t, _, _ in METRICS if t in s["tasks"]]
        lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def markdown_table(rows: dict[str, dict]) -> str:
    budgets = any(row.get("budget") for row in rows.values())    # compute columns once some run has them
    cols = [m[0] for m in METRICS] + (list(BUDGET_HEADERS) if budgets else [])
    head = "| model | " + " | ".join([f"{c} (%)" if p else f"{c} (lower is better)" for c, _, _, p in METRICS]
                                     + cols[len(METRICS):]) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, row in rows.items():
        cells = [("-" if row.get(c) is None else f"{row[c]:.2f}" if p else f"{row[c]:.3f}")
                 for c, _, _, p in METRICS] + (budget_cells(row.get("budget")) if budgets else [])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(rows: dict[str, dict], out) -> str:
    """Grouped bars: one group per metric, one bar per model (NLL in its own panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pct = [m[0] for m in METRICS if m[3] and any(r.get(m[0]) is not None for r in rows.values())]
    other = [m[0] for m in METRICS if not m[3] and any(r.get(m[0]) is not None for r in rows.values())]
    panels = [(pct, "score (%)"), (other, "NLL (lower is better)")]
    panels = [p for p in panels if p[0]] or [(["MMLU"], "score (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 2.2 * sum(len(p[0]) for p in panels), 4.2),
                             gridspec_kw={"width_ratios": [max(len(p[0]), 1) for p in panels]}, squeeze=False)
    names = list(rows)
    width = 0.8 / max(len(names), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metrics, label) in zip(axes[0], panels):
        for k, name in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(metrics))]
            ys = [rows[name].get(m) for m in metrics]
            bars = ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
                          width, label=name, color=colors[k % len(colors)])
            ax.bar_label(bars, fmt="%.1f" if label.startswith("score") else "%.2f", fontsize=6, padding=1)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Parametric knowledge transfer: evaluation")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(out)


@dataclass
class CompareConfig:
    """--runs name1=dir1,name2=dir2 (or a list '[name1=dir1,name2=dir2]') [--out md] [--png png]
    [--paper_rows True] [--scale auto|fraction|percent] [--mixed_protocols True] [--overwrite True]
    (--out '' / --png '' skip that file; existing files are replaced only with --overwrite True)."""
    runs: str | None = None
    out: str = "figures/demo_results.md"
    png: str = "figures/demo_scores.png"
    paper_rows: bool = False
    scale: str = "auto"
    mixed_protocols: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.scale not in ("auto", "fraction", "percent"):
            fail(f"--scale {self.scale!r}: expected auto, fraction or percent")


def compare(runs, out="figures/demo_results.md", png="figures/demo_scores.png", paper_rows=False, scale="auto",
            mixed_protocols=False, overwrite=False) -> str:
    """The markdown table (written to `out` and the bar chart to `png` when given)."""
    cfg = CompareConfig(runs, out, png, paper_rows, scale, mixed_protocols, overwrite)
    named = parse_runs(cfg.runs)
    for flag, path in (("--out", cfg.out), ("--png", cfg.png)):
        if path:
            check_output(path, flag, cfg.overwrite, {f"--runs {name}": d for name, d in named})
    summaries = {name: read_summary(d) for name, d in named}
    diffs = protocol_differences(summaries)
    if diffs and not cfg.mixed_protocols:
        fail(f"--runs: different protocols in one table ({diffs[0]}); pass --mixed_protocols True to show them together")
    rows = {name: load_run(d, cfg.scale, summaries[name]) for name, d in named}
    if cfg.paper_rows:
        rows.update({k: dict(v) for k, v in PAPER_ROWS.items()})
    table = markdown_table(rows) + (protocol_notes(summaries) if diffs else "")
    if cfg.out:
        write_text(cfg.out, table)
    if cfg.png:
        plot_scores(rows, cfg.png)
    return table


def main(cfg: CompareConfig | None = None, **flags) -> None:
    """Print the table (and write --out/--png). Callable as main(cfg) or main(runs=..., out=..., ...)."""
    cfg = cfg or CompareConfig(**flags)
    print(compare(**vars(cfg)), end="")


if __name__ == "__main__":
    run_cli(main, CompareConfig)
