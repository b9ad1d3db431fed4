"""The demo's wiring: `demo.sh --quick` runs every stage's real script on tiny models built in code, writes
only under its output directory, and prints a table whose transfer rows have their no-transfer controls."""
import hashlib
import os
import subprocess

from conftest import ROOT

ROWS = ("student", "laten", "postpkt", "lora_random", "lora_pissa", "semalign", "kd", "teacher")


def _tracked_figures():
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((ROOT / "figures").iterdir())}


def test_demo_quick_runs_every_stage_writes_only_under_out_and_compares_with_controls(tmp_path):
    before = _tracked_figures()
    env = dict(os.environ, OUT=str(tmp_path / "demo"), README_FIGURES=str(tmp_path / "readme_figures"))
    r = subprocess.run(["bash", "demo.sh", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert _tracked_figures() == before                       # the README's figures are not touched
    figures = tmp_path / "demo" / "figures"
    table = (figures / "demo_results.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert set(ROWS) <= set(rows)
    assert "no-transfer control" in rows["model"] and "KL to teacher" in rows["model"]
    assert "| lora_random, lora_pissa |" in rows["postpkt"] and "| student |" in rows["laten"]
    assert " [" in rows["student"] and "1 | 2 |" in rows["kd"]         # intervals; KD's steps / examples
    for png in ("demo_scores.png", "laten_training_loss.png", "laten_layer_map.png", "laten_neurons.png",
                "similarity_representation.png", "similarity_parametric.png"):
        assert (figures / png).stat().st_size > 1000
    assert "total wall-clock" in r.stdout

    # refreshing the README's figures is its own step, a copy of the finished run
    r = subprocess.run(["bash", "demo.sh", "--quick", "--refresh_figures"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "readme_figures" / "demo_results.md").read_text() == table
    assert (tmp_path / "readme_figures" / "similarity_parametric.png").is_file()


def test_demo_refuses_unknown_arguments_and_pairs():
    for args in (["--fast"], ["--pair", "llama"]):
        r = subprocess.run(["bash", "demo.sh", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error:"), r.stderr
