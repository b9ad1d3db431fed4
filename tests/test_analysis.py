"""Figure scripts and the comparison table on synthetic logs / JSON (no models)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG, path


def _train_log(path, steps=5):
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 3.0 / s, "lm_loss": 2.0 / s, "mse_loss": 1.0 / s,
                                "lr": 1e-3 * (1 - s / (steps + 1)), "seconds": 0.5,
                                "teacher_ffn_layers": [0, 2, 5], "student_ffn_layers": [0, 1, 2],
                                "teacher_attn_layers": [1, 3], "student_attn_layers": [0, 2]}) + "\n")
    return path


def _transfer_json(path):
    path.write_text(json.dumps({
        "student_ffn_layers": [0, 2], "student_ffn_neurons": [[1, 5, 9], [0, 159]],
        "student_attn_layers": [1], "student_attn_neurons": [[3, 4, 60]],
        "teacher_ffn_layers": [0, 3], "teacher_attn_layers": [2],
        "intermediate_size": 160, "hidden_size": 64}))
    return path


def _summary(d, tasks):
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({"model_path": str(d), "tasks": tasks}))
    return d


def test_training_figures(tmp_path):
    from analysis.plot_training import TrainingFigures, main

    log = _train_log(tmp_path / "train_log.jsonl")
    main(TrainingFigures(log=str(log), out_dir=str(tmp_path / "fig")))
    _png(tmp_path / "fig" / "laten_training_loss.png")
    _png(tmp_path / "fig" / "laten_layer_map.png")
    # a given step, and the layer map from a laten_transfer.json
    main(TrainingFigures(log=str(log), out_dir=str(tmp_path / "fig2"), step=3))
    _png(tmp_path / "fig2" / "laten_layer_map.png")
    main(TrainingFigures(transfer_json=str(_transfer_json(tmp_path / "t.json")), out_dir=str(tmp_path / "fig3")))
    _png(tmp_path / "fig3" / "laten_layer_map.png")
    assert not (tmp_path / "fig3" / "laten_training_loss.png").exists()


def test_training_bad_step_is_user_error(tmp_path):
    from analysis.plot_training import TrainingFigures, main
    from pkt.io import PKTError

    with pytest.raises(PKTError, match="--step 99"):
        main(TrainingFigures(log=str(_train_log(tmp_path / "l.jsonl")), out_dir=str(tmp_path), step=99))


def test_neurons_figure(tmp_path):
    from analysis.plot_neurons import NeuronsFigure, main, plot_neurons
    from pkt.io import PKTError

    out = tmp_path / "n.png"
    main(NeuronsFigure(transfer_json=str(_transfer_json(tmp_path / "t.json")), out=str(out)))
    _png(out)
    with pytest.raises(PKTError, match="lists for"):
        plot_neurons({"student_ffn_layers": [0, 1], "student_ffn_neurons": [[1]]}, tmp_path / "x.png")


def test_compare_table_and_bars(tmp_path, capsys):
    from pkt.eval import compare

    a = _summary(tmp_path / "student", {"gsm": {"accuracy": 0.25}, "mmlu": {"accuracy": 0.5},
                                        "nll": {"nll": 2.5}})
    b = _summary(tmp_path / "laten", {"gsm": {"accuracy": 0.3}, "humaneval": {"pass@1": 0.1},
                                      "mbpp": {"pass@1": 0.2}, "mmlu": {"accuracy": 0.55}, "nll": {"nll": 2.25}})
    md, png = tmp_path / "figs" / "demo_results.md", tmp_path / "figs" / "demo_scores.png"
    compare.main(runs=f"student={a},laten={b}", out=str(md), png=str(png), paper_rows=True)
    table = md.read_text()
    assert table == capsys.readouterr().out
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | MMLU (%) | GSM8K (%)")
    assert lines[2] == "| student | 50.00 | 25.00 | - | - | 2.500 |"
    assert lines[3] == "| laten | 55.00 | 30.00 | 10.00 | 20.00 | 2.250 |"
    assert lines[4] == "| Llama-2-7b-chat (paper) | 44.20 | 16.07 | 14.05 | 17.80 | - |"
    _png(png)
    # list form, unnamed dir, percent scale
    rows = compare.compare([str(a)], out=None, png=None, scale="percent")
    assert "| student | 0.50 | 0.25 |" in rows


def test_compare_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--runs", f"x={tmp_path / 'nope'}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --runs") and "summary.json" in r.stderr
    assert r.stderr.count("\n") == 1
