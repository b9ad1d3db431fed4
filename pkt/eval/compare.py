"""One comparison table (markdown) and one bar chart for all methods' evaluation results (compare.py).

Each run directory holds what evaluate.py writes: `summary.json`
  {"model_path": ..., "tasks": {"gsm": {"accuracy": ..}, "mmlu": {"accuracy": ..}, "humaneval": {"pass@1": ..},
   "mbpp": {"pass@1": ..}, "nll": {"nll": ..}, "kl": {"kl": ..}}}
and, per task, `<task>/predictions.jsonl` (one record per item: per-example NLL / KL sums and token counts,
`correct` per question or per code sample). Metrics no run has are left out; missing ones are "-".
Accuracies / pass@1 are printed in percent: values in [0, 1] are read as fractions (`scale="auto"`).

Uncertainty (pkt.stats): each value carries its 95 % interval, `[low, high]`: NLL and KL by bootstrap over
examples, accuracies by Wilson (pass@1 with several samples per problem: bootstrap over problems). A value
marked `≈` differs from the reference row (the first run, or `reference`) by less than the noise: the paired
bootstrap interval of the difference, on the items both were scored on, contains 0.

Controls: `controls={"postpkt": ["lora_random", "lora_pissa"], ...}` adds, for each such row, the paired
differences row - control of NLL and KL with their intervals (`≈`: inside the noise), so that a transfer row
is read next to its no-transfer control.

Compute: once some run's model directory (`model_path`) holds a `pkt_budget.json` (pkt/budget.py), the table
adds what each method used ("-" for runs without one).

Runs evaluated under different protocols (the preset and the settings evaluate.py records per task) are
refused in one table unless `mixed_protocols`; then each run's protocol is listed under the table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pkt.budget import BUDGET_HEADERS, budget_cells, read_budget
from pkt.data import load_jsonl
from pkt.figures import pyplot, save_fig
from pkt.io import check_output, fail, parse_list, parse_named, write_text
from pkt.stats import Difference, bootstrap_ci, paired_difference, wilson_interval

# (column title, task, key, is a percentage)
METRICS = [("MMLU", "mmlu", "accuracy", True), ("GSM8K", "gsm", "accuracy", True),
           ("HumanEval", "humaneval", "pass@1", True), ("MBPP", "mbpp", "pass@1", True),
           ("NLL", "nll", "nll", False), ("KL to teacher", "kl", "kl", False)]
CONTROL_METRICS = ("NLL", "KL to teacher")     # the measures a control is compared on (they resolve small effects)
PAPER_ROWS = {"Llama-2-7b-chat (paper)": {"MMLU": 44.20, "GSM8K": 16.07, "HumanEval": 14.05, "MBPP": 17.80}}
NOISE = "≈"


def parse_runs(runs) -> list[tuple[str, Path]]:
    """'a=dir1,b=dir2', a list of 'name=dir' / 'dir' items, or a dict -> [(name, dir)] (unnamed: the dir's name)."""
    out = parse_named(runs, "--runs", default_name=lambda d: Path(d).name) if runs else []
    if not out:
        fail("--runs: give name=eval_dir pairs, e.g. --runs student=out/eval/student,laten=out/eval/laten")
    return [(name, Path(d)) for name, d in out]


def parse_controls(controls, names) -> dict[str, list[str]]:
    """'postpkt=lora_random+lora_pissa,laten=student' (or a dict of lists) -> {row: [control rows]}; every name
    must be a run of the table."""
    if not controls:
        return {}
    if isinstance(controls, dict):
        pairs = [(k, v if isinstance(v, (list, tuple)) else str(v).split("+")) for k, v in controls.items()]
    else:
        pairs = []
        for item in parse_list(controls, "--controls", unique=False):
            row, sep, ctrl = str(item).strip().partition("=")
            if not sep or not ctrl.strip():
                fail(f"--controls {item!r}: expected row=control or row=control1+control2")
            pairs.append((row, ctrl.split("+")))
    out = {}
    for row, ctrls in pairs:
        ctrls = [c.strip() for c in ctrls if c.strip()]
        for n in [row.strip(), *ctrls]:
            if n not in names:
                fail(f"--controls: {n!r} is not a run of --runs ({', '.join(names)})")
        if row.strip() in ctrls:
            fail(f"--controls: {row.strip()!r} cannot be its own control")
        out[row.strip()] = ctrls
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


def item_values(run_dir: Path, task: str) -> dict | None:
    """{item key: (value, weight)} from `<run_dir>/<task>/predictions.jsonl`: NLL / KL per example (its sum
    and token count), 1/0 per question (gsm, mmlu), the fraction of passing samples per problem (code tasks).
    None when the file is not there or predates per-item records."""
    p = Path(run_dir) / task / "predictions.jsonl"
    if not p.is_file():
        return None
    records = load_jsonl(p)
    if task in ("nll", "kl"):
        if not records or any(f"{task}_sum" not in r or "n_tokens" not in r for r in records):
            return None
        return {(r.get("dataset"), r.get("index"), r.get("id")): (float(r[f"{task}_sum"]), float(r["n_tokens"]))
                for r in records}
    if not records or any("correct" not in r for r in records):
        return None
    if task in ("humaneval", "mbpp"):
        per: dict = {}
        for r in records:
            per.setdefault(r.get("task_id"), []).append(float(bool(r["correct"])))
        return {k: (sum(v) / len(v), 1.0) for k, v in per.items()}
    return {r.get("id"): (float(bool(r["correct"])), 1.0) for r in records}


@dataclass
class Run:
    """One row: its values per column title, the per-item values behind them, their intervals, its budget."""
    name: str
    values: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)
    budget: dict | None = None


def _interval(items: dict | None, metrics: dict, key: str, pct: bool):
    """95 % interval of a column's value (in its display scale), or None when nothing supports one."""
    scale = 100.0 if pct else 1.0          # accuracies are fractions here, shown in percent
    if items:
        vals = [v for v, _ in items.values()]
        if not pct:
            lo, hi = bootstrap_ci(vals, [w for _, w in items.values()])
        elif all(v in (0.0, 1.0) for v in vals):
            lo, hi = wilson_interval(int(sum(vals)), len(vals))
        else:
            lo, hi = bootstrap_ci(vals)
        return lo * scale, hi * scale
    ci = metrics.get(f"{key}_ci")
    if not pct and isinstance(ci, list) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    n = metrics.get("n", metrics.get("n_tasks"))
    frac = metrics.get(key)
    if pct and isinstance(n, int) and n > 0 and isinstance(frac, (int, float)) and 0 <= frac <= 1:
        lo, hi = wilson_interval(round(frac * n), n)
        return lo * 100, hi * 100
    return None


def load_run(name: str, d: Path, scale: str = "auto", summary: dict | None = None) -> Run:
    """A row from `d/summary.json` and `d/<task>/predictions.jsonl`; percentages in 0..100."""
    summary = summary or read_summary(d)
    tasks = summary["tasks"]
    run = Run(name, budget=read_budget(summary.get("model_path")))    # <model_path>/pkt_budget.json, or None
    for title, task, key, pct in METRICS:
        v = _metric(tasks, task, key)
        fraction = v is not None and pct and (scale == "fraction" or (scale == "auto" and v <= 1.0))
        if fraction:
            v *= 100.0
        run.values[title] = v
        if v is None:
            continue
        items = item_values(d, task) if d.is_dir() else None
        if items:
            run.items[title] = items
        if pct and not fraction:        # a percentage given as such: no per-item scale to rebuild
            continue
        run.intervals[title] = _interval(items, tasks[task], key, pct)
    return run


def difference(a: Run, b: Run, title: str, pct: bool) -> Difference | None:
    """a - b on column `title` (display scale): paired on the items both were scored on when they are the same
    items, else each row's items resampled on its own; None without per-item values."""
    ia, ib = a.items.get(title), b.items.get(title)
    if not ia or not ib:
        return None
    scale = 100.0 if pct else 1.0
    if set(ia) == set(ib):
        keys = list(ia)
        d = paired_difference([ia[k][0] for k in keys], [ib[k][0] for k in keys],
                              [ia[k][1] for k in keys], [ib[k][1] for k in keys])
    else:
        d = paired_difference([v for v, _ in ia.values()], [v for v, _ in ib.values()],
                              [w for _, w in ia.values()], [w for _, w in ib.values()], unpaired=True)
    return Difference(d.diff * scale, d.low * scale, d.high * scale, d.paired)


def _num(v: float, pct: bool, signed: bool = False, tiny: bool = False) -> str:
    """2 decimals for percentages, 3 otherwise; `tiny` (a difference below the last digit): 2 significant."""
    return f"{v:{'+' if signed else ''}.{'1e' if tiny else f'{2 if pct else 3}f'}}"


def _cell(run: Run, title: str, pct: bool, mark: bool) -> str:
    v = run.values.get(title)
    if v is None:
        return "-"
    s = _num(v, pct)
    ci = run.intervals.get(title)
    if ci:
        lo, hi = ci
        s += f" [{lo:.1f}, {hi:.1f}]" if pct else f" [{lo:.3f}, {hi:.3f}]"
    return s + (f" {NOISE}" if mark else "")


def _diff_cell(d: Difference | None, pct: bool) -> str:
    if d is None:
        return "-"
    top = max(abs(d.diff), abs(d.low), abs(d.high))
    tiny = 0 < top < (0.005 if pct else 0.0005)       # would print as 0.00 / 0.000 although it is not 0
    return (f"{_num(d.diff, pct, True, tiny)} [{_num(d.low, pct, True, tiny)}, {_num(d.high, pct, True, tiny)}]"
            + (f" {NOISE}" if d.inside_noise else ""))


def markdown_table(rows: dict[str, Run], reference: str | None = None,
                   controls: dict[str, list[str]] | None = None) -> str:
    """The table: one column per metric some row has (value [95 % interval], `≈` when inside the noise of the
    reference row), the control columns when `controls` are given, the budget columns once a row has one;
    a legend under it."""
    metrics = [m for m in METRICS if any(r.values.get(m[0]) is not None for r in rows.values())]
    controls = controls or {}
    ctrl_metrics = [m for m in metrics if m[0] in CONTROL_METRICS] if controls else []
    budgets = any(r.budget for r in rows.values())
    ref = rows.get(reference) if reference else None
    head = (["model"] + [f"{t} (%)" if p else f"{t} (lower is better)" for t, _, _, p in metrics]
            + (["no-transfer control"] + [f"Δ {t} vs control" for t, _, _, _ in ctrl_metrics] if controls else [])
            + (list(BUDGET_HEADERS) if budgets else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in rows.items():
        cells = []
        for title, _, _, pct in metrics:
            d = difference(run, ref, title, pct) if ref is not None and run is not ref else None
            cells.append(_cell(run, title, pct, d is not None and d.inside_noise))
        if controls:
            ctrls = controls.get(name, [])
            cells.append(", ".join(ctrls) or "-")
            for title, _, _, pct in ctrl_metrics:
                cells.append("; ".join(_diff_cell(difference(run, rows[c], title, pct), pct) for c in ctrls) or "-")
        if budgets:
            cells += budget_cells(run.budget)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    legend = ["", "[low, high]: 95 % interval (NLL, KL: bootstrap over examples; accuracies: Wilson; pass@1 with "
              "several samples per problem: bootstrap over problems)."]
    if ref is not None:
        legend.append(f"{NOISE}: the difference from {reference} is inside the noise (the paired bootstrap 95 % "
                      "interval of the difference, on the same items, contains 0).")
    if controls:
        legend.append(f"Δ vs control: this row minus its no-transfer control, paired bootstrap 95 % interval; "
                      f"{NOISE}: inside the noise. Several controls are separated by ';'.")
    return "\n".join(lines + legend) + "\n"


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


def plot_scores(rows: dict[str, Run], out) -> str:
    """Grouped bars with their 95 % intervals: one group per metric, one bar per model (NLL and KL in their
    own panel)."""
    plt = pyplot()
    present = [m for m in METRICS if any(r.values.get(m[0]) is not None for r in rows.values())]
    pct = [m[0] for m in present if m[3]]
    other = [m[0] for m in present if not m[3]]
    panels = [(pct, "score (%)"), (other, "lower is better")]
    panels = [p for p in panels if p[0]] or [(["MMLU"], "score (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 2.2 * sum(len(p[0]) for p in panels), 4.2),
                             gridspec_kw={"width_ratios": [max(len(p[0]), 1) for p in panels]}, squeeze=False)
    names = list(rows)
    width = 0.8 / max(len(names), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metrics, label) in zip(axes[0], panels):
        for k, name in enumerate(names):
            run = rows[name]
            pts = [(i + (k - (len(names) - 1) / 2) * width, run.values.get(m), run.intervals.get(m))
                   for i, m in enumerate(metrics) if run.values.get(m) is not None]
            if not pts:
                continue
            xs, ys, cis = zip(*pts)
            err = [[max(y - ci[0], 0) if ci else 0 for y, ci in zip(ys, cis)],
                   [max(ci[1] - y, 0) if ci else 0 for y, ci in zip(ys, cis)]]
            bars = ax.bar(xs, ys, width, label=name, color=colors[k % len(colors)], yerr=err, capsize=2,
                          error_kw={"elinewidth": 0.8})
            ax.bar_label(bars, fmt="%.1f" if label.startswith("score") else "%.2f", fontsize=6, padding=1)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Parametric knowledge transfer: evaluation (bars: 95 % intervals)")
    fig.tight_layout()
    return save_fig(fig, out)


@dataclass
class CompareConfig:
    """--runs name1=dir1,name2=dir2 (or a list '[name1=dir1,name2=dir2]') [--out md] [--png png]
    [--reference NAME] [--controls row=control1+control2,row=control] [--paper_rows True]
    [--scale auto|fraction|percent] [--mixed_protocols True] [--overwrite True]
    (--out '' / --png '' skip that file; existing files are replaced only with --overwrite True).
    --reference: the row the ≈ marks compare with (default: the first run; '' for none). --controls: each
    transfer row's no-transfer control(s), shown as paired differences of NLL and KL."""
    runs: str | None = None
    out: str = "figures/demo_results.md"
    png: str = "figures/demo_scores.png"
    reference: str | None = None
    controls: str | None = None
    paper_rows: bool = False
    scale: str = "auto"
    mixed_protocols: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.scale not in ("auto", "fraction", "percent"):
            fail(f"--scale {self.scale!r}: expected auto, fraction or percent")


def compare(runs, out="figures/demo_results.md", png="figures/demo_scores.png", paper_rows=False, scale="auto",
            mixed_protocols=False, overwrite=False, reference=None, controls=None) -> str:
    """The markdown table (written to `out` and the bar chart to `png` when given)."""
    cfg = CompareConfig(runs, out, png, reference, controls, paper_rows, scale, mixed_protocols, overwrite)
    named = parse_runs(cfg.runs)
    names = [n for n, _ in named]
    ref = names[0] if cfg.reference is None else (cfg.reference or None)
    if ref is not None and ref not in names:
        fail(f"--reference {ref!r} is not a run of --runs ({', '.join(names)})")
    ctrl = parse_controls(cfg.controls, names)
    for flag, path in (("--out", cfg.out), ("--png", cfg.png)):
        if path:
            check_output(path, flag, cfg.overwrite, {f"--runs {name}": d for name, d in named})
    summaries = {name: read_summary(d) for name, d in named}
    diffs = protocol_differences(summaries)
    if diffs and not cfg.mixed_protocols:
        fail(f"--runs: different protocols in one table ({diffs[0]}); pass --mixed_protocols True to show them together")
    rows = {name: load_run(name, d, cfg.scale, summaries[name]) for name, d in named}
    if cfg.paper_rows:
        rows.update({k: Run(k, values=dict(v)) for k, v in PAPER_ROWS.items()})
    table = markdown_table(rows, ref, ctrl) + (protocol_notes(summaries) if diffs else "")
    if cfg.out:
        write_text(cfg.out, table)
    if cfg.png:
        plot_scores(rows, cfg.png)
    return table


def main(cfg: CompareConfig | None = None, **flags) -> None:
    """Print the table (and write --out/--png). Callable as main(cfg) or main(runs=..., out=..., ...)."""
    cfg = cfg or CompareConfig(**flags)
    print(compare(**vars(cfg)), end="")
