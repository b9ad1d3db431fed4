"""The demo's wiring: `demo.sh --quick` runs every stage's real script on tiny models built in code."""
import os
import subprocess

from conftest import ROOT


def test_demo_quick_runs_every_stage_and_writes_table_and_figures(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "demo"))
    r = subprocess.run(["bash", "demo.sh", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    figures = tmp_path / "demo" / "figures"
    table = (figures / "demo_results.md").read_text()
    for name in ("student", "laten", "postpkt", "semalign", "teacher"):
        assert f"| {name} |" in table
    for png in ("demo_scores.png", "laten_training_loss.png", "laten_layer_map.png", "laten_neurons.png",
                "similarity_representation.png", "similarity_parametric.png"):
        assert (figures / png).stat().st_size > 1000
    assert "total wall-clock" in r.stdout
