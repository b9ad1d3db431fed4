"""compare.py's table: intervals in every cell, `≈` where a row is inside the noise of the reference, each
transfer row's paired difference to its no-transfer control."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from pkt.eval.compare import compare
from pkt.io import PKTError
from pkt.stats import bootstrap_ci, paired_difference, wilson_interval


def _run(d, nll_per_token, correct, n_tokens=None):
    """An evaluate.py-like directory: nll per example (sum, tokens) and gsm correctness per question."""
    d.mkdir(parents=True)
    n_tokens = n_tokens or [10] * len(nll_per_token)
    nll = [{"dataset": "toy", "index": i, "id": f"t{i}", "nll_sum": v * t, "n_tokens": t, "nll": v}
           for i, (v, t) in enumerate(zip(nll_per_token, n_tokens))]
    gsm = [{"id": i, "correct": bool(c)} for i, c in enumerate(correct)]
    for task, recs in (("nll", nll), ("gsm", gsm)):
        (d / task).mkdir()
        (d / task / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    pooled = sum(r["nll_sum"] for r in nll) / sum(n_tokens)
    (d / "summary.json").write_text(json.dumps({"model_path": str(d), "tasks": {
        "nll": {"nll": pooled, "n_tokens": sum(n_tokens)},
        "gsm": {"accuracy": sum(correct) / len(correct), "n": len(correct)}}}))
    return f"{d.name}={d}"


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 1.0, 30)
    correct = [int(x) for x in rng.integers(0, 2, 30)]
    return {
        "student": _run(tmp_path / "student", base, correct),
        "noise": _run(tmp_path / "noise", base + rng.normal(0, 0.05, 30), correct),   # a wobble, no shift
        "better": _run(tmp_path / "better", base - 0.3 + rng.normal(0, 0.02, 30), [1] * 30),
    }, base, correct


def _rows(table):
    return {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}


def test_cells_carry_bootstrap_and_wilson_intervals(runs):
    r, base, correct = runs
    table = compare(r["student"], out=None, png=None)
    cells = _rows(table)["student"]
    lo, hi = bootstrap_ci(base * 10, [10] * 30)
    assert cells[2] == f"{np.mean(base):.3f} [{lo:.3f}, {hi:.3f}]"
    wlo, whi = wilson_interval(sum(correct), 30)
    assert cells[1] == f"{100 * sum(correct) / 30:.2f} [{100 * wlo:.1f}, {100 * whi:.1f}]"
    assert "[low, high]: 95 % interval" in table


def test_rows_inside_the_noise_of_the_reference_are_marked(runs):
    r, _, _ = runs
    rows = _rows(compare(",".join(r.values()), out=None, png=None))
    assert rows["noise"][2].endswith("≈") and rows["noise"][1].endswith("≈")     # same answers: inside the noise
    assert not rows["better"][2].endswith("≈") and not rows["better"][1].endswith("≈")
    assert not rows["student"][2].endswith("≈")                                  # the reference itself


def test_the_reference_row_can_be_chosen_or_dropped(runs):
    r, _, _ = runs
    rows = _rows(compare(",".join(r.values()), out=None, png=None, reference="better"))
    assert rows["student"][2].rstrip().endswith("]") and not rows["better"][2].endswith("≈")
    assert "≈: the difference" not in compare(",".join(r.values()), out=None, png=None, reference="")
    with pytest.raises(PKTError, match="--reference 'nope'"):
        compare(",".join(r.values()), out=None, png=None, reference="nope")


def test_control_columns_show_the_paired_difference_to_each_control(runs, tmp_path):
    r, base, _ = runs
    table = compare(",".join(r.values()), out=None, png=None, controls="better=student+noise")
    head = table.splitlines()[0]
    assert "| no-transfer control | Δ NLL vs control |" in head
    cells = _rows(table)["better"]
    assert cells[3] == "student, noise"
    better = [json.loads(line)["nll"] for line in open(tmp_path / "better" / "nll" / "predictions.jsonl")]
    d = paired_difference(np.array(better) * 10, base * 10, [10] * 30, [10] * 30)
    first = cells[4].split("; ")[0]
    assert first == f"{d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" and d.high < 0
    assert _rows(table)["student"][3] == "-"


def test_controls_must_name_runs_of_the_table(runs):
    r, _, _ = runs
    with pytest.raises(PKTError, match="--controls: 'lora' is not a run"):
        compare(",".join(r.values()), out=None, png=None, controls="better=lora")
    with pytest.raises(PKTError, match="expected row=control"):
        compare(",".join(r.values()), out=None, png=None, controls="better")
    with pytest.raises(PKTError, match="its own control"):
        compare(",".join(r.values()), out=None, png=None, controls="better=better")


def test_rows_scored_on_different_items_are_compared_unpaired(tmp_path):
    a = _run(tmp_path / "a", [3.0, 3.2, 2.8, 3.1], [1, 0, 1, 0])
    d = tmp_path / "b"
    b = _run(d, [3.0, 3.1, 2.9], [1, 0, 0])                 # another draw: items differ
    rows = _rows(compare(f"{a},{b}", out=None, png=None))
    assert rows["b"][2].endswith("≈")


def test_metrics_no_run_has_are_left_out_and_summaries_without_items_still_get_wilson(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"model_path": "m", "tasks": {"mmlu": {"accuracy": 0.5, "n": 40}}}))
    table = compare(f"old={d}", out=None, png=None)
    assert table.splitlines()[0] == "| model | MMLU (%) |"
    lo, hi = wilson_interval(20, 40)
    assert f"50.00 [{100 * lo:.1f}, {100 * hi:.1f}]" in table


def test_cli_writes_the_table_and_the_bars(runs, tmp_path):
    r, _, _ = runs
    md, png = tmp_path / "t.md", tmp_path / "b.png"
    p = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--runs", ",".join(r.values()),
                        "--controls", "better=student", "--out", str(md), "--png", str(png)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert md.read_text() == p.stdout and "| better |" in p.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
